"""The orchestrator's own actor: powers the VMs on, runs the workloads, snapshots and audits.

It is not part of the modelled system; it lives in the launching process (ZeroMQ runtime)
or beside the actors (deterministic runtime) and drives a run through ordinary messages.
"""

from __future__ import annotations

from typing import Any

from vsva.actors.base import Actor, ActorEnv, Call, Gather, Wait
from vsva.actors.catalogue import PoolStatus, Shutdown, Snapshot, StartWorkload, VmStart, VmStop
from vsva.analysis.audit import audit
from vsva.ops.topology import HOST, ORCH, Topology

WORKLOAD_TIMEOUT = 120.0


class Controller(Actor):
    """Runs one scripted session: vm_start, start_workload, snapshot + audit, shutdown."""

    def __init__(self, topology: Topology, *, shutdown: bool = True, stop_vms: bool = True, env: Any = None):

        super().__init__(ORCH, env or ActorEnv(config={"request_timeout": topology.request_timeout},
                                               seed=topology.seed))
        self.topology = topology
        self.shutdown_at_end = shutdown
        self.stop_vms = stop_vms
        self.result: dict[str, Any] | None = None

    def on_start(self):
        vmms, guests = self.topology.names("vmm"), self.topology.names("guest")
        started = yield Gather([Call(v, VmStart(), flow="boot") for v in vmms])
        runs = yield Gather([Call(g, StartWorkload(), timeout=WORKLOAD_TIMEOUT) for g, s
                             in zip(guests, started) if s["ret"] == 0])
        live = yield from self.snapshot_all()
        violations = audit(live, self.topology)
        stopped = []
        if self.stop_vms:
            stopped = yield Gather([Call(v, VmStop(), flow=f"F8:vm{self.topology.spec(v).config['vm']}.1",
                                         timeout=60.0) for v in vmms])
            after = yield from self.snapshot_all()
            violations += [v for v in audit(after, self.topology) if v not in violations]
        self.result = {
            "vm_start": dict(zip(vmms, started)),
            "workloads": dict(zip([g for g, s in zip(guests, started) if s["ret"] == 0], runs)),
            "vm_stop": dict(zip(vmms, stopped)),
            "snapshots": live,
            "violations": violations,
        }
        if self.shutdown_at_end:
            yield from self.shutdown_all()

    def settle(self, limit: float = 10.0, tick: float = 0.005):
        """Wait (bounded) until the host has no PASID waiting for FREE acknowledgements.

        Snapshots are taken one actor at a time, not as one atomic cut: while a reclaim is
        still collecting acknowledgements, kvm may answer before its FREE arrives and the
        host after the PASID went back to the pool, and the audit would see a translation
        for a free PASID that never existed at any single moment."""
        waited = 0.0
        while waited < limit:
            status = yield Call(HOST, PoolStatus())
            if status.get("ret") != 0 or not status.get("reclaiming"):
                return
            yield Wait(("settle", waited), timeout=tick)
            waited += tick

    def snapshot_all(self):
        """Every actor's state at a quiescent point (no workload running, no reclaim pending)."""
        yield from self.settle()
        names = self.topology.names()
        replies = yield Gather([Call(n, Snapshot()) for n in names])
        return {n: r.get("state", {"error": r.get("error", ""), "ret": r.get("ret")}) for n, r in zip(names, replies)}

    def shutdown_all(self):
        yield Gather([Call(n, Shutdown(), timeout=2.0) for n in self.topology.names()])
