"""An actor's timers: `next_deadline` and `expire` against the spec, a scan of every pending
request's deadline in the order the requests were made (what the actor did before it kept its
deadlines in a heap). Both actors get the same random schedule of requests made, answered,
refused, cancelled (peer down, woken) and timed out; everything they do must be the same."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from vsva.actors import base
from vsva.actors import errno as E
from vsva.actors.base import Actor, ActorEnv, Call, Gather, Wait
from vsva.actors.messages import Envelope

PEERS = ("p1", "p2", "p3")
TIMEOUTS = (0.0, 0.5, 1.0, 1.5, 2.5, 5.0)  # few values: many deadlines tie


class Toy(Actor):
    """Runs the programs it is given; each step's outcome goes to `seen`."""

    def __init__(self) -> None:
        super().__init__("toy", ActorEnv())
        self.seen: list[tuple[Any, ...]] = []

    def program(self, label: int, steps: list[tuple[Any, ...]]) -> Any:
        def run() -> Any:
            for n, step in enumerate(steps):
                what = step[0]
                if what == "call":
                    got = yield Call(step[1], f"t{label}.{n}", {}, timeout=step[2])
                elif what == "gather":
                    got = yield Gather(
                        [Call(p, f"t{label}.{n}.{i}", {}, timeout=t) for i, (p, t) in enumerate(step[1])]
                    )
                elif what == "wait":
                    got = yield Wait(("k", step[1]), step[2])
                else:  # wake another task's Wait, from inside this one
                    got = self.wake(("k", step[1]), {"ret": 0, "by": label})
                self.seen.append((label, n, outcome(got)))

        return run


class ScanSpec(Toy):
    """The spec: every request's deadline kept in the order it was made, scanned each time."""

    def __init__(self) -> None:
        super().__init__()
        self.deadlines: dict[int, float] = {}

    def _pend(self, req_id: int, task: Any, deadline: float) -> None:
        super()._pend(req_id, task, deadline)
        self.deadlines[req_id] = deadline

    def next_deadline(self) -> float | None:
        return min((d for r, d in self.deadlines.items() if r in self._tasks), default=None)

    def expire(self, now: float) -> list[Envelope]:
        self.now = now
        for req_id in [r for r, d in self.deadlines.items() if r in self._tasks and d <= now]:
            self._resume_with(req_id, self._timed_out(req_id))
        return self._drain()


def outcome(got: Any) -> Any:
    if isinstance(got, list):
        return tuple(outcome(g) for g in got)
    if isinstance(got, dict):
        return (got.get("ret"), got.get("indefinite", False), got.get("by"))
    return got


steps = st.lists(
    st.one_of(
        st.tuples(st.just("call"), st.sampled_from(PEERS), st.sampled_from(TIMEOUTS)),
        st.tuples(
            st.just("gather"),
            st.lists(st.tuples(st.sampled_from(PEERS), st.sampled_from(TIMEOUTS)), min_size=0, max_size=3),
        ),
        st.tuples(st.just("wait"), st.integers(0, 3), st.sampled_from(TIMEOUTS)),
        st.tuples(st.just("wake"), st.integers(0, 3)),
    ),
    min_size=1,
    max_size=4,
)
spawn = st.tuples(st.just("spawn"), steps)
ops = st.lists(
    st.one_of(
        spawn,
        spawn,
        spawn,
        st.tuples(st.just("reply"), st.integers(0, 50), st.booleans()),
        st.tuples(st.just("down"), st.sampled_from(PEERS), st.booleans()),
        st.tuples(st.just("send_failed"), st.integers(0, 50)),
        st.tuples(st.just("wake"), st.integers(0, 3)),
        st.tuples(st.just("tick"), st.sampled_from((0.0, 0.25, 0.5, 1.0, 2.0))),
        st.tuples(st.just("tick"), st.sampled_from((0.0, 0.25, 0.5, 1.0, 2.0))),
    ),
    min_size=8,
    max_size=80,
)


def play(actor: Toy, schedule: list[tuple[Any, ...]]) -> list[Any]:
    """Run `schedule` on `actor`; everything it did, step by step."""
    now, sent, record = 0.0, [], []
    for n, op in enumerate(schedule):
        what = op[0]
        if what == "spawn":
            out = actor.run_task(actor.program(n, op[1]), now)
        elif what == "reply" and sent:
            req = sent[op[1] % len(sent)]
            src = next(p for p in PEERS if p != req.dst) if op[2] else req.dst  # a forged reply
            out = actor.deliver(Envelope(src, actor.name, req.kind, {"ret": 0}, 10_000 + n, req.id), now)
        elif what == "down":
            out = actor.peer_down(op[1], now, sent=op[2])
        elif what == "send_failed" and sent:
            out = actor.send_failed(sent[op[1] % len(sent)], now)
        elif what == "wake":
            out = [actor.wake(("k", op[1]), {"ret": 0, "by": "outside"})]
        elif what == "tick":
            now += op[1]
            out = actor.expire(now)
        else:
            out = []
        sent += [env for env in out if isinstance(env, Envelope) and env.rr]
        wire = [env.to_wire() if isinstance(env, Envelope) else env for env in out]
        record.append((n, wire, actor.next_deadline(), actor.busy, actor.dropped_replies, list(actor.seen)))
    record.append(("timeouts", actor.timeouts))
    return record


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])  # loaded machines
@given(ops)
@example([("spawn", [("call", "p1", 1.0)]), ("spawn", [("wait", 0, 1.0)]), ("tick", 1.0)])  # a tie
def test_deadlines_and_the_order_they_fire_in_are_the_scans(schedule):
    assert play(Toy(), schedule) == play(ScanSpec(), schedule)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])  # loaded machines
@given(ops)
def test_the_same_with_the_heap_compacted_at_every_request(schedule):
    slack, base.TIMER_SLACK = base.TIMER_SLACK, 0
    try:
        assert play(Toy(), schedule) == play(ScanSpec(), schedule)
    finally:
        base.TIMER_SLACK = slack


def test_answered_requests_do_not_pile_up_behind_a_long_wait():
    """A Wait of 1,000 s stays pending while 2,000 requests of 5 s are made and answered: the
    deadlines of the answered ones are dropped (the heap stays bounded by the pending ones)."""
    actor = Toy()
    actor.run_task(actor.program(0, [("wait", 0, 1000.0)]), 0.0)
    most = 0
    for n in range(2000):
        [req] = actor.run_task(actor.program(n + 1, [("call", "p1", 5.0)]), float(n))
        actor.deliver(Envelope("p1", "toy", req.kind, {"ret": 0}, 0, req.id), float(n))
        most = max(most, len(actor._timers))
        assert actor.next_deadline() == 1000.0
    assert most <= 2 * 2 + base.TIMER_SLACK + 1  # 2 pending at most: the Wait and one request
    assert len(actor.seen) == 2000 and actor.expire(1000.0) == [] and not actor.busy
    assert actor.seen[-1] == (0, 0, (-E.ETIMEDOUT, True, None))
