"""The host: IOMMU driver (intel-svm), IOASID core, VFIO kernel side, and the devices.

The handlers follow the kernel functions they model:
    on_vfio_open          VFIO container/group setup: domain, second-level table, devices
    on_ioasid_alloc/free  the VCMD path into ioasid_alloc()/ioasid_free() of the VM's set
    on_bind_gpasid        intel_svm_bind_gpasid(), checks in the kernel's order and codes
    on_unbind_gpasid      intel_svm_unbind_gpasid(), with the review's flushes and PRQ drain
    on_cache_invalidate   intel_iommu_sva_invalidate() for the uapi invalidation info
    on_dev_submit         a device's DMA engine running a work descriptor; a recoverable
                          first-level fault becomes a page request (F6, `page_request`)
    on_page_response      intel_svm_page_response(): the VMM's page group response
Translation itself runs in the hot path (`hotpath.Iommu`) over the shared memory bytes.

Page requests (F6). A device with PRI (`pri`, default on) whose translation stops on a
non-present first-level entry, or on a first-level permission the guest may grant (a write
to a read-only page), sends a page request: PASID, page address, read/write, a group index
(9 bits, per physical device), last-in-group (always set: one page per group). The host
queues it in its page request queue (`self.prq`, at most `prq_depth` entries, default 32)
until its response, reports it one-way to the VMM of the VM owning the PASID, and the
descriptor waits (`Wait`) for the page group response; SUCCESS retries the descriptor from
the faulting byte, INVALID or FAILURE fail it (-EFAULT; FAILURE is not remembered beyond the
descriptor). At most `prq_max_faults` (1024) requests per descriptor.
  Overflow (VT-d's behaviour): a request that finds the queue full sets the overflow flag
  (PRO) and is auto-responded SUCCESS by the IOMMU without reaching software; while PRO is
  set every new request is auto-responded the same way; PRO clears when the queue empties.
  The device retries after a back-off (a round trip through the host) and faults again,
  which counts against its budget: under a sustained overflow the descriptor fails.
  Timeout: a request not answered within `prq_timeout` (1.0 s, below the guests' request
  timeout) is answered INVALID by the host on the guest's behalf; the descriptor fails
  with -ETIMEDOUT (a definite outcome) and the entry leaves the queue.
  Drain: `_teardown_entry` (unbind, free under ordered and reclaim, VM teardown, and the
  naive policy's deferred cleanup) drains the PASID's entries of that device: each waiting
  descriptor fails at once (-ECANCELED, aborted) and a later response is refused (-EINVAL,
  unknown group). So under ordered and reclaim no request survives the unbind or free
  that precedes reuse; under naive the PASID is back in the pool before its deferred
  cleanup drains it: the audit can catch a request queued under a free or reused PASID.
  Requests for a PASID that is not bound to the device, defunct, reclaiming, or owned by
  another VM than the device's are dropped, counted (`prq_stats["dropped"]`), never
  reported to anyone, and answered INVALID.
  Responses are matched on (physical device, group index): an unknown group, another VM's
  request (-EACCES), another device or PASID than the request's (-EINVAL) or a PASID that
  is no longer bound (-ENODEV) is refused and changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vsva import hotpath
from vsva.actors import errno as E
from vsva.actors.base import Actor, Call, Gather, Wait, failed
from vsva.actors.memory import SL_LINK, SL_PRESENT, FrameAllocator, PasidDirectory, RadixTable
from vsva.actors.catalogue import (
    BindGpasid, CacheInvalidate, DevSubmit, IoasidAlloc, IoasidCleanup, IoasidFree, IoasidNotify, PageRequest,
    PageResponse, PasidBindings, Ping, PoolStatus, UnbindGpasid, VfioClose, VfioOpen,
)
from vsva.actors.messages import Envelope
from vsva.actors.uapi import (
    EV_BIND, EV_FREE, EV_FREE_SET, EV_UNBIND, IOMMU_CACHE_INV_TYPE_DEV_IOTLB, IOMMU_CACHE_INV_TYPE_IOTLB,
    IOMMU_CACHE_INV_TYPE_PASID, IOMMU_FAULT_PERM_READ, IOMMU_FAULT_PERM_WRITE, IOMMU_GPASID_BIND_VERSION_1,
    IOMMU_INV_ADDR_FLAGS_LEAF, IOMMU_INV_ADDR_FLAGS_PASID, IOMMU_INV_GRANU_ADDR, IOMMU_INV_GRANU_DOMAIN,
    IOMMU_INV_GRANU_PASID, IOMMU_PAGE_RESP_INVALID, IOMMU_PAGE_RESP_SUCCESS, IOMMU_PASID_FORMAT_INTEL_VTD,
    IOMMU_SVA_GPASID_VAL, PRQ_GRPID_MAX, VTD_FLAG_EAFE, VTD_FLAG_SRE, VTD_FLAG_WPE, VTD_FLAGS_LAST,
)
from vsva.actors.policy import DEFAULT_POLICY, Policy
from vsva.hotpath.layout import (
    ACCESS_READ, FAULT_FL_NOT_PRESENT, FAULT_FL_PERMISSION, PAGE_SHIFT, PAGE_SIZE, PASID_DIR_FRAMES,
    PASID_MAX, SL_R, SL_W, describe_fault, encode_pasid_entry, fault_reason,
)

BIND_DATA_MINSZ = 48  # argsz must cover the fields up to the vendor union
SUPPORTED_ADDR_WIDTH = 48  # 4-level first level (5-level is a later step)
SVM_FLAG_GUEST_MODE = 1 << 2
SVM_FLAG_GUEST_PASID = 1 << 3

# Which caches accept which granularity (uapi table; kernel-semantics.md §5).
_INV_GRANU_OK = {
    IOMMU_INV_GRANU_DOMAIN: IOMMU_CACHE_INV_TYPE_IOTLB | IOMMU_CACHE_INV_TYPE_PASID,
    IOMMU_INV_GRANU_PASID: IOMMU_CACHE_INV_TYPE_IOTLB | IOMMU_CACHE_INV_TYPE_DEV_IOTLB
    | IOMMU_CACHE_INV_TYPE_PASID,
    IOMMU_INV_GRANU_ADDR: IOMMU_CACHE_INV_TYPE_IOTLB | IOMMU_CACHE_INV_TYPE_DEV_IOTLB,
}
_INV_CACHE_ALL = IOMMU_CACHE_INV_TYPE_IOTLB | IOMMU_CACHE_INV_TYPE_DEV_IOTLB | IOMMU_CACHE_INV_TYPE_PASID


@dataclass
class Sdev:
    """intel_svm_dev: one physical device bound to an svm, with its bind count."""

    dev: str
    users: int = 1


@dataclass
class Svm:
    """intel_svm for a guest PASID: the host PASID, the guest PASID and the bound devices."""

    pasid: int
    vm: int
    gpasid: int = -1
    flags: int = 0
    devs: dict[str, Sdev] = field(default_factory=dict)
    vdevs: dict[str, int] = field(default_factory=dict)  # (virtual) device -> outstanding binds

    def notice(self, event: str, dev: str = "") -> IoasidNotify:
        """The notifier event for this svm: the one place its body is built (an identity
        PASID has no separate guest PASID, the host PASID stands for it)."""
        return IoasidNotify(event=event, vm=self.vm, hpasid=self.pasid,
                            gpasid=self.gpasid if self.gpasid >= 0 else self.pasid, dev=dev)


@dataclass
class Ioasid:
    """An allocated IOASID: its set (the VM) and private data (the svm once bound)."""

    pasid: int
    vm: int
    svm: Svm | None = None


@dataclass
class VmDomain:
    """What VFIO set up for one VM: its vmm, domain (second level), RAM and devices."""

    vm: int
    vmm: str
    guest: str
    sl: RadixTable
    ram_frames: list[int]
    devices: list[str]
    quota: int
    ioasids: set[int] = field(default_factory=set)


@dataclass
class PhysDevice:
    """A physical PCI function: its context entry (PASID directory) and capabilities."""

    name: str
    id: int
    pci: bool
    max_pasids: int
    ats: bool
    pasid_dir: PasidDirectory | None = None
    pasid_enabled: bool = False
    pri: bool = True  # Page Request Interface: recoverable faults become page requests


class Host(Actor):
    """The host kernel's IOMMU side: one per host."""

    def __init__(self, name: str, env: Any):
        super().__init__(name, env)
        self.devices_cfg: dict[str, dict] = self.config["devices"]
        self.subscribers: list[str] = list(self.config.get("subscribers", []))
        self.vm_names: dict[int, dict] = {int(k): v for k, v in self.config.get("vms", {}).items()}
        self.frames = FrameAllocator(range(self.mem.nframes - 1, 0, -1))
        self.owners = np.zeros(self.mem.nframes, dtype=np.int32)
        self.iommu = hotpath.Iommu(self.mem.buf, self.owners)
        self.phys: dict[str, PhysDevice] = {}
        self.domains: dict[int, VmDomain] = {}
        self.vmm_of: dict[str, int] = {}  # vmm actor name -> vm id (the open VFIO fds)
        self.ioasids: dict[int, Ioasid] = {}
        self.free_pasids: list[int] = []  # freed PASIDs, handed out again last-freed-first
        self.next_pasid = 1
        self.policy = Policy.parse(self.config.get("policy", DEFAULT_POLICY))
        self.allocator: str = self.config.get("allocator", "reuse-first")
        self.reclaiming: dict[int, int] = {}  # PASID -> VM, defunct until subscribers acknowledge
        self.quarantined: dict[int, int] = {}  # PASID -> VM whose FREE was never acknowledged
        self.unacked: dict[int, set[str]] = {}  # quarantined PASID -> subscribers that never acked
        self.teardowns: list[dict[str, Any]] = []
        self.notify_failures = 0
        self.prq: list[dict] = []  # outstanding page requests, oldest first (F6)
        self.prq_depth: int = max(1, int(self.config.get("prq_depth", 32)))
        self.prq_timeout: float = float(self.config.get("prq_timeout", 1.0))
        self.prq_max_faults: int = int(self.config.get("prq_max_faults", 1024))
        self.prq_overflow = False  # PRO: set when a request found the queue full
        self.prq_stats = {"requests": 0, "responses": 0, "auto_responses": 0, "timeouts": 0,
                          "drained": 0, "dropped": 0, "rejected": 0}
        self.prq_latencies: list[float] = []  # request queued -> response, the last 4096
        self._prq_grpid: dict[str, int] = {}  # physical device -> next page request group index
        self._prq_seq: dict[int, int] = {}  # VM -> F6 instance number, for the flow tag
        self.dma_done = 0
        self.dma_faults = 0
        self.foreign_dma: list[dict[str, int]] = []  # DMA that used a PASID another VM now owns
        for dev_name, cfg in self.devices_cfg.items():
            if "parent" not in cfg:
                self.phys[dev_name] = self._probe(dev_name, cfg)

    # ---- setup: devices and VFIO -------------------------------------------------------
    def _probe(self, name: str, cfg: dict) -> PhysDevice:
        """Give a physical device its context entry: a PASID directory in host memory."""
        dev = PhysDevice(name, cfg["id"], cfg.get("pci", True), cfg.get("max_pasids", PASID_MAX),
                         cfg.get("ats", True))
        dev.pri = bool(cfg.get("pri", True))
        base = self._alloc_contiguous(PASID_DIR_FRAMES) << PAGE_SHIFT
        dev.pasid_dir = PasidDirectory(self.mem, base, self._alloc_table)
        self.iommu.attach_device(dev.id, base, dev.ats)
        return dev

    def _alloc_table(self, owner: int = 0) -> int:
        frame = self.frames.alloc()
        self.mem.zero_frame(frame)
        self.owners[frame] = owner
        return frame << PAGE_SHIFT

    def _alloc_contiguous(self, count: int) -> int:
        """Frames for a PASID directory: taken from the top of the pool, contiguous. Devices
        are probed at start, when the free list still begins with the highest frames in
        descending order (allocations pop from its other end): its head is the run, taken
        in O(count) (a sort of the whole pool per device made 256 VMs take seconds)."""
        free = self.frames.free
        run = free[:count][::-1]
        if len(run) < count or run[-1] - run[0] != count - 1:
            raise MemoryError("no contiguous frames for a PASID directory")
        del free[:count]
        for frame in run:
            self.frames.used.add(frame)
            self.mem.zero_frame(frame)
        return run[0]

    def physical(self, dev: str) -> PhysDevice | None:
        """The physical device behind `dev` (an mdev's parent, as mdev_get_iommu_device)."""
        cfg = self.devices_cfg.get(dev)
        if cfg is None:
            return None
        return self.phys.get(cfg.get("parent", dev))

    def on_vfio_open(self, msg: Envelope, req: VfioOpen) -> dict:
        """A VMM opens its VM's devices: domain, second level over shuffled RAM frames, IOASID set."""
        vm = req.vm
        names = self.vm_names.get(vm)
        if names is None or names["vmm"] != msg.src:
            return failed(-E.EPERM, error=f"{msg.src} is not the VMM of VM {vm}")
        if vm in self.domains:
            return failed(-E.EBUSY, error=f"VM {vm} is already open")
        assigned = [d for d in req.devices if isinstance(d, str) and self.devices_cfg.get(d, {}).get("vm") == vm]
        if len(assigned) != len(req.devices):
            return failed(-E.ENODEV, error="a device is not assigned to this VM")
        pages, quota = req.ram_pages, req.quota
        if not 16 <= pages <= len(self.frames) - 64 or not 0 < quota < PASID_MAX:
            return failed(-E.EINVAL, error="ram_pages or quota out of range")
        ram = [self.frames.alloc() for _ in range(pages)]
        self.rng.shuffle(ram)
        for frame in ram:
            self.mem.zero_frame(frame)
            self.owners[frame] = vm
        sl = RadixTable(self.mem, self._alloc_table(), self._alloc_table, link=SL_LINK, present=SL_PRESENT)
        for gfn, frame in enumerate(ram):
            sl.map(gfn << PAGE_SHIFT, frame << PAGE_SHIFT, SL_R | SL_W)
        self.domains[vm] = VmDomain(vm, msg.src, names["guest"], sl, ram, list(req.devices), quota)
        self.vmm_of[msg.src] = vm
        return {"ret": 0, "ram_frames": ram}

    def caller_vm(self, msg: Envelope) -> VmDomain | None:
        """The VM whose VFIO fd the request came through (None: not a VMM of an open VM)."""
        vm = self.vmm_of.get(msg.src)
        return None if vm is None else self.domains.get(vm)

    # ---- F1 / F5: the IOASID allocator --------------------------------------------------
    def on_ioasid_alloc(self, msg: Envelope, req: IoasidAlloc) -> dict:
        """ioasid_alloc() in the caller VM's set, bounded by the set's quota."""
        dom = self.caller_vm(msg)
        if dom is None:
            return failed(-E.EPERM, error="caller has no open VM")
        if len(dom.ioasids) >= dom.quota:
            return failed(-E.ENOSPC, error=f"VM {dom.vm} IOASID quota {dom.quota} reached")
        pasid = self._pool_take()
        if pasid is None:
            return failed(-E.ENOSPC, error="system PASID space exhausted")
        self.iommu.set_defunct(pasid, False)
        self.ioasids[pasid] = Ioasid(pasid, dom.vm)
        dom.ioasids.add(pasid)
        return {"ret": 0, "hpasid": pasid}

    def _pool_take(self) -> int | None:
        """Reuse-first hands out the last freed PASID (so reuse hazards show); fresh counts up."""
        if self.free_pasids and (self.allocator == "reuse-first" or self.next_pasid >= PASID_MAX):
            return self.free_pasids.pop()
        if self.next_pasid >= PASID_MAX:
            return None
        self.next_pasid += 1
        return self.next_pasid - 1

    def on_ioasid_free(self, msg: Envelope, req: IoasidFree):
        """ioasid_free() from the VCMD path; a still-bound PASID goes through the FREE notifier."""
        dom = self.caller_vm(msg)
        if dom is None:
            return failed(-E.EPERM, error="caller has no open VM")
        ioasid = self.ioasids.get(req.hpasid)
        if ioasid is None:
            return failed(-E.EINVAL, error=f"IOASID {req.hpasid} is not allocated")
        if ioasid.vm != dom.vm:
            return failed(-E.EACCES, error=f"IOASID {ioasid.pasid} belongs to another VM")
        if ioasid.svm is not None and self.policy is Policy.ORDERED:
            return failed(-E.EBUSY, error=f"IOASID {ioasid.pasid} is still bound; policy 'ordered' "
                          "requires unbind before free")
        yield from self.ioasid_free(dom, [ioasid], EV_FREE, wait=False)
        return {"ret": 0, "state": self.pasid_state(ioasid.pasid)}

    # ---- F5 / F8: the IOASID notifier and the cleanup policies ----------------------------------
    def ioasid_free(self, dom: VmDomain, ioasids: list[Ioasid], event: str, *, wait: bool):
        """Free IOASIDs of one VM's set; bound ones are cleaned up as the run's policy says.

        naive:   every PASID is back in the pool at once; the subscribers are told without
                 waiting and the IOMMU driver's own cleanup is deferred work that runs later.
        ordered: a free of a bound PASID is refused, so the VCMD path brings only unbound
                 ones, back to the pool at once; VM teardown unbinds the bound ones here
                 (entries torn down, not defunct) and, like reclaim, gives them back only
                 after every subscriber acknowledged: an ack travels behind the work that
                 subscriber sent before it (vdcm's descriptors), so none of it can run under
                 the PASID's next owner.
        reclaim: bound PASIDs are torn down now and marked defunct (their DMA and page
                 requests are dropped); they return to the pool only after every subscriber
                 has acknowledged FREE. A subscriber that never answers leaves them
                 quarantined: a leak, never a reuse.
        """
        for ioasid in ioasids:
            del self.ioasids[ioasid.pasid]
            dom.ioasids.discard(ioasid.pasid)
        bound = [a for a in ioasids if a.svm is not None]
        self.free_pasids += [a.pasid for a in ioasids if a.svm is None]
        if not bound and event == EV_FREE:
            return
        events = self._free_events(dom.vm, bound, event)
        if self.policy is Policy.NAIVE:
            self.free_pasids += [a.pasid for a in bound]
            for ioasid in bound:
                self.send(self.name, IoasidCleanup(hpasid=ioasid.pasid, vm=dom.vm, devs=sorted(ioasid.svm.devs)))
            for note in events:
                for sub in self.subscribers:
                    self.send(sub, note)
            return
        for ioasid in bound:
            self.reclaiming[ioasid.pasid] = dom.vm  # out of the pool until every ack
            if self.policy is Policy.RECLAIM:
                self.iommu.set_defunct(ioasid.pasid, True)
            for dev in list(ioasid.svm.devs):
                self._teardown_entry(dev, ioasid.pasid, dom.vm)
            ioasid.svm = None
        acks = self._await_free_acks(dom.vm, [a.pasid for a in bound], events)
        if wait:
            yield from acks
        else:
            self._run(lambda: acks, None, self._flow)

    def _free_events(self, vm: int, bound: list[Ioasid], event: str) -> list[IoasidNotify]:
        """FREE per bound PASID, or one FREE_SET for a whole set (subscribers drop the VM)."""
        if event == EV_FREE_SET:
            return [IoasidNotify(event=EV_FREE_SET, vm=vm, hpasid=0, gpasid=0, dev="")]
        return [a.svm.notice(EV_FREE) for a in bound]

    def _await_free_acks(self, vm: int, pasids: list[int], events: list[IoasidNotify]):
        """Wait (bounded) for every subscriber's FREE acknowledgement, then release the PASIDs."""
        timeout = self.config.get("notify_timeout", 2.0)
        replies = yield Gather([Call(s, note, timeout=timeout) for note in events for s in self.subscribers])
        refused = [r for r in replies if r.get("ret", 0)]
        silent = {s for s, r in zip([s for _ in events for s in self.subscribers], replies) if r.get("ret", 0)}
        for pasid in pasids:
            self.reclaiming.pop(pasid, None)
            if refused:
                self.quarantined[pasid] = vm
                self.unacked[pasid] = set(silent)  # released when each of these resyncs
                continue
            self.iommu.set_defunct(pasid, False)
            self.free_pasids.append(pasid)
        if refused:
            self.notify_failures += len(refused)
            self.log("quarantine", f"{len(refused)} subscriber(s) did not acknowledge FREE of VM {vm}: "
                     f"{E.name(refused[0]['ret'])}; {len(pasids)} PASID(s) quarantined")

    def on_ioasid_cleanup(self, msg: Envelope, req: IoasidCleanup) -> dict | None:
        """The naive policy's deferred work: the IOMMU driver's teardown, whenever it runs."""
        if msg.src != self.name:
            return failed(-E.EPERM, error="deferred cleanup is the host's own work")
        for dev in req.devs:
            if dev in self.phys:
                self._teardown_entry(dev, req.hpasid, req.vm)
        return None

    def pasid_state(self, pasid: int) -> str:
        """The PASID's lifecycle state (I3): free, allocated, bound, reclaiming or quarantined."""
        if pasid in self.ioasids:
            return "bound" if self.ioasids[pasid].svm is not None else "allocated"
        if pasid in self.reclaiming:
            return "reclaiming"
        return "quarantined" if pasid in self.quarantined else "free"

    def on_pool_status(self, msg: Envelope, req: PoolStatus) -> dict:
        """A cheap view of the allocator and teardowns (for experiments polling a live host)."""
        return {"ret": 0, "free_pool": len(self.free_pasids), "reclaiming": len(self.reclaiming),
                "quarantined": len(self.quarantined), "vms": sorted(self.domains),
                "teardowns": [dict(t) for t in self.teardowns]}

    def on_pasid_bindings(self, msg: Envelope, req: PasidBindings) -> dict:
        """Every bound (vm, gpasid, hpasid, dev, users): what a restarted subscriber (kvm, vdcm)
        rebuilds its translation tables from before it serves (the notifier's current state)."""
        if msg.src not in self.subscribers:
            return failed(-E.EPERM, error="only notifier subscribers may list PASID bindings")
        # A subscriber rebuilding its tables from the current bindings has dropped whatever it
        # held for PASIDs freed while it was gone: that is its FREE acknowledgement.
        for pasid in [p for p, subs in self.unacked.items() if msg.src in subs]:
            self.unacked[pasid].discard(msg.src)
            if not self.unacked[pasid] and pasid in self.quarantined:
                del self.unacked[pasid]
                del self.quarantined[pasid]
                self.iommu.set_defunct(pasid, False)
                self.free_pasids.append(pasid)
        out = [{"vm": note.vm, "gpasid": note.gpasid, "hpasid": note.hpasid, "dev": dev, "users": users}
               for a in self.ioasids.values() if a.svm is not None
               for dev, users in sorted(a.svm.vdevs.items()) for note in [a.svm.notice(EV_BIND, dev)]]
        return {"ret": 0, "bindings": out}

    def on_vfio_close(self, msg: Envelope, req: VfioClose):
        """The VMM closes its VFIO fd: the same teardown as its death, without detection."""
        dom = self.caller_vm(msg)
        if dom is None:
            return failed(-E.EPERM, error="caller has no open VM")
        yield from self.vm_teardown(dom, "vfio_close")
        return {"ret": 0}

    def on_peer_down(self, peer: str):
        """A VMM's connection is gone (its process died): the kernel sees its VFIO fd close."""
        vm = self.vmm_of.get(peer)
        if vm is not None:
            yield from self.vm_teardown(self.domains[vm], f"{peer} died")

    def vm_teardown(self, dom: VmDomain, why: str):
        """F8: ioasid_free_set() on the VM's set, then its domain, frames and devices go."""
        del self.vmm_of[dom.vmm]  # no further request through this fd
        record = {"vm": dom.vm, "why": why, "started": self.now, "pasids": len(dom.ioasids)}
        self.teardowns.append(record)
        ioasids = [self.ioasids[p] for p in sorted(dom.ioasids)]
        # ordered: VFIO unbinds everything, then frees -- ioasid_free tears the bound ones down
        # and returns them only once the subscribers acknowledged (see its docstring)
        yield from self.ioasid_free(dom, ioasids, EV_FREE_SET, wait=True)
        self._release_domain(dom)
        record["finished"] = self.now

    def _release_domain(self, dom: VmDomain) -> None:
        """Give the VM's frames and second-level tables back and flush what its domain cached."""
        for table in dom.sl.tables():
            self.frames.release(table >> PAGE_SHIFT)
            self.owners[table >> PAGE_SHIFT] = 0
        for frame in dom.ram_frames:
            self.owners[frame] = 0
            self.frames.release(frame)
        self.iommu.inv_iotlb("domain", did=dom.vm)
        self.iommu.inv_pasid_cache("domain", did=dom.vm)
        del self.domains[dom.vm]

    # ---- F2: intel_svm_bind_gpasid --------------------------------------------------------
    def on_bind_gpasid(self, msg: Envelope, req: BindGpasid):
        dom = self.caller_vm(msg)
        if dom is None:
            return failed(-E.EPERM, error="caller has no open VM")
        if req.dev not in dom.devices:  # VFIO: the device is not in this container
            return failed(-E.ENODEV, error=f"{req.dev} is not assigned to VM {dom.vm}")
        pdev, data = self.physical(req.dev), req.data
        ret = self._bind_checks(pdev, data)
        if ret:
            return failed(ret, error="bind record refused")
        hpasid = data["hpasid"]
        # ioasid_find(set, hpasid): not allocated -> -ENOENT, another set -> -EACCES.
        ioasid = self.ioasids.get(hpasid)
        if ioasid is None:
            return failed(-E.ENOENT, error=f"IOASID {hpasid} not allocated")
        if ioasid.vm != dom.vm:
            return failed(-E.EACCES, error=f"IOASID {hpasid} belongs to another VM")
        svm = ioasid.svm
        if svm is not None:
            if not svm.devs:
                return failed(-E.EINVAL, error="svm with an empty device list")
            if pdev.name in svm.devs:
                svm.devs[pdev.name].users += 1
                svm.vdevs[req.dev] = svm.vdevs.get(req.dev, 0) + 1
                yield from self.notify(EV_BIND, svm, req.dev)
                return {"ret": 0, "users": svm.devs[pdev.name].users}
        else:
            svm = Svm(hpasid, dom.vm)
            if data["flags"] & IOMMU_SVA_GPASID_VAL:
                svm.gpasid = data["gpasid"]
                svm.flags |= SVM_FLAG_GUEST_PASID
            ioasid.svm = svm
        pdev.pasid_enabled = True  # intel_iommu_enable_pasid(): the context entry allows PASIDs
        ret = self._setup_nested(pdev, dom, data)
        if ret:
            self._free_if_empty(ioasid)
            return failed(ret, error="nested PASID entry setup failed")
        svm.flags |= SVM_FLAG_GUEST_MODE
        svm.devs[pdev.name] = Sdev(pdev.name)
        svm.vdevs[req.dev] = svm.vdevs.get(req.dev, 0) + 1
        yield from self.notify(EV_BIND, svm, req.dev)
        return {"ret": 0, "users": 1}

    def _bind_checks(self, pdev: PhysDevice | None, data: dict) -> int:
        """Steps 1-4 of intel_svm_bind_gpasid: 0 or the kernel's error code."""
        if pdev is None or not data:
            return -E.EINVAL
        fields = ("argsz", "version", "format", "flags", "hpasid", "gpasid", "gpgd", "addr_width")
        if any(not isinstance(data.get(f), int) or isinstance(data.get(f), bool) for f in fields):
            return -E.EINVAL
        if data["argsz"] < BIND_DATA_MINSZ:
            return -E.EINVAL
        if data["version"] != IOMMU_GPASID_BIND_VERSION_1 or data["format"] != IOMMU_PASID_FORMAT_INTEL_VTD:
            return -E.EINVAL
        if not pdev.pci:
            return -E.ENOTSUPP
        if pdev.max_pasids != PASID_MAX:
            return -E.EINVAL
        if data["hpasid"] <= 0 or data["hpasid"] >= PASID_MAX:
            return -E.EINVAL
        return 0

    def _setup_nested(self, pdev: PhysDevice, dom: VmDomain, data: dict) -> int:
        """intel_pasid_setup_nested(): validate the guest's paging mode and flags, write the entry."""
        vtd = data.get("vtd_flags", 0)
        if not isinstance(vtd, int) or isinstance(vtd, bool) or vtd & ~(VTD_FLAGS_LAST - 1):
            return -E.EINVAL
        if data["addr_width"] != SUPPORTED_ADDR_WIDTH:
            return -E.EINVAL
        # The first-level root is a GPA: it must be supported by the second level
        # (intel_pasid_setup_nested: gpgd > domain->max_addr -> -EINVAL), never truncated.
        if data["gpgd"] & (PAGE_SIZE - 1) or not 0 <= data["gpgd"] < len(dom.ram_frames) << PAGE_SHIFT:
            return -E.EINVAL
        pdev.pasid_dir.write_entry(data["hpasid"], encode_pasid_entry(
            flptr=data["gpgd"], slptr=dom.sl.root, did=dom.vm, sre=bool(vtd & VTD_FLAG_SRE),
            wpe=bool(vtd & VTD_FLAG_WPE), eafe=bool(vtd & VTD_FLAG_EAFE)))
        self.iommu.inv_pasid_cache("pasid", did=dom.vm, pasid=data["hpasid"])
        return 0

    def notify(self, event: str, svm: Svm, dev: str):
        """The IOASID notifier chain: every subscriber must acknowledge before we go on.

        BIND and UNBIND go out for every bind and unbind of a (virtual) device, so that
        subscribers can keep per-device translations (two mdevs of one parent share an sdev);
        FREE goes out once per PASID, with no device.
        """
        note = svm.notice(event, dev)
        replies = yield Gather([Call(s, note) for s in self.subscribers])
        for sub, reply in zip(self.subscribers, replies):
            if reply.get("ret", 0):
                self.log(f"notify:{sub}", f"{sub} answered {event} of PASID {svm.pasid} with "
                         f"{E.name(reply['ret'])}")
        return replies

    # ---- F4: intel_svm_unbind_gpasid --------------------------------------------------------
    def on_unbind_gpasid(self, msg: Envelope, req: UnbindGpasid):
        dom = self.caller_vm(msg)
        if dom is None:
            return failed(-E.EPERM, error="caller has no open VM")
        if req.dev not in dom.devices:
            return failed(-E.ENODEV, error=f"{req.dev} is not assigned to VM {dom.vm}")
        pdev, pasid = self.physical(req.dev), req.hpasid
        if pdev is None:
            return failed(-E.EINVAL)
        ioasid = self.ioasids.get(pasid)
        if ioasid is not None and ioasid.vm != dom.vm:
            return failed(-E.EACCES, error=f"IOASID {pasid} belongs to another VM")
        if ioasid is None and self.reclaiming.get(pasid) == dom.vm:
            return {"ret": 0, "users": 0, "defunct": True}  # freed first: nothing is left to undo
        svm = ioasid.svm if ioasid else None
        if svm is None or pdev.name not in svm.devs:
            return failed(-E.EINVAL, error=f"{pdev.name} is not bound to PASID {pasid}")
        sdev = svm.devs[pdev.name]
        sdev.users -= 1
        left = svm.vdevs.get(req.dev, 0) - 1
        if left > 0:
            svm.vdevs[req.dev] = left
        else:
            svm.vdevs.pop(req.dev, None)
        if sdev.users:
            yield from self.notify(EV_UNBIND, svm, req.dev)
            return {"ret": 0, "users": sdev.users}
        del svm.devs[pdev.name]
        self._teardown_entry(pdev.name, pasid, dom.vm)
        self._free_if_empty(ioasid)
        yield from self.notify(EV_UNBIND, svm, req.dev)
        return {"ret": 0, "users": 0}

    def _teardown_entry(self, dev: str, pasid: int, did: int) -> None:
        """intel_pasid_tear_down_entry() plus the flushes and PRQ drain the review asked for."""
        pdev = self.phys[dev]
        pdev.pasid_dir.clear_entry(pasid)
        self.iommu.inv_pasid_cache("pasid", did=did, pasid=pasid)
        self.iommu.inv_iotlb("pasid", did=did, pasid=pasid)
        self.iommu.inv_devtlb(pdev.id, pasid=pasid)
        self.drain_prq(dev, pasid)

    def drain_prq(self, dev: str, pasid: int) -> int:
        """intel_svm_drain_prq(): no page request of this PASID may outlive the entry.

        Each drained request is answered INVALID: its descriptor fails at once (aborted)."""
        drained = [r for r in self.prq if r["dev"] == dev and r["pasid"] == pasid]
        for req in drained:
            self._prq_remove(req)
        self.prq_stats["drained"] += len(drained)
        for req in drained:
            self.wake((req["dev"], req["grpid"]), {"ret": 0, "code": IOMMU_PAGE_RESP_INVALID, "drained": True})
        return len(drained)

    def _free_if_empty(self, ioasid: Ioasid) -> None:
        """intel_svm_free_if_empty(): detach the svm from the IOASID once no device is left."""
        if ioasid.svm is not None and not ioasid.svm.devs:
            ioasid.svm = None

    # ---- F3: cache invalidation passed down -------------------------------------------------
    def on_cache_invalidate(self, msg: Envelope, req: CacheInvalidate) -> dict:
        dom = self.caller_vm(msg)
        if dom is None:
            return failed(-E.EPERM, error="caller has no open VM")
        if req.dev not in dom.devices:
            return failed(-E.ENODEV, error=f"{req.dev} is not assigned to VM {dom.vm}")
        info, pdev = req.info, self.physical(req.dev)
        ret, why = self._inv_checks(info, dom)
        if ret:
            return failed(ret, error=why)
        granu, cache, pasid = info["granularity"], info["cache"], info.get("pasid", 0)
        if granu == IOMMU_INV_GRANU_ADDR:
            order = max(0, (info["granule_size"] * info["nb_granules"] - 1).bit_length() - PAGE_SHIFT)
            if cache & IOMMU_CACHE_INV_TYPE_IOTLB:
                self.iommu.inv_iotlb("addr", did=dom.vm, pasid=pasid, addr=info["addr"], size_order=order,
                                     ih=bool(info.get("flags", 0) & IOMMU_INV_ADDR_FLAGS_LEAF))
            if cache & IOMMU_CACHE_INV_TYPE_DEV_IOTLB:
                self.iommu.inv_devtlb(pdev.id, pasid=pasid, addr=info["addr"], size_order=order)
            return {"ret": 0}
        scope = "pasid" if granu == IOMMU_INV_GRANU_PASID else "domain"
        if cache & IOMMU_CACHE_INV_TYPE_IOTLB:
            self.iommu.inv_iotlb(scope, did=dom.vm, pasid=pasid)
        if cache & IOMMU_CACHE_INV_TYPE_PASID:
            self.iommu.inv_pasid_cache(scope, did=dom.vm, pasid=pasid)
        if cache & IOMMU_CACHE_INV_TYPE_DEV_IOTLB:
            self.iommu.inv_devtlb(pdev.id, pasid=pasid)
        return {"ret": 0}

    def _inv_checks(self, info: dict, dom: VmDomain) -> tuple[int, str]:
        """The uapi rules: known version, cache bits, a granularity every named cache supports."""
        if info.get("version") != 1:
            return -E.EINVAL, "invalidation info version"
        cache, granu = info.get("cache"), info.get("granularity")
        if not isinstance(cache, int) or not cache or cache & ~_INV_CACHE_ALL or not isinstance(granu, int) \
                or granu not in _INV_GRANU_OK or not isinstance(info.get("flags", 0), int):
            return -E.EINVAL, "cache type, granularity or flags"
        if cache & ~_INV_GRANU_OK[granu]:
            return -E.EINVAL, "a named cache does not support this granularity"
        if granu != IOMMU_INV_GRANU_DOMAIN:
            pasid = info.get("pasid")
            if not isinstance(pasid, int) or not 0 < pasid < PASID_MAX:
                return -E.EINVAL, "PASID out of range"
            if pasid not in dom.ioasids:
                return -E.EACCES, f"PASID {pasid} is not in VM {dom.vm}'s IOASID set"
        if granu == IOMMU_INV_GRANU_ADDR:
            if not info.get("flags", 0) & IOMMU_INV_ADDR_FLAGS_PASID:
                return -E.EINVAL, "address invalidation without a PASID"
            size, count, addr = info.get("granule_size"), info.get("nb_granules"), info.get("addr")
            if size != PAGE_SIZE or not isinstance(count, int) or not 0 < count <= 1 << 18 \
                    or not isinstance(addr, int) or addr & (PAGE_SIZE - 1) or not 0 <= addr < 1 << 48:
                return -E.EINVAL, "address range"
        return 0, ""

    # ---- F7: a device's DMA engine ------------------------------------------------------------
    def on_dev_submit(self, msg: Envelope, req: DevSubmit):
        """Run a work descriptor. Passthrough: the guest's own portal; mdev: submitted by vdcm.

        F6: a recoverable first-level fault on a device with PRI becomes a page request; the
        descriptor waits for its page group response and, on SUCCESS, the device retries from
        the faulting byte (see the module docstring for the queue, overflow and drain)."""
        cfg = self.devices_cfg.get(req.dev)
        if cfg is None:
            return failed(-E.ENODEV, error=f"no device {req.dev}")
        vm = cfg.get("vm", 0)
        if vm and vm not in self.domains:
            return failed(-E.ENODEV, error=f"{req.dev} belongs to no running VM")
        portal_owner = self.config.get("vdcm", "vdcm") if "parent" in cfg else self.vm_names.get(vm, {}).get("guest")
        if msg.src != portal_owner:
            return failed(-E.EPERM, error=f"{msg.src} may not submit to {req.dev}")
        pasid = req.hpasid
        pdev = self.physical(req.dev)
        work, total, faults = req.body(), 0, 0
        while True:
            status, fault_va, done = self._run_descriptor(pdev, work)
            total += done
            if not status or not self._pri_recoverable(pdev, status):
                break
            faults += 1
            if faults > self.prq_max_faults:
                self.dma_faults += 1
                return {"ret": -E.EFAULT, "status": status, "fault": describe_fault(status), "fault_va": fault_va,
                        "done": total, "page_requests": faults - 1, "error": "page request budget exhausted"}
            read = work["op"] == "copy" and fault_va == work["src"] + done
            perm = IOMMU_FAULT_PERM_READ if read else IOMMU_FAULT_PERM_WRITE
            code, ret, why = yield from self.page_request(pdev, req.dev, pasid, vm, fault_va, perm)
            if code != IOMMU_PAGE_RESP_SUCCESS:
                self.dma_faults += 1
                return {"ret": ret, "status": status, "fault": describe_fault(status), "fault_va": fault_va,
                        "done": total, "page_requests": faults, "page_response": code, "error": why,
                        **({"aborted": True} if ret == -E.ECANCELED else {})}
            work = {**work, "src": work["src"] + done, "dst": work["dst"] + done, "len": work["len"] - done}
        owner = self.ioasids[pasid].vm if pasid in self.ioasids else None
        if not status and owner is not None and owner != vm:
            self.foreign_dma.append({"pasid": pasid, "device_vm": vm, "owner_vm": owner})
        if status:
            self.dma_faults += 1
            return {"ret": -E.EFAULT, "status": status, "fault": describe_fault(status), "fault_va": fault_va,
                    "done": total, "page_requests": faults}
        self.dma_done += 1
        return {"ret": 0, "status": 0, "page_requests": faults}

    # ---- F6: page requests (intel_svm prq_event_thread -> iommu_report_device_fault) ------------
    @staticmethod
    def _pri_recoverable(pdev: PhysDevice, status: int) -> bool:
        """A fault the guest can fix by making the page present (or writable): a page request."""
        return pdev.pri and fault_reason(status) in (FAULT_FL_NOT_PRESENT, FAULT_FL_PERMISSION)

    def page_request(self, pdev: PhysDevice, vdev: str, pasid: int, vm: int, addr: int, perm: int):
        """The device's page request: queue it, report it to the owning VMM, wait for the group
        response. Returns (response code, errno for a failed descriptor, why)."""
        ioasid = self.ioasids.get(pasid)
        if ioasid is None or ioasid.svm is None or pdev.name not in ioasid.svm.devs or ioasid.vm != vm \
                or self.iommu.is_defunct(pasid) or vm not in self.domains:
            # prq_event_thread: no svm for this PASID (freed, defunct, another VM's): drop it
            self.prq_stats["dropped"] += 1
            self.log("prq:drop", f"page request of {vdev} for PASID {pasid} @ {addr:#x} dropped: not bound to it")
            return IOMMU_PAGE_RESP_INVALID, -E.EFAULT, f"page request for PASID {pasid} dropped (not bound)"
        if self.prq_overflow or len(self.prq) >= self.prq_depth:
            # VT-d: the queue is full: set PRO, the IOMMU auto-responds SUCCESS; the device backs off
            self.prq_overflow = True
            self.prq_stats["auto_responses"] += 1
            yield Call(self.name, Ping())
            return IOMMU_PAGE_RESP_SUCCESS, 0, "auto-responded (page request queue overflow)"
        grpid = self._next_grpid(pdev.name)
        seq = self._prq_seq[vm] = self._prq_seq.get(vm, 0) + 1
        page = addr & ~(PAGE_SIZE - 1)
        req = {"dev": pdev.name, "vdev": vdev, "pasid": pasid, "vm": vm, "addr": page, "perm": perm,
               "grpid": grpid, "last": True, "flow": f"F6:vm{vm}.{seq}", "queued": self.now}
        self.prq.append(req)
        self.prq_stats["requests"] += 1
        self.send(self.domains[vm].vmm, PageRequest(dev=vdev, hpasid=pasid, grpid=grpid, addr=page, perm=perm,
                                                    last=True), flow=req["flow"])
        reply = yield Wait((pdev.name, grpid), self.prq_timeout)
        if reply.get("ret"):  # nobody answered in time: the host answers INVALID on the guest's behalf
            self._prq_remove(req)
            self.prq_stats["timeouts"] += 1
            self.log("prq:timeout", f"page request {req['flow']} of VM {vm} unanswered after "
                     f"{self.prq_timeout} s: answered INVALID")
            return IOMMU_PAGE_RESP_INVALID, -E.ETIMEDOUT, f"no page response within {self.prq_timeout} s"
        if reply.get("drained"):
            return reply["code"], -E.ECANCELED, f"page request drained: PASID {pasid} unbound or freed"
        self.prq_latencies = self.prq_latencies[-4095:] + [self.now - req["queued"]]
        return reply["code"], -E.EFAULT, f"page response {reply['code']}"

    def _next_grpid(self, dev: str) -> int:
        """A 9-bit page request group index not in use on this device."""
        busy = {r["grpid"] for r in self.prq if r["dev"] == dev}
        grpid = self._prq_grpid.get(dev, 0)
        while grpid in busy:
            grpid = (grpid + 1) % PRQ_GRPID_MAX
        self._prq_grpid[dev] = (grpid + 1) % PRQ_GRPID_MAX
        return grpid

    def _prq_remove(self, req: dict) -> None:
        if req in self.prq:
            self.prq.remove(req)
        if not self.prq:
            self.prq_overflow = False  # the queue drained: clear PRO

    def on_page_response(self, msg: Envelope, resp: PageResponse) -> dict:
        """intel_svm_page_response(): match the VMM's page group response to its request."""
        dom = self.caller_vm(msg)
        if dom is None:
            return failed(-E.EPERM, error="caller has no open VM")
        ret, why, req = self._match_response(dom, resp)
        if ret:
            self.prq_stats["rejected"] += 1
            self.log("prq:reject", f"page response from {msg.src} refused: {why}")
            return failed(ret, error=why)
        self._prq_remove(req)
        self.prq_stats["responses"] += 1
        self.wake((req["dev"], req["grpid"]), {"ret": 0, "code": resp.code})
        return {"ret": 0}

    def _match_response(self, dom: VmDomain, resp: PageResponse) -> tuple[int, str, dict | None]:
        if resp.dev not in dom.devices:
            return -E.ENODEV, f"{resp.dev} is not assigned to VM {dom.vm}", None
        pdev = self.physical(resp.dev)
        req = next((r for r in self.prq if r["dev"] == pdev.name and r["grpid"] == resp.grpid), None)
        if req is None:
            return -E.EINVAL, f"no outstanding page request group {resp.grpid} on {pdev.name}", None
        if req["vm"] != dom.vm:
            return -E.EACCES, f"page request group {resp.grpid} belongs to VM {req['vm']}", None
        if req["pasid"] != resp.hpasid or req["vdev"] != resp.dev:
            return -E.EINVAL, f"group {resp.grpid} was requested by {req['vdev']} PASID {req['pasid']}", None
        ioasid = self.ioasids.get(req["pasid"])
        if ioasid is None or ioasid.vm != dom.vm or ioasid.svm is None:
            return -E.ENODEV, f"PASID {req['pasid']} is no longer bound", None
        return 0, "", req

    def _run_descriptor(self, pdev: PhysDevice, body: dict) -> tuple[int, int, int]:
        """(status, fault_va, done): done counts the bytes moved before the fault."""
        op, pasid, n = body["op"], body["hpasid"], body["len"]
        if op == "copy":
            status, va, done = self.iommu.dma_copy(pdev.id, pasid, body["src"], body["dst"], n)[:3]
        elif op == "fill":
            status, va, done = self.iommu.dma_fill(pdev.id, pasid, body["dst"], n, body["pattern"] & 0xFF)[:3]
        else:
            return -E.EINVAL, 0, 0
        return status, va, done

    # ---- audit ---------------------------------------------------------------------------------
    def coherence(self, entries: dict[str, list[int]]) -> list[dict[str, int]]:
        """I2: IOTLB entries that disagree with a fresh walk of the tables as they are now.

        A separate twin with empty caches walks each cached page (a read, as a user request
        would; it may set accessed bits the first walk had set already). An entry of a PASID
        with no PASID entry left is I3's business, not checked here."""
        fresh = hotpath.PureIommu(self.mem.buf, self.owners)
        for dev in self.phys.values():
            fresh.attach_device(dev.id, dev.pasid_dir.base, False)
        stale = []
        for did, pasid, vpn, frame, _ in self.iommu.cache_dump()["iotlb"]:
            dev = next((self.phys[d] for d, pasids in entries.items() if pasid in pasids), None)
            if dev is None:
                continue
            pa, fault = fresh.translate_one(dev.id, pasid, vpn << PAGE_SHIFT, ACCESS_READ)
            if fault or pa >> PAGE_SHIFT != frame:
                stale.append({"did": did, "pasid": pasid, "vpn": vpn, "cached": frame,
                              "fresh": -1 if fault else pa >> PAGE_SHIFT})
        return stale

    def snapshot(self) -> dict[str, Any]:
        entries = {name: dev.pasid_dir.present_pasids() for name, dev in self.phys.items()}
        return {
            "stale_iotlb": self.coherence(entries),
            **super().snapshot(),
            "ioasids": {str(p): {"vm": a.vm, "bound": a.svm is not None} for p, a in self.ioasids.items()},
            "svms": {str(a.pasid): {"vm": a.svm.vm, "gpasid": a.svm.gpasid, "flags": a.svm.flags,
                                    "devs": {d: s.users for d, s in a.svm.devs.items()}}
                     for a in self.ioasids.values() if a.svm is not None},
            "pasid_entries": entries,
            "vms": {str(d.vm): {"vmm": d.vmm, "ioasids": sorted(d.ioasids), "quota": d.quota,
                                "ram_frames": len(d.ram_frames)} for d in self.domains.values()},
            "prq": list(self.prq),
            "prq_depth": self.prq_depth,
            "prq_overflow": self.prq_overflow,
            "prq_stats": dict(self.prq_stats),
            "prq_latencies": list(self.prq_latencies),
            "policy": self.policy.value,
            "reclaiming": {str(p): vm for p, vm in self.reclaiming.items()},
            "quarantined": {str(p): vm for p, vm in self.quarantined.items()},
            "free_pool": len(self.free_pasids),
            "teardowns": list(self.teardowns),
            "notify_failures": self.notify_failures,
            "owned_frames": {str(vm): int(n) for vm, n in zip(*np.unique(self.owners, return_counts=True)) if vm},
            "caches": _wire_safe(self.iommu.cache_dump()),
            "counters": self.iommu.counters(),
            "dma": {"done": self.dma_done, "faults": self.dma_faults, "foreign": list(self.foreign_dma)},
            "hotpath": hotpath.IMPLEMENTATION,
        }


def _wire_safe(value: Any) -> Any:
    """Make a cache dump msgpack-safe: map keys as strings, tuples as lists."""
    if isinstance(value, dict):
        return {str(k): _wire_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_wire_safe(v) for v in value]
    return value
