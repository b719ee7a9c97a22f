"""The sweep of dead owners' runs (vsva.ops.runfiles): a dead owner's run goes, a live one's
stays, and a run made in another PID namespace (a container sharing /tmp, `unshare --pid`)
is left alone, since its pid says nothing here."""

from __future__ import annotations

import os
import subprocess
import sys

from vsva.ops import runfiles


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_sweep_removes_dead_owners_runs_only(tmp_path):
    ns = runfiles.pid_namespace()
    dead = tmp_path / f"vsva-{dead_pid()}.1.{ns}-abc"
    live = tmp_path / f"vsva-{runfiles.owner_tag()}-def"
    foreign = tmp_path / f"vsva-{dead_pid()}.1.{ns + 1}-ghi"  # another namespace's pid
    other = tmp_path / "vsva-1000"  # the default state directory's shape: not a run
    for d in (dead, live, foreign, other):
        d.mkdir()
    removed = runfiles.sweep(str(tmp_path))
    assert str(dead) in removed
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in (live, foreign, other))


def test_run_dir_names_its_owner(tmp_path):
    path = runfiles.make_run_dir(str(tmp_path))
    assert os.path.basename(path).startswith(f"vsva-{runfiles.owner_tag()}-")
    assert runfiles.owner_alive(os.path.basename(path)) is True
    assert runfiles.shm_path(path) == f"/dev/shm/{os.path.basename(path)}.mem"
