"""How one host stack grows with its number of VMs: start, binds, DMA, messages, CPU, memory, teardown.

A point launches one host (host, kvm, vdcm) and `vms` VMs as processes, powers every VM on
at once, and runs in every guest the same two phases (workload `phases`): `binds` bind /
unbind cycles of one PASID (all VMs binding at once), then `dma_rounds` rounds of DMA fills
through a passthrough function and an mdev, data checked. Then the audit on the live
topology, every VM stopped (F8), the audit again, and everything taken down.

Rates are over the phase's window (the first VM's start of it to the last VM's end, in
epoch time): binds_per_s counts bind/unbind cycles of every VM; DMA translations come from the
host's hot-path counters (only DMA translates, so the whole run's count is the DMA phase's).
CPU shares are CPU seconds over the wall time from "every VM booted" to "every workload done":
host_cpu_share of one core for the host process, actors_cpu_share of the whole machine for all
actor processes. PSS is read from /proc/PID/smaps_rollup when every workload has finished.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vsva.ops.config import VM
from vsva.ops.topology import MAX_RAM_PAGES, min_ram_pages
from vsva.scale.experiments import Metric, Param, PointContext, PointTimeout, StackResult
from vsva.scale.experiments.measure import (
    bench_steps,
    cpu_seconds,
    last_phase,
    mean,
    messages_between,
    percentile,
    phase_window,
    pss_mb,
    workload_failures,
)

if TYPE_CHECKING:
    from vsva.ops.control import Controller
    from vsva.ops.launcher import Launcher
    from vsva.ops.topology import Topology

DOC = (
    "VM count: start-to-ready, binds/s with every VM binding, bind p50/p99, DMA, messages, CPU, PSS, teardown"
)
PROCESSES = True
KINDS = ("host", "kvm", "vdcm", "vmm", "guest")
LAUNCH_MIN_S = 20.0

PARAMS = {
    "vms": Param(int, 2, "VMs on the host (guest + vmm processes each)", range=(1, 1024)),
    "binds": Param(int, 50, "bind/unbind cycles per VM in the bind phase", range=(1, 100_000)),
    "dma_rounds": Param(int, 20, "DMA rounds per VM (2 fills of 8 KiB each)", range=(1, 100_000)),
    "ram_pages": Param(
        int, 512, "guest RAM per VM (4 KiB pages)", range=(min_ram_pages(1 + VM.mediated), MAX_RAM_PAGES)
    ),
    "hosts": Param(int, 1, "independent host stacks run at once", range=(1, 64)),
}
METRICS = {
    "ready_s": Metric("s", "launch to every actor process ready", "max"),
    "start_to_ready_s": Metric("s", "launch to every VM powered on", "max"),
    "binds_per_s": Metric("1/s", "bind/unbind cycles per second, all VMs binding at once", "sum"),
    "bind_p50_us": Metric("us", "guest-observed bind latency, median over every bind", "mean"),
    "bind_p99_us": Metric("us", "guest-observed bind latency, 99th percentile", "max"),
    "dma_translations_per_s": Metric("1/s", "hot-path translations per second in the DMA phase", "sum"),
    "dma_descriptors_per_s": Metric("1/s", "DMA work descriptors completed per second", "sum"),
    "iotlb_hit_rate": Metric("", "IOTLB hits / lookups (after the device TLBs)", "mean"),
    "devtlb_hit_rate": Metric("", "device-TLB (ATS) hits / lookups", "mean"),
    "host_msgs_per_s": Metric("1/s", "messages sent or received by the host during the workloads", "sum"),
    "host_cpu_share": Metric("core", "host process CPU time / wall time during the workloads", "mean"),
    "actors_cpu_share": Metric("machine", "all actor processes' CPU time / (wall time x cores)", "mean"),
    "pss_host_mb": Metric("MiB", "PSS of the host process", "mean"),
    "pss_guest_mb": Metric("MiB", "PSS per guest process (mean)", "mean"),
    "pss_vmm_mb": Metric("MiB", "PSS per vmm process (mean)", "mean"),
    "pss_total_mb": Metric("MiB", "PSS of every actor process together", "sum"),
    "vm_stop_s": Metric("s", "every VM stopped at once (F8 teardowns)", "max"),
    "close_s": Metric("s", "every process stopped and the run's files removed", "max"),
    "processes": Metric("", "actor processes", "sum"),
}
SERIES: dict[str, str] = {}


def capacity() -> tuple[int, str]:
    """The most VMs the process runtime accepts in one topology, and where that limit is set."""
    from vsva.ops import capacity as cap

    return cap.MAX_VMS, "vsva.ops.capacity.MAX_VMS"


def refuse_topology(topo: Any) -> str | None:
    """Why this machine cannot hold `topo` (descriptors, memory, /dev/shm, processes), or None."""
    from vsva.ops.capacity import CapacityError, check

    try:
        check(topo)
    except CapacityError as exc:
        return f"refused: {exc}"
    return None


def refuse(params: dict[str, Any]) -> str | None:
    limit, where = capacity()
    if params["vms"] > limit:
        return f"refused: {params['vms']} VMs exceed the runtime's limit of {limit} ({where})"
    return refuse_topology(topology(params, 0, []))


def topology(params: dict[str, Any], seed: int, phases: list[list[Any]], **kw: Any) -> Topology:
    from vsva.ops.topology import default_topology

    topo = default_topology(
        params["vms"], seed=seed, workload="phases", iterations=1, ram_pages=params["ram_pages"], **kw
    )
    for name in topo.names("guest"):
        topo.spec(name).config["phases"] = phases
    return topo


class Sampler:
    """CPU seconds of every actor process when the VMs are booted and when the workloads are
    done, and PSS then (called from the controller's phase marks)."""

    def __init__(self, launcher: Any, ctx: PointContext):
        self.launcher, self.ctx = launcher, ctx
        self.cpu: dict[str, dict[str, float | None]] = {}
        self.pss: dict[str, float | None] = {}
        self.wall: dict[str, float] = {}

    def __call__(self, phase: str) -> None:
        self.ctx.phase(phase)
        if phase not in ("booted", "worked"):
            return
        pids = {r["name"]: r["pid"] for r in self.launcher.processes() if r["state"] == "running"}
        self.wall[phase] = time.monotonic()
        self.cpu[phase] = {n: cpu_seconds(p) for n, p in pids.items()}
        if phase == "worked":
            self.pss = {n: pss_mb(p) for n, p in pids.items()}

    def cpu_share(self, names: list[str]) -> float | None:
        if "worked" not in self.cpu or "booted" not in self.cpu:
            return None
        wall = self.wall["worked"] - self.wall["booted"]
        used = []
        for n in names:
            booted, worked = self.cpu["booted"].get(n), self.cpu["worked"].get(n)
            if booted is not None and worked is not None:
                used.append(worked - booted)
        return sum(used) / wall if wall > 0 and used else None


def launch_timeout(ctx: PointContext) -> float:
    """The launcher's ready timeout: the point's time left, but at least LAUNCH_MIN_S, so a
    point short of time is a `timeout` of the session rather than a launch error."""
    return min(120.0, max(LAUNCH_MIN_S, ctx.check("launch")))


def run_session(
    topo: Topology, ctx: PointContext, on_launch: Callable[[Launcher, Controller], None] | None = None
) -> tuple[dict[str, Any], Launcher, Sampler, dict[str, Any]]:
    """Launch `topo`, run the controller's session to its end, close; returns
    (the controller's result, launcher, sampler, timings)."""
    from vsva.ops.control import Controller
    from vsva.ops.launcher import Launcher

    t0 = time.monotonic()
    launcher = Launcher(topo, base_dir=ctx.base_dir, ready_timeout=launch_timeout(ctx), stop=ctx.stop)
    with launcher:
        ctx.phase(f"launched {len(topo.actors)} processes")
        sampler = Sampler(launcher, ctx)
        ctl = Controller(topo, on_phase=sampler, workload_timeout=ctx.check("the workloads"))
        if on_launch is not None:
            on_launch(launcher, ctl)
        finished = launcher.run_actor(ctl, timeout=ctx.check("the session"))
        if not finished or ctl.result is None:
            ctx.check("the session")  # a stop request ended it: PointStopped
            raise PointTimeout(f"timed out after phase {last_phase(ctl.marks)}")
        t_close = time.monotonic()
        launcher.close()
    timings = {
        "ready_s": launcher.ready_seconds,
        "close_s": time.monotonic() - t_close,
        "start_to_ready_s": ctl.marks["booted"] - t0,
        "vm_stop_s": ctl.marks.get("stopped", 0) - ctl.marks.get("audited", 0),
    }
    return ctl.result, launcher, sampler, timings


def run_stack(params: dict[str, Any], seed: int, ctx: PointContext) -> StackResult:
    topo = topology(params, seed, [["bind_latency", params["binds"]], ["dma_loop", params["dma_rounds"]]])
    res, launcher, sampler, timings = run_session(topo, ctx)
    out = StackResult(violations=list(res["violations"]), audit_ran=True, failures=workload_failures(res))
    works = res["workloads"]
    lat = [
        x for steps in bench_steps(works, "bind latencies").values() for s in steps for x in s["latencies"]
    ]
    binds = phase_window(works, "bind_latency")
    dma = phase_window(works, "dma_loop")
    host = res["snapshots"].get("host", {})
    c = host.get("counters", {})
    trace = launcher.trace()
    t0 = launcher.t0
    assert t0 is not None, "a started launcher has its epoch"
    w = (min(binds[0], dma[0]), max(binds[1], dma[1])) if binds and dma else None
    names = {k: topo.names(k) for k in KINDS}
    out.metrics = {
        **{k: timings[k] for k in ("ready_s", "start_to_ready_s", "vm_stop_s", "close_s")},
        "binds_per_s": len(lat) / (binds[1] - binds[0]) if binds and binds[1] > binds[0] else None,
        "bind_p50_us": _us(percentile(lat, 0.5)),
        "bind_p99_us": _us(percentile(lat, 0.99)),
        "dma_translations_per_s": _rate(c.get("translations"), dma),
        "dma_descriptors_per_s": _rate(c.get("dma_descriptors"), dma),
        "iotlb_hit_rate": _ratio(c.get("iotlb_hits"), c.get("iotlb_lookups")),
        "devtlb_hit_rate": _ratio(c.get("devtlb_hits"), c.get("devtlb_lookups")),
        "host_msgs_per_s": _rate(messages_between(trace, "host", w, t0), w) if w else None,
        "host_cpu_share": sampler.cpu_share(names["host"]),
        "actors_cpu_share": _per_core(sampler.cpu_share(topo.names())),
        "pss_host_mb": mean(sampler.pss.get(n) for n in names["host"]),
        "pss_guest_mb": mean(sampler.pss.get(n) for n in names["guest"]),
        "pss_vmm_mb": mean(sampler.pss.get(n) for n in names["vmm"]),
        "pss_total_mb": sum(v for v in sampler.pss.values() if v is not None) if sampler.pss else None,
        "processes": len(topo.actors),
    }
    return out


def _us(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e6


def _rate(count: int | None, window: tuple[float, float] | None) -> float | None:
    if count is None or not window or window[1] <= window[0]:
        return None
    return count / (window[1] - window[0])


def _ratio(a: int | None, b: int | None) -> float | None:
    return a / b if a is not None and b else None


def _per_core(share: float | None) -> float | None:
    return None if share is None else share / (os.cpu_count() or 1)
