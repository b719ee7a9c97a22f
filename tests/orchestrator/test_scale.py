"""128 VMs on one machine (259 actor processes forked by the fork server): a short workload
starts, runs, audits clean and stops, and nothing of the run is left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VMS = 128


def processes_of(parent_pid: int) -> list[int]:
    """Fork servers (and so their children) a launcher in process `parent_pid` started."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"vsva.runtime.zygote" in argv and str(parent_pid).encode() in argv:
            found.append(int(entry))
    return found


def test_128_vms_start_run_audit_clean_and_leave_nothing():
    proc = subprocess.Popen(
        [sys.executable, "-m", "vsva", "demo", "--json", "--vms", str(VMS), "--iterations", "1"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    report = json.loads(out)
    assert report["ok"] and report["vms"] == VMS
    assert report["audit"]["violations"] == [] and report["timeouts"] == []
    assert report["steps"]["failed"] == []
    assert report["flows"]["F8"] == VMS  # every VM stopped through F8
    rows = report["processes"]
    assert len(rows) == 2 * VMS + 3 and all(r["exitcode"] == 0 for r in rows)
    for row in rows:
        assert not os.path.exists(f"/proc/{row['pid']}")  # exited and reaped
    assert processes_of(proc.pid) == []  # the fork server is gone too
    assert not any(os.path.exists(path) for path in report["run_files"])
