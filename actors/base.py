"""The actor model every component is written in, independent of any transport.

An actor is a state machine with one handler per message kind (`on_<kind>(msg, req)`, where
`req` is the body decoded into its catalogue class and checked once, before the handler runs;
vsva.actors.catalogue). A handler either returns the reply body at once, or is a generator that yields `Call` / `Gather` to
send requests and is resumed with their replies: that keeps a multi-step kernel flow (the
vmm's trap -> host bind -> notifier acks -> wait completion) readable top to bottom, in one
function, like the kernel function it models.

The runtime drives an actor through four entry points only: `start`, `deliver`, `expire`
and `peer_down`; each returns the envelopes to send. Both runtimes (ZeroMQ processes and
the deterministic scheduler) use exactly these, so the actor code is the same in both. Code
outside the actor starts work on it with `run_task` (it returns the envelopes to send too).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Generator, Hashable
from dataclasses import dataclass, field
from heapq import heapify, heappop, heappush
from itertools import count
from operator import itemgetter
from types import GeneratorType
from typing import Any, TypeVar

from vsva.actors import errno as E
from vsva.actors.catalogue import ORCHESTRATOR, Message, Ping, Shutdown, Snapshot, TraceSync, lookup
from vsva.actors.memory import PhysMem
from vsva.actors.messages import ADOPTED_CLOCK_MAX, Envelope

DEFAULT_TIMEOUT = 5.0
_NO_TIMEOUTS: dict[str, float] = {}  # (read only: no per-kind timeouts configured)
_ADDED = itemgetter(1)  # a timer's place in the order the requests were added
TIMER_SLACK = 64  # deadlines of answered requests an actor keeps beyond 2 per pending one


@dataclass(slots=True)
class Call:
    """A request to another actor; the yielding handler resumes with its reply body.

    `msg` is a message of the catalogue; a bare kind with a `body` map is accepted for
    tests and toy protocols that put arbitrary bodies on the wire."""

    dst: str
    msg: Message | str
    body: dict[str, Any] | None = None
    timeout: float | None = None
    flow: str | None = None  # tag this request (and what it causes) with a flow id, e.g. "F2#1"

    def wire(self) -> tuple[str, dict[str, Any]]:
        """The request's kind and body as they go on the wire."""
        msg = self.msg
        if isinstance(msg, str):
            return msg, {} if self.body is None else self.body
        return msg.KIND, msg.body()


@dataclass(slots=True)
class Gather:
    """Several requests sent at once; the handler resumes with the list of reply bodies."""

    calls: list[Call]


@dataclass(slots=True)
class Wait:
    """Park the handler until another handler calls `self.wake(key, body)` (it resumes with
    body), or until `timeout` passes (it resumes with an indefinite -ETIMEDOUT). For waits on
    an event that arrives as a separate message, e.g. a page response matched to its request."""

    key: Hashable
    timeout: float


def failed(ret: int, indefinite: bool = False, **extra: Any) -> dict[str, Any]:
    """A reply body for an error; `indefinite` marks outcomes the caller cannot know."""
    body: dict[str, Any] = {"ret": ret, **extra}
    if indefinite:
        body["indefinite"] = True
    return body


@dataclass
class ActorEnv:
    """What a runtime gives an actor: its configuration, memory and a random stream."""

    config: dict[str, Any] = field(default_factory=dict)
    mem: PhysMem | None = None  # the shared physical memory, for the actors that touch it
    seed: int = 0
    log: Callable[[str], None] = lambda line: None


Body = dict[str, Any]  # a message or reply body as on the wire: a msgpack map
Step = Call | Gather | Wait  # what a handler yields to wait
T = TypeVar("T")
# A handler (or a helper it delegates to with `yield from`) that waits by yielding Steps and
# returns T. What it is resumed with depends on the step (a reply body for a Call or a Wait,
# the list of bodies for a Gather), so the send type stays open.
Steps = Generator[Step, Any, T]
Handler = Steps[Body | None]  # the body it returns is the reply (None: {"ret": 0})


@dataclass(slots=True)
class _Task:
    """A running handler: the generator, the request it answers and what it waits for."""

    gen: Handler
    request: Envelope | None
    flow: str
    waiting: dict[int, int] = field(default_factory=dict)  # request id -> slot
    results: list[Any] = field(default_factory=list)
    gather: bool = False


class Actor:
    """Base class: message dispatch, request/reply bookkeeping, clocks and ids."""

    def __init__(self, name: str, env: ActorEnv):
        self.name = name
        self.env = env
        self.config = env.config
        self.mem = env.mem
        self.rng = random.Random(f"{env.seed}:{name}")
        self.now = 0.0
        self.clock = 0
        self.stopping = False
        self.dropped_replies = 0
        self._next_id = 0
        self._out: list[Envelope] = []
        self._tasks: dict[int, _Task] = {}  # request id -> the task waiting for it
        # One (deadline, order added, request id) per request of _tasks, earliest first. A request
        # that is answered stays in the heap until it comes to the top (or the heap is compacted):
        # an entry counts only while its id is in _tasks (ids are never reused)
        self._timers: list[tuple[float, int, int]] = []
        self._added = count()
        # Told every new deadline (the deterministic runtime keeps one heap over all its actors)
        self.timer_added: Callable[[float], None] | None = None
        self._dst_of: dict[int, str] = {}  # request id -> peer it went to
        # request id -> its kind (to check the reply's schema), when it was sent, its timeout
        self._sent: dict[int, tuple[str, float, float]] = {}
        self.timeouts: list[dict[str, Any]] = []  # every request of ours that timed out
        self._flow = ""
        self._log_times: dict[str, list[float]] = {}
        self._waits: dict[Hashable, int] = {}  # Wait key -> pseudo request id (negative) in _tasks
        self._wait_ids = 0

    @property
    def memory(self) -> PhysMem:
        """The shared physical memory: the host, the vmms and the guests run with it."""
        if self.mem is None:
            raise RuntimeError(f"{self.name} was started without physical memory")
        return self.mem

    # ---- runtime entry points -------------------------------------------------------
    def start(self, now: float) -> list[Envelope]:
        """Called once before any message; runs `on_start` if the actor has one."""
        self.now = now
        starter = getattr(self, "on_start", None)
        if starter is not None:
            self._run(starter, None, "")
        return self._drain()

    def deliver(self, msg: Envelope, now: float) -> list[Envelope]:
        """Handle one incoming envelope (request, one-way message or reply)."""
        self.now = now
        clock = msg.clock if msg.clock < ADOPTED_CLOCK_MAX else ADOPTED_CLOCK_MAX
        self.clock = (clock if clock > self.clock else self.clock) + 1
        corr = msg.corr
        if corr is None:
            self._dispatch(msg)
        elif corr < 0 or self._dst_of.get(corr) != msg.src:
            # Wait ids are never on the wire, and a reply counts only from the peer its
            # request went to (request ids are guessable: they count up from 1)
            self.dropped_replies += 1
        else:
            self._resume_with(corr, self._checked_reply(msg, corr))
        out, self._out = self._out, []  # (_drain, inline: this runs for every message)
        return out

    def expire(self, now: float) -> list[Envelope]:
        """Fail every request whose deadline has passed with an indefinite -ETIMEDOUT, in the
        order the requests were made (the ones that come due while these resume wait for the
        next call)."""
        self.now = now
        timers, tasks = self._timers, self._tasks
        due = []
        while timers and timers[0][0] <= now:
            timer = heappop(timers)
            if timer[2] in tasks:
                due.append(timer)
        due.sort(key=_ADDED)
        for _, _, req_id in due:
            self._resume_with(req_id, self._timed_out(req_id))
        return self._drain()

    def _timed_out(self, req_id: int) -> dict[str, Any]:
        """The reply a request that timed out gets: what it was, to whom, how long it waited
        (also kept in `timeouts`, for the reports)."""
        if req_id not in self._sent:  # a Wait: a timeout is what it waits for
            return failed(-E.ETIMEDOUT, indefinite=True)
        kind, sent, timeout = self._sent[req_id]
        rec = {
            "actor": self.name,
            "kind": kind,
            "peer": self._dst_of.get(req_id, ""),
            "elapsed_s": round(self.now - sent, 3),
            "timeout_s": round(timeout, 3),
        }
        self.timeouts.append(rec)
        return failed(
            -E.ETIMEDOUT,
            indefinite=True,
            timed_out=rec,
            error=f"{kind} to {rec['peer']}: no reply after {rec['elapsed_s']} s",
        )

    def peer_down(self, peer: str, now: float, sent: bool = True) -> list[Envelope]:
        """Fail requests in flight to a dead peer: indefinite if they were sent, else definite."""
        self.now = now
        for req_id in [r for r in self._tasks if self._dst_of.get(r) == peer]:
            self._resume_with(req_id, failed(-E.EHOSTDOWN, indefinite=sent))
        on_down = getattr(self, "on_peer_down", None)
        if on_down is not None:
            self._run(on_down, None, "", peer)
        return self._drain()

    def send_failed(self, env: Envelope, now: float) -> list[Envelope]:
        """The runtime could not hand `env` to its peer: a request fails definitely."""
        self.now = now
        if not env.is_reply and env.id in self._tasks:
            self._resume_with(env.id, failed(-E.EHOSTDOWN))
        return self._drain()

    def run_task(self, fn: Callable[[], Any], now: float) -> list[Envelope]:
        """Entry point for code outside the actor (a driver, a test harness): start `fn` at
        `now` as a task that answers no request (a generator may yield Call, Gather, Wait);
        returns the envelopes to send, like `deliver`."""
        self.now = now
        self.spawn(fn)
        return self._drain()

    def next_deadline(self) -> float | None:
        """The earliest deadline of a request or Wait still pending (None: none is)."""
        timers, tasks = self._timers, self._tasks
        while timers and timers[0][2] not in tasks:
            heappop(timers)
        return timers[0][0] if timers else None

    @property
    def busy(self) -> bool:
        """True while any handler waits for a reply."""
        return bool(self._tasks)

    # ---- what handlers use ------------------------------------------------------------
    def send(self, dst: str, event: Message, flow: str | None = None) -> None:
        """A one-way message (no reply expected); `flow` tags it (default: the handler's flow)."""
        self._emit(dst, event.KIND, event.body(), rr=False, flow=flow)

    def spawn(self, fn: Callable[[], Handler | Body | None]) -> None:
        """Start `fn` as a separate task that answers no request (from a handler: its
        messages leave with the handler's)."""
        self._run(fn, None, "")

    def wake(self, key: Hashable, body: Body) -> bool:
        """Resume the handler parked on `Wait(key)` with `body`; False if none waits (any more)."""
        req_id = self._waits.pop(key, None)
        if req_id is None or req_id not in self._tasks:
            return False
        self._resume_with(req_id, body)
        return True

    def log(self, key: str, line: str, per_second: int = 5) -> None:
        """Rate-limited log line (requests come from untrusted parties, like dev_err_ratelimited)."""
        wall = time.monotonic()
        recent = [t for t in self._log_times.get(key, []) if wall - t < 1.0]
        if len(recent) < per_second:
            recent.append(wall)
            self.env.log(f"{self.name}: {line}")
        self._log_times[key] = recent

    def snapshot(self) -> dict[str, Any]:
        """The actor's state for the audit; actors extend it."""
        return {"name": self.name, "pending": len(self._tasks), "dropped_replies": self.dropped_replies}

    def on_snapshot(self, msg: Envelope, req: Snapshot) -> dict[str, Any]:
        return {"ret": 0, "state": self.snapshot()}

    def on_ping(self, msg: Envelope, req: Ping) -> dict[str, Any]:
        return {"ret": 0}

    def on_trace_sync(self, msg: Envelope, req: TraceSync) -> dict[str, Any]:
        """Only the answer: writing the trace before it leaves is the process runtime's."""
        return {"ret": 0}

    def on_shutdown(self, msg: Envelope, req: Shutdown) -> dict[str, Any]:
        self.stopping = True
        return {"ret": 0}

    # ---- internals ----------------------------------------------------------------------
    def _dispatch(self, msg: Envelope) -> None:
        """Decode the body into its message class once; refuse what does not fit."""
        cls = lookup(msg.kind)
        if cls is None:
            self._refuse(msg, -E.EOPNOTSUPP, f"unknown message kind {msg.kind!r}")
            return
        handler = getattr(self, f"on_{msg.kind}", None)
        if handler is None:
            self._refuse(msg, -E.EOPNOTSUPP, f"{self.name} does not handle {msg.kind}")
            return
        if cls.CONTROL and msg.src not in (ORCHESTRATOR, self.name):
            self._refuse(msg, -E.EPERM, f"only {ORCHESTRATOR} may send {msg.kind}")
            return
        req = cls.parse(msg.body)
        if isinstance(req, str):
            self._refuse(msg, -E.EINVAL, req)
            return
        self._run(handler, msg, msg.flow, msg, req)

    def _refuse(self, msg: Envelope, ret: int, why: str) -> None:
        self.log(f"bad:{msg.kind}", f"refused {msg.kind} from {msg.src}: {why} ({E.name(ret)})")
        if msg.rr:
            self._reply(msg, failed(ret, error=why))

    def _checked_reply(self, msg: Envelope, corr: int) -> dict[str, Any]:
        """A reply from the wire (to request `corr`), checked against that request's schema."""
        cls = lookup(self._sent[corr][0])  # deliver saw `corr` in _dst_of: it is in _sent too
        why = cls.REPLY.check(msg.body) if cls is not None and cls.REPLY is not None else None
        if why is None:
            return msg.body
        self.log(f"badreply:{msg.kind}", f"refused reply from {msg.src}: {why}")
        return failed(-E.EBADMSG, error=why)

    def _run(
        self, fn: Callable[..., Handler | Body | None], request: Envelope | None, flow: str, *args: Any
    ) -> None:
        """Run `fn(*args)` as the handler of `request` (None: a task that answers nobody)."""
        previous, self._flow = self._flow, flow
        try:
            result = fn(*args)
        except Exception as exc:  # a handler bug must not kill the actor
            self._crashed(request, exc)
            return
        finally:
            self._flow = previous
        # A handler's generator is a native one (the exact type test is the cheap case); a
        # reply body is a dict and no Generator
        if type(result) is GeneratorType or (type(result) is not dict and isinstance(result, Generator)):
            self._step(_Task(result, request, flow or (request.flow if request else "")), None)
        elif request is not None and request.rr:
            self._reply(request, result if result is not None else {"ret": 0})

    def _step(self, task: _Task, value: Any) -> None:
        """Advance a handler generator until it waits or finishes."""
        previous, self._flow = self._flow, task.flow
        try:
            yielded = task.gen.send(value)
        except StopIteration as stop:
            if task.request is not None and task.request.rr:
                self._reply(task.request, stop.value if stop.value is not None else {"ret": 0})
            return
        except Exception as exc:
            self._crashed(task.request, exc)
            return
        finally:
            self._flow = previous
        self._wait(task, yielded)

    def _wait(self, task: _Task, yielded: Any) -> None:
        if isinstance(yielded, Wait):
            self._park(task, yielded)
            return
        gather = isinstance(yielded, Gather)
        calls = yielded.calls if gather else [yielded]
        for call in calls:
            if not isinstance(call, Call):
                self._crashed(task.request, TypeError(f"handler yielded {yielded!r}"))
                return
        task.gather = gather
        task.results = [None] * len(calls)
        task.waiting = waiting = {}
        if not calls:
            self._step(task, [])
            return
        now = self.now
        # A request's timeout: its Call's own, else its kind's (config "timeouts", scaled to
        # what that kind waits for: vsva.ops.pacing), else the actor's request_timeout.
        base: float = self.config.get("request_timeout", DEFAULT_TIMEOUT)
        by_kind: dict[str, float] = self.config.get("timeouts", _NO_TIMEOUTS)
        msg: Message | str | None = None
        wire: tuple[str, dict[str, Any]] = ("", {})
        for slot, call in enumerate(calls):
            if call.msg is not msg or type(msg) is str:  # a message sent to several peers
                msg, wire = call.msg, call.wire()  # (the notifier's) has one wire body
            (kind, body), dst = wire, call.dst
            req_id = self._emit(dst, kind, body, rr=True, flow=task.flow if call.flow is None else call.flow)
            waiting[req_id] = slot
            timeout = by_kind.get(kind, base) if call.timeout is None else call.timeout
            self._pend(req_id, task, now + timeout)
            self._sent[req_id] = (kind, now, timeout)
            self._dst_of[req_id] = dst

    def _park(self, task: _Task, wait: Wait) -> None:
        """A Wait is a request to nobody: a negative id in _tasks, so expire() times it out."""
        if wait.key in self._waits and self._waits[wait.key] in self._tasks:
            self._crashed(task.request, ValueError(f"two handlers wait on {wait.key!r}"))
            return
        self._wait_ids -= 1
        req_id = self._wait_ids
        task.gather, task.results, task.waiting = False, [None], {req_id: 0}
        self._waits[wait.key] = req_id
        self._pend(req_id, task, self.now + wait.timeout)

    def _pend(self, req_id: int, task: _Task, deadline: float) -> None:
        """`task` waits for `req_id` until `deadline`."""
        self._tasks[req_id] = task
        timers = self._timers
        heappush(timers, (deadline, next(self._added), req_id))
        if len(timers) > 2 * len(self._tasks) + TIMER_SLACK:  # mostly answered requests: drop those
            tasks = self._tasks
            timers[:] = [timer for timer in timers if timer[2] in tasks]
            heapify(timers)
        if self.timer_added is not None:
            self.timer_added(deadline)

    def _resume_with(self, req_id: int, body: dict[str, Any]) -> None:
        task = self._tasks.pop(req_id, None)
        if task is None:
            self.dropped_replies += 1  # a reply after its timeout, or a forged correlation id
            return
        self._dst_of.pop(req_id, None)
        self._sent.pop(req_id, None)
        if req_id < 0:  # a Wait that timed out: forget its key
            for key in [k for k, r in self._waits.items() if r == req_id]:
                del self._waits[key]
        task.results[task.waiting.pop(req_id)] = body if isinstance(body, dict) else failed(-E.EBADMSG)
        if not task.waiting:
            self._step(task, task.results if task.gather else task.results[0])

    def _crashed(self, request: Envelope | None, exc: Exception) -> None:
        self.log("crash", f"handler for {request.kind if request else 'start'} failed: {exc!r}")
        if request is not None and request.rr:
            self._reply(request, failed(-E.EIO, error=f"{type(exc).__name__}: {exc}"))

    def _reply(self, request: Envelope, body: dict[str, Any]) -> None:
        self._emit(request.src, request.kind, body, rr=False, corr=request.id, flow=request.flow)

    def _emit(
        self,
        dst: str,
        kind: str,
        body: dict[str, Any],
        *,
        rr: bool,
        corr: int | None = None,
        flow: str | None = None,
    ) -> int:
        self._next_id += 1
        self.clock += 1
        tag = self._flow if flow is None else flow
        # positional (a call with keywords costs twice as much): src, dst, kind, body, id, corr, rr, clock, flow
        self._out.append(Envelope(self.name, dst, kind, body, self._next_id, corr, rr, self.clock, tag))
        return self._next_id

    def _drain(self) -> list[Envelope]:
        out, self._out = self._out, []
        return out
