"""IOTLB geometry against working set and page size, on the hot path directly (no processes).

One VM, one process, one PASID on one device with ATS off (so every request looks up the
IOTLB, not a device TLB). The process maps `working_set` 4 KiB pages' worth of memory from a
1 GiB-aligned VA: with `page_size = "4k"` as that many 4 KiB pages (nested 4-level x 4-level:
24 memory references per cold walk), with "2m" as 2 MiB pages at both levels. The guest
pages alias onto a small pool of frames, so a large working set costs table frames only.

The access stream is `accesses` page-granular requests, uniformly random over the working set
("random") or cycling through it in order ("loop", which defeats any LRU-like replacement once
the set exceeds the cache). A first pass warms the caches; the measured pass is a fresh stream
of the same kind, timed with perf_counter_ns around the translate calls only.

The hot path keys its IOTLB by 4 KiB page whatever the page size (hotpath/_pure.py
_translate1: `tkey = pasid << 36 | vpn`), so large pages shorten the walk but do not widen the
IOTLB's reach: the 2m rows show that.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from vsva.scale.experiments import Metric, Param, PointContext, StackResult

if TYPE_CHECKING:
    from vsva.hotpath.testing import HostMemory

DOC = "IOTLB sets x ways vs working set and page size on the hot path: hit rate, ns and memory refs per translation"
PROCESSES = False
PASID, DEV, DID = 1, 0, 1
BASE_VA = 1 << 30
POOL = 64  # guest pages the 4 KiB mappings alias onto

PARAMS = {
    "sets": Param(int, 256, "IOTLB sets (a power of two)", range=(1, 1 << 16)),
    "ways": Param(int, 8, "IOTLB ways", choices=(1, 2, 4, 8)),
    "working_set": Param(int, 1024, "distinct 4 KiB pages touched", range=(1, 1 << 18)),
    "page_size": Param(str, "4k", "mapping size at both translation levels", choices=("4k", "2m")),
    "pattern": Param(str, "random", "access order over the working set", choices=("random", "loop")),
    "accesses": Param(
        int, 65536, "translations per pass (one warm-up pass, one measured)", range=(64, 1 << 24)
    ),
    "batch": Param(int, 1024, "translations per translate call", range=(1, 1 << 16)),
}
METRICS = {
    "hit_rate": Metric("", "IOTLB hits / lookups in the measured pass"),
    "ns_per_translation": Metric("ns", "wall time per translation in the measured pass"),
    "memory_refs_per_translation": Metric("", "page-table memory references per translation"),
    "walks_per_translation": Metric("", "nested walks per translation (= miss rate)"),
    "evictions_per_translation": Metric("", "IOTLB evictions per translation"),
    "iotlb_entries": Metric("", "sets x ways"),
}
SERIES: dict[str, str] = {}


def refuse(params: dict[str, Any]) -> str | None:
    sets = params["sets"]
    if sets & (sets - 1):
        return f"sets = {sets} is not a power of two"
    return None


def build(working_set: int, page_size: str, seed: int) -> tuple[HostMemory, int]:
    """Host memory, PASID directory and the VA of every page of the working set."""
    from vsva.hotpath.layout import FL_P, FL_RW, FL_US, PAGE_SHIFT, SL_R, SL_W
    from vsva.hotpath.testing import GuestProcess, GuestVM, HostMemory, install_pasid, make_pasid_dir

    large = page_size == "2m"
    leaf_tables = -(-working_set // 512)
    host = HostMemory(
        leaf_tables + POOL + 1024 + (1024 if large else 0), seed=seed, contig_frames=1024 if large else None
    )
    vm = GuestVM(host, DID)
    proc = GuestProcess(vm)
    dir_hpa = make_pasid_dir(host)
    install_pasid(host, dir_hpa, PASID, flptr=proc.cr3, slptr=vm.sl_root, did=DID, eafe=False)
    bits = np.uint64(FL_P | FL_RW | FL_US)
    q = host.q
    if large:  # one 2 MiB guest region (a 2 MiB SL page) under every 2 MiB FL page
        region = -(-(vm.next_gpa_page + 1) // 512) * 512
        vm.next_gpa_page = region + 512
        vm.sl_map(region, host.alloc_contig(512, owner=DID, align=512), SL_R | SL_W, level=2)
        for i in range(-(-working_set // 512)):
            proc.map(BASE_VA + (i << 21), region, level=2)
    else:
        pool = np.array([vm.alloc_gpa_page() for _ in range(POOL)], dtype=np.uint64)
        for first in range(0, working_set, 512):
            k = min(512, working_set - first)
            ea = proc.entry_addr(BASE_VA + (first << PAGE_SHIFT), 1)
            gpas = pool[np.arange(first, first + k) % POOL]
            q[ea >> 3 : (ea >> 3) + k] = (gpas << np.uint64(PAGE_SHIFT)) | bits
    return host, dir_hpa


def stream(rng: np.random.Generator, params: dict[str, Any]) -> np.ndarray:
    n, ws = params["accesses"], params["working_set"]
    pages = rng.integers(0, ws, n) if params["pattern"] == "random" else np.arange(n) % ws
    offsets = rng.integers(0, 4096, n)
    vas: np.ndarray = (
        np.uint64(BASE_VA) + (pages.astype(np.uint64) << np.uint64(12)) + offsets.astype(np.uint64)
    )
    return vas


def run_stack(params: dict[str, Any], seed: int, ctx: PointContext) -> StackResult:
    from vsva import hotpath
    from vsva.hotpath.layout import ACCESS_READ

    ctx.phase("building tables")
    host, dir_hpa = build(params["working_set"], params["page_size"], seed)
    io = hotpath.Iommu(host.mem, host.owners, iotlb_sets=params["sets"], iotlb_ways=params["ways"])
    io.attach_device(DEV, dir_hpa, ats=False)
    rng = np.random.default_rng(seed)
    n, batch = params["accesses"], params["batch"]
    pasids = np.full(n, PASID, np.uint32)
    access = np.full(n, ACCESS_READ, np.uint8)
    out_pa = np.zeros(n, np.uint64)
    out_fault = np.zeros(n, np.int32)
    result = StackResult()
    ctx.phase("warm-up pass")
    vas = stream(rng, params)
    io.translate(DEV, pasids, vas, access, out_pa, out_fault)
    ctx.check("the warm-up pass")
    vas = stream(rng, params)
    io.reset_counters()
    ctx.phase("measured pass")
    elapsed = 0
    for lo in range(0, n, batch):
        hi = min(n, lo + batch)
        t0 = time.perf_counter_ns()
        io.translate(DEV, pasids[lo:hi], vas[lo:hi], access[lo:hi], out_pa[lo:hi], out_fault[lo:hi])
        elapsed += time.perf_counter_ns() - t0
    c = io.counters()
    faults = int(np.count_nonzero(out_fault))
    if faults:
        result.failures.append(f"{faults} of {n} translations faulted")
    if c["owner_violations"]:
        result.violations.append(
            {
                "invariant": "I1",
                "what": f"{c['owner_violations']} translations reached a frame the VM does not own",
                "actors": [],
                "vm": DID,
                "pasid": PASID,
            }
        )
    result.audit_ran = True  # I1 is this run's whole audit: one VM, no lifecycle
    t = max(1, c["translations"])
    result.metrics = {
        "hit_rate": c["iotlb_hits"] / max(1, c["iotlb_lookups"]),
        "ns_per_translation": elapsed / n,
        "memory_refs_per_translation": c["memory_refs"] / t,
        "walks_per_translation": c["walks"] / t,
        "evictions_per_translation": c["iotlb_evictions"] / t,
        "iotlb_entries": params["sets"] * params["ways"],
    }
    return result
