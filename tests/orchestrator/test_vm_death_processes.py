"""F8 with real processes: SIGKILL a VM's vmm (then its guest) while both VMs run DMA loops.

The host must notice the dead vmm by itself (its connection to the vmm drops: peer_down) and
tear the VM down; VM 1's loop must finish with every DMA verified; the audit of the surviving
actors must be clean; after `close` nothing of the run may remain.

The orchestrator here is a small actor of its own (named "orch", run by the launcher). It waits
for events, never for wall time: guests' progress and the host's teardown are read with
requests (`snapshot`, `pool_status`), each poll bounded by a deadline.
"""

from __future__ import annotations

import os
import time

import pytest
from zmqrt_toys import pid_alive

from vsva.actors import errno as E
from vsva.actors.base import Actor, ActorEnv, Call, Gather
from vsva.analysis.audit import audit
from vsva.ops.launcher import Launcher
from vsva.ops.topology import ORCH, default_topology

ITERATIONS = 2000  # rounds of VM 1's loop (2 DMAs each): long enough to still run at the kill
KILL_AFTER = 5  # DMAs each guest has completed before VM 2 dies
DEADLINE = 10.0  # seconds any one wait may take
WORKLOAD_DEADLINE = 60.0  # seconds VM 1's whole loop may take (loaded CI runs need ~15)


class DeathRun(Actor):
    """Boot both VMs, start both DMA loops, signal when they are under way; once VM 2's vmm is
    reported down, poll the host until it has torn VM 2 down, then (VM 1 done) audit."""

    def __init__(self, topology):
        super().__init__(ORCH, ActorEnv(config={"request_timeout": DEADLINE}, seed=topology.seed))
        self.topology = topology
        self.guests = topology.names("guest")
        self.started: list[dict] = []
        self.workloads: dict[str, dict] = {}
        self.progress: dict[str, int] = {}
        self.under_way = False
        self.downs: list[str] = []
        self.teardown: dict | None = None
        self.polls = 0
        self.result: dict | None = None
        self._finishing = False

    def on_start(self):
        self.started = yield Gather([Call(v, "vm_start", {}) for v in self.topology.names("vmm")])
        if any(r["ret"] for r in self.started):
            self.result = {"error": "vm_start failed", "started": self.started}
            return
        for g in self.guests:
            self.spawn(lambda g=g: self._workload(g))
        end = self.now + DEADLINE
        while self.now < end:
            snaps = yield Gather([Call(g, "snapshot", {}) for g in self.guests])
            self.progress = {
                g: s.get("state", {}).get("dma", {}).get("completed", 0) for g, s in zip(self.guests, snaps)
            }
            if all(n >= KILL_AFTER for n in self.progress.values()):
                self.under_way = True
                return
        self.result = {"error": f"DMA loops did not get going: {self.progress}"}

    def _workload(self, guest: str):
        self.workloads[guest] = yield Call(guest, "start_workload", {}, timeout=WORKLOAD_DEADLINE)
        yield from self._maybe_finish()

    def on_peer_down(self, peer: str):
        self.downs.append(peer)
        if peer != "vm2.vmm":
            return
        end = self.now + DEADLINE  # the host's own detection, then its ioasid_free_set
        while self.now < end:
            self.polls += 1
            status = yield Call("host", "pool_status", {})
            done = [t for t in status.get("teardowns", []) if t["vm"] == 2 and "finished" in t]
            if done:
                self.teardown = done[0]
                break
        else:
            self.teardown = {"error": "the host did not tear VM 2 down in time"}
        yield from self._maybe_finish()

    def _maybe_finish(self):
        if self._finishing or self.teardown is None or "vm1.guest" not in self.workloads:
            return
        self._finishing = True
        names = [n for n in self.topology.names() if not n.startswith("vm2.")]
        replies = yield Gather([Call(n, "snapshot", {}) for n in names])
        snaps = {n: r.get("state", {"error": r}) for n, r in zip(names, replies)}
        self.result = {"snapshots": snaps, "violations": audit(snaps, self.topology)}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("policy", ["naive", "ordered", "reclaim"])
def test_sigkill_vmm_during_dma_loops(policy):
    topology = default_topology(2, workload="dma_loop", iterations=ITERATIONS, policy=policy)
    t0 = time.monotonic()
    launcher = Launcher(topology)
    with launcher:
        pids = [r["pid"] for r in launcher.processes()]
        run_dir, shm = launcher.run_dir, launcher.shm_path
        orch = DeathRun(topology)
        assert launcher.run_actor(orch, timeout=DEADLINE, until=lambda a: a.under_way or a.result is not None)
        assert orch.under_way, orch.result
        assert "vm1.guest" not in orch.workloads  # VM 1's loop is still running at the kill
        # the guest first: killed second, it could see its vmm die and answer its workload
        # with that failure before its own death (a VM's guest and vmm die together)
        assert launcher.kill("vm2.guest")
        assert launcher.kill("vm2.vmm")
        # VM 2 torn down (each poll bounded by DEADLINE), then VM 1's loop to its end
        assert launcher.run_actor(orch, timeout=WORKLOAD_DEADLINE + 5), (orch.teardown, orch.workloads.keys())
        deaths = dict(launcher.poll_deaths(timeout=2.0))
        rows = {r["name"]: r for r in launcher.processes()}
    elapsed = time.monotonic() - t0
    # the two VM 2 processes died by SIGKILL, every other actor was still running
    assert {n: (r["state"], r["exitcode"]) for n, r in rows.items() if n.startswith("vm2.")} == {
        "vm2.vmm": ("killed", -9),
        "vm2.guest": ("killed", -9),
    }
    assert all(r["state"] == "running" for n, r in rows.items() if not n.startswith("vm2.")), rows
    assert set(deaths) <= {"vm2.vmm", "vm2.guest"}
    assert "vm2.vmm" in orch.downs
    # the host tore VM 2 down by itself, because its vmm died
    assert orch.teardown.get("why") == "vm2.vmm died", orch.teardown
    # VM 1's loop completed, every DMA verified
    vm1 = orch.workloads["vm1.guest"]
    assert vm1["ret"] == 0 and vm1["ok"], [s for s in vm1["steps"] if not s["ok"]][:3]
    assert (
        sum(1 for s in vm1["steps"] if s["flow"] == "F7" and s.get("verified") and s["ok"]) == 2 * ITERATIONS
    )
    # VM 2's workload request was in flight when its guest died
    vm2 = orch.workloads.get("vm2.guest", {})
    assert vm2.get("ret") == -E.EHOSTDOWN and vm2.get("indefinite") is True, vm2
    # the audit of the survivors is clean and nothing of VM 2 is left anywhere
    res = orch.result
    assert res["violations"] == [], res["violations"]
    host = res["snapshots"]["host"]
    assert "2" not in host["vms"] and "2" not in host["owned_frames"]
    assert not [p for p, a in host["ioasids"].items() if a["vm"] == 2]
    assert host["pasid_entries"]["pf2"] == [] and host["reclaiming"] == {} and host["quarantined"] == {}
    assert "2" not in res["snapshots"]["kvm"]["tables"] and "2" not in res["snapshots"]["vdcm"]["tables"]
    assert host["counters"]["owner_violations"] == 0 and host["dma"]["foreign"] == []
    # after close nothing is left
    assert not any(pid_alive(p) for p in pids)
    assert not os.path.exists(run_dir) and not os.path.exists(shm)
    print(
        f"\n  {policy}: {elapsed:.2f} s, host teardown seen after {orch.polls} pool_status poll(s), "
        f"teardown {orch.teardown['finished'] - orch.teardown['started']:.4f} s"
    )
