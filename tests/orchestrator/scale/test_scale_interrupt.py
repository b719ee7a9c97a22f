"""Ctrl-C in the middle of a point: the running point's processes, sockets and shared memory
are gone, the finished point is kept, and the run says how to resume."""

from __future__ import annotations

import glob
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from vsva.scale.results import ResultsDir


def _lines_until(proc: subprocess.Popen, needle: str, timeout: float) -> list[str]:
    """stderr lines of `proc` up to the first containing `needle` (bounded)."""
    seen, end = [], time.monotonic() + timeout
    while time.monotonic() < end:
        ready, _, _ = select.select([proc.stderr], [], [], max(0.0, end - time.monotonic()))
        if not ready:
            break
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return seen
    raise AssertionError(f"no {needle!r} within {timeout} s; stderr so far:\n{''.join(seen)}")


def _processes_naming(text: str) -> list[str]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd and int(pid) != os.getpid():
            out.append(f"{pid}: {cmd}")
    return out


def test_sigint_mid_point_leaves_nothing_and_keeps_finished_points(tmp_path):
    tmpdir = tempfile.mkdtemp(prefix="vsva-t", dir="/tmp")  # short: ipc paths live under it
    try:
        check_interrupt(tmp_path, tmpdir)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def check_interrupt(tmp_path, tmpdir: str) -> None:
    env = {**os.environ, "TMPDIR": tmpdir}
    cmd = [sys.executable, "-m", "vsva", "scale", "run", "vms", "--points", "1,2", "--set", "binds=3",
           "--set", "dma_rounds=2", "--out", str(tmp_path / "results")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        _lines_until(proc, "run 2/2 vms=2 #0: launched", timeout=120)
        run_dirs = glob.glob(os.path.join(tmpdir, "vsva-s*", "0", "vsva-*"))
        assert len(run_dirs) == 1 and len(glob.glob(os.path.join(run_dirs[0], "*.sock"))) >= 7  # live
        shm = f"/dev/shm/{os.path.basename(run_dirs[0])}.mem"
        assert os.path.exists(shm)
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted: 1 of 2 runs recorded; resume with `vsva scale run --resume" in err
    assert _processes_naming(tmpdir) == []
    assert os.listdir(tmpdir) == []  # run directories, sockets, the runner's own directories
    assert not os.path.exists(shm)
    rd = ResultsDir.open(str(tmp_path / "results" / "vms" / "latest"))
    assert [r["params"]["vms"] for r in rd.rows()] == [1] and rd.meta()["state"] == "interrupted"
    assert os.path.isfile(os.path.join(rd.path, "summary.md"))
