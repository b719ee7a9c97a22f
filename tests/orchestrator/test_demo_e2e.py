"""`vsva demo` as a user runs it: real processes, real sockets, nothing left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vsva.runtime import frames

VSVA = [sys.executable, "-m", "vsva"]


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*VSVA, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )


@pytest.mark.parametrize("vms", [1, 2])
def test_demo_json_passes_and_leaves_nothing(vms: int) -> None:
    done = _run("demo", "--json", "--vms", str(vms))
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["ok"] is True
    assert report["vms"] == vms
    assert report["audit"]["violations"] == []
    assert report["hotpath"] in ("compiled", "python")
    assert report["frames"] == frames.IMPLEMENTATION  # the processes' (same environment)
    for flow in ("F1", "F2", "F3", "F4", "F5", "F6", "F7"):
        assert report["flows"][flow] > 0, flow
    assert report["flows"]["F2"] == 5 * vms  # three pf binds (one demand-paged) and two mdev binds per VM
    names = {p["name"] for p in report["processes"]}
    assert names == {"host", "kvm", "vdcm"} | {
        f"vm{i}.{k}" for i in range(1, vms + 1) for k in ("guest", "vmm")
    }
    pids = [p["pid"] for p in report["processes"]]
    assert len(set(pids)) == len(pids) and os.getpid() not in pids
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    assert len(report["run_files"]) == 2  # the run directory and the shared-memory file
    assert not any(os.path.exists(path) for path in report["run_files"])


def test_demo_timeline_and_trace_files(tmp_path) -> None:
    done = _run("demo", "--trace-out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "F2 vm1 #1: bind" in out and "bind_gpasid" in out and "ioasid_notify" in out
    assert "audit (I1, I2, I3, I4, I5, I6, I7): clean" in out and "verdict: PASS" in out
    perfetto = json.loads((tmp_path / "trace.perfetto.json").read_text())
    assert any(e.get("name") == "bind_gpasid" and e["ph"] == "X" for e in perfetto["traceEvents"])
    assert (tmp_path / "sequence-vm1.mmd").read_text().startswith("sequenceDiagram")


def test_demo_refuses_unknown_runtime() -> None:
    done = _run("demo", "--runtime", "bogus")
    assert done.returncode != 0
    assert "processes" in done.stderr and "sim" in done.stderr
