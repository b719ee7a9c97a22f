"""A restart that fails is a reported failure of that actor, not a crash of the run.

Real processes (`vsva run`'s engine, vsva.ops.scenario.supervise): a scenario kills kvm, or
a guest whose VM restarts it (`on_guest_death = "restart"`), at a flow step. The moment the
launcher reports that death (its `on_death` callback, inside the reap, before the supervisor
acts on it) the test removes the run's shared memory, as any local process of this user could:
every actor maps it when it starts (vsva.runtime.actor_process), so the restarted incarnation
dies before it reports ready and the restart fails, deterministically and without waiting on
time. The run must end with a report in which that actor's recovery says so in one line, in
the text and in the JSON, the run failed, the actor was not restarted over and over, and
nothing of the run is left.
"""

from __future__ import annotations

import json
import os

import pytest
from zmqrt_toys import pid_alive

from vsva.ops.scenario import render, supervise
from vsva.ops.supervisor import Supervisor
from vsva.ops.topology_file import loads

# The kill lands when the supervisor has read the guest's event, which on a loaded machine can
# be tens of milliseconds after the guest sent it; a bind takes ~2 ms, so 20 iterations could
# end before the kill (the guest then answers its workload and the VM is not "off" for the
# failed restart). 200 keep the workload running until the kill: the rest never runs.
SCENARIO = """
[run]
seed = 5
[[vms]]
id = 1
workload = "bind_latency"
iterations = 200{restart}
[[faults]]
kill = "{target}"
at_flow = "F2"
vm = 1
nth = 5
[scenario]
timeout = 30
"""
CASES = {"kvm": ("kvm", ""), "guest": ("vm1.guest", '\non_guest_death = "restart"')}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_failed_restart_is_one_line_of_the_report(case):
    target, restart = CASES[case]
    sup = Supervisor(loads(SCENARIO.format(target=target, restart=restart)))

    def take_the_memory(name: str, code: int) -> None:
        shm = sup.launcher.shm_path
        if name == target and shm is not None and os.path.exists(shm):
            os.unlink(shm)

    sup.launcher.on_death.append(take_the_memory)
    rep = supervise(sup)  # before the fix: LaunchError out of the supervisor's restart

    mine = [r for r in rep["recoveries"] if r["actor"] == target]
    assert len(mine) == 1, rep["recoveries"]  # one death recovered; the failed incarnation is not
    assert mine[0]["error"] == f"restart failed: {target} exited with 1 before ready", mine[0]
    assert "new_pid" not in mine[0]
    assert not rep["ok"]
    assert [p["state"] for p in rep["processes"] if p["name"] == target] == ["exited"]

    shown = json.loads(json.dumps(rep, indent=1, default=str))  # what `vsva run --json` prints
    assert [r["error"] for r in shown["recoveries"] if r["actor"] == target] == [mine[0]["error"]]
    lines: list[str] = []
    render(rep, lines.append)  # what `vsva run` prints
    recovered = [line.strip() for line in lines if line.strip().startswith(f"{target} (exit -9): ")]
    assert len(recovered) == 1 and recovered[0].endswith(f"[{mine[0]['error']}]"), lines
    assert lines[-1].strip().startswith("verdict: FAIL"), lines[-1]
    if case == "guest":
        vm1 = rep["workloads"]["1"]
        assert vm1["state"] == "off" and "restart failed" in vm1["why"], vm1

    assert not any(pid_alive(p["pid"]) for p in rep["processes"])
    assert not any(os.path.exists(f) for f in rep["run_files"])
