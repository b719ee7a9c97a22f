"""The CI-sized run of the fuzzer (tests/orchestrator/fuzzing.py): hostile inputs to every
actor (host, kvm, vdcm, a vmm, a guest) and the supervisor's control socket of a live
topology whose VM 1 ran its workload (PASIDs bound), over ipc and over tcp with CURVE. No
actor dies or stops answering, every input the protocol answers is answered with a refusal,
none changes any actor's state, no actor leaks a descriptor. The long run (>= 100,000
inputs, its figures): benchmarks/fuzz_actors.py."""

from __future__ import annotations

import pytest
from fuzzing import TARGETS, fuzz, keyed_strangers
from supervised import supervised

from vsva.ops.topology_file import default_run

INPUTS = 36_000


@pytest.fixture(params=["ipc", "tcp"])
def sup(request):
    run = default_run(1, workload="bind_many", iterations=3, transport=request.param)
    with keyed_strangers(), supervised(run) as s:
        for _ in range(1000):
            if s.workloads_done():
                break
            s.step(0.02)
        assert s.vms[1].workload is not None and s.vms[1].workload["ret"] == 0, s.vms[1].workload
        yield s


@pytest.mark.timeout(120)
def test_hostile_inputs_to_every_actor_are_refused_and_change_nothing(sup):
    stats = fuzz(sup, n=INPUTS, seed=11, every=3000)
    assert stats["findings"] == []
    assert stats["inputs"] == INPUTS and min(stats["per_target"].values()) == INPUTS // (len(TARGETS) + 1)
    refused_by = {key.split()[0] for key in stats["refusals"]}
    assert refused_by == {"actor", "runtime", "supervisor"}, stats["refusals"]  # every layer was reached
    assert stats["answered"] > INPUTS // 2
