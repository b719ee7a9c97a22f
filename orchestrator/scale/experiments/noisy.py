"""A noisy neighbour: one VM floods the host while the others bind, DMA and fault.

A point launches one host, a noisy VM (VM 1) and `victims` VMs. Every victim runs the same
phases: `binds` bind/unbind cycles, `dma_rounds` rounds of DMA fills (a passthrough function
and an mdev, data checked), `fault_rounds` rounds of demand-paged fills (8 page requests
each). The noisy VM meanwhile runs, by `noise`:
  none        nothing: the baseline the other variants are read against;
  invalidate  `noise_ops` whole-PASID IOTLB + device-TLB invalidations back to back (inv_flood);
  fault       `noise_fault_rounds` rounds of demand-paged fills, 8 page requests each (fault_loop).
The victims' figures are theirs alone (from their own recorded steps), except the IOTLB and
device-TLB hit rates, which the host counts for all its devices together. `noise_overlap` is
the share of the victims' window during which the noisy VM was still flooding: a noise
variant whose flood ended early says so there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vsva.scale.experiments import Metric, Param, PointContext, StackResult
from vsva.scale.experiments.measure import (
    bench_steps,
    epoch_offset,
    percentile,
    phase_window,
    workload_failures,
)
from vsva.scale.experiments.vms import capacity, refuse_topology, run_session
from vsva.scale.experiments.vms import topology as vms_topology

if TYPE_CHECKING:
    from vsva.ops.topology import Topology

DOC = "one VM floods invalidations or page faults while the others run: their DMA, hit rates, fault and bind latency"
PROCESSES = True
NOISY = "vm1.guest"
DMA_BYTES = 2 * 4096  # per descriptor of dma_loop

PARAMS = {
    "noise": Param(str, "invalidate", "what the noisy VM does", choices=("none", "invalidate", "fault")),
    "noise_ops": Param(int, 2000, "the noisy VM's invalidations (noise = invalidate)", range=(1, 10_000_000)),
    "noise_fault_rounds": Param(
        int, 150, "the noisy VM's demand-paged rounds (noise = fault)", range=(1, 1_000_000)
    ),
    "victims": Param(int, 2, "VMs running the measured phases", range=(1, 255)),
    "binds": Param(int, 50, "bind/unbind cycles per victim", range=(1, 100_000)),
    "dma_rounds": Param(int, 50, "DMA rounds per victim", range=(1, 100_000)),
    "fault_rounds": Param(int, 20, "demand-paged rounds per victim", range=(1, 100_000)),
    "hosts": Param(int, 1, "independent host stacks run at once", range=(1, 64)),
}
METRICS = {
    "victim_dma_descriptors_per_s": Metric(
        "1/s", "the victims' DMA descriptors per second (DMA window)", "sum"
    ),
    "victim_dma_mib_s": Metric("MiB/s", "the victims' DMA throughput", "sum"),
    "iotlb_hit_rate": Metric("", "IOTLB hits / lookups, every device of the host", "mean"),
    "devtlb_hit_rate": Metric("", "device-TLB hits / lookups, every device of the host", "mean"),
    "victim_bind_p50_us": Metric("us", "the victims' bind latency, median", "mean"),
    "victim_bind_p99_us": Metric("us", "the victims' bind latency, 99th percentile", "max"),
    "victim_fault_round_p50_us": Metric("us", "a victim's demand-paged fill of 8 pages, median", "mean"),
    "victim_fault_round_p99_us": Metric(
        "us", "a victim's demand-paged fill of 8 pages, 99th percentile", "max"
    ),
    "noise_ops_per_s": Metric("1/s", "the noisy VM's invalidations or fault rounds per second", "sum"),
    "noise_overlap": Metric("", "share of the victims' window the noise lasted", "mean"),
}
SERIES: dict[str, str] = {}


def refuse(params: dict[str, Any]) -> str | None:
    limit, where = capacity()
    if params["victims"] + 1 > limit:
        return f"refused: {params['victims'] + 1} VMs exceed the runtime's limit of {limit} ({where})"
    return refuse_topology(topology(params, 0))


def topology(params: dict[str, Any], seed: int) -> Topology:
    noise, victim = plan(params)
    topo = vms_topology({"vms": params["victims"] + 1, "ram_pages": 1024}, seed, victim)
    topo.spec(NOISY).config["phases"] = noise
    return topo


def plan(params: dict[str, Any]) -> tuple[list[list[Any]], list[list[Any]]]:
    """(the noisy VM's phases, each victim's phases)."""
    noise = {
        "none": [],
        "invalidate": [["inv_flood", params["noise_ops"]]],
        "fault": [["fault_loop", params["noise_fault_rounds"]]],
    }[params["noise"]]
    return noise, [
        ["bind_latency", params["binds"]],
        ["dma_loop", params["dma_rounds"]],
        ["fault_loop", params["fault_rounds"]],
    ]


def run_stack(params: dict[str, Any], seed: int, ctx: PointContext) -> StackResult:
    topo = topology(params, seed)
    res, _launcher, _sampler, _timings = run_session(topo, ctx)
    out = StackResult(violations=list(res["violations"]), audit_ran=True, failures=workload_failures(res))
    works = res["workloads"]
    victims = {g: w for g, w in works.items() if g != NOISY}
    c = res["snapshots"].get("host", {}).get("counters", {})
    dma = phase_window(victims, "dma_loop")
    descriptors = sum(
        s["steps"]
        for w in victims.values()
        for s in w.get("steps", [])
        if s.get("what") == "phase" and s.get("phase") == "dma_loop"
    )
    lat = [
        x * 1e6
        for steps in bench_steps(victims, "bind latencies").values()
        for s in steps
        for x in s["latencies"]
    ]
    rounds = [
        x * 1e6
        for steps in bench_steps(victims, "page fault rounds").values()
        for s in steps
        for x in s["rounds"]
    ]
    span = dma and _span(victims)
    noisy = _noise_window(works.get(NOISY, {}))
    dma_s = dma[1] - dma[0] if dma else 0
    ops = {"none": 0, "invalidate": params["noise_ops"], "fault": params["noise_fault_rounds"]}[
        params["noise"]
    ]
    out.metrics = {
        "victim_dma_descriptors_per_s": descriptors / dma_s if dma_s > 0 else None,
        "victim_dma_mib_s": descriptors * DMA_BYTES / dma_s / (1 << 20) if dma_s > 0 else None,
        "iotlb_hit_rate": c.get("iotlb_hits", 0) / c["iotlb_lookups"] if c.get("iotlb_lookups") else None,
        "devtlb_hit_rate": c.get("devtlb_hits", 0) / c["devtlb_lookups"] if c.get("devtlb_lookups") else None,
        "victim_bind_p50_us": percentile(lat, 0.5),
        "victim_bind_p99_us": percentile(lat, 0.99),
        "victim_fault_round_p50_us": percentile(rounds, 0.5),
        "victim_fault_round_p99_us": percentile(rounds, 0.99),
        "noise_ops_per_s": (ops / (noisy[1] - noisy[0])) if noisy and noisy[1] > noisy[0] else None,
        "noise_overlap": _overlap(noisy, span) if span else None,
    }
    return out


def _span(victims: dict[str, dict[str, Any]]) -> tuple[float, float] | None:
    """From the victims' first phase start to their last phase end (epoch seconds)."""
    found = [phase_window(victims, p) for p in ("bind_latency", "dma_loop", "fault_loop")]
    windows = [w for w in found if w]
    return (min(w[0] for w in windows), max(w[1] for w in windows)) if windows else None


def _noise_window(work: dict[str, Any]) -> tuple[float, float] | None:
    steps = work.get("steps", [])
    off = epoch_offset(steps)
    phase = next((s for s in steps if s.get("what") == "phase"), None)
    return None if phase is None or off is None else (phase["t0"] + off, phase["t1"] + off)


def _overlap(noise: tuple[float, float] | None, span: tuple[float, float]) -> float:
    if noise is None or span[1] <= span[0]:
        return 0.0
    return max(0.0, min(noise[1], span[1]) - max(noise[0], span[0])) / (span[1] - span[0])
