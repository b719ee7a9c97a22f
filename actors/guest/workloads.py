"""Guest workloads: what a guest's processes do once it has booted (`start_workload`).

`run_demo` walks flows F1-F7 and checks every DMA by reading the bytes back through the
process's own page tables; the others serve the benchmarks and `vsva explore` (churn).
The topology names one per VM (`workload`, a key of WORKLOADS).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vsva.actors import errno as E
from vsva.actors.base import Steps
from vsva.actors.catalogue import VcmdFree
from vsva.actors.guest.kernel import Process
from vsva.actors.memory import radix_tables
from vsva.actors.uapi import IOMMU_PAGE_RESP_INVALID
from vsva.hotpath.layout import ADDR_MASK, FL_P, PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from vsva.actors.guest.actor import Guest


def _pattern(seed: int, length: int) -> bytes:
    return bytes((seed * 31 + i * 7) & 0xFF for i in range(length))


def _bind_and_copy(
    g: Guest, proc: Process, dev: str, src: int, dst: int, data: bytes, what: str
) -> Steps[int]:
    """F1, F2, F7: write `data` at src, allocate and bind a PASID for `dev`, DMA-copy src to dst
    and record the verified step (its text: `what`); the PASID, 0 if none was allocated."""
    k = g.booted_kernel
    k.write(proc, src, data)
    pasid = yield from g.alloc_pasid(proc, dev)
    if not pasid:
        return 0
    yield from g.bind(proc, dev, pasid)
    reply = yield from g.submit(dev, pasid, "copy", src=src, dst=dst, length=len(data))
    g.step(
        "F7",
        f"pid {proc.pid} DMA copy {what} via {dev}",
        reply,
        ok=reply["ret"] == 0 and k.read(proc, dst, len(data)) == data,
        verified=True,
        **{key: reply[key] for key in ("page_requests",) if key in reply},
    )
    return pasid


def demo_passthrough(g: Guest, proc: Process, dev: str, base: int) -> Steps[int]:
    """One process on the passthrough function: bind, copy, migrate a page + flush, re-DMA."""
    k = g.booted_kernel
    src, dst, pages = base, base + 0x100000, 4
    k.mmap(proc, src, pages)
    k.mmap(proc, dst, pages)
    data = _pattern(proc.pid, pages * PAGE_SIZE)
    pasid = yield from _bind_and_copy(g, proc, dev, src, dst, data, f"{len(data)} B")
    if not pasid:
        return 0
    # F3: migrate the first destination page, flush, and DMA again: the device must write the
    # new frame, never the old one (a stale IOTLB entry would).
    old, new = k.migrate(proc, dst)
    old_bytes = k.ram.read(old, PAGE_SIZE)
    yield from g.flush(proc, dev, pasid, dst)
    reply = yield from g.submit(dev, pasid, "fill", dst=dst, length=PAGE_SIZE, pattern=0x5A)
    g.step(
        "F7",
        f"pid {proc.pid} DMA fill of migrated page via {dev}",
        reply,
        ok=reply["ret"] == 0
        and k.read(proc, dst, PAGE_SIZE) == b"\x5a" * PAGE_SIZE
        and k.ram.read(old, PAGE_SIZE) == old_bytes,
        old_gpa=old,
        new_gpa=new,
        verified=True,
    )
    return pasid


def demo_mdev_pair(g: Guest, proc: Process, mdevs: list[str], base: int) -> Steps[None]:
    """Two mdevs of one parent bound to one guest PASID: users == 2, then two unbinds. A kernel
    that allows one bind per device (v5.9: the second is -EBUSY) gets the pair as one mdev,
    and the step says so."""
    k = g.booted_kernel
    k.mmap(proc, base, 2)
    pasid = yield from g.alloc_pasid(proc, mdevs[0])
    if not pasid:
        return
    proc.pasids[mdevs[1]] = pasid
    first = yield from g.bind(proc, mdevs[0], pasid)
    second = yield from g.bind(proc, mdevs[1], pasid, allowed=(0, -E.EBUSY))
    if second["ret"] == -E.EBUSY:
        g.step(
            "F2",
            f"pid {proc.pid} second bind of the parent refused: this kernel allows one bind per device",
            second,
            ok=first.get("users") == 1,
            users=second.get("users"),
            check=True,
        )
        g.pasid_dirs[mdevs[1]].clear_entry(pasid)
        proc.pasids.pop(mdevs[1], None)
        mdevs = mdevs[:1]
    else:
        g.step(
            "F2",
            f"pid {proc.pid} second bind shares the parent's sdev",
            second,
            ok=first.get("users") == 1 and second.get("users") == 2,
            users=second.get("users"),
            check=True,
        )
    for i, dev in enumerate(mdevs):
        reply = yield from g.submit(dev, pasid, "fill", dst=base, length=2 * PAGE_SIZE, pattern=0x11 + i)
        g.step(
            "F7",
            f"pid {proc.pid} DMA fill via {dev} (guest PASID {pasid})",
            reply,
            ok=reply["ret"] == 0 and k.read(proc, base, 2 * PAGE_SIZE) == bytes([0x11 + i]) * 2 * PAGE_SIZE,
            verified=True,
        )
    last = bytes([0x11 + len(mdevs) - 1]) * PAGE_SIZE
    if len(mdevs) > 1:
        yield from g.unbind(proc, mdevs[0], pasid)
        reply = yield from g.submit(mdevs[1], pasid, "fill", dst=base, length=PAGE_SIZE, pattern=0x33)
        g.step(
            "F7",
            f"pid {proc.pid} {mdevs[1]} still works after {mdevs[0]} unbound",
            reply,
            ok=reply["ret"] == 0 and k.read(proc, base, PAGE_SIZE) == b"\x33" * PAGE_SIZE,
            verified=True,
        )
        last = b"\x33" * PAGE_SIZE
    yield from g.unbind(proc, mdevs[-1], pasid)
    reply = yield from g.submit(mdevs[-1], pasid, "fill", dst=base, length=PAGE_SIZE, pattern=0x44)
    g.step(
        "F7",
        f"pid {proc.pid} DMA after the last unbind is refused",
        reply,
        ok=reply["ret"] != 0 and k.read(proc, base, PAGE_SIZE) == last,
        expected_error=True,
    )
    yield from g.free(proc, mdevs[0], pasid)
    proc.pasids.pop(mdevs[-1], None)


def demo_demand_paging(g: Guest, proc: Process, dev: str, base: int, pages: int = 4) -> Steps[None]:
    """F6: DMA into a buffer the process mapped but never touched: one page request per page,
    the guest faults each page in; then a DMA to an address outside every VMA fails."""
    k = g.booted_kernel
    src, dst, hole = base, base + 0x100000, base + 0x200000
    k.mmap(proc, src, pages)
    k.mmap(proc, dst, pages, populate=False)
    data = _pattern(proc.pid + 11, pages * PAGE_SIZE)
    pasid = yield from _bind_and_copy(g, proc, dev, src, dst, data, f"into {pages} demand-paged pages")
    if not pasid:
        return
    reply = yield from g.submit(dev, pasid, "fill", dst=hole, length=PAGE_SIZE, pattern=0x77)
    g.step(
        "F7",
        f"pid {proc.pid} DMA to an unmapped address fails (page response INVALID)",
        reply,
        ok=reply["ret"] != 0
        and reply.get("page_response") == IOMMU_PAGE_RESP_INVALID
        and not proc.pt.lookup(hole) & FL_P,
        expected_error=True,
    )
    yield from g.unbind(proc, dev, pasid)
    yield from g.free(proc, dev, pasid)


def run_demo(g: Guest) -> Steps[None]:
    """The demo: two processes share the passthrough function, one uses a pair of mdevs, one
    DMAs into demand-paged memory (F6)."""
    k = g.booted_kernel
    pf = next(d for d in g.pasid_dirs if d not in g.mdevs)
    p1, p2, p3 = k.spawn(1), k.spawn(2), k.spawn(3)
    pasid1 = yield from demo_passthrough(g, p1, pf, 0x4000_0000)
    pasid2 = yield from demo_passthrough(g, p2, pf, 0x7F00_0000_0000)
    yield from demo_mdev_pair(g, p3, sorted(g.mdevs)[:2], 0x5000_0000)
    yield from demo_demand_paging(g, k.spawn(4), pf, 0x6000_0000)
    for proc, pasid in ((p1, pasid1), (p2, pasid2)):
        if pasid:
            yield from g.unbind(proc, pf, pasid)
            yield from g.free(proc, pf, pasid)


def bind_latency(g: Guest) -> Steps[None]:
    """Bind and unbind one PASID over and over, timing each bind from the guest's request to
    its wait completion (the figure benchmarks/bench_bind.py reports)."""
    proc = g.booted_kernel.spawn(1)
    pf = next(d for d in g.pasid_dirs if d not in g.mdevs)
    pasid = yield from g.alloc_pasid(proc, pf)
    latencies, starts = [], []
    for _ in range(int(g.config.get("iterations", 100))):
        started = g.now
        reply = yield from g.bind(proc, pf, pasid)
        latencies.append(g.now - started)
        starts.append(started)
        if reply["ret"]:
            break
        yield from g.unbind(proc, pf, pasid)
    yield from g.free(proc, pf, pasid)
    g.steps.append(
        {
            "flow": "bench",
            "what": "bind latencies",
            "ok": True,
            "ret": 0,
            "check": True,
            "latencies": latencies,
            "starts": starts,
        }
    )


def dma_loop(g: Guest) -> Steps[None]:
    """Bind one PASID on the passthrough function and one on an mdev, then DMA through both
    for `iterations` rounds, each round's bytes read back; stop at the first failure (the VM
    may be dying under it); unbind and free at the end."""
    k, proc, bound = g.booted_kernel, g.booted_kernel.spawn(1), []
    pf = next(d for d in g.pasid_dirs if d not in g.mdevs)
    for i, dev in enumerate([pf] + sorted(g.mdevs)[:1]):
        base = 0x4000_0000 + i * 0x100000
        k.mmap(proc, base, 2)
        pasid = yield from g.alloc_pasid(proc, dev)
        if not pasid or (yield from g.bind(proc, dev, pasid))["ret"]:
            return
        bound.append((dev, pasid, base))
    for n in range(int(g.config.get("iterations", 100))):
        for i, (dev, pasid, base) in enumerate(bound):
            pattern, size = (n * 7 + i * 3 + 1) & 0xFF, 2 * PAGE_SIZE
            reply = yield from g.submit(dev, pasid, "fill", dst=base, length=size, pattern=pattern)
            if not g.step(
                "F7",
                f"round {n} DMA fill via {dev}",
                reply,
                verified=True,
                ok=reply["ret"] == 0 and k.read(proc, base, size) == bytes([pattern]) * size,
            ):
                return
    for dev, pasid, _ in bound:
        yield from g.unbind(proc, dev, pasid)
        yield from g.free(proc, dev, pasid)


def bind_many(g: Guest) -> Steps[None]:
    """Allocate and bind `iterations` PASIDs to one process's page tables, and keep them: on the
    passthrough function, or with config bind_on = "mdev" on an mdev of the shared accelerator."""
    proc = g.booted_kernel.spawn(1)
    dev = (
        sorted(g.mdevs)[0]
        if g.config.get("bind_on") == "mdev"
        else next(d for d in g.pasid_dirs if d not in g.mdevs)
    )
    for _ in range(int(g.config.get("iterations", 16))):
        pasid = yield from g.alloc_pasid(proc, dev)
        if not pasid:
            return
        yield from g.bind(proc, dev, pasid)


FAULT_PAGES = 8  # fault_loop's pages a round (config fault_pages)


def tables_kept(workload: str, iterations: int) -> int:
    """Page-table pages `workload` allocates over `iterations` rounds and never frees:
    fault_loop maps FAULT_PAGES fresh pages a round at ever higher addresses and gives the
    pages back, not the tables that mapped them (~1 a 64 rounds)."""
    return radix_tables(FAULT_PAGES * iterations) if workload == "fault_loop" else 0


def fault_loop(g: Guest) -> Steps[None]:
    """Bind one PASID, then for `iterations` rounds map `fault_pages` fresh untouched pages and
    fill them by DMA (one page request each), data checked; the round times are recorded
    (benchmarks/bench_page_faults.py)."""
    k, proc = g.booted_kernel, g.booted_kernel.spawn(1)
    pf = next(d for d in g.pasid_dirs if d not in g.mdevs)
    pasid = yield from g.alloc_pasid(proc, pf)
    if not pasid or (yield from g.bind(proc, pf, pasid))["ret"]:
        return
    pages, rounds, faults, started = int(g.config.get("fault_pages", FAULT_PAGES)), [], 0, g.now
    order = max(0, (pages - 1).bit_length())
    for n in range(int(g.config.get("iterations", 100))):
        base = 0x1_0000_0000 + n * (PAGE_SIZE << order)  # aligned: one flush covers the range
        k.mmap(proc, base, pages, populate=False)
        t0 = g.now
        reply = yield from g.submit(pf, pasid, "fill", dst=base, length=pages * PAGE_SIZE, pattern=n & 0xFF)
        rounds.append(g.now - t0)
        faults += reply.get("page_requests", 0)
        if reply["ret"] or k.read(proc, base, pages * PAGE_SIZE) != bytes([n & 0xFF]) * pages * PAGE_SIZE:
            g.step("F7", f"round {n} demand-paged fill", reply, ok=False)
            break
        for i in range(pages):  # munmap: give the pages back so a long run keeps its RAM
            k.pages.release((proc.pt.unmap(base + i * PAGE_SIZE) & ADDR_MASK) >> PAGE_SHIFT)
        proc.vmas.pop()
        yield from g.flush(proc, pf, pasid, base, size_order=order)
    g.steps.append(
        {
            "flow": "bench",
            "what": "page fault rounds",
            "ok": True,
            "ret": 0,
            "check": True,
            "rounds": rounds,
            "faults": faults,
            "elapsed": g.now - started,
        }
    )
    yield from g.unbind(proc, pf, pasid)
    yield from g.free(proc, pf, pasid)


def churn(g: Guest) -> Steps[None]:
    """Free before unbind, over and over, on an mdev of the accelerator every VM shares.

    Each round allocates a PASID, binds it, checks a DMA fill through it, then frees it while
    it is still bound (the order the source thread worries about). Under 'ordered' the free
    is refused and the guest unbinds first. Run by `vsva explore --workload churn` to let the
    scheduler interleave the VMs' frees, reuses and the policy's cleanup."""
    k = g.booted_kernel
    proc = k.spawn(1)
    base = 0x6000_0000
    k.mmap(proc, base, 1)
    mdev = sorted(g.mdevs)[0]
    for i in range(int(g.config.get("iterations", 8))):
        pasid = yield from g.alloc_pasid(proc, mdev)
        if not pasid:
            return
        yield from g.bind(proc, mdev, pasid)
        pattern = (g.vm * 16 + i) & 0xFF
        reply = yield from g.submit(mdev, pasid, "fill", dst=base, length=PAGE_SIZE, pattern=pattern)
        g.step(
            "F7",
            f"pid 1 round {i} DMA fill via {mdev}",
            reply,
            verified=True,
            ok=reply["ret"] == 0 and k.read(proc, base, PAGE_SIZE) == bytes([pattern]) * PAGE_SIZE,
        )
        freed = yield from g.flow_request("F5", g.vmm, VcmdFree(gpasid=pasid))
        g.step(
            "F5", f"pid 1 round {i} free PASID {pasid} while bound", freed, ok=freed["ret"] in (0, -E.EBUSY)
        )
        if freed["ret"] == -E.EBUSY:  # policy 'ordered': unbind, then free
            yield from g.unbind(proc, mdev, pasid)
            yield from g.free(proc, mdev, pasid)
        proc.pasids.pop(mdev, None)


WORKLOADS = {
    "demo": run_demo,
    "fault_loop": fault_loop,
    "bind_latency": bind_latency,
    "dma_loop": dma_loop,
    "bind_many": bind_many,
    "churn": churn,
}

# What a workload needs of its VM that the topology file cannot leave to chance: the mediated
# devices it runs on (demo binds one PASID to two mdevs, churn runs on one), and whether it
# keeps every PASID it allocates (bind_many: one a round, so its iterations fit its quota).
MEDIATED_NEEDED = {"demo": 2, "churn": 1}
KEEPS_PASIDS = frozenset({"bind_many"})

from vsva.actors.scale_workloads import SCALE_WORKLOADS  # noqa: E402 (they compose the above)

WORKLOADS.update(SCALE_WORKLOADS)
