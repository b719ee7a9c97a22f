"""The free-before-unbind policies under churn and a VMM kill (docs/design.md §4), with numbers.

A point launches one host and 2 + `churn_vms` VMs. VM 1 binds `pasids` PASIDs (on an mdev
of the accelerator every VM shares, `bind_on`) and keeps them; then VM 2 starts `other_binds` bind/unbind cycles (the
other VMs' bind latency) and each churn VM frees bound PASIDs of the shared accelerator's
mdevs over and over (workload `churn`). `kill_after_s` later VM 1's vmm and guest are
SIGKILLed; the host notices the vmm's death on its own and tears VM 1 down (F8) under the
run's policy. The probe polls the host's pool (`pool_status`) until VM 1's teardown has
finished and no PASID is still reclaiming, noting the largest reclaim backlog it saw. When
the other workloads are done: the audit on the live topology, the survivors stopped, the
audit again; quarantined PASIDs count as leaks (I4), as in every run's live audit. With
`kill_subscriber` a notifier subscriber (kvm or vdcm) dies just before the vmm and is not
restarted, so no FREE of the teardown is ever acknowledged: under ordered and reclaim the
PASIDs are quarantined (a leak, never a reuse), under naive they are reused at once.

Over FIFO links between processes naive's hazard (a freed, still-bound PASID reused before
its deferred cleanup ran) shows as an occasional failed DMA of a churn VM, which makes the
run `failed`; the deterministic runtime (`vsva explore`) finds it for every seed.

teardown_ms counts from the SIGKILL to the poll that saw the teardown done (polls every
POLL_S); host_teardown_ms is the host's own record of it (death seen -> every PASID
released). The other VM's binds are split by their start time: inside the window from the
kill to the end of the teardown, or outside it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

from vsva.actors.base import Body, Call, Steps, Wait
from vsva.actors.catalogue import PoolStatus
from vsva.ops.control import Orchestrator
from vsva.ops.topology import Topology, guest_name, vmm_name
from vsva.scale.experiments import Metric, Param, PointContext, PointTimeout, StackResult
from vsva.scale.experiments.measure import (
    bench_steps,
    epoch_offset,
    last_phase,
    percentile,
    workload_failures,
)
from vsva.scale.experiments.vms import launch_timeout

DOC = "naive / ordered / reclaim under churn and a VMM kill: teardown, reclaim backlog, violations, leaks, others' bind latency"
PROCESSES = True
POLL_S = 0.002
KILLED = 1
OTHER = 2

PARAMS = {
    "policy": Param(
        str, "reclaim", "free-before-unbind cleanup policy", choices=("naive", "ordered", "reclaim")
    ),
    "pasids": Param(int, 64, "PASIDs VM 1 has bound when its vmm is killed", range=(1, 16384)),
    "kill": Param(bool, True, "SIGKILL VM 1's vmm and guest (false: a run without the fault)"),
    "kill_subscriber": Param(
        str,
        "",
        "also SIGKILL this notifier subscriber just before the vmm "
        "(never restarted: its FREE acknowledgements never come)",
        choices=("", "kvm", "vdcm"),
    ),
    "bind_on": Param(
        str,
        "mdev",
        "where VM 1 binds: an mdev of the accelerator the churn VMs share, or its own passthrough function",
        choices=("mdev", "pf"),
    ),
    "churn_vms": Param(int, 1, "VMs freeing bound PASIDs over and over meanwhile", range=(0, 16)),
    "churn_rounds": Param(int, 40, "alloc/bind/DMA/free rounds per churn VM", range=(1, 100_000)),
    "other_binds": Param(int, 300, "VM 2's bind/unbind cycles", range=(1, 100_000)),
    "kill_after_s": Param(float, 0.2, "from the other workloads' start to the kill", range=(0.0, 60.0)),
    "hosts": Param(int, 1, "independent host stacks run at once", range=(1, 64)),
}
METRICS = {
    "teardown_ms": Metric("ms", "SIGKILL of VM 1's vmm -> teardown done, every PASID released", "max"),
    "host_teardown_ms": Metric("ms", "the host's own teardown record (death seen -> released)", "max"),
    "reclaim_backlog_peak": Metric("", "most PASIDs seen reclaiming at once", "max"),
    "audit_violations": Metric("", "violations the audits found (live, then after stopping)", "sum"),
    "pasids_leaked": Metric("", "PASIDs of VM 1 still held by the host after its teardown", "sum"),
    "pasids_quarantined": Metric("", "PASIDs quarantined (a FREE never acknowledged)", "sum"),
    "other_bind_p50_us": Metric("us", "VM 2's bind latency during the teardown, median", "mean"),
    "other_bind_p99_us": Metric("us", "VM 2's bind latency during the teardown, 99th percentile", "max"),
    "other_bind_p50_us_outside": Metric("us", "VM 2's bind latency outside the teardown, median", "mean"),
    "churn_failed_steps": Metric("", "steps of the churn VMs that failed", "sum"),
    "bound": Metric("", "PASIDs VM 1 had bound", "sum"),
}
SERIES = {"other_bind_us": "VM 2's bind latencies (us) against their start (s since the run started)"}


def refuse(params: dict[str, Any]) -> str | None:
    from vsva.scale.experiments import vms

    total = 2 + params["churn_vms"]
    limit, where = vms.capacity()
    if total > limit:
        return f"refused: {total} VMs exceed the runtime's limit of {limit} ({where})"
    return vms.refuse_topology(topology(params, 0))


class PolicyProbe(Orchestrator):
    """The run engine's Orchestrator running the session above, from the engine's steps
    (boot, workload, audit_live with its quarantine leaks, stop_vms)."""

    def __init__(
        self,
        topology: Topology,
        params: dict[str, Any],
        kill_vm: Callable[[int], None],
        on_phase: Callable[[str], None],
        timeout: float,
    ):
        super().__init__(topology)
        self.on_phase = on_phase
        self.params = params
        self.kill_vm = kill_vm
        self.workload_timeout = timeout
        self.teardown_timeout = min(60.0, timeout)
        self.result: dict[str, Any] | None = None
        self.works: dict[int, Body] = {}
        self.killed_at: float | None = None
        self.torn_down_at: float | None = None
        self.host_record: dict[str, Any] | None = None
        self.backlog = 0

    def on_start(self) -> Steps[None]:
        vms = self.topology.vms
        self.mark("started")
        started = yield from self.boot(vms)
        self.mark("booted")
        self.works = {KILLED: (yield from self.workload(KILLED, self.workload_timeout))}
        others = [vm for vm in vms if vm != KILLED]
        for vm in others:
            self.spawn(partial(self._other, vm, len(others)))
        yield Wait(("kill-after",), timeout=self.params["kill_after_s"])
        if self.params["kill"]:
            yield from self._kill_and_watch()
        if len(self.works) <= len(others):
            yield Wait(("others",), timeout=self.workload_timeout)
        self.mark("worked")
        live = yield from self.audit_live()
        violations = live["violations"]
        self.mark("audited")
        yield from self.stop_vms([vm for vm in vms if not (self.params["kill"] and vm == KILLED)])
        self.mark("stopped")
        after = yield from self.audit_live()
        violations += [v for v in after["violations"] if v not in violations]
        self.result = {
            "vm_start": {vmm_name(vm): r for vm, r in started.items()},
            "workloads": {guest_name(vm): r for vm, r in self.works.items()},
            "snapshots": live["snapshots"],
            "after": after["snapshots"],
            "violations": violations,
        }
        yield from self.shutdown_all()

    def _other(self, vm: int, count: int) -> Steps[None]:
        self.works[vm] = yield from self.workload(vm, self.workload_timeout)
        if len(self.works) == count + 1:
            self.wake(("others",), {"ret": 0})

    def _kill_and_watch(self) -> Steps[None]:
        self.killed_at = time.time()
        self.kill_vm(KILLED)
        end = self.now + self.teardown_timeout
        while self.now < end:
            status = yield Call("host", PoolStatus())  # its kind's timeout (pacing)
            self.backlog = max(self.backlog, status.get("reclaiming", 0))
            done = [t for t in status.get("teardowns", []) if t["vm"] == KILLED and "finished" in t]
            if done and status.get("reclaiming", 0) == 0:
                self.torn_down_at = time.time()
                self.host_record = done[-1]
                return
            yield Wait(("poll", self.now), timeout=POLL_S)


def topology(params: dict[str, Any], seed: int) -> Topology:
    from vsva.ops.topology import default_topology

    n = 2 + params["churn_vms"]
    topo = default_topology(
        n,
        seed=seed,
        policy=params["policy"],
        workload="phases",
        iterations=1,
        quota=params["pasids"] + 16,
        ram_pages=512,
    )
    plan = {1: [["bind_many", params["pasids"]]], 2: [["bind_latency", params["other_binds"]]]}
    for name in topo.names("guest"):
        vm = topo.spec(name).config["vm"]
        topo.spec(name).config["phases"] = plan.get(vm, [["churn", params["churn_rounds"]]])
    topo.spec(f"vm{KILLED}.guest").config["bind_on"] = params["bind_on"]
    return topo


def run_stack(params: dict[str, Any], seed: int, ctx: PointContext) -> StackResult:
    from vsva.ops.launcher import Launcher

    topo = topology(params, seed)
    launcher = Launcher(topo, base_dir=ctx.base_dir, ready_timeout=launch_timeout(ctx), stop=ctx.stop)
    with launcher:
        ctx.phase(f"launched {len(topo.actors)} processes")

        def kill_vm(vm: int) -> None:
            if params["kill_subscriber"]:
                launcher.kill(params["kill_subscriber"])
                launcher.wait_exit(params["kill_subscriber"], 5.0)
            ctx.phase(f"killing vm{vm}.vmm")
            launcher.kill(f"vm{vm}.vmm")
            launcher.kill(f"vm{vm}.guest")

        p = PolicyProbe(topo, params, kill_vm, ctx.phase, ctx.check("the session"))
        finished = launcher.run_actor(p, timeout=ctx.check("the session"))
        if not finished or p.result is None:
            ctx.check("the session")  # a stop request ended it: PointStopped
            raise PointTimeout(f"timed out after phase {last_phase(p.marks)}")
        t0 = launcher.t0
        assert t0 is not None, "a started launcher has its epoch"
        launcher.close()
    return measure(p, p.result, params, t0)


def measure(p: PolicyProbe, res: dict[str, Any], params: dict[str, Any], t0: float) -> StackResult:
    """The point's metrics from the probe's `result` (`res`) and what it timed."""
    host_after = res["after"].get("host", {})
    out = StackResult(violations=res["violations"], audit_ran=True, failures=workload_failures(res))
    quarantined = host_after.get("quarantined", {})
    works = res["workloads"]
    other = works.get(f"vm{OTHER}.guest", {})
    steps = other.get("steps", [])
    off = epoch_offset(steps)
    bind: dict[str, list[float]] = next(
        iter(bench_steps({"g": other}, "bind latencies")["g"]), {"latencies": [], "starts": []}
    )
    window = (p.killed_at, p.torn_down_at) if p.killed_at and p.torn_down_at else None
    during: list[float] = []
    outside: list[float] = []
    for start, lat in zip(bind.get("starts", []), bind["latencies"]):
        inside = window is not None and off is not None and window[0] <= start + off <= window[1]
        (during if inside else outside).append(lat * 1e6)
    churners = [w for g, w in works.items() if g not in (f"vm{KILLED}.guest", f"vm{OTHER}.guest")]
    leaked = (
        [a for a in host_after.get("ioasids", {}).values() if a.get("vm") == KILLED] if params["kill"] else []
    )
    record = p.host_record or {}
    out.metrics = {
        "teardown_ms": (window[1] - window[0]) * 1e3 if window else None,
        "host_teardown_ms": (record["finished"] - record["started"]) * 1e3 if record else None,
        "reclaim_backlog_peak": p.backlog,
        "audit_violations": len(out.violations),
        "pasids_leaked": len(leaked),
        "pasids_quarantined": len(quarantined),
        "other_bind_p50_us": percentile(during, 0.5),
        "other_bind_p99_us": percentile(during, 0.99),
        "other_bind_p50_us_outside": percentile(outside, 0.5),
        "churn_failed_steps": sum(1 for w in churners for s in w.get("steps", []) if not s.get("ok")),
        "bound": sum(
            1 for s in works.get(f"vm{KILLED}.guest", {}).get("steps", []) if s["flow"] == "F2" and s["ok"]
        ),
    }
    if window is None and params["kill"]:
        out.failures.append("VM 1's teardown was not seen to finish")
    if off is not None and bind["latencies"]:
        out.series["other_bind_us"] = {
            "t": [s + off - t0 for s in bind["starts"]],
            "y": [x * 1e6 for x in bind["latencies"]],
            "windows": [[window[0] - t0, window[1] - t0, "VMM kill -> teardown done"]] if window else [],
        }
    return out
