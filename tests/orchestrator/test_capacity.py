"""Capacity: up to 256 VMs are accepted; a topology this machine cannot hold is refused
before anything starts, with one line naming the limit."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import textwrap

import pytest

from vsva.ops import capacity
from vsva.ops.capacity import CapacityError
from vsva.ops.config import VmConfig
from vsva.ops.topology import build_topology, default_topology
from vsva.ops.topology_file import TopologyError, loads

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def vms_toml(n: int) -> str:
    return "".join(f"[[vms]]\nid = {i}\n" for i in range(1, n + 1))


def test_256_vms_accepted_257_refused():
    assert len(loads(vms_toml(256)).topology.vms) == 256
    with pytest.raises(TopologyError, match="at most 256"):
        loads(vms_toml(257))


def test_shared_memory_larger_than_dev_shm_is_refused_by_name():
    huge = build_topology([VmConfig(vm=vm, ram_pages=1 << 20) for vm in range(1, 257)])
    assert capacity.needs(huge)["shm_bytes"] == huge.mem_frames * 4096  # sized to the topology
    with pytest.raises(CapacityError, match="/dev/shm"):
        capacity.check(huge)
    capacity.check(default_topology(256))  # the default 256-VM topology fits this machine


def test_shared_memory_counts_in_the_memory_needed(monkeypatch):
    """The host zeroes all of every VM's RAM: the shared-memory file becomes resident, so a
    topology whose file fits /dev/shm but not the available memory is refused by the latter."""
    topo = build_topology([VmConfig(vm=vm, ram_pages=131072) for vm in (1, 2)])
    need = capacity.needs(topo)
    assert need["memory_mb"] > need["shm_bytes"] >> 20
    have = {"fds": 1 << 20, "memory_mb": need["memory_mb"] - 1, "shm_bytes": 1 << 40, "processes": 1 << 20}
    monkeypatch.setattr(capacity, "limits", lambda: have)
    with pytest.raises(CapacityError, match=f"2 VMs need about {need['memory_mb']} MB of available memory"):
        capacity.check(topo)


def test_demo_refuses_what_the_descriptor_limit_cannot_hold():
    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    done = subprocess.run(
        [sys.executable, "-m", "vsva", "demo", "--vms", "128"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=low_limit,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "RLIMIT_NOFILE" in lines[0] and "1024" in lines[0], lines


def test_soft_descriptor_limit_is_raised_to_the_hard_limit():
    code = textwrap.dedent("""
        import resource
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096))
        from vsva.ops.capacity import raise_fd_limit
        print(raise_fd_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert done.stdout.split() == ["4096", "4096"], done.stderr
