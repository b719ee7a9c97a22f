"""The guest kernel: processes with first-level page tables in guest RAM, and the vIOMMU driver.

Everything the guest does to the IOMMU goes through what a real guest has: it writes its
PASID tables and page tables as bytes in its own RAM, then queues invalidation descriptors
and a wait to the virtual IOMMU (the vmm traps them). Devices get work through their
portals: the passthrough function's directly (it runs on the host), an mdev's through vdcm.

The demo workload (`run_demo`) walks flows F1-F7 and checks every DMA by reading the
bytes back through the process's own page tables. F6: a process may map memory without
touching it (`mmap(populate=False)`); a device's DMA into it raises page requests that the
vmm injects into the guest's virtual page request queue; `on_page_request` makes the page
present if the address lies in one of the process's VMAs (INVALID otherwise) and answers
the page group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generator

import msgpack

from vsva.actors import errno as E
from vsva.actors.base import Actor, Call, Wait, failed
from vsva.actors.memory import FL_LINK, FL_PRESENT, FrameAllocator, GuestRam, PasidDirectory, RadixTable
from vsva.actors.catalogue import (
    DevSubmit, FlowWatch, MdevSubmit, QiSubmit, StartWorkload, VcmdAlloc, VcmdFree, VmInfo, VPageRequest, VPageResponse,
)
from vsva.actors.messages import MAX_FRAME, Envelope
from vsva.actors.uapi import (
    IOMMU_FAULT_PERM_WRITE, IOMMU_PAGE_RESP_FAILURE, IOMMU_PAGE_RESP_INVALID, IOMMU_PAGE_RESP_SUCCESS,
)
from vsva.hotpath.layout import (
    ADDR_MASK, FL_P, FL_RW, FL_US, PAGE_SHIFT, PAGE_SIZE, PASID_DIR_FRAMES, PGTT_FIRST_ONLY,
    encode_pasid_entry,
)


@dataclass
class Process:
    """A guest process: its mm (CR3 and first-level tables) and what it holds."""

    pid: int
    pt: RadixTable
    pasids: dict[str, int] = field(default_factory=dict)  # dev -> guest PASID
    vmas: list[tuple[int, int, bool]] = field(default_factory=list)  # (start, end, writable)

    @property
    def cr3(self) -> int:
        return self.pt.root

    def find_vma(self, va: int) -> tuple[int, int, bool] | None:
        return next((v for v in self.vmas if v[0] <= va < v[1]), None)


class GuestKernel:
    """Guest memory management: the page allocator, process address spaces, CPU accesses."""

    def __init__(self, ram: GuestRam):
        self.ram = ram
        self.pages = FrameAllocator(range(len(ram.frames) - 1, PASID_DIR_FRAMES * 4, -1))
        self.contiguous_next = 1  # low GPA frames are kept for PASID directories
        self.procs: dict[int, Process] = {}

    def alloc_page(self) -> int:
        """A zeroed guest page; returns its GPA."""
        gfn = self.pages.alloc()
        self.ram.zero_frame(gfn)
        return gfn << PAGE_SHIFT

    def alloc_contiguous(self, count: int) -> int:
        """`count` guest-contiguous pages (a PASID directory); returns the GPA of the first."""
        first = self.contiguous_next
        if first + count > PASID_DIR_FRAMES * 4:
            raise MemoryError("no room for another PASID directory")
        self.contiguous_next += count
        for gfn in range(first, first + count):
            self.ram.zero_frame(gfn)
        return first << PAGE_SHIFT

    def spawn(self, pid: int) -> Process:
        proc = Process(pid, RadixTable(self.ram, self.alloc_page(), self.alloc_page, link=FL_LINK,
                                       present=FL_PRESENT))
        self.procs[pid] = proc
        return proc

    def mmap(self, proc: Process, va: int, pages: int, populate: bool = True, writable: bool = True) -> None:
        """Map anonymous memory (a VMA); with populate, every page gets a frame now (MAP_POPULATE),
        without it the pages stay non-present until a CPU or device (F6) fault."""
        proc.vmas.append((va, va + pages * PAGE_SIZE, writable))
        if populate:
            for i in range(pages):
                proc.pt.map(va + i * PAGE_SIZE, self.alloc_page(), FL_P | FL_RW | FL_US)

    def fault_in(self, proc: Process, va: int, write: bool) -> int:
        """handle_mm_fault() for a device's page request: a page response code."""
        vma = proc.find_vma(va)
        if vma is None or write and not vma[2]:
            return IOMMU_PAGE_RESP_INVALID  # outside every VMA, or a write to a read-only one
        page, entry = va & ~(PAGE_SIZE - 1), proc.pt.lookup(va)
        flags = FL_P | FL_US | (FL_RW if vma[2] else 0)
        if entry & FL_P:  # present: a write to a write-protected page the VMA allows (COW-like)
            proc.pt.map(page, entry & ADDR_MASK, flags)
            return IOMMU_PAGE_RESP_SUCCESS
        try:
            proc.pt.map(page, self.alloc_page(), flags)
        except MemoryError:
            return IOMMU_PAGE_RESP_FAILURE
        return IOMMU_PAGE_RESP_SUCCESS

    def migrate(self, proc: Process, va: int) -> tuple[int, int]:
        """Move one page to a new frame (page migration): copy, then switch the PTE."""
        old = proc.pt.lookup(va) & ADDR_MASK
        new = self.alloc_page()
        self.ram.write(new, self.ram.read(old, PAGE_SIZE))
        proc.pt.map(va, new, FL_P | FL_RW | FL_US)
        return old, new

    def gpa(self, proc: Process, va: int) -> int:
        entry = proc.pt.lookup(va)
        if not entry & FL_P:
            raise MemoryError(f"pid {proc.pid}: segfault at {va:#x}")
        return (entry & ADDR_MASK) | (va & (PAGE_SIZE - 1))

    def read(self, proc: Process, va: int, length: int) -> bytes:
        """What the process reads at `va` (the CPU walks the same first-level tables)."""
        out = bytearray()
        while length:
            n = min(length, PAGE_SIZE - (va & (PAGE_SIZE - 1)))
            out += self.ram.read(self.gpa(proc, va), n)
            va, length = va + n, length - n
        return bytes(out)

    def write(self, proc: Process, va: int, data: bytes) -> None:
        offset = 0
        while offset < len(data):
            n = min(len(data) - offset, PAGE_SIZE - (va & (PAGE_SIZE - 1)))
            self.ram.write(self.gpa(proc, va), data[offset:offset + n])
            va, offset = va + n, offset + n


FLOW_WATCH_TIMEOUT = 600.0  # seconds a flow watch may wait (a workload's length at most)


class Guest(Actor):
    """One per VM: runs a workload when the orchestrator asks (`start_workload`)."""

    def __init__(self, name: str, env: Any):
        super().__init__(name, env)
        self.vm: int = self.config["vm"]
        self.vmm: str = self.config["vmm"]
        self.host: str = self.config["host"]
        self.vdcm: str = self.config["vdcm"]
        self.mdevs: set[str] = set(self.config.get("mdevs", []))
        self.kernel: GuestKernel | None = None
        self.pasid_dirs: dict[str, PasidDirectory] = {}
        self.steps: list[dict[str, Any]] = []
        self.flow_seq: dict[str, int] = {}
        self.running = False
        self.dma = {"submitted": 0, "completed": 0, "failed": 0, "aborted": 0, "indefinite": 0}

    # ---- the vIOMMU driver -------------------------------------------------------------------
    def flow_tag(self, flow: str) -> str:
        n = self.flow_seq[flow] = self.flow_seq.get(flow, 0) + 1
        tag = f"{flow}:vm{self.vm}.{n}"
        self.wake(("flow_watch", flow, n), {"ret": 0, "tag": tag})  # see on_flow_watch
        return tag

    def step(self, flow: str, what: str, reply: dict[str, Any], ok: bool | None = None, **detail: Any) -> bool:
        """Record the outcome of one flow instance; `ok` defaults to 'ret == 0'."""
        ok = reply.get("ret", 0) == 0 if ok is None else ok
        self.steps.append({"flow": flow, "what": what, "ok": ok, "ret": reply.get("ret", 0),
                           "error": reply.get("error", ""), **detail})
        return ok

    def boot(self) -> Generator[Any, Any, int]:
        """Read the firmware tables, set up memory and one PASID directory per device."""
        tag = self.flow_tag("boot")
        info = yield Call(self.vmm, VmInfo(), flow=tag)
        if info["ret"]:
            return info["ret"]
        self.kernel = GuestKernel(GuestRam(self.mem, info["ram_frames"]))
        for dev in info["devices"]:
            pdir = self.kernel.alloc_contiguous(PASID_DIR_FRAMES)
            self.pasid_dirs[dev] = PasidDirectory(self.kernel.ram, pdir, self.kernel.alloc_page)
            reply = yield Call(self.vmm, QiSubmit(descs=[{"type": "cc", "dev": dev, "pdir": pdir},
                                                         {"type": "wait"}]), flow=tag)
            if reply["ret"]:
                return reply["ret"]
        return 0

    def alloc_pasid(self, proc: Process, dev: str) -> Generator[Any, Any, int]:
        """F1: the virtual command 'allocate PASID'; returns the guest PASID (0 on failure)."""
        reply = yield Call(self.vmm, VcmdAlloc(dev=dev), flow=self.flow_tag("F1"))
        if self.step("F1", f"pid {proc.pid} alloc PASID for {dev}", reply, gpasid=reply.get("gpasid"),
                     hpasid=reply.get("hpasid")):
            proc.pasids[dev] = reply["gpasid"]
            return reply["gpasid"]
        return 0

    def bind(self, proc: Process, dev: str, pasid: int) -> Generator[Any, Any, dict]:
        """F2: write the first-level PASID entry (FLPTR = CR3), PASID-cache invalidation, wait."""
        self.pasid_dirs[dev].write_entry(pasid, encode_pasid_entry(
            flptr=proc.cr3, slptr=0, did=self.vm, eafe=True, pgtt=PGTT_FIRST_ONLY))
        reply = yield Call(self.vmm, QiSubmit(descs=[{"type": "pc", "dev": dev, "gpasid": pasid},
                                                     {"type": "wait"}]), flow=self.flow_tag("F2"))
        users = next((d.get("users") for d in reply.get("done", []) if d.get("type") == "pc"), None)
        self.step("F2", f"pid {proc.pid} bind {dev} PASID {pasid}", reply, users=users)
        return {**reply, "users": users}

    def unbind(self, proc: Process, dev: str, pasid: int) -> Generator[Any, Any, dict]:
        """F4: clear the PASID entry, PASID-cache invalidation, wait."""
        self.pasid_dirs[dev].clear_entry(pasid)
        reply = yield Call(self.vmm, QiSubmit(descs=[{"type": "pc", "dev": dev, "gpasid": pasid},
                                                     {"type": "wait"}]), flow=self.flow_tag("F4"))
        self.step("F4", f"pid {proc.pid} unbind {dev} PASID {pasid}", reply)
        return reply

    def flush(self, proc: Process, dev: str, pasid: int, va: int, size_order: int = 0):
        """F3: PASID-based IOTLB + device-TLB invalidation of a range, then wait."""
        base = {"dev": dev, "gpasid": pasid, "addr": va & ~(PAGE_SIZE - 1), "size_order": size_order}
        reply = yield Call(self.vmm, QiSubmit(descs=[{"type": "piotlb", **base}, {"type": "dev_iotlb", **base},
                                                     {"type": "wait"}]), flow=self.flow_tag("F3"))
        self.step("F3", f"pid {proc.pid} flush {dev} PASID {pasid} @ {va:#x}", reply)
        return reply

    def free(self, proc: Process, dev: str, pasid: int):
        """F5: the virtual command 'free PASID'."""
        reply = yield Call(self.vmm, VcmdFree(gpasid=pasid), flow=self.flow_tag("F5"))
        self.step("F5", f"pid {proc.pid} free PASID {pasid}", reply)
        proc.pasids.pop(dev, None)
        return reply

    def submit(self, dev: str, pasid: int, op: str, *, src: int = 0, dst: int = 0, length: int = 0,
               pattern: int = 0):
        """F7: a work descriptor through the device's portal (mdevs: vdcm's virtual registers)."""
        fields = {"dev": dev, "op": op, "src": src, "dst": dst, "len": length, "pattern": pattern}
        # an mdev takes the guest PASID (vdcm translates it); the passthrough function is
        # programmed with the host PASID, which the identity allocation made equal to it
        work = MdevSubmit(gpasid=pasid, **fields) if dev in self.mdevs else DevSubmit(hpasid=pasid, **fields)
        portal = self.vdcm if dev in self.mdevs else self.host
        self.dma["submitted"] += 1
        flow = self.flow_tag("F7")
        reply = yield Call(portal, work, flow=flow)
        # The portal's process died (vdcm restarted by the supervisor): the device was reset
        # under the descriptor. With `portal_retry` (set by the supervisor) the driver waits
        # for the device and resubmits, visibly (counted): copy and fill are idempotent.
        retry_end = self.now + float(self.config.get("portal_retry", 0.0))
        while reply.get("ret") == -E.EHOSTDOWN and self.now < retry_end:
            self.dma["resubmitted"] = self.dma.get("resubmitted", 0) + 1
            self._retry_key = getattr(self, "_retry_key", 0) + 1
            yield Wait(("portal", self._retry_key), 0.02)
            reply = yield Call(portal, work, flow=flow)
        outcome = "indefinite" if reply.get("indefinite") else "aborted" if reply.get("aborted") else \
            "failed" if reply["ret"] else "completed"
        self.dma[outcome] += 1
        return reply

    # ---- F6: the virtual page request queue ------------------------------------------------------
    def on_vpage_request(self, msg: Envelope, req: VPageRequest):
        """The vIOMMU's page request interrupt (intel_svm prq handler in the guest): find the
        process bound to (device, PASID), fault the page in, answer the page group."""
        if msg.src != self.vmm:
            return failed(-E.EPERM)
        procs = self.kernel.procs.values() if self.kernel else []
        proc = next((p for p in procs if p.pasids.get(req.dev) == req.gpasid), None)
        write = bool(req.perm & IOMMU_FAULT_PERM_WRITE)
        code = IOMMU_PAGE_RESP_INVALID if proc is None else self.kernel.fault_in(proc, req.addr, write)
        reply = yield Call(self.vmm, VPageResponse(dev=req.dev, gpasid=req.gpasid, grpid=req.grpid, code=code))
        self.step("F6", f"pid {proc.pid if proc else '?'} page request {req.dev} PASID {req.gpasid} "
                  f"@ {req.addr:#x} {'write' if write else 'read'} -> "
                  f"{('SUCCESS', 'INVALID', 'FAILURE')[code]}", reply, code=code, grpid=req.grpid)
        return None

    # ---- workloads ------------------------------------------------------------------------------
    def on_flow_watch(self, msg: Envelope, req: FlowWatch):
        """Answer when instance `nth` of `flow` starts (at once if it has): the event a fault
        trigger waits for, so the orchestrator never polls. The answer leaves in the same
        batch as that instance's first request, so a kill on it lands inside the step."""
        if self.flow_seq.get(req.flow, 0) >= req.nth:
            return {"ret": 0, "tag": f"{req.flow}:vm{self.vm}.{self.flow_seq[req.flow]}"}
        reply = yield Wait(("flow_watch", req.flow, req.nth), FLOW_WATCH_TIMEOUT)
        return reply

    def on_start_workload(self, msg: Envelope, req: StartWorkload):
        if self.running:
            return failed(-E.EBUSY, error="workload already running")
        self.running = True
        ret = yield from self.boot()
        if ret:
            return failed(ret, error="boot failed", steps=self.steps)
        yield from WORKLOADS[self.config.get("workload", "demo")](self)
        ok = all(s["ok"] for s in self.steps)
        return {"ret": 0 if ok else -E.EIO, "ok": ok, **self.results()}

    def results(self) -> dict[str, Any]:
        """The steps and their summary. Every step while they fit in half a frame; beyond
        that (thousands of rounds) the failed ones only, at most 100: a workload of any
        length reports its end in one reply (MAX_FRAME bounds every frame)."""
        steps = self.steps
        summary = {"total": len(steps), "failed": sum(not s["ok"] for s in steps),
                   "verified": sum(1 for s in steps if s.get("verified") and s["ok"])}
        if len(msgpack.packb(steps, use_bin_type=True)) <= MAX_FRAME // 2:
            return {"steps": steps, "summary": summary}
        return {"steps": [s for s in steps if not s["ok"]][:100], "summary": {**summary, "truncated": True}}

    def snapshot(self) -> dict[str, Any]:
        procs = self.kernel.procs.values() if self.kernel else []
        return {**super().snapshot(), "vm": self.vm,
                "pasids": [{"pid": p.pid, "dev": d, "pasid": g} for p in procs for d, g in p.pasids.items()],
                "steps_ok": sum(s["ok"] for s in self.steps), "steps_failed": sum(not s["ok"] for s in self.steps),
                "dma": dict(self.dma), "flows": dict(self.flow_seq)}


def _pattern(seed: int, length: int) -> bytes:
    return bytes((seed * 31 + i * 7) & 0xFF for i in range(length))


def demo_passthrough(g: Guest, proc: Process, dev: str, base: int) -> Generator[Any, Any, int]:
    """One process on the passthrough function: bind, copy, migrate a page + flush, re-DMA."""
    k = g.kernel
    src, dst, pages = base, base + 0x100000, 4
    k.mmap(proc, src, pages)
    k.mmap(proc, dst, pages)
    data = _pattern(proc.pid, pages * PAGE_SIZE)
    k.write(proc, src, data)
    pasid = yield from g.alloc_pasid(proc, dev)
    if not pasid:
        return 0
    yield from g.bind(proc, dev, pasid)
    reply = yield from g.submit(dev, pasid, "copy", src=src, dst=dst, length=len(data))
    g.step("F7", f"pid {proc.pid} DMA copy {len(data)} B via {dev}", reply,
           ok=reply["ret"] == 0 and k.read(proc, dst, len(data)) == data, verified=True)
    # F3: migrate the first destination page, flush, and DMA again: the device must write the
    # new frame, never the old one (a stale IOTLB entry would).
    old, new = k.migrate(proc, dst)
    old_bytes = k.ram.read(old, PAGE_SIZE)
    yield from g.flush(proc, dev, pasid, dst)
    reply = yield from g.submit(dev, pasid, "fill", dst=dst, length=PAGE_SIZE, pattern=0x5A)
    g.step("F7", f"pid {proc.pid} DMA fill of migrated page via {dev}", reply,
           ok=reply["ret"] == 0 and k.read(proc, dst, PAGE_SIZE) == b"\x5a" * PAGE_SIZE
           and k.ram.read(old, PAGE_SIZE) == old_bytes, old_gpa=old, new_gpa=new, verified=True)
    return pasid


def demo_mdev_pair(g: Guest, proc: Process, mdevs: list[str], base: int) -> Generator[Any, Any, None]:
    """Two mdevs of one parent bound to one guest PASID: users == 2, then two unbinds."""
    k = g.kernel
    k.mmap(proc, base, 2)
    pasid = yield from g.alloc_pasid(proc, mdevs[0])
    if not pasid:
        return
    proc.pasids[mdevs[1]] = pasid
    first = yield from g.bind(proc, mdevs[0], pasid)
    second = yield from g.bind(proc, mdevs[1], pasid)
    g.step("F2", f"pid {proc.pid} second bind shares the parent's sdev", second,
           ok=first.get("users") == 1 and second.get("users") == 2, users=second.get("users"), check=True)
    for i, dev in enumerate(mdevs):
        reply = yield from g.submit(dev, pasid, "fill", dst=base, length=2 * PAGE_SIZE, pattern=0x11 + i)
        g.step("F7", f"pid {proc.pid} DMA fill via {dev} (guest PASID {pasid})", reply,
               ok=reply["ret"] == 0 and k.read(proc, base, 2 * PAGE_SIZE) == bytes([0x11 + i]) * 2 * PAGE_SIZE,
               verified=True)
    yield from g.unbind(proc, mdevs[0], pasid)
    reply = yield from g.submit(mdevs[1], pasid, "fill", dst=base, length=PAGE_SIZE, pattern=0x33)
    g.step("F7", f"pid {proc.pid} {mdevs[1]} still works after {mdevs[0]} unbound", reply,
           ok=reply["ret"] == 0 and k.read(proc, base, PAGE_SIZE) == b"\x33" * PAGE_SIZE, verified=True)
    yield from g.unbind(proc, mdevs[1], pasid)
    reply = yield from g.submit(mdevs[1], pasid, "fill", dst=base, length=PAGE_SIZE, pattern=0x44)
    g.step("F7", f"pid {proc.pid} DMA after the last unbind is refused", reply,
           ok=reply["ret"] != 0 and k.read(proc, base, PAGE_SIZE) == b"\x33" * PAGE_SIZE, expected_error=True)
    yield from g.free(proc, mdevs[0], pasid)
    proc.pasids.pop(mdevs[1], None)


def demo_demand_paging(g: Guest, proc: Process, dev: str, base: int, pages: int = 4):
    """F6: DMA into a buffer the process mapped but never touched: one page request per page,
    the guest faults each page in; then a DMA to an address outside every VMA fails."""
    k = g.kernel
    src, dst, hole = base, base + 0x100000, base + 0x200000
    k.mmap(proc, src, pages)
    k.mmap(proc, dst, pages, populate=False)
    data = _pattern(proc.pid + 11, pages * PAGE_SIZE)
    k.write(proc, src, data)
    pasid = yield from g.alloc_pasid(proc, dev)
    if not pasid:
        return
    yield from g.bind(proc, dev, pasid)
    reply = yield from g.submit(dev, pasid, "copy", src=src, dst=dst, length=len(data))
    g.step("F7", f"pid {proc.pid} DMA copy into {pages} demand-paged pages via {dev}", reply,
           ok=reply["ret"] == 0 and k.read(proc, dst, len(data)) == data, verified=True,
           page_requests=reply.get("page_requests"))
    reply = yield from g.submit(dev, pasid, "fill", dst=hole, length=PAGE_SIZE, pattern=0x77)
    g.step("F7", f"pid {proc.pid} DMA to an unmapped address fails (page response INVALID)", reply,
           ok=reply["ret"] != 0 and reply.get("page_response") == IOMMU_PAGE_RESP_INVALID
           and not proc.pt.lookup(hole) & FL_P, expected_error=True)
    yield from g.unbind(proc, dev, pasid)
    yield from g.free(proc, dev, pasid)


def run_demo(g: Guest) -> Generator[Any, Any, None]:
    """The demo: two processes share the passthrough function, one uses a pair of mdevs, one
    DMAs into demand-paged memory (F6)."""
    k = g.kernel
    pf = next(d for d in g.pasid_dirs if d not in g.mdevs)
    p1, p2, p3 = k.spawn(1), k.spawn(2), k.spawn(3)
    pasid1 = yield from demo_passthrough(g, p1, pf, 0x4000_0000)
    pasid2 = yield from demo_passthrough(g, p2, pf, 0x7f00_0000_0000)
    yield from demo_mdev_pair(g, p3, sorted(g.mdevs)[:2], 0x5000_0000)
    yield from demo_demand_paging(g, k.spawn(4), pf, 0x6000_0000)
    for proc, pasid in ((p1, pasid1), (p2, pasid2)):
        if pasid:
            yield from g.unbind(proc, pf, pasid)
            yield from g.free(proc, pf, pasid)


def bind_latency(g: Guest) -> Generator[Any, Any, None]:
    """Bind and unbind one PASID over and over, timing each bind from the guest's request to
    its wait completion (the figure benchmarks/bench_bind.py reports)."""
    proc = g.kernel.spawn(1)
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
    g.steps.append({"flow": "bench", "what": "bind latencies", "ok": True, "ret": 0, "check": True,
                    "latencies": latencies, "starts": starts})


def dma_loop(g: Guest) -> Generator[Any, Any, None]:
    """Bind one PASID on the passthrough function and one on an mdev, then DMA through both
    for `iterations` rounds, each round's bytes read back; stop at the first failure (the VM
    may be dying under it); unbind and free at the end."""
    k, proc, bound = g.kernel, g.kernel.spawn(1), []
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
            if not g.step("F7", f"round {n} DMA fill via {dev}", reply, verified=True,
                          ok=reply["ret"] == 0 and k.read(proc, base, size) == bytes([pattern]) * size):
                return
    for dev, pasid, _ in bound:
        yield from g.unbind(proc, dev, pasid)
        yield from g.free(proc, dev, pasid)


def bind_many(g: Guest) -> Generator[Any, Any, None]:
    """Allocate and bind `iterations` PASIDs to one process's page tables, and keep them: on the
    passthrough function, or with config bind_on = "mdev" on an mdev of the shared accelerator."""
    proc = g.kernel.spawn(1)
    dev = sorted(g.mdevs)[0] if g.config.get("bind_on") == "mdev" else next(d for d in g.pasid_dirs if d not in g.mdevs)
    for _ in range(int(g.config.get("iterations", 16))):
        pasid = yield from g.alloc_pasid(proc, dev)
        if not pasid:
            return
        yield from g.bind(proc, dev, pasid)


def fault_loop(g: Guest) -> Generator[Any, Any, None]:
    """Bind one PASID, then for `iterations` rounds map `fault_pages` fresh untouched pages and
    fill them by DMA (one page request each), data checked; the round times are recorded
    (benchmarks/bench_page_faults.py)."""
    k, proc = g.kernel, g.kernel.spawn(1)
    pf = next(d for d in g.pasid_dirs if d not in g.mdevs)
    pasid = yield from g.alloc_pasid(proc, pf)
    if not pasid or (yield from g.bind(proc, pf, pasid))["ret"]:
        return
    pages, rounds, faults, started = int(g.config.get("fault_pages", 8)), [], 0, g.now
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
    g.steps.append({"flow": "bench", "what": "page fault rounds", "ok": True, "ret": 0, "check": True,
                    "rounds": rounds, "faults": faults, "elapsed": g.now - started})
    yield from g.unbind(proc, pf, pasid)
    yield from g.free(proc, pf, pasid)


def churn(g: Guest) -> Generator[Any, Any, None]:
    """Free before unbind, over and over, on an mdev of the accelerator every VM shares.

    Each round allocates a PASID, binds it, checks a DMA fill through it, then frees it while
    it is still bound (the order the source thread worries about). Under 'ordered' the free
    is refused and the guest unbinds first. Run by `vsva explore --workload churn` to let the
    scheduler interleave the VMs' frees, reuses and the policy's cleanup."""
    k = g.kernel
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
        g.step("F7", f"pid 1 round {i} DMA fill via {mdev}", reply, verified=True,
               ok=reply["ret"] == 0 and k.read(proc, base, PAGE_SIZE) == bytes([pattern]) * PAGE_SIZE)
        freed = yield Call(g.vmm, VcmdFree(gpasid=pasid), flow=g.flow_tag("F5"))
        g.step("F5", f"pid 1 round {i} free PASID {pasid} while bound", freed, ok=freed["ret"] in (0, -E.EBUSY))
        if freed["ret"] == -E.EBUSY:  # policy 'ordered': unbind, then free
            yield from g.unbind(proc, mdev, pasid)
            yield from g.free(proc, mdev, pasid)
        proc.pasids.pop(mdev, None)


WORKLOADS = {"demo": run_demo, "fault_loop": fault_loop, "bind_latency": bind_latency, "dma_loop": dma_loop,
             "bind_many": bind_many, "churn": churn}

from vsva.actors.scale_workloads import SCALE_WORKLOADS  # noqa: E402 (they compose the above)

WORKLOADS.update(SCALE_WORKLOADS)
