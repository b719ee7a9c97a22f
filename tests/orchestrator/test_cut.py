"""The live audit's cut (vsva.analysis.cut) ends within `cut_limit_s`, whatever the host does:
`vsva audit` waits for two cuts at most (vsva.ops.control.AUDIT_REPLY_S), so a cut that
outlived that bound would be reported as a supervisor that does not answer. On the
deterministic runtime, with every delivery slowed to 2.5 ms (a host behind a long queue)."""

from __future__ import annotations

import pytest

from vsva.analysis.cut import SETTLE_LIMIT_S, cut_limit_s
from vsva.ops.control import AUDIT_ANSWER_S, Orchestrator
from vsva.ops.pacing import orch_config
from vsva.ops.topology import ORCH
from vsva.runtime import sim

SLOW_STEP = 2.5e-3  # virtual seconds per delivery: a poll of the host costs 5 ms, as much as a tick


@pytest.fixture
def slow(monkeypatch):
    monkeypatch.setattr(sim, "STEP", SLOW_STEP)


def live_audit(w) -> dict:
    """One audit_live of the orchestrator's actor on world `w`, run to its end."""
    orch = w.rt.add(Orchestrator(w.t, env=w.rt.env(orch_config(w.t))))
    out: list[dict] = []

    def task():
        out.append((yield from orch.audit_live()))

    w.rt.run_task(ORCH, task)
    w.rt.run(until=lambda: bool(out))
    assert out, "the audit did not end"
    return out[0]


def test_a_reclaim_that_never_ends_bounds_the_settle_and_fails_the_audit(vsva, slow):
    w = vsva.world(1)
    w.host.ioasid.reclaim(4242, 1)  # a FREE whose acknowledgements never come
    res = live_audit(w)
    cut = res["cut"]
    # the settle gave up at its limit, counted on the clock: one poll per tick before, each
    # poll's round trip on top of its tick, took it to 2x the limit here
    assert SETTLE_LIMIT_S <= cut["settle_s"] <= SETTLE_LIMIT_S + 2 * SLOW_STEP + 0.005 + 1e-6
    assert cut["held_s"] <= cut_limit_s(AUDIT_ANSWER_S)
    # and it says so: an audit over a teardown in progress is not a clean one
    assert not res["ok"]
    assert [line for line in res["incomplete"] if line.startswith("host: 1 PASID(s) still waited")]


def test_a_settled_host_adds_nothing_to_the_cut(vsva, slow):
    res = live_audit(vsva.world(1))
    assert (res["ok"], res["incomplete"], res["violations"]) == (True, [], [])
    assert res["cut"]["settle_s"] < 0.1
