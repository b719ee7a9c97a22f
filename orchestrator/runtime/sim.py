"""The deterministic in-process runtime: every actor in one process, one seed fixes the order.

Messages between each ordered pair of actors stay FIFO (as over one ZeroMQ connection); which
pair's head is delivered next is drawn from a seeded random stream, so one seed is one
interleaving and replays exactly. Time is virtual: it advances a fixed step per delivery and
jumps to the next deadline when nothing is in flight, so timeouts fire deterministically too.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from heapq import heapify, heappop, heappush
from itertools import count
from typing import Any, TypeVar

from vsva.actors import actor_class
from vsva.actors.base import Actor, ActorEnv, Call, Steps
from vsva.actors.memory import PhysMem
from vsva.actors.messages import Envelope, decode, encode
from vsva.analysis.trace import record
from vsva.ops.topology import Topology

STEP = 20e-6  # virtual seconds per delivery (about one same-CPU ZeroMQ hop)
TIMER_SLACK = 1024  # deadlines of answered requests the runtime keeps beyond 2 per actor
A = TypeVar("A", bound=Actor)


class SimRuntime:
    """Runs a topology's actors (plus any extra, e.g. the controller) in one process."""

    def __init__(
        self,
        topology: Topology,
        seed: int | None = None,
        *,
        wire: bool = True,
        log: Callable[[str], None] | None = None,
    ):
        self.topology = topology
        self.seed = topology.seed if seed is None else seed
        self.rng = random.Random(f"sched:{self.seed}")
        self.mem = PhysMem.anonymous(topology.mem_frames)
        self.wire = wire  # round-trip every envelope through msgpack, as the real transport does
        self.logs: list[str] = []
        self._log = log or self.logs.append
        self.actors: dict[str, Actor] = {}
        self.links: dict[tuple[str, str], deque[Envelope]] = {}
        self.trace: list[dict[str, Any]] = []
        self.now = 0.0
        self.delivered = 0
        self.dead: set[str] = set()
        self.held: set[tuple[str, str]] = set()
        # The actors' deadlines in one heap, as (deadline, the actor's place in `actors`): for
        # every actor with a request pending there is an entry no later than its next deadline
        # (each new deadline is pushed; an entry taken out is put back as the actor's next one).
        # What an entry says is checked against the actor before it counts.
        self._timers: list[tuple[float, int]] = []
        self._compact_at = TIMER_SLACK
        self._places = count()
        self._place_of: dict[str, int] = {}  # actor name -> its place (the order `actors` keeps)
        self._at: dict[int, str] = {}  # place -> actor name
        for spec in topology.actors:
            self.add(actor_class(spec.kind)(spec.name, self.env(spec.config)))

    def env(self, config: dict[str, Any]) -> ActorEnv:
        return ActorEnv(config=config, mem=self.mem, seed=self.seed, log=self._log)

    def add(self, actor: A) -> A:
        """Make `actor` part of the run (one of the same name is replaced, in its place)."""
        name = actor.name
        replaced = self.actors.get(name)
        if replaced is not None:
            replaced.timer_added = None
            place = self._place_of[name]
        else:
            place = next(self._places)
            self._place_of[name], self._at[place] = place, name
        self.actors[name] = actor
        timers = self._timers
        actor.timer_added = lambda deadline: heappush(timers, (deadline, place))
        deadline = actor.next_deadline()
        if deadline is not None:
            heappush(timers, (deadline, place))
        return actor

    def _actor_at(self, place: int) -> Actor | None:
        """The actor in `place`, if it is still part of the run."""
        name = self._at.get(place)
        return self.actors.get(name) if name is not None and self._place_of.get(name) == place else None

    def start(self) -> None:
        for actor in list(self.actors.values()):
            self._post(actor, actor.start(self.now))

    # ---- delivery --------------------------------------------------------------------------
    def _post(self, sender: Actor, envs: list[Envelope]) -> None:
        for env in envs:
            self.trace.append(record(env, self.now))
            if env.dst not in self.actors:
                self._post(sender, sender.send_failed(env, self.now))
                continue
            if self.wire:
                env = decode(encode(env))
            self.links.setdefault((env.src, env.dst), deque()).append(env)

    def inject(self, env: Envelope) -> None:
        """Put a raw envelope on the wire (tests of bad input from a hostile party)."""
        self.trace.append(record(env, self.now))
        self.links.setdefault((env.src, env.dst), deque()).append(env)

    def step(self) -> bool:
        """Deliver one message; False when nothing is in flight."""
        ready = sorted(k for k, q in self.links.items() if q and k not in self.held)
        if not ready:
            return False
        link = ready[self.rng.randrange(len(ready))]
        env = self.links[link].popleft()
        self.now += STEP
        actor = self.actors.get(env.dst)
        if actor is not None:
            self.delivered += 1
            self._post(actor, actor.deliver(env, self.now))
        self._fire_due()
        return True

    def _fire_due(self) -> None:
        """Fire every deadline virtual time has reached: a timer is due whether or not other
        messages are in flight (one VM's busy loop must not hold back another's lease). The
        actors due fire in the order of `actors`, each once."""
        timers, now = self._timers, self.now
        if len(timers) > self._compact_at:
            self._compact()
        if not timers or timers[0][0] > now:
            return
        places = set()
        while timers and timers[0][0] <= now:
            places.add(heappop(timers)[1])
        for place in sorted(places):
            actor = self._actor_at(place)
            if actor is None:
                continue
            deadline = actor.next_deadline()
            if deadline is not None and deadline <= now:
                self._post(actor, actor.expire(now))
                deadline = actor.next_deadline()
            if deadline is not None:
                heappush(timers, (deadline, place))

    def _expire_due(self) -> bool:
        """Advance virtual time to the earliest deadline and fire it; False if there is none."""
        timers = self._timers
        while timers:
            deadline, place = timers[0]
            actor = self._actor_at(place)
            current = actor.next_deadline() if actor is not None else None
            if current == deadline:
                break
            heappop(timers)  # answered since (or its actor is gone): put back its next deadline
            if current is not None:
                heappush(timers, (current, place))
        else:
            return False
        self.now = max(self.now, deadline)
        self._fire_due()
        return True

    def _compact(self) -> None:
        """Keep one entry per actor with a deadline (the heap grows by one per request)."""
        self._at = {place: name for place, name in self._at.items() if self._place_of.get(name) == place}
        timers = self._timers
        timers[:] = [
            (deadline, place)
            for place, name in self._at.items()
            if name in self.actors and (deadline := self.actors[name].next_deadline()) is not None
        ]
        heapify(timers)
        self._compact_at = 2 * len(self.actors) + TIMER_SLACK

    def run(self, until: Callable[[], bool] | None = None, max_steps: int = 2_000_000) -> int:
        """Deliver until `until()` holds or the system is quiescent; returns deliveries made."""
        before = self.delivered
        for _ in range(max_steps):
            if until is not None and until():
                break
            if not self.step() and not self._expire_due():
                break
        else:
            raise RuntimeError(f"no quiescence after {max_steps} steps (livelock?)")
        return self.delivered - before

    # ---- faults ------------------------------------------------------------------------------
    def hold(self, src: str, dst: str) -> None:
        """Stop delivering src -> dst (a slow link, a stalled work queue) until `release`."""
        self.held.add((src, dst))

    def release(self, src: str, dst: str) -> None:
        self.held.discard((src, dst))

    def kill(self, name: str) -> None:
        """The actor's process dies: its queues vanish, its peers see it go."""
        self.actors.pop(name, None)
        self._place_of.pop(name, None)
        self.dead.add(name)
        for link in [k for k in self.links if name in k]:
            del self.links[link]
        for actor in list(self.actors.values()):
            self._post(actor, actor.peer_down(name, self.now))

    def run_task(self, name: str, fn: Callable[[], Any]) -> None:
        """Start `fn` as a task of actor `name` from outside (a driver, a test): see
        `Actor.run_task`; its messages go on the wire, `run` delivers them."""
        actor = self.actors[name]
        self._post(actor, actor.run_task(fn, self.now))

    def call(
        self,
        dst: str,
        kind: str,
        body: dict[str, Any] | None = None,
        src: str = "orch",
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        """Send one request from outside the system and run until its reply (for tests)."""
        found = self.actors.get(src)
        if found is not None and not isinstance(found, _Probe):
            raise ValueError(f"{src!r} is an actor of the run; call() sends as a probe of another name")
        probe = found if found is not None else self.add(_Probe(src, self.env({})))
        self._post(probe, probe.send_request(dst, kind, body or {}, timeout, self.now))
        self.run(until=lambda: probe.reply is not None)
        reply, probe.reply = probe.reply, None
        return reply if reply is not None else {"ret": None, "error": "no reply"}


class _Probe(Actor):
    """A stand-in caller for `SimRuntime.call`: one request at a time."""

    reply: dict[str, Any] | None = None

    def send_request(
        self, dst: str, kind: str, body: dict[str, Any], timeout: float, now: float
    ) -> list[Envelope]:
        def ask() -> Steps[None]:
            self.reply = yield Call(dst, kind, body, timeout=timeout)

        return self.run_task(ask, now)
