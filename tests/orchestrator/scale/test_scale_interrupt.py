"""A stop signal in the middle of a point: the running point's processes, sockets and shared
memory are gone, the finished point is kept, and the run says how to resume; a second signal
while it stops changes nothing."""

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

import pytest

from vsva.scale.results import ResultsDir
from vsva.scale.stacks import descendants


def _lines_until(proc: subprocess.Popen, needle: str, timeout: float) -> str:
    """What `proc` wrote on stderr until `needle` (bounded). Read from the descriptor: a
    buffered readline could hold the line in its buffer while select() waits for more."""
    fd, seen, end = proc.stderr.fileno(), b"", time.monotonic() + timeout
    while needle.encode() not in seen:
        left = end - time.monotonic()
        chunk = os.read(fd, 65536) if left > 0 and select.select([fd], [], [], left)[0] else b""
        if not chunk:
            raise AssertionError(f"no {needle!r} within {timeout} s; stderr so far:\n{seen.decode()}")
        seen += chunk
    return seen.decode(errors="replace")


def _start_time(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/PID/stat), None once it is gone or a zombie:
    a pid that comes back as another process has another start time."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


@pytest.mark.timeout(300)
def test_sigterm_mid_point_leaves_nothing_and_keeps_finished_points(tmp_path):
    tmpdir = tempfile.mkdtemp(prefix="vsva-t", dir="/tmp")  # short: ipc paths live under it
    try:
        check_interrupt(tmp_path, tmpdir)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def check_interrupt(tmp_path, tmpdir: str) -> None:
    env = {**os.environ, "TMPDIR": tmpdir}
    cmd = [
        sys.executable,
        "-m",
        "vsva",
        "scale",
        "run",
        "vms",
        "--points",
        "1,2",
        "--set",
        "binds=3",
        "--set",
        "dma_rounds=2",
        "--out",
        str(tmp_path / "results"),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        _lines_until(proc, "run 2/2 vms=2 #0: launched", timeout=120)
        run_dirs = glob.glob(os.path.join(tmpdir, "vsva-s*", "0", "vsva-*"))
        assert len(run_dirs) == 1 and len(glob.glob(os.path.join(run_dirs[0], "*.sock"))) >= 7  # live
        shm = f"/dev/shm/{os.path.basename(run_dirs[0])}.mem"
        assert os.path.exists(shm)
        below = {pid: _start_time(pid) for pid, _ in descendants(proc.pid)}
        assert len(below) >= 7  # host, kvm, vdcm, two guests and two vmms (and a fork server)
        proc.send_signal(signal.SIGTERM)
        _lines_until(proc, "stopping", timeout=60)
        proc.send_signal(signal.SIGINT)  # Ctrl-C while it stops: ignored
        _out, err = proc.communicate(timeout=150)  # the plots of the finished run are drawn
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM: 1 of 2 runs recorded; resume with `vsva scale run --resume" in err
    assert [pid for pid, t in below.items() if _start_time(pid) == t] == []
    assert os.listdir(tmpdir) == []  # run directories, sockets, the runner's own directories
    assert not os.path.exists(shm)
    rd = ResultsDir.open(str(tmp_path / "results" / "vms" / "latest"))
    assert [r["params"]["vms"] for r in rd.rows()] == [1] and rd.meta()["state"] == "interrupted"
    assert os.path.isfile(os.path.join(rd.path, "summary.md"))
