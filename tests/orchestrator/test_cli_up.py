"""`vsva up --detach` / `ps --json` / `kill` / outside `kill -9` / `audit --json` / `down`, driven
as a user would: subprocesses of `python -m vsva`, with a private state directory.
After `down` nothing of that run remains: no process, socket file, run directory or /dev/shm
file (checked on the run's own paths: other tests run concurrently)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from streams import poll_until, wait_gone
from zmqrt_toys import pid_alive

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def vsva(tmp_path):
    env = {**os.environ, "VSVA_STATE_DIR": str(tmp_path / "state")}

    def run(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [sys.executable, "-m", "vsva", *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
            timeout=timeout,
        )
        if check:
            assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-2000:])
        return done

    run.state = tmp_path / "state" / "current.json"
    yield run
    if run.state.exists():  # a failed test: take it down anyway
        run("down", check=False)


def ps(vsva) -> dict[str, dict]:
    rows = json.loads(vsva("ps", "--json").stdout)
    assert all({"name", "pid", "state"} <= set(r) for r in rows)
    return {r["name"]: r for r in rows}


@pytest.mark.timeout(120)
def test_up_ps_kill_audit_down(vsva):
    up = vsva("up", "--detach")
    assert "7 actors running" in up.stdout
    state = json.loads(vsva.state.read_text())
    run_dir, shm, sup_pid = state["run_dir"], state["shm"], state["pid"]
    assert os.path.isdir(run_dir) and os.path.exists(shm) and pid_alive(sup_pid)
    rows = ps(vsva)
    assert set(rows) == {"host", "kvm", "vdcm", "vm1.vmm", "vm1.guest", "vm2.vmm", "vm2.guest"}
    assert all(r["state"] == "running" and pid_alive(r["pid"]) for r in rows.values())
    first_pids = {n: r["pid"] for n, r in rows.items()}

    # the default topology's demo workloads complete; the live audit is clean
    audit = json.loads(vsva("audit", "--json").stdout)
    assert {k: audit.pop(k) for k in ("ok", "violations", "incomplete")} == {
        "ok": True,
        "violations": [],
        "incomplete": [],
    }
    assert set(audit) == {"cut"} and audit["cut"]["held_s"] > 0

    # an actor that is alive but does not answer: the heartbeat (dead_peer_interval) flags it
    os.kill(first_pids["vdcm"], signal.SIGSTOP)
    try:
        poll_until(lambda: ps(vsva)["vdcm"]["state"] == "unresponsive", 10.0, "vdcm unresponsive")
    finally:
        os.kill(first_pids["vdcm"], signal.SIGCONT)
    poll_until(lambda: ps(vsva)["vdcm"]["state"] == "running", 10.0, "vdcm answering again")

    # vsva kill of a VMM: the VM is gone (host teardown), its guest is killed by the supervisor
    out = vsva("kill", "vm1.vmm").stdout
    assert f"pid {first_pids['vm1.vmm']}" in out
    rows = poll_until(lambda: (r := ps(vsva))["vm1.guest"]["state"] == "killed" and r, 10.0, "guest killed")
    assert rows["vm1.vmm"]["state"] == "killed" and rows["vm2.vmm"]["state"] == "running"

    # an outside kill -9 of kvm is handled the same way: restarted with a new pid
    os.kill(first_pids["kvm"], signal.SIGKILL)
    rows = poll_until(
        lambda: (r := ps(vsva))["kvm"]["pid"] != first_pids["kvm"] and r["kvm"]["state"] == "running" and r,
        10.0,
        "kvm restarted",
    )
    assert rows["kvm"]["restarts"] == 1 and pid_alive(rows["kvm"]["pid"])
    # ... and an outside kill -9 of the other VM's guest: VM 2 stopped through its vmm (F8)
    os.kill(first_pids["vm2.guest"], signal.SIGKILL)
    poll_until(lambda: ps(vsva)["vm2.guest"]["state"] == "killed", 10.0, "guest death seen")
    audit = poll_until(
        lambda: (a := json.loads(vsva("audit", "--json", check=False).stdout))["ok"] and a,
        10.0,
        "clean audit after recovery",
    )
    assert audit["violations"] == []
    status = vsva("ps").stdout
    assert "vm1 gone" in status and "vm2 off" in status

    bad = vsva("kill", "vm7.vmm", check=False)
    assert bad.returncode == 2 and "no actor 'vm7.vmm'" in bad.stderr

    all_pids = set(first_pids.values()) | {r["pid"] for r in ps(vsva).values()} | {sup_pid}
    vsva("down")
    wait_gone(all_pids, 10, "every process gone")
    assert not os.path.exists(run_dir) and not os.path.exists(shm)
    assert not vsva.state.exists()
    gone = vsva("ps", check=False)
    assert gone.returncode == 3 and "no topology is running" in gone.stderr


@pytest.mark.timeout(60)
def test_up_from_file_and_down_after_supervisor_death(vsva, tmp_path):
    topo = tmp_path / "one.toml"
    topo.write_text('[run]\nseed = 5\n[[vms]]\nworkload = "bind_many"\niterations = 4\n')
    vsva("up", "--detach", str(topo))
    state = json.loads(vsva.state.read_text())
    with open(f"/proc/{state['pid']}/cmdline", "rb") as f:  # `up` awaited its readiness pipe
        assert b"--ready-fd" in f.read().split(b"\0")
    assert set(ps(vsva)) == {"host", "kvm", "vdcm", "vm1.vmm", "vm1.guest"}
    again = vsva("up", "--detach", check=False)
    assert again.returncode == 1 and "already running" in again.stderr
    # the supervisor itself dies: its children die with it (PDEATHSIG); down cleans the rest
    pids = list(state["actors"].values())
    os.kill(state["pid"], signal.SIGKILL)
    wait_gone(pids + [state["pid"]], 10, "children gone")
    vsva("down")
    assert not os.path.exists(state["run_dir"]) and not os.path.exists(state["shm"])
    assert not vsva.state.exists()
