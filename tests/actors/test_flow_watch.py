"""flow_watch: the guest reports the start of a flow instance (the fault trigger at a flow
step waits for this event instead of polling the guest's snapshot)."""

from __future__ import annotations

from vsva.ops.topology import guest_name


def test_answered_in_the_batch_of_the_nth_instance_first_request(vsva):
    w = vsva.world(1, workload="bind_latency", iterations=6)
    g = guest_name(1)
    watch = vsva.Wire(w.rt).send("orch", g, "flow_watch", {"flow": "F2", "nth": 4})
    vsva.ask(w.rt, g, "start_workload", {})
    trace = w.rt.trace
    at = next(i for i, r in enumerate(trace) if r["corr"] == watch.rid)
    assert trace[at]["body"] == {"ret": 0, "tag": "F2:vm1.4"}
    first = next(i for i, r in enumerate(trace) if r["src"] == g and r["flow"] == "F2:vm1.4")
    assert first == at + 1, "the answer must leave just before the step's first request"
    assert not any(r["src"] == g and r["flow"] == "F2:vm1.5" for r in trace[:at])


def test_an_instance_already_started_is_answered_at_once(vsva):
    w = vsva.world(1, workload="bind_latency", iterations=3)
    g = guest_name(1)
    vsva.ask(w.rt, g, "start_workload", {})
    assert vsva.ask(w.rt, g, "flow_watch", {"flow": "F2", "nth": 2}) == {"ret": 0, "tag": "F2:vm1.3"}
