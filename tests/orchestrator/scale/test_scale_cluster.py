"""`vsva scale run --cluster`: a real Ray cluster of a head and one worker node, started for
the test inside network, PID and mount namespaces of its own (only loopback up, so nothing of
it listens beyond this test; every Ray process dies with the namespace; a private /dev/shm and
a TMPDIR of its own, so that no vsva command inside or outside mistakes the
other's run files for a dead owner's; /tmp itself stays visible, because the checkout and its
virtual environment may live there). Two points run as
tasks that each reserve a whole node, one on each node at once; their rows stream back."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from vsva.scale.results import ResultsDir

# --kill-child: if the test is stopped (its timeout), the namespace's first process dies with
# unshare, and with it every Ray process of the namespace
NAMESPACES = ["unshare", "--net", "--pid", "--fork", "--kill-child", "--mount-proc"]
RAY = "from ray.scripts.scripts import main; main()"
INSIDE = r"""
import os, shutil, subprocess, sys, tempfile
py, out = sys.executable, sys.argv[1]
out_fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
# A private /dev/shm and TMPDIR: every vsva command removes run files whose owner is dead,
# judged by pid and start time, and pids mean something else in here than outside.
subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/dev/shm"], check=True)
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")
os.environ["TMPDIR"] = tmp
common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats"]
head = [py, "-c", RAY, "start", "--head", "--port", "6379", "--include-dashboard", "false", "--temp-dir", tmp]
subprocess.run(head + common, check=True, capture_output=True, timeout=240)
subprocess.run([py, "-c", RAY, "start", "--address", "127.0.0.1:6379"] + common, check=True,
               capture_output=True, timeout=240)
run = subprocess.run([py, "-m", "vsva", "scale", "run", "vms", "--points", "1,2", "--set", "binds=3",
                      "--set", "dma_rounds=2", "--cluster", "127.0.0.1:6379", "--out", tmp + "/results",
                      "--json"], capture_output=True, text=True, timeout=300)
back = f"/proc/self/fd/{out_fd}"
shutil.copytree(tmp + "/results", back + "/results", symlinks=True)
open(back + "/stdout", "w").write(run.stdout)
open(back + "/stderr", "w").write(run.stderr)
sys.exit(run.returncode)
""".replace("RAY", repr(RAY))


def _namespaces_work() -> bool:
    try:
        return subprocess.run([*NAMESPACES, "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.timeout(600)  # Ray's start-up: ~3 s per node on an idle machine, a minute on a loaded one
def test_points_run_as_ray_tasks_on_a_two_node_cluster(tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[cluster]')")
    if not shutil.which("unshare") or not shutil.which("ip") or not _namespaces_work():
        pytest.skip("network/PID namespaces are not available here (unshare --net --pid failed)")
    out = tmp_path
    proc = subprocess.run(
        [*NAMESPACES, sys.executable, "-c", INSIDE, str(out)], capture_output=True, text=True, timeout=560
    )
    stderr = (out / "stderr").read_text() if (out / "stderr").exists() else proc.stderr
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads((out / "stdout").read_text())
    assert "cluster 127.0.0.1:6379: 2 nodes" in stderr
    path = os.path.join(out, "results", summary["dir"].split("/results/", 1)[1])
    rows = ResultsDir.open(path).rows()
    assert sorted(r["params"]["vms"] for r in rows) == [1, 2]
    assert all(r["status"] == "ok" and r["audit"]["ok"] for r in rows), [r["reason"] for r in rows]
    nodes = {r["per_host"][0]["node"] for r in rows}
    assert len(nodes) == 2  # one point per node, each task holding its node's only CPU
    assert os.path.isfile(os.path.join(path, "summary.md"))
