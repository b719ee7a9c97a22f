"""The run engine: the orchestrator's own actor and the steps every run is made of.

Whoever drives a run, it is made of the same steps, written once here as generator methods
of `Orchestrator`, the actor named "orch" (not part of the modelled system: it lives in the
launching process, or beside the actors in the deterministic runtime, and acts through
ordinary messages): power VMs on (`boot`), run a guest's workload (`workload`), audit the
live topology (`audit_live`: every actor's snapshot on a consistent cut, vsva.analysis.cut;
the invariants of vsva.analysis.audit, and the PASIDs the host had to quarantine, which are
leaks), stop VMs
through F8 (`stop_vms`) and shut the actors down (`shutdown_all`).

`Controller` runs the steps as one scripted session (`vsva demo`, explore, most tests), on
either runtime. The supervisor (`vsva up`, `vsva run`, vsva.ops.supervisor) runs them one by
one between its recovery actions, starting each from outside the actor with the actor's
public `run_task`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from vsva.actors.base import Actor, ActorEnv, Body, Call, Gather, Steps
from vsva.actors.catalogue import Shutdown, StartWorkload, VmStart, VmStop
from vsva.analysis.audit import audit
from vsva.analysis.cut import CutTaker, cut_limit_s
from vsva.ops.pacing import gather_bounded, orch_config
from vsva.ops.topology import HOST, ORCH, Topology, guest_name, vmm_name

WORKLOAD_TIMEOUT = 120.0
AUDIT_ANSWER_S = 2.0  # an actor that has not answered its snapshot by then fails the audit
AUDIT_VERDICT_S = 5.0  # the invariants and the reply (0.14 s measured: 256 VMs, 16,384 bound PASIDs)
# How long `vsva audit` waits: a request that comes while an audit runs waits for the rest of
# that one, then its own (vsva.ops.supervisor.control.AuditQueue), each a cut and a verdict.
AUDIT_REPLY_S = 2 * (cut_limit_s(AUDIT_ANSWER_S) + AUDIT_VERDICT_S)
VM_STOP_TIMEOUT = 60.0


def quarantine_leaks(snapshots: dict[str, Any]) -> list[dict[str, Any]]:
    """I4 as a run sees it: a PASID the host quarantined (a subscriber never acknowledged its
    FREE) is never reused, so it is lost to the pool: a leak."""
    leaked = snapshots.get(HOST, {}).get("quarantined", {})
    if not leaked:
        return []
    return [
        {
            "invariant": "I4",
            "what": f"{len(leaked)} PASID(s) quarantined (leaked)",
            "actors": [HOST],
            "vm": None,
            "pasid": None,
        }
    ]


class Orchestrator(Actor):
    """The steps of a run (see the module docstring); subclasses say in which order."""

    def __init__(self, topology: Topology, env: ActorEnv | None = None):
        super().__init__(ORCH, env or ActorEnv(config=orch_config(topology), seed=topology.seed))
        self.topology = topology
        self.marks: dict[str, float] = {}  # phase -> time.monotonic() when it ended
        self.on_phase: Callable[[str], None] | None = None
        self.cuts = CutTaker(self, topology)

    def mark(self, phase: str) -> None:
        """Note that a phase of the run (started, booted, worked, audited, stopped) ended and
        tell `on_phase` (the scale experiments time phases and sample processes there)."""
        self.marks[phase] = time.monotonic()
        if self.on_phase is not None:
            self.on_phase(phase)

    def boot(self, vms: list[int]) -> Steps[dict[int, Body]]:
        """vm_start on each VM's vmm, `POWER_ON_WINDOW` at a time; returns {vm: reply}."""
        replies = yield from gather_bounded([Call(vmm_name(vm), VmStart(), flow="boot") for vm in vms])
        return dict(zip(vms, replies))

    def workload(self, vm: int, timeout: float = WORKLOAD_TIMEOUT) -> Steps[Body]:
        """Run VM `vm`'s guest workload to its end; returns the guest's report."""
        report: Body = yield Call(guest_name(vm), StartWorkload(), timeout=timeout)
        return report

    def workloads(self, vms: list[int], timeout: float = WORKLOAD_TIMEOUT) -> Steps[dict[int, Body]]:
        """Every listed VM's workload at once; returns {vm: report}."""
        replies = yield Gather([Call(guest_name(vm), StartWorkload(), timeout=timeout) for vm in vms])
        return dict(zip(vms, replies))

    def audit_live(self, names: list[str] | None = None) -> Steps[dict[str, Any]]:
        """Audit the live topology on a consistent cut (vsva.analysis.cut: the guests pause
        new work while what is in flight drains and every actor is snapshotted):
        {"ok", "violations", "incomplete", "snapshots", "cut"}. It never passes by silence:
        an actor that did not answer (or a guest that did not drain) makes it incomplete,
        and an incomplete audit fails, naming who (`incomplete`: one line per actor);
        `cut` says what the pause cost (seconds)."""
        names = self.topology.names() if names is None else names
        cut = yield from self.cuts.take(names, AUDIT_ANSWER_S)
        violations = audit(cut.snapshots, self.topology) + quarantine_leaks(cut.snapshots)
        return {
            "ok": not violations and not cut.incomplete,
            "violations": violations,
            "incomplete": cut.incomplete,
            "snapshots": cut.snapshots,
            "cut": {k: round(v, 4) for k, v in cut.costs.items()},
        }

    def stop_vms(self, vms: list[int], timeout: float | None = VM_STOP_TIMEOUT) -> Steps[dict[int, Body]]:
        """vm_stop (F8: the host unbinds and frees every PASID of the VM); returns {vm: reply}.
        `timeout` None: vm_stop's, scaled to the topology (vsva.ops.pacing)."""
        replies = yield Gather(
            [Call(vmm_name(vm), VmStop(), flow=f"F8:vm{vm}.1", timeout=timeout) for vm in vms]
        )
        return dict(zip(vms, replies))

    def shutdown_all(self) -> Steps[None]:
        yield Gather([Call(n, Shutdown(), timeout=2.0) for n in self.topology.names()])


class Controller(Orchestrator):
    """One scripted session: boot every VM, run the workloads, audit, stop the VMs (F8),
    audit again, shut down. The outcome is `result` (None until the session ends)."""

    def __init__(
        self,
        topology: Topology,
        *,
        shutdown: bool = True,
        stop_vms: bool = True,
        env: ActorEnv | None = None,
        on_phase: Callable[[str], None] | None = None,
        workload_timeout: float = WORKLOAD_TIMEOUT,
    ):
        super().__init__(topology, env)
        self.shutdown_at_end = shutdown
        self.stop_at_end = stop_vms
        self.on_phase = on_phase
        self.workload_timeout = workload_timeout
        self.result: dict[str, Any] | None = None

    def on_start(self) -> Steps[None]:
        vms = self.topology.vms
        self.mark("started")
        started = yield from self.boot(vms)
        self.mark("booted")
        runs = yield from self.workloads([vm for vm in vms if started[vm]["ret"] == 0], self.workload_timeout)
        self.mark("worked")
        live = yield from self.audit_live()
        violations = live["violations"]
        self.mark("audited")
        stopped: dict[int, Any] = {}
        if self.stop_at_end:
            stopped = yield from self.stop_vms(vms)
            self.mark("stopped")
            after = yield from self.audit_live()
            violations += [v for v in after["violations"] if v not in violations]
        self.result = {
            "vm_start": {vmm_name(vm): r for vm, r in started.items()},
            "workloads": {guest_name(vm): r for vm, r in runs.items()},
            "vm_stop": {vmm_name(vm): r for vm, r in stopped.items()},
            "snapshots": live["snapshots"],
            "violations": violations,
        }
        if self.shutdown_at_end:
            yield from self.shutdown_all()
