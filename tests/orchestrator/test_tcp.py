"""`[run] transport = "tcp"`: every actor's ROUTER on a kernel-chosen 127.0.0.1 port.

The real two-VM demo over tcp (every step ok, audit clean, only loopback listeners, nothing
left after close), kill -9 of a vmm detected by the host over tcp, and a restart of kvm in the
demo topology after which the survivors reach the new port (the launcher's restart loop runs
over both transports: tests/orchestrator/test_launcher.py).
"""

from __future__ import annotations

import glob
import os
import re
import signal
import time

import pytest
from test_vm_death_processes import DEADLINE, ITERATIONS, WORKLOAD_DEADLINE, DeathRun
from zmqrt_toys import TOYS, Script, pid_alive

from vsva.ops.control import Controller
from vsva.ops.demo import report
from vsva.ops.launcher import Launcher
from vsva.ops.topology import Topology, default_topology
from vsva.ops.topology_file import load, parse
from vsva.runtime.peers import UP

TCP_EP = re.compile(r"^tcp://127\.0\.0\.1:(\d+)$")


def tcp_topology(**kw) -> Topology:
    topology = default_topology(2, **kw)
    topology.transport = "tcp"
    return topology


def listeners(pids: list[int]) -> list[tuple[str, int]]:
    """(local address, port) of every listening TCP socket (v4 and v6) held by `pids`."""
    inodes = set()
    for pid in pids:
        for fd in glob.glob(f"/proc/{pid}/fd/*"):
            try:
                link = os.readlink(fd)
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[len("socket:[") : -1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            cols = row.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if state == "0A" and inode in inodes:  # TCP_LISTEN
                addr, port = local.split(":")
                if len(addr) == 8:
                    addr = ".".join(str(int(addr[i : i + 2], 16)) for i in (6, 4, 2, 0))
                found.append((addr, int(port, 16)))
    return found


def ports(launcher: Launcher) -> dict[str, int]:
    eps = launcher.endpoints()
    assert all(TCP_EP.match(ep) for ep in eps.values()), eps
    return {name: int(TCP_EP.match(ep).group(1)) for name, ep in eps.items()}


def test_topology_file_accepts_tcp():
    run = parse({"run": {"transport": "tcp"}})
    assert run.transport == "tcp" and run.topology.transport == "tcp"
    assert parse({"run": {}}).topology.transport == "ipc"
    example = load(os.path.join(os.path.dirname(os.path.dirname(TOYS)), "examples", "two-vms-tcp.toml"))
    assert example.topology.transport == "tcp" and example.topology.vms == [1, 2]


@pytest.mark.timeout(60)
def test_demo_two_vms_over_tcp_loopback_only():
    topology = tcp_topology()
    t0 = time.monotonic()
    launcher = Launcher(topology)
    with launcher:
        ready = time.monotonic() - t0
        run_dir, shm = launcher.run_dir, launcher.shm_path
        pids = [r["pid"] for r in launcher.processes()]
        by_name = ports(launcher)
        assert set(by_name) == {"orch", *topology.names()}
        assert len(set(by_name.values())) == len(by_name)  # one port per actor
        # every listener of the run (the children's and the launcher's) is on 127.0.0.1,
        # one per actor, and they are exactly the published endpoints
        found = listeners([*pids, os.getpid()])
        assert found and all(addr == "127.0.0.1" for addr, _ in found), found
        assert sorted(p for _, p in found) == sorted(by_name.values()), (found, by_name)
        assert [os.path.basename(p) for p in glob.glob(os.path.join(run_dir, "*.sock"))] == [
            "orch-ctl.sock"
        ]  # only the launcher's control socket stays ipc
        assert {os.path.basename(p) for p in glob.glob(os.path.join(run_dir, "*.ep"))} == {
            f"{n}.ep" for n in by_name
        }
        ctl = Controller(topology)
        assert launcher.run_actor(ctl, timeout=60)
        launcher.close()
        session = {
            **ctl.result,
            "trace": launcher.trace(),
            "processes": launcher.processes(),
            "ready_s": ready,
            "files": [run_dir, shm],
            "elapsed_s": time.monotonic() - t0,
        }
    rep = report(session, topology, "processes")
    assert rep["transport"] == "tcp"
    assert rep["steps"]["total"] > 0 and rep["steps"]["failed"] == [], rep["steps"]["failed"][:3]
    assert rep["audit"]["violations"] == []
    assert rep["ok"], rep
    assert all(p["exitcode"] == 0 for p in rep["processes"]), rep["processes"]
    # after close: no process, no listener, no run directory, no shared memory
    assert not any(pid_alive(p) for p in pids)
    assert listeners([os.getpid()]) == []
    assert not os.path.exists(run_dir) and not os.path.exists(shm)


@pytest.mark.timeout(120)
def test_sigkill_vmm_detected_by_host_over_tcp():
    topology = default_topology(2, workload="dma_loop", iterations=ITERATIONS, policy="reclaim")
    topology.transport = "tcp"
    launcher = Launcher(topology)
    with launcher:
        ports(launcher)
        pids = [r["pid"] for r in launcher.processes()]
        run_dir, shm = launcher.run_dir, launcher.shm_path
        orch = DeathRun(topology)
        assert launcher.run_actor(orch, timeout=DEADLINE, until=lambda a: a.under_way or a.result is not None)
        assert orch.under_way, orch.result
        # the guest first: killed second, it could see its vmm die and answer its workload
        # with that failure before its own death (a VM's guest and vmm die together)
        assert launcher.kill("vm2.guest")
        assert launcher.kill("vm2.vmm")
        # DeathRun polls the host's pool_status (bounded by DEADLINE) until VM 2 is torn down,
        # then waits for VM 1's loop to end
        assert launcher.run_actor(orch, timeout=WORKLOAD_DEADLINE + 5), (orch.teardown, orch.workloads.keys())
    assert "vm2.vmm" in orch.downs
    assert orch.teardown.get("why") == "vm2.vmm died", orch.teardown
    vm1 = orch.workloads["vm1.guest"]
    assert vm1["ret"] == 0 and vm1["ok"], [s for s in vm1["steps"] if not s["ok"]][:3]
    assert orch.result["violations"] == [], orch.result["violations"]
    host = orch.result["snapshots"]["host"]
    assert "2" not in host["vms"] and not [p for p, a in host["ioasids"].items() if a["vm"] == 2]
    assert not any(pid_alive(p) for p in pids)
    assert not os.path.exists(run_dir) and not os.path.exists(shm)


@pytest.mark.timeout(60)
def test_kvm_restart_over_tcp_survivors_reconnect():
    """kill -9 kvm before the session, restart it (new process, new port): the orchestrator,
    whose connection to the old port was up, reaches the new one, and so do the children,
    which connect to kvm on its first use in the session (none has a connection before:
    `Topology.peers_of` names kvm for nobody); the whole demo session then passes. (Children
    that had a connection reconnecting to a restarted peer's new port: test_launcher.)"""
    topology = tcp_topology()
    launcher = Launcher(topology)
    with launcher:
        run_dir = launcher.run_dir
        old_pid, old_port = launcher.pid("kvm"), ports(launcher)["kvm"]
        assert not any("kvm" in topology.peers_of(n) for n in topology.names())  # (see above)
        # the orchestrator's connection to kvm is up: its socket monitor says so in a round
        up = launcher.run_actor(
            Script(), timeout=10.0, until=lambda a: launcher.runtime.peers["kvm"].state == UP
        )
        assert up, "the orchestrator's connection to kvm was not up within 10 s"
        assert launcher.kill("kvm")
        assert launcher.wait_exit("kvm", 2.0) == -signal.SIGKILL
        new_pid = launcher.restart("kvm")
        new_port = ports(launcher)["kvm"]
        assert new_pid != old_pid
        assert ("127.0.0.1", new_port) in listeners([new_pid])
        ctl = Controller(topology)
        assert launcher.run_actor(ctl, timeout=60)
        trace = launcher.trace()
        rows = {r["name"]: r for r in launcher.processes()}
    assert rows["kvm"]["pid"] == new_pid
    steps = [s for w in ctl.result["workloads"].values() for s in w.get("steps", [])]
    assert steps and all(s["ok"] for s in steps), [s for s in steps if not s["ok"]][:3]
    assert ctl.result["violations"] == []
    # the survivors talked to the new kvm (and it answered)
    to_kvm = {r["src"] for r in trace if r["dst"] == "kvm"}
    assert {"host"} <= to_kvm, to_kvm
    assert any(r["src"] == "kvm" for r in trace)
    assert not os.path.exists(run_dir)
    print(f"\n  kvm restarted over tcp: port {old_port} -> {new_port}")
