"""quiesce / resume: the guest's half of the live audit's cut (vsva.analysis.cut), on the
deterministic runtime. A quiesced guest answers only once nothing of its own is in flight,
then starts no flow instance until `resume` or until its lease ends; the state it leaves is
one the audit finds clean, while the same churn audited without the cut is not."""

from __future__ import annotations

from vsva.actors.catalogue import FlowWatch, Quiesce, Resume, StartWorkload
from vsva.analysis.audit import audit

GUESTS = ("vm1.guest", "vm2.guest")


def churning(vsva, seed: int = 1):
    """Two VMs churning; returns (world, wire) once VM 1 has started its third bind."""
    w = vsva.world(2, seed=seed, workload="churn", iterations=1000)
    wire = vsva.Wire(w.rt)
    watch = wire.send("orch", GUESTS[0], FlowWatch(flow="F2", nth=3))
    for g in GUESTS:
        wire.send("orch", g, StartWorkload())
    assert wire.wait(watch)["ret"] == 0
    return w, wire


def requests_from(trace, since: int, src: str) -> list[dict]:
    return [r for r in trace[since:] if r["src"] == src and r["corr"] is None]


def quiesce(w, wire, hold: float = 10.0) -> list[dict]:
    held = [wire.send("orch", g, Quiesce(hold=hold, drain=1.5)) for g in GUESTS]
    return [wire.wait(h) for h in held]


def test_answered_once_drained_then_nothing_starts(vsva):
    w, wire = churning(vsva)
    replies = quiesce(w, wire)
    assert [r["ret"] for r in replies] == [0, 0]
    assert all(w.rt.actors[g].in_flight == 0 for g in GUESTS)
    since = len(w.rt.trace)
    while w.rt.step():  # deliver everything still on the wire (the host's FREE acks ...)
        pass
    assert not any(requests_from(w.rt.trace, since, g) for g in GUESTS)
    assert not w.host.ioasid.reclaiming
    assert audit(w.snapshots(), w.t) == []
    flows = [dict(w.rt.actors[g].flow_seq) for g in GUESTS]
    released = [wire.call("orch", g, Resume()) for g in GUESTS]
    assert [r["released"] for r in released] == [1, 1]  # each churn waited at its next flow
    w.rt.run(until=lambda: w.rt.actors[GUESTS[0]].flow_seq["F2"] > flows[0]["F2"] + 2)
    assert all(w.rt.actors[g].flow_seq != f for g, f in zip(GUESTS, flows))


def test_the_lease_ends_the_hold_without_resume(vsva):
    w, wire = churning(vsva)
    at = w.rt.now  # the guests' lease starts when the quiesce arrives, after this
    assert [r["ret"] for r in quiesce(w, wire, hold=0.5)] == [0, 0]
    since = len(w.rt.trace)
    w.rt.run(until=lambda: requests_from(w.rt.trace, since, GUESTS[0]))
    assert w.rt.now >= at + 0.5


def test_the_lease_ends_while_another_vm_keeps_the_system_busy(vsva):
    """A deadline fires when virtual time reaches it, not only once nothing is in flight:
    VM 2 churns on without a pause while VM 1's lease runs out (the runtime's timers,
    orchestrator/runtime/sim.py `_fire_due`)."""
    w, wire = churning(vsva)
    at = w.rt.now
    assert wire.call("orch", GUESTS[0], Quiesce(hold=0.05, drain=1.5))["ret"] == 0
    since = len(w.rt.trace)
    w.rt.run(until=lambda: requests_from(w.rt.trace, since, GUESTS[0]), max_steps=20_000)
    assert requests_from(w.rt.trace, since, GUESTS[0]) and w.rt.now >= at + 0.05
    assert requests_from(w.rt.trace, since, GUESTS[1])  # VM 2 was never held


def test_churn_audited_without_the_cut_is_not_clean(vsva):
    """The hazard the cut removes: snapshots taken while binds are in flight disagree."""
    found = []
    for seed in range(1, 6):
        w, wire = churning(vsva, seed)
        found += audit(w.snapshots(), w.t)
    assert {v["invariant"] for v in found} & {"I3", "I5"}


def test_a_guest_that_cannot_drain_says_so(vsva):
    w, wire = churning(vsva)
    w.rt.hold("vm1.vmm", "host")  # VM 1's requests stay in flight
    w.rt.run(until=lambda: w.rt.actors[GUESTS[0]].in_flight)
    reply = wire.call("orch", GUESTS[0], Quiesce(hold=10.0, drain=0.2))
    assert reply["ret"] < 0 and reply["in_flight"] == 1 and "still in flight" in reply["error"]
    w.rt.release("vm1.vmm", "host")
