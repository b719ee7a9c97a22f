"""The run engine (vsva.ops.control): the steps a demo session and the supervisor share."""

from __future__ import annotations

from vsva.ops.control import Controller, Orchestrator
from vsva.ops.topology import HOST, KVM, default_topology
from vsva.runtime.sim import SimRuntime


def _leaks(violations: list[dict]) -> list[dict]:
    return [v for v in violations if v["invariant"] == "I4" and "quarantined" in v["what"]]


def test_a_session_reports_quarantined_pasids():
    """kvm never hears from the host, so no FREE of VM teardown is acknowledged and reclaim
    quarantines those PASIDs: the demo's session must count them as leaks, as the
    supervisor's audit does (one audit step for both)."""
    t = default_topology(1, seed=3, policy="reclaim")
    rt = SimRuntime(t)
    ctl = rt.add(Controller(t, env=rt.env({"request_timeout": t.request_timeout})))
    rt.hold(HOST, KVM)
    rt.start()
    rt.run(until=lambda: ctl.result is not None)
    assert ctl.result is not None
    assert rt.actors[HOST].snapshot()["quarantined"]
    assert _leaks(ctl.result["violations"])


def test_audit_live_runs_from_outside_the_actor(vsva):
    """A step started through the actor's public run_task runs to its end on the sim: a
    clean world audits clean, with every actor's snapshot."""
    w = vsva.world(2)
    orch = w.rt.add(Orchestrator(w.t, env=w.rt.env({})))
    box: dict = {}

    def step():
        box["audit"] = yield from orch.audit_live()

    w.rt.run_task(orch.name, step)
    w.rt.run(until=lambda: "audit" in box)
    assert box["audit"]["ok"] and box["audit"]["violations"] == []
    assert set(box["audit"]["snapshots"]) == set(w.t.names())
