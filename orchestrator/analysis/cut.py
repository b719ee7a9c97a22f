"""The live audit's cut: one global state that no flow is inside, on a topology that keeps working.

Snapshots arrive one actor after another. On a busy topology a bind can be done on the host
and not yet in its vmm's shadow (the reply is on its way), so the audit, whose invariants
(I3, I5) hold where no flow is in progress, would report violations that never existed.

How the cut is taken: pause, drain, snapshot, resume (as a hypervisor stops a VM's vCPUs,
drains the I/O in flight and saves device state).
1. `quiesce` to every guest: it starts no new flow instance (a lease of HOLD_S, so a lost
   resume cannot stop the VMs for good) and answers once every request it has in flight got
   its reply. Guests are where every flow starts; every other actor answers only after the
   work it was asked for is done, so a drained guest has no work of its own anywhere.
2. Settle: the host's FREE acknowledgements are the one piece of work that outlives its
   reply (the reclaim policy answers the free, then collects the acks): wait until no PASID
   is reclaiming.
3. Every actor's snapshot; 4. `resume` to every guest.
A Chandy-Lamport snapshot was not chosen: it records a state that is consistent but may be
in the middle of a flow (the svm on the host, the bind's reply in a channel, the vmm's
handler suspended), so the audit would have to replay the recorded channels and handlers
through the protocol to judge I3 and I5; and it needs a marker on every channel into every
actor, while the peers here come and go (bounded, evicted peer tables) and the host works
on its own timers (page request timeouts). Pausing costs the guests the cut's duration
(`Cut.costs`: measured by benchmarks/bench_audit_cut.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vsva.actors import errno as E
from vsva.actors.base import Actor, Body, Call, Gather, Steps, Wait
from vsva.actors.catalogue import PoolStatus, Quiesce, Resume, Snapshot
from vsva.ops.topology import HOST, Topology

HOLD_S = 10.0  # a guest holds new work this long at most without a resume
SETTLE_LIMIT_S = 10.0
SETTLE_TICK_S = 0.005
TURN_LIMIT_S = 60.0  # a cut waits this long at most for the one before it


@dataclass
class Cut:
    """What a cut collected: the snapshots, why each missing or unsound part is missing
    (`incomplete`, one line each), and what the pause cost (`costs`, seconds)."""

    snapshots: dict[str, Body] = field(default_factory=dict)
    incomplete: list[str] = field(default_factory=list)
    costs: dict[str, float] = field(default_factory=dict)


class CutTaker:
    """Takes cuts for one orchestrator actor, one at a time: a second audit waits for the
    first, whose resume would otherwise end the second one's hold."""

    def __init__(self, actor: Actor, topology: Topology):
        self.actor = actor
        self.topology = topology
        self.busy = False
        self.queue: list[tuple[str, int]] = []
        self.turns = 0

    def take(self, names: list[str], answer_s: float) -> Steps[Cut]:
        """The cut over the listed actors (each asked to answer within `answer_s`); returns a Cut."""
        if self.busy:
            self.turns += 1
            key = ("cut turn", self.turns)
            self.queue.append(key)
            turn = yield Wait(key, TURN_LIMIT_S)
            if turn.get("ret"):
                self.queue.remove(key)
                return Cut(incomplete=[f"another audit held the topology for {TURN_LIMIT_S} s"])
        self.busy = True
        cut = yield from self._cut(names, answer_s)
        if self.queue:
            self.actor.wake(self.queue.pop(0), {"ret": 0})  # the turn passes on: still busy
        else:
            self.busy = False
        return cut

    def _cut(self, names: list[str], answer_s: float) -> Steps[Cut]:
        actor, cut = self.actor, Cut()
        guests = [n for n in names if self.topology.spec(n).kind == "guest"]
        t0 = actor.now
        drain = max(0.0, answer_s - 0.5)  # a guest answers why before the request times out
        held = yield Gather([Call(g, Quiesce(hold=HOLD_S, drain=drain), timeout=answer_s) for g in guests])
        silent = {g for g, r in zip(guests, held) if r.get("ret") == -E.ETIMEDOUT}
        cut.incomplete += [_why(g, r, answer_s) for g, r in zip(guests, held) if r.get("ret")]
        t_drained = actor.now
        reclaiming = yield from settle(actor, answer_s)
        if reclaiming:
            cut.incomplete.append(
                f"{HOST}: {reclaiming} PASID(s) still waited for FREE acknowledgements after "
                f"{SETTLE_LIMIT_S} s (the snapshots may show a teardown in progress)"
            )
        t_settled = actor.now
        asked = [n for n in names if n not in silent]
        replies = yield Gather([Call(n, Snapshot(), timeout=answer_s) for n in asked])
        cut.snapshots = {n: r["state"] for n, r in zip(asked, replies) if r.get("ret") == 0 and "state" in r}
        cut.incomplete += [_why(n, r, answer_s) for n, r in zip(asked, replies) if n not in cut.snapshots]
        t_snapped = actor.now
        yield Gather([Call(g, Resume(), timeout=answer_s) for g in guests if g not in silent])
        cut.costs = {
            "drain_s": t_drained - t0,
            "settle_s": t_settled - t_drained,
            "snapshot_s": t_snapped - t_settled,
            "held_s": actor.now - t0,  # no guest started new work for at most this long
        }
        return cut


def _why(name: str, reply: Body, answer_s: float) -> str:
    """One line of `incomplete` for an actor whose part of the cut is missing."""
    ret = reply.get("ret", -E.EIO)
    if ret == -E.ETIMEDOUT:
        return f"{name} did not answer in {answer_s} s"
    if ret == -E.EBUSY and "in_flight" in reply:
        return f"{name}: {reply['error']}"
    return f"{name} refused its part of the cut ({E.name(ret)})"


def settle(
    actor: Actor, answer_s: float, limit: float = SETTLE_LIMIT_S, tick: float = SETTLE_TICK_S
) -> Steps[int]:
    """Wait until the host has no PASID waiting for FREE acknowledgements (step 2), for
    `limit` seconds of the actor's clock at most (each poll answered within `answer_s`, so a
    slow host stretches the wait by one poll, not by one per tick); returns how many PASIDs
    were still reclaiming when it gave up (0: settled, or the host could not say)."""
    end = actor.now + limit
    while True:
        status = yield Call(HOST, PoolStatus(), timeout=answer_s)
        reclaiming = int(status.get("reclaiming", 0)) if status.get("ret") == 0 else 0
        if not reclaiming or actor.now >= end:
            return reclaiming
        yield Wait(("settle", actor.now), timeout=tick)


def cut_limit_s(answer_s: float) -> float:
    """The longest a cut takes once it has its turn: the quiesce, the last poll of the settle
    past its limit, the snapshots and the resume each answer within `answer_s` (one Gather
    each), the settle polls for SETTLE_LIMIT_S plus one tick."""
    return 4 * answer_s + SETTLE_LIMIT_S + SETTLE_TICK_S
