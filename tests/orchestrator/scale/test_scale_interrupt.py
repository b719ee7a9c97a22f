"""A stop signal in the middle of a point: the running point's processes, sockets and shared
memory are gone, taken down by its stacks themselves (the runner's residue check, which
would name what it had to remove, finds nothing), the finished point is kept, and the run
says how to resume; a second signal while it stops changes nothing."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest
from streams import read_until

from vsva.scale.results import ResultsDir
from vsva.scale.stacks import descendants


def _start_time(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/PID/stat), None once it is gone or a zombie:
    a pid that comes back as another process has another start time."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


@pytest.fixture
def short_tmp():
    """A short TMPDIR for the sweep (ipc socket paths live under it), removed afterwards."""
    path = tempfile.mkdtemp(prefix="vsva-t", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def scale_run(short_tmp: str, *args: str) -> Iterator[subprocess.Popen]:
    """`vsva scale run vms ARGS` with TMPDIR=`short_tmp`; killed if the test leaves it running."""
    cmd = [sys.executable, "-m", "vsva", "scale", "run", "vms", *args]
    env = {**os.environ, "TMPDIR": short_tmp}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(300)
def test_sigterm_mid_point_leaves_nothing_and_keeps_finished_points(tmp_path, short_tmp):
    out = str(tmp_path / "results")
    with scale_run(
        short_tmp, "--points", "1,2", "--set", "binds=3", "--set", "dma_rounds=2", "--out", out
    ) as proc:
        read_until(proc, "run 2/2 vms=2 #0: launched", timeout=120)
        run_dirs = glob.glob(os.path.join(short_tmp, "vsva-s*", "0", "vsva-*"))
        assert len(run_dirs) == 1 and len(glob.glob(os.path.join(run_dirs[0], "*.sock"))) >= 7  # live
        shm = f"/dev/shm/{os.path.basename(run_dirs[0])}.mem"
        assert os.path.exists(shm)
        below = {pid: _start_time(pid) for pid, _ in descendants(proc.pid)}
        assert len(below) >= 7  # host, kvm, vdcm, two guests and two vmms (and a fork server)
        proc.send_signal(signal.SIGTERM)
        read_until(proc, "stopping", timeout=60)
        proc.send_signal(signal.SIGINT)  # Ctrl-C while it stops: ignored
        _out, err = proc.communicate(timeout=150)  # the plots of the finished run are drawn
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM: 1 of 2 runs recorded; resume with `vsva scale run --resume" in err
    assert "left behind" not in err  # the stack took itself down; the runner had nothing to remove
    assert [pid for pid, t in below.items() if _start_time(pid) == t] == []
    assert os.listdir(short_tmp) == []  # run directories, sockets, the runner's own directories
    assert not os.path.exists(shm)
    rd = ResultsDir.open(str(tmp_path / "results" / "vms" / "latest"))
    assert [r["params"]["vms"] for r in rd.rows()] == [1] and rd.meta()["state"] == "interrupted"
    assert os.path.isfile(os.path.join(rd.path, "summary.md"))


@pytest.mark.timeout(300)
def test_sigterm_while_two_host_stacks_run_leaves_nothing(tmp_path, short_tmp):
    """`hosts = 2`: each stack is a child process in its own session, which the terminal's
    signal does not reach. The runner passes its stop on to both and waits for them; their
    actors, fork servers, run directories and shared memory are all gone when it exits. The
    signal comes once both stacks have said (through the runner's progress) that every
    actor of theirs is up."""
    args = ["--points", "1", "--set", "hosts=2", "--set", "binds=3", "--set", "dma_rounds=100000"]
    with scale_run(short_tmp, *args, "--out", str(tmp_path / "results")) as proc:
        read_until(proc, "#0: host 0: launched 5 processes", "#0: host 1: launched 5 processes", timeout=120)
        below = {pid: _start_time(pid) for pid, _ in descendants(proc.pid)}
        assert len(below) >= 12  # two stack processes, their fork servers and 5 actors each
        run_dirs = glob.glob(os.path.join(short_tmp, "vsva-s*", "*", "vsva-*"))
        shms = [f"/dev/shm/{os.path.basename(d)}.mem" for d in run_dirs]
        assert len(run_dirs) == 2 and all(os.path.exists(m) for m in shms)
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=150)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM: 0 of 1 runs recorded" in err
    assert "\nscale: stopped while the host stacks ran\n" in err  # and left nothing for the runner
    assert [pid for pid, t in below.items() if _start_time(pid) == t] == []
    assert os.listdir(short_tmp) == [] and not [m for m in shms if os.path.exists(m)]
