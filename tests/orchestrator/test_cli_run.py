"""`vsva run` says for each VM what failed and why, and `vsva run` / `vsva up` write their trace
with --trace-out, a run that is interrupted or killed included. Driven as a user would."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from streams import poll_until, read_until, wait_gone
from test_cli_cleanup import (
    Cli,
    assert_stopped,
    cli_session,
    descendants,
    shm_of,
    stop_twice,
    traced,
)

from vsva.analysis.trace import read_frames

SCENARIO = """
[run]
seed = 3
[[vms]]
id = 1
workload = "dma_loop"
iterations = {iterations}
[[vms]]
id = 2
workload = "dma_loop"
iterations = {iterations}
[[faults]]
kill = "vm2.vmm"
at_flow = "F7"
vm = 2
nth = 3
[scenario]
timeout = 60
"""


@pytest.fixture
def cli(tmp_path):
    yield from cli_session(tmp_path)


def booted(cli: Cli) -> bool:
    """Some actor's trace file already holds a vm_start (trace files are written in batches)."""
    return any(
        any(r["kind"] == "vm_start" for r in read_frames(str(p)))
        for d in cli.run_dirs()
        for p in Path(d).glob("trace-*.frames")
    )


def trace_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trace.jsonl").read_text().splitlines()]


@pytest.mark.timeout(180)
def test_run_says_why_each_vm_failed_and_writes_the_trace(cli, tmp_path):
    """The trace of a run whose vm2.vmm is SIGKILLed at F7 instance 3 holds vm2's part of the
    run up to the fault, as the actors that outlive it sent it: the orchestrator's boot of
    vm2.vmm, the host's F1 and F2 replies to vm2.vmm for both devices, the F7 replies of
    instances 1 and 2 to vm2.guest. All of these were sent before the kill (the guest starts F7
    instance 3 only once they came back) by actors that exit cleanly, which loses no record.
    The records of vm2's own actors (vm2.vmm, and vm2.guest that the supervisor then kills) are
    not asserted: a SIGKILL takes those not yet written, up to TRACE_MAX_AGE of them
    (vsva.runtime.trace_buffer), and the fault comes some 40 ms after vm2.vmm's first send, so
    a run on a busy machine can have none of them."""
    scenario = tmp_path / "kill-vmm.toml"
    scenario.write_text(SCENARIO.format(iterations=400))
    out = tmp_path / "trace"
    done = cli("run", str(scenario), "--trace-out", str(out), timeout=150)
    lines = {
        line.split(":")[0].strip(): line
        for line in done.stdout.splitlines()
        if line.strip().startswith("vm") and ": " in line and "verified DMA" in line
    }
    assert "ok None" not in done.stdout
    assert "workload ok" in lines["vm1"], done.stdout
    assert "FAILED" in lines["vm2"] and "vm2.vmm killed by SIGKILL" in lines["vm2"], done.stdout
    rep = json.loads(cli("run", str(scenario), "--json", timeout=150).stdout)
    assert rep["workloads"]["1"]["why"] is None
    assert "vm2.vmm killed by SIGKILL" in rep["workloads"]["2"]["why"]
    to_vm2 = {(r["dst"], r["flow"]) for r in trace_records(out) if not r["src"].startswith("vm2.")}
    before_fault = {("vm2.vmm", "boot"), ("vm2.guest", "F7:vm2.1"), ("vm2.guest", "F7:vm2.2")}
    before_fault |= {("vm2.vmm", f"{flow}:vm2.{n}") for flow in ("F1", "F2") for n in (1, 2)}
    assert before_fault <= to_vm2, sorted(before_fault - to_vm2)
    assert (out / "trace.perfetto.json").exists()


def long_run(cli: Cli, tmp_path: Path, *extra: str) -> tuple:
    """A `vsva run` whose workloads outlast the test (no fault: every actor stays up), once
    it says its actors are running; and its processes then."""
    scenario = tmp_path / "long.toml"
    no_faults = SCENARIO.format(iterations=1_000_000).split("[[faults]]")[0]
    scenario.write_text(no_faults + "[scenario]\ntimeout = 600\n")
    proc = cli.start("run", str(scenario), *extra)
    read_until(proc, "actors running", timeout=60)
    assert shm_of(proc.pid)
    pids = descendants(proc.pid)
    assert len(pids) >= 7  # the actors of two VMs and the host side
    return proc, pids


@pytest.mark.timeout(180)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_run_cleans_up_and_keeps_its_trace(cli, tmp_path, sig):
    out = tmp_path / "trace"
    proc, pids = long_run(cli, tmp_path, "--trace-out", str(out))
    poll_until(lambda: traced(cli), 60, "trace records")  # written in batches: nothing says when
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert_stopped(cli, proc, sig, err, pids)
    assert trace_records(out)


@pytest.mark.timeout(180)
def test_run_second_signal_while_stopping_is_ignored(cli, tmp_path):
    proc, pids = long_run(cli, tmp_path)
    err = stop_twice(proc, signal.SIGTERM, signal.SIGINT)
    assert_stopped(cli, proc, signal.SIGTERM, err, pids)


@pytest.mark.timeout(180)
def test_up_trace_out_written_at_down_and_after_a_killed_supervisor(cli, tmp_path):
    out = tmp_path / "trace-down"
    assert cli("up", "-d", "--trace-out", str(out)).returncode == 0
    poll_until(lambda: traced(cli), 30, "the topology's trace")
    assert cli("down").returncode == 0
    assert any(r["kind"] == "vm_start" for r in trace_records(out))

    out = tmp_path / "trace-killed"
    assert cli("up", "-d", "--trace-out", str(out)).returncode == 0
    state = cli.state_file()
    poll_until(lambda: booted(cli), 30, "the VMs' boot in the trace files")
    os.kill(state["pid"], signal.SIGKILL)
    wait_gone([state["pid"]], 10, "the supervisor's death")
    down = cli("down")
    assert down.returncode == 0 and state["run_dir"] in down.stdout
    assert any(r["kind"] == "vm_start" for r in trace_records(out))


@pytest.mark.timeout(180)
def test_up_injects_the_fault_schedule(cli, tmp_path):
    """`[[faults]]` in a file given to `vsva up` are injected as under `vsva run` (README)."""
    topo = tmp_path / "kill-kvm.toml"
    topo.write_text(
        '[run]\nseed = 2\n[[vms]]\nid = 1\nworkload = "dma_loop"\niterations = 1000000\n'
        '[[faults]]\nkill = "kvm"\nat_time = 0.2\n'
    )
    assert cli("up", "-d", str(topo)).returncode == 0

    def kvm_restarted():
        rows = {r["name"]: r for r in json.loads(cli("ps", "--json").stdout)}
        return rows["kvm"]["restarts"] >= 1 and rows["kvm"]["state"] == "running"

    poll_until(kvm_restarted, 60, "the scheduled kill of kvm and its restart")
