"""The host actor: each handler is one flow, reading like the kernel function it models.

Its state lives in components (this package): `vfio` (devices, frames, open VMs and the
VFIO checks), `ioasid` (the IOASID core: sets, pool, reclaim and quarantine), svm/sdev and
the PASID entries (svm.py), cache invalidation (invalidate.py), the page request queue
(`prq`), the DMA engines (dma.py). The handlers:
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
the faulting byte, INVALID or FAILURE fail it (-EFAULT). FAILURE is sticky per physical
device (PCI PRI "Response Failure": the function stops issuing page requests): every later
recoverable fault of that device, whatever its PASID or mdev, fails its descriptor at once
unreported (`prq.stats.failure_drops`) until the device is reset. Reset, in this model, is
the FLR VFIO does when a VM's devices are released (VM stop or the VMM's death): a
passthrough function at once, a parent of mdevs once no running VM holds one of its mdevs
(so one guest's FAILURE silences the parent for every VM's mdevs until then).
At most `prq_max_faults` (1024) requests per descriptor.
  Overflow (VT-d's behaviour): a request that finds the queue full sets the overflow flag
  (PRO) and is auto-responded SUCCESS by the IOMMU without reaching software; while PRO is
  set every new request is auto-responded the same way; PRO clears when the queue empties.
  The device retries after a back-off (a round trip through the host) and faults again,
  which counts against its budget: under a sustained overflow the descriptor fails.
  Timeout: a request not answered within `prq_timeout` (1.0 s, below the guests' request
  timeout) is answered INVALID by the host on the guest's behalf; the descriptor fails
  with -ETIMEDOUT (a definite outcome) and the entry leaves the queue.
  Drain: `teardown_entry` (unbind, free under ordered and reclaim, VM teardown, and the
  naive policy's deferred cleanup) drains the PASID's requests of that device
  (intel_svm_drain_prq: no request of the PASID left in the queue, then the fenced drain
  wait): each waiting descriptor fails at once (-ECANCELED, aborted); the VMM was told of
  the request, so its later response still finds the event and is refused by the driver
  with -ENODEV (the PASID is no longer bound to the device); a second one finds no event
  (-EINVAL). So under ordered and reclaim no request survives the unbind or free
  that precedes reuse; under naive the PASID is back in the pool before its deferred
  cleanup drains it: the audit can catch a request queued under a free or reused PASID.
  Requests for a PASID that is not bound to the device, defunct, reclaiming, or owned by
  another VM than the device's are dropped, counted (`prq.stats.dropped`), never
  reported to anyone, and answered INVALID.
  Responses are matched on (physical device, group index): an unknown group, another VM's
  request (-EACCES), another device or PASID than the request's (-EINVAL) or a PASID that
  is no longer bound (-ENODEV) is refused and changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from typing import Any, NotRequired, TypedDict

import numpy as np

from vsva import hotpath
from vsva.actors import errno as E
from vsva.actors.base import Actor, ActorEnv, Body, Call, Gather, Handler, Steps, Wait, failed
from vsva.actors.catalogue import (
    BINDINGS_PAGE_BYTES,
    BindGpasid,
    CacheInvalidate,
    DevSubmit,
    IoasidAlloc,
    IoasidCleanup,
    IoasidFree,
    IoasidNotify,
    PageRequest,
    PageResponse,
    PasidBindings,
    Ping,
    PoolStatus,
    UnbindGpasid,
    VfioClose,
    VfioOpen,
    binding_bytes,
    binding_entry,
)
from vsva.actors.host import invalidate
from vsva.actors.host.dma import DmaStats, pri_recoverable, run_descriptor
from vsva.actors.host.ioasid import Ioasid, IoasidCore, NotifierPrio
from vsva.actors.host.prq import PageRequestQueue, PageRequestRecord
from vsva.actors.host.svm import (
    SVM_FLAG_GUEST_MODE,
    SVM_FLAG_GUEST_PASID,
    Sdev,
    Svm,
    bind_checks,
    setup_nested,
    tear_down_entry,
)
from vsva.actors.host.vfio import HostFrames, PhysDevice, Vfio, VmDomain
from vsva.actors.messages import Envelope
from vsva.actors.policy import DEFAULT_POLICY, Policy
from vsva.actors.semantics import DEFAULT_KERNEL, Kernel
from vsva.actors.uapi import (
    EV_BIND,
    EV_FREE,
    EV_FREE_SET,
    EV_UNBIND,
    IOMMU_FAULT_PERM_READ,
    IOMMU_FAULT_PERM_WRITE,
    IOMMU_PAGE_RESP_FAILURE,
    IOMMU_PAGE_RESP_INVALID,
    IOMMU_PAGE_RESP_SUCCESS,
    IOMMU_SVA_GPASID_VAL,
)
from vsva.hotpath.layout import ACCESS_READ, PAGE_SHIFT, describe_fault


class TeardownRecord(TypedDict):
    """One VM teardown (F8), as pool_status and the snapshot list them: the VM, why (its fd
    closed, its VMM died), when it started and finished, its PASIDs then, devices reset."""

    vm: int
    why: str
    started: float
    pasids: int
    reset: NotRequired[list[str]]
    finished: NotRequired[float]


class Host(Actor):
    """The host kernel's IOMMU side: one per host."""

    def __init__(self, name: str, env: ActorEnv):
        super().__init__(name, env)
        prios: dict[str, str] = dict(self.config.get("subscribers", {}))
        self.free_chain = NotifierPrio.chain(prios, self.name)
        self.subscribers = [name for name in self.free_chain if name != self.name]
        self.policy = Policy.parse(self.config.get("policy", DEFAULT_POLICY))
        self.kernel = Kernel.parse(self.config.get("kernel", DEFAULT_KERNEL))
        self.frames = HostFrames(self.memory)
        self.iommu = hotpath.Iommu(self.memory.buf, self.frames.owners)
        self.vfio = Vfio(self.config, self.frames, self.iommu)
        self.ioasid = IoasidCore(self.config.get("allocator", "reuse-first"))
        self.prq = PageRequestQueue.configured(self.config)
        self.dma = DmaStats()
        self.teardowns: list[TeardownRecord] = []
        self.notify_failures = 0
        # bumped by every change of the bindings (each one notified): a pasid_bindings page of
        # an older generation is not consistent with the pages after it
        self.bindings_gen = 0

    # ---- boot: the VFIO container -------------------------------------------------------
    def on_vfio_open(self, msg: Envelope, req: VfioOpen) -> dict[str, Any]:
        """A VMM opens its VM's devices: domain, second level over shuffled RAM frames, IOASID set."""
        ret, why = self.vfio.open_checks(msg.src, req.vm, req.devices, req.ram_pages, req.quota)
        if ret:
            return failed(ret, error=why)
        dom = self.vfio.open(msg.src, req.vm, req.devices, req.ram_pages, req.quota, self.rng.shuffle)
        return {"ret": 0, "ram_frames": dom.ram_frames}

    def vfio_caller(self, msg: Envelope, dev: str | None = None) -> VmDomain | Body:
        """The caller's VM, or the refusal (a reply body): no open VM (-EPERM), `dev` not in
        its container (-ENODEV)."""
        dom = self.vfio.caller(msg)
        if dom is None:
            return failed(-E.EPERM, error="caller has no open VM")
        if dev is not None and dev not in dom.devices:
            return failed(-E.ENODEV, error=f"{dev} is not assigned to VM {dom.vm}")
        return dom

    # ---- F1 / F5: the IOASID allocator --------------------------------------------------
    def on_ioasid_alloc(self, msg: Envelope, req: IoasidAlloc) -> dict[str, Any]:
        """ioasid_alloc() in the caller VM's set, bounded by the set's quota."""
        dom = self.vfio_caller(msg)
        if not isinstance(dom, VmDomain):
            return dom  # the refusal
        if len(dom.ioasids) >= dom.quota:
            return failed(-E.ENOSPC, error=f"VM {dom.vm} IOASID quota {dom.quota} reached")
        ioasid = self.ioasid.alloc(dom.vm)
        if ioasid is None:
            return failed(-E.ENOSPC, error="system PASID space exhausted")
        self.iommu.set_defunct(ioasid.pasid, False)
        dom.ioasids.add(ioasid.pasid)
        return {"ret": 0, "hpasid": ioasid.pasid}

    def on_ioasid_free(self, msg: Envelope, req: IoasidFree) -> Handler:
        """ioasid_free() from the VCMD path; a still-bound PASID goes through the FREE notifier."""
        dom = self.vfio_caller(msg)
        if not isinstance(dom, VmDomain):
            return dom  # the refusal
        ioasid = self.ioasid.find(req.hpasid)
        if ioasid is None:
            return failed(-E.EINVAL, error=f"IOASID {req.hpasid} is not allocated")
        if ioasid.vm != dom.vm:
            return failed(-E.EACCES, error=f"IOASID {ioasid.pasid} belongs to another VM")
        if ioasid.svm is not None and self.policy is Policy.ORDERED:
            return failed(
                -E.EBUSY,
                error=f"IOASID {ioasid.pasid} is still bound; policy 'ordered' requires unbind before free",
            )
        yield from self.ioasid_free(dom, [ioasid], EV_FREE, wait=False)
        return {"ret": 0, "state": self.ioasid.state(ioasid.pasid)}

    # ---- F5 / F8: the IOASID notifier and the cleanup policies ----------------------------------
    def ioasid_free(self, dom: VmDomain, ioasids: list[Ioasid], event: str, *, wait: bool) -> Steps[None]:
        """Free IOASIDs of one VM's set; bound ones are cleaned up as the run's policy says.

        The FREE notifier runs in priority order (`NotifierPrio`, the IOASID extension that
        followed the thread): kvm first (CPU: no vCPU may submit work with the PASID any more),
        then the IOMMU driver's own teardown (entries, PASID cache, IOTLB, device TLB, PRQ
        drain), then vdcm (device: it drains the mdev descriptors of the PASID and drops its
        hold on it). The PASID stays out of the pool until every subscriber has let go, as
        the series' reference count keeps it FREE_PENDING. `free_chain` is that order.

        naive:   every PASID is back in the pool at once; kvm is told, the IOMMU driver's
                 teardown queued as deferred work that runs whenever it runs, vdcm told,
                 nobody waiting for anybody.
        ordered: a free of a bound PASID is refused, so the VCMD path brings only unbound
                 ones, back to the pool at once; VM teardown unbinds the bound ones here
                 (not defunct) and, like reclaim, gives them back only after every
                 subscriber acknowledged and the entries are torn down.
        reclaim: bound PASIDs are marked defunct now (their DMA and page requests are
                 dropped from here on), then notified in order and torn down; they return
                 to the pool only after every subscriber has acknowledged FREE. A
                 subscriber that never answers leaves them quarantined: a leak, never a
                 reuse (the teardown runs after the bounded wait all the same).
        """
        for ioasid in ioasids:
            self.ioasid.forget(ioasid)
            dom.ioasids.discard(ioasid.pasid)
        bound = [(a, a.svm) for a in ioasids if a.svm is not None]
        for ioasid in ioasids:
            if ioasid.svm is None:
                self.ioasid.release(ioasid.pasid)
        if not bound and event == EV_FREE:
            return
        events = self._free_events(dom.vm, bound, event)
        self.bindings_gen += 1  # the bound ones have left the listing (forgotten above)
        devs = {ioasid.pasid: sorted(svm.devs) for ioasid, svm in bound}
        if self.policy is Policy.NAIVE:
            for ioasid, _ in bound:
                self.ioasid.release(ioasid.pasid)
            for who in self.free_chain:
                for note in self._chain_link(who, dom.vm, devs, events):
                    self.send(who, note)
            return
        for ioasid, _ in bound:
            self.ioasid.reclaim(ioasid.pasid, dom.vm)  # out of the pool until every ack
            if self.policy is Policy.RECLAIM:
                self.iommu.set_defunct(ioasid.pasid, True)
            ioasid.svm = None
        cleanup = self._free_in_order(dom.vm, devs, events)
        if wait:
            yield from cleanup
        else:
            self._run(lambda: cleanup, None, self._flow)

    def _free_events(self, vm: int, bound: list[tuple[Ioasid, Svm]], event: str) -> list[IoasidNotify]:
        """FREE per bound PASID, or one FREE_SET for a whole set (subscribers drop the VM)."""
        if event == EV_FREE_SET:
            return [IoasidNotify(event=EV_FREE_SET, vm=vm, hpasid=0, gpasid=0, dev="")]
        return [svm.notice(EV_FREE) for _, svm in bound]

    def _chain_link(
        self, who: str, vm: int, devs: dict[int, list[str]], events: list[IoasidNotify]
    ) -> list[IoasidNotify] | list[IoasidCleanup]:
        """What one link of the FREE chain is sent: the IOMMU driver (the host itself) one
        teardown per PASID, a subscriber the FREE events."""
        if who == self.name:
            return [IoasidCleanup(hpasid=p, vm=vm, devs=names) for p, names in devs.items()]
        return events

    def _free_in_order(self, vm: int, devs: dict[int, list[str]], events: list[IoasidNotify]) -> Steps[None]:
        """The FREE chain in priority order, each link a bounded wait for its answers (kvm,
        the IOMMU teardown, vdcm), then the PASIDs back to the pool (or quarantine)."""
        timeout: float = self.config.get("notify_timeout", 2.0)
        silent: set[str] = set()
        refused: list[Body] = []
        for who in self.free_chain:
            notes = self._chain_link(who, vm, devs, events)
            replies: list[Body] = yield Gather([Call(who, note, timeout=timeout) for note in notes])
            failed_here = [r for r in replies if r.get("ret", 0)]
            if failed_here and who != self.name:
                silent.add(who)
                refused += failed_here
        for pasid in devs:
            if self.ioasid.reclaimed(pasid, vm, silent):
                self.iommu.set_defunct(pasid, False)
        if refused:
            self.notify_failures += len(refused)
            self.log(
                "quarantine",
                f"{len(refused)} subscriber(s) did not acknowledge FREE of VM {vm}: "
                f"{E.name(refused[0]['ret'])}; {len(devs)} PASID(s) quarantined",
            )

    def on_ioasid_cleanup(self, msg: Envelope, req: IoasidCleanup) -> dict[str, Any]:
        """The IOMMU driver's FREE handler (IOASID_PRIO_IOMMU: after kvm, before vdcm): tear the
        PASID's entries down on every device (naive: deferred work, whenever it runs)."""
        if msg.src != self.name:
            return failed(-E.EPERM, error="the IOMMU teardown is the host's own work")
        for dev in req.devs:
            if dev in self.vfio.phys:
                self.teardown_entry(dev, req.hpasid, req.vm)
        return {"ret": 0}

    def on_pool_status(self, msg: Envelope, req: PoolStatus) -> dict[str, Any]:
        """A cheap view of the allocator and teardowns (for experiments polling a live host)."""
        return {
            "ret": 0,
            "free_pool": len(self.ioasid.pool),
            "reclaiming": len(self.ioasid.reclaiming),
            "quarantined": len(self.ioasid.quarantined),
            "vms": sorted(self.vfio.domains),
            "teardowns": [dict(t) for t in self.teardowns],
        }

    def on_pasid_bindings(self, msg: Envelope, req: PasidBindings) -> dict[str, Any]:
        """A page of the current bindings after the cursor, what a restarted subscriber (kvm,
        vdcm) rebuilds its translation tables from before it serves (the notifier's current
        state). A page takes bindings while they fit BINDINGS_PAGE_BYTES (at least one, so that
        the listing goes on); `gen` lets the subscriber see that the bindings changed between
        two of its pages."""
        if msg.src not in self.subscribers:
            return failed(-E.EPERM, error="only notifier subscribers may list PASID bindings")
        page: list[dict[str, Any]] = []
        size, more = 0, False
        for svm, dev, users in self.bindings_after(req.after_hpasid, req.after_dev):
            size += binding_bytes(dev)
            if page and size > BINDINGS_PAGE_BYTES:
                more = True
                break
            note = svm.notice(EV_BIND, dev)
            page.append(binding_entry(note.vm, note.gpasid, note.hpasid, dev, users))
        if not more:
            # A subscriber rebuilding its tables from the current bindings has dropped whatever
            # it held for PASIDs freed while it was gone: that is its FREE acknowledgement.
            for pasid in self.ioasid.resynced(msg.src):
                self.iommu.set_defunct(pasid, False)
        return {"ret": 0, "bindings": page, "more": more, "gen": self.bindings_gen}

    def bindings_after(self, hpasid: int, dev: str) -> Iterator[tuple[Svm, str, int]]:
        """Every (svm, device, bind count) after the cursor, in (host PASID, device) order:
        an order that does not depend on when the PASIDs were allocated or bound."""
        bound = {p: a.svm for p, a in self.ioasid.allocated.items() if a.svm is not None and p >= hpasid}
        for pasid in sorted(bound):
            svm = bound[pasid]
            for vdev, users in sorted(svm.vdevs.items()):
                if (pasid, vdev) > (hpasid, dev):
                    yield svm, vdev, users

    # ---- F8: the VFIO fd closes -------------------------------------------------------------
    def on_vfio_close(self, msg: Envelope, req: VfioClose) -> Handler:
        """The VMM closes its VFIO fd: the same teardown as its death, without detection."""
        dom = self.vfio_caller(msg)
        if not isinstance(dom, VmDomain):
            return dom  # the refusal
        yield from self.vm_teardown(dom, "vfio_close")
        return {"ret": 0}

    def on_peer_down(self, peer: str) -> Steps[None]:
        """A VMM's connection is gone (its process died): the kernel sees its VFIO fd close."""
        vm = self.vfio.vmm_of.get(peer)
        if vm is not None:
            yield from self.vm_teardown(self.vfio.domains[vm], f"{peer} died")

    def vm_teardown(self, dom: VmDomain, why: str) -> Steps[None]:
        """F8: ioasid_free_set() on the VM's set, then its domain, frames and devices go."""
        del self.vfio.vmm_of[dom.vmm]  # no further request through this fd
        record: TeardownRecord = {"vm": dom.vm, "why": why, "started": self.now, "pasids": len(dom.ioasids)}
        self.teardowns.append(record)
        ioasids = [self.ioasid.allocated[p] for p in sorted(dom.ioasids)]
        # ordered: VFIO unbinds everything, then frees -- ioasid_free tears the bound ones down
        # and returns them only once the subscribers acknowledged (see its docstring)
        yield from self.ioasid_free(dom, ioasids, EV_FREE_SET, wait=True)
        self.vfio.release(dom)
        self.prq.forget_vm(dom.vm)
        record["reset"] = self.vfio.reset_released(dom)
        record["finished"] = self.now

    # ---- F2: intel_svm_bind_gpasid --------------------------------------------------------
    def on_bind_gpasid(self, msg: Envelope, req: BindGpasid) -> Handler:
        dom = self.vfio_caller(msg, req.dev)  # VFIO: the device is in this container
        if not isinstance(dom, VmDomain):
            return dom  # the refusal
        pdev, data = self.vfio.physical(req.dev), req.data
        ret = bind_checks(pdev, data)
        if ret or pdev is None:  # (bind_checks refuses a missing device)
            return failed(ret, error="bind record refused")
        hpasid = data["hpasid"]
        # ioasid_find(set, hpasid): not allocated -> -ENOENT, another set -> -EACCES.
        ioasid = self.ioasid.find(hpasid)
        if ioasid is None:
            return failed(-E.ENOENT, error=f"IOASID {hpasid} not allocated")
        if ioasid.vm != dom.vm:
            return failed(-E.EACCES, error=f"IOASID {hpasid} belongs to another VM")
        svm = ioasid.svm
        if svm is not None:
            if not svm.devs:
                return failed(-E.EINVAL, error="svm with an empty device list")
            if pdev.name in svm.devs and self.kernel is Kernel.V5_9:  # "Disable multiple GPASID-dev bind"
                return failed(-E.EBUSY, error=f"{pdev.name} is already bound to PASID {hpasid}")
            if pdev.name in svm.devs:  # v11: another bind of the device counts one more user
                svm.devs[pdev.name].users += 1
                svm.vdev_bound(req.dev)
                yield from self.notify(EV_BIND, svm, req.dev)
                return {"ret": 0, "users": svm.devs[pdev.name].users}
        else:
            svm = Svm(hpasid, dom.vm)
            if data["flags"] & IOMMU_SVA_GPASID_VAL:
                svm.gpasid = data["gpasid"]
                svm.flags |= SVM_FLAG_GUEST_PASID
            ioasid.svm = svm
        pdev.pasid_enabled = True  # intel_iommu_enable_pasid(): the context entry allows PASIDs
        ret = setup_nested(self.iommu, pdev, dom, data)
        if ret:
            self._free_if_empty(ioasid)
            why = (
                f"PASID {hpasid} entry on {pdev.name} still present: an earlier binding of it was never "
                "torn down"
                if ret == -E.EBUSY
                else "nested PASID entry setup failed"
            )
            return failed(ret, error=why)
        svm.flags |= SVM_FLAG_GUEST_MODE
        svm.devs[pdev.name] = Sdev(pdev.name)
        svm.vdev_bound(req.dev)
        yield from self.notify(EV_BIND, svm, req.dev)
        return {"ret": 0, "users": 1}

    def notify(self, event: str, svm: Svm, dev: str) -> Steps[list[Body]]:
        """The IOASID notifier chain: every subscriber must acknowledge before we go on.

        BIND and UNBIND go out for every bind and unbind of a (virtual) device, so that
        subscribers can keep per-device translations (two mdevs of one parent share an sdev);
        FREE goes out once per PASID, with no device.
        """
        note = svm.notice(event, dev)
        self.bindings_gen += 1
        replies: list[Body] = yield Gather([Call(s, note) for s in self.subscribers])
        for sub, reply in zip(self.subscribers, replies):
            if reply.get("ret", 0):
                self.log(
                    f"notify:{sub}",
                    f"{sub} answered {event} of PASID {svm.pasid} with {E.name(reply['ret'])}",
                )
        return replies

    # ---- F4: intel_svm_unbind_gpasid --------------------------------------------------------
    def on_unbind_gpasid(self, msg: Envelope, req: UnbindGpasid) -> Handler:
        dom = self.vfio_caller(msg, req.dev)
        if not isinstance(dom, VmDomain):
            return dom  # the refusal
        pdev, pasid = self.vfio.physical(req.dev), req.hpasid
        if pdev is None:
            return failed(-E.EINVAL)
        ioasid = self.ioasid.find(pasid)
        if ioasid is not None and ioasid.vm != dom.vm:
            return failed(-E.EACCES, error=f"IOASID {pasid} belongs to another VM")
        if ioasid is None and self.ioasid.reclaiming.get(pasid) == dom.vm:
            return {"ret": 0, "users": 0, "defunct": True}  # freed first: nothing is left to undo
        if ioasid is None:  # ioasid_find: ERR_PTR(-ENOENT), returned as it is
            return failed(-E.ENOENT, error=f"IOASID {pasid} is not allocated")
        svm = ioasid.svm
        if (svm is None or pdev.name not in svm.devs) and self.kernel is Kernel.V5_9:
            return {"ret": 0, "users": 0}  # pasid_to_svm_sdev: no svm or no sdev is not an error
        if svm is None or pdev.name not in svm.devs:
            return failed(-E.EINVAL, error=f"{pdev.name} is not bound to PASID {pasid}")
        sdev = svm.devs[pdev.name]
        sdev.users -= 1
        svm.vdev_unbound(req.dev)
        if sdev.users:
            yield from self.notify(EV_UNBIND, svm, req.dev)
            return {"ret": 0, "users": sdev.users}
        del svm.devs[pdev.name]
        self.teardown_entry(pdev.name, pasid, dom.vm)
        self._free_if_empty(ioasid)
        yield from self.notify(EV_UNBIND, svm, req.dev)
        return {"ret": 0, "users": 0}

    def teardown_entry(self, dev: str, pasid: int, did: int) -> None:
        """intel_pasid_tear_down_entry() plus the flushes and PRQ drain the review asked for."""
        tear_down_entry(self.iommu, self.vfio.phys[dev], pasid, did)
        self.drain_prq(dev, pasid)

    def drain_prq(self, dev: str, pasid: int) -> int:
        """intel_svm_drain_prq(): no page request of this PASID may outlive the entry.

        Each drained request is answered INVALID: its descriptor fails at once (aborted)."""
        drained = self.prq.drain(dev, pasid, self.now)
        for req in drained:
            self.wake(
                (req["dev"], req["grpid"]), {"ret": 0, "code": IOMMU_PAGE_RESP_INVALID, "drained": True}
            )
        return len(drained)

    @staticmethod
    def _free_if_empty(ioasid: Ioasid) -> None:
        """intel_svm_free_if_empty(): detach the svm from the IOASID once no device is left."""
        if ioasid.svm is not None and not ioasid.svm.devs:
            ioasid.svm = None

    # ---- F3: cache invalidation passed down -------------------------------------------------
    def on_cache_invalidate(self, msg: Envelope, req: CacheInvalidate) -> dict[str, Any]:
        """iommu_cache_invalidate() -> intel_iommu_sva_invalidate() (invalidate.py): the uapi
        checks, then the VT-d driver's table; a cache the table does not flush is skipped
        with ret 0, and the reply says which flushes were done and which caches skipped."""
        dom = self.vfio_caller(msg, req.dev)
        if not isinstance(dom, VmDomain):
            return dom  # the refusal
        ret, why, rec = invalidate.checks(req.info, dom)
        if ret or rec is None:
            return failed(ret, error=why)
        pdev = self.vfio.physical(req.dev)
        if pdev is None:
            return failed(-E.ENODEV, error=f"{req.dev} has no physical device")
        ret, why, flushes, skipped = invalidate.sva_invalidate(rec, self.kernel, pdev.ats)
        if ret:
            return failed(ret, error=why)
        invalidate.apply(self.iommu, pdev, dom.vm, flushes)
        return {"ret": 0, "flushed": [fl.wire() for fl in flushes], "skipped": skipped}

    # ---- F7: a device's DMA engine ------------------------------------------------------------
    def on_dev_submit(self, msg: Envelope, req: DevSubmit) -> Handler:
        """Run a work descriptor. Passthrough: the guest's own portal; mdev: submitted by vdcm.

        F6: a recoverable first-level fault on a device with PRI becomes a page request; the
        descriptor waits for its page group response and, on SUCCESS, the device retries from
        the faulting byte (see the module docstring for the queue, overflow and drain)."""
        cfg = self.vfio.devices_cfg.get(req.dev)
        if cfg is None:
            return failed(-E.ENODEV, error=f"no device {req.dev}")
        vm = cfg.get("vm", 0)
        if vm and vm not in self.vfio.domains:
            return failed(-E.ENODEV, error=f"{req.dev} belongs to no running VM")
        if msg.src != self.vfio.portal_owner(req.dev, vm):
            return failed(-E.EPERM, error=f"{msg.src} may not submit to {req.dev}")
        pasid, pdev = req.hpasid, self.vfio.physical(req.dev)
        if pdev is None:
            return failed(-E.ENODEV, error=f"{req.dev} has no physical device")
        work, total, faults = req.body(), 0, 0
        while True:
            status, fault_va, done = run_descriptor(self.iommu, pdev.id, work)
            total += done
            if not status or not pri_recoverable(pdev.pri, status):
                break
            if pdev.prg_failed:  # a FAILURE response disabled its page requests until reset
                self.prq.stats.failure_drops += 1
                break
            faults += 1
            if faults > self.prq.max_faults:
                self.dma.faults += 1
                return {
                    "ret": -E.EFAULT,
                    "status": status,
                    "fault": describe_fault(status),
                    "fault_va": fault_va,
                    "done": total,
                    "page_requests": faults - 1,
                    "error": "page request budget exhausted",
                }
            read = work["op"] == "copy" and fault_va == work["src"] + done
            perm = IOMMU_FAULT_PERM_READ if read else IOMMU_FAULT_PERM_WRITE
            code, ret, why = yield from self.page_request(pdev, req.dev, pasid, vm, fault_va, perm)
            if code != IOMMU_PAGE_RESP_SUCCESS:
                self.dma.faults += 1
                return {
                    "ret": ret,
                    "status": status,
                    "fault": describe_fault(status),
                    "fault_va": fault_va,
                    "done": total,
                    "page_requests": faults,
                    "page_response": code,
                    "error": why,
                    **({"aborted": True} if ret == -E.ECANCELED else {}),
                }
            work = {**work, "src": work["src"] + done, "dst": work["dst"] + done, "len": work["len"] - done}
        owner = self.ioasid.find(pasid)
        if not status and owner is not None and owner.vm != vm:
            self.dma.foreign.append({"pasid": pasid, "device_vm": vm, "owner_vm": owner.vm})
        if status:
            self.dma.faults += 1
            return {
                "ret": -E.EFAULT,
                "status": status,
                "fault": describe_fault(status),
                "fault_va": fault_va,
                "done": total,
                "page_requests": faults,
            }
        self.dma.done += 1
        return {"ret": 0, "status": 0, "page_requests": faults}

    # ---- F6: page requests (intel_svm prq_event_thread -> iommu_report_device_fault) ------------
    def page_request(
        self, pdev: PhysDevice, vdev: str, pasid: int, vm: int, addr: int, perm: int
    ) -> Steps[tuple[int, int, str]]:
        """The device's page request: queue it, report it to the owning VMM, wait for the group
        response. Returns (response code, errno for a failed descriptor, why)."""
        ioasid = self.ioasid.find(pasid)
        if (
            ioasid is None
            or ioasid.svm is None
            or pdev.name not in ioasid.svm.devs
            or ioasid.vm != vm
            or self.iommu.is_defunct(pasid)
            or vm not in self.vfio.domains
        ):
            # prq_event_thread: no svm for this PASID (freed, defunct, another VM's): drop it
            self.prq.stats.dropped += 1
            self.log(
                "prq:drop", f"page request of {vdev} for PASID {pasid} @ {addr:#x} dropped: not bound to it"
            )
            return IOMMU_PAGE_RESP_INVALID, -E.EFAULT, f"page request for PASID {pasid} dropped (not bound)"
        if self.prq.full():  # VT-d: PRO set, the IOMMU auto-responds SUCCESS; the device backs off
            yield Call(self.name, Ping())
            return IOMMU_PAGE_RESP_SUCCESS, 0, "auto-responded (page request queue overflow)"
        req = self.prq.queue(pdev.name, vdev, pasid, vm, addr, perm, self.now)
        self.send(
            self.vfio.domains[vm].vmm,
            PageRequest(dev=vdev, hpasid=pasid, grpid=req["grpid"], addr=req["addr"], perm=perm, last=True),
            flow=req["flow"],
        )
        reply: Body = yield Wait((pdev.name, req["grpid"]), self.prq.timeout)
        if reply.get("ret"):  # nobody answered in time: the host answers INVALID on the guest's behalf
            self.prq.remove(req)
            self.prq.stats.timeouts += 1
            self.log(
                "prq:timeout",
                f"page request {req['flow']} of VM {vm} unanswered after "
                f"{self.prq.timeout} s: answered INVALID",
            )
            return IOMMU_PAGE_RESP_INVALID, -E.ETIMEDOUT, f"no page response within {self.prq.timeout} s"
        if reply.get("drained"):
            return reply["code"], -E.ECANCELED, f"page request drained: PASID {pasid} unbound or freed"
        self.prq.answered(req, self.now)
        return reply["code"], -E.EFAULT, f"page response {reply['code']}"

    def on_page_response(self, msg: Envelope, resp: PageResponse) -> dict[str, Any]:
        """iommu_page_response() -> intel_svm_page_response(): match the VMM's page group
        response to its request and pass the code to the device. A FAILURE disables the
        device's page requests (PCI PRI Response Failure): from then on its faults are not
        reported, until VFIO resets the device (`Vfio.reset_released`)."""
        dom = self.vfio_caller(msg)
        if not isinstance(dom, VmDomain):
            return dom  # the refusal
        ret, why, req = self._match_response(dom, resp)
        if req is None:  # refused (ret, why)
            self.prq.stats.rejected += 1
            self.log("prq:reject", f"page response from {msg.src} refused: {why}")
            return failed(ret, error=why)
        if "drained_at" in req:  # the PASID is bound to the device again: its old group is gone
            self.prq.consume_drained(req)
            return {"ret": 0}
        self.prq.remove(req)
        self.prq.stats.responses += 1
        if resp.code == IOMMU_PAGE_RESP_FAILURE:
            self.vfio.phys[req["dev"]].prg_failed = True
            self.log("prq:failure", f"{req['dev']}: FAILURE response; its page requests stay off until reset")
        self.wake((req["dev"], req["grpid"]), {"ret": 0, "code": resp.code})
        return {"ret": 0}

    def _match_response(self, dom: VmDomain, resp: PageResponse) -> tuple[int, str, PageRequestRecord | None]:
        """iommu_page_response finds the pending event (none: -EINVAL); intel_svm_page_response
        then needs the PASID bound to the device (pasid_to_svm_sdev; none: -ENODEV), which a
        response after the drain of its request no longer finds."""
        pdev = self.vfio.physical(resp.dev)
        if resp.dev not in dom.devices or pdev is None:
            return -E.ENODEV, f"{resp.dev} is not assigned to VM {dom.vm}", None
        ret, why, req = self.prq.match(pdev.name, resp.dev, dom.vm, resp.hpasid, resp.grpid, self.now)
        if req is None:
            return ret, why, None
        ioasid = self.ioasid.find(req["pasid"])
        if ioasid is None or ioasid.vm != dom.vm or ioasid.svm is None or pdev.name not in ioasid.svm.devs:
            if "drained_at" in req:  # the core's event goes whatever the driver answers
                self.prq.consume_drained(req)
            return -E.ENODEV, f"PASID {req['pasid']} is no longer bound to {pdev.name}", None
        return 0, "", req

    # ---- audit ---------------------------------------------------------------------------------
    def coherence(self, entries: dict[str, list[int]]) -> list[dict[str, int]]:
        """I2: IOTLB entries that disagree with a fresh walk of the tables as they are now.

        A separate twin with empty caches walks each cached page (a read, as a user request
        would; it may set accessed bits the first walk had set already). An entry of a PASID
        with no PASID entry left is I3's business, not checked here."""
        phys = self.vfio.phys
        fresh = hotpath.PureIommu(self.memory.buf, self.frames.owners)
        for dev in phys.values():
            fresh.attach_device(dev.id, dev.pasid_dir.base, False)
        stale = []
        for did, pasid, vpn, frame, _ in self.iommu.cache_dump()["iotlb"]:
            cached_by = next((phys[d] for d, pasids in entries.items() if pasid in pasids), None)
            if cached_by is None:
                continue
            pa, fault = fresh.translate_one(cached_by.id, pasid, vpn << PAGE_SHIFT, ACCESS_READ)
            if fault or pa >> PAGE_SHIFT != frame:
                stale.append(
                    {
                        "did": did,
                        "pasid": pasid,
                        "vpn": vpn,
                        "cached": frame,
                        "fresh": -1 if fault else pa >> PAGE_SHIFT,
                    }
                )
        return stale

    def snapshot(self) -> dict[str, Any]:
        entries = {name: dev.pasid_dir.present_pasids() for name, dev in self.vfio.phys.items()}
        allocated, owners = self.ioasid.allocated, self.frames.owners
        return {
            "stale_iotlb": self.coherence(entries),
            **super().snapshot(),
            "ioasids": {str(p): {"vm": a.vm, "bound": a.svm is not None} for p, a in allocated.items()},
            "svms": {
                str(a.pasid): {
                    "vm": a.svm.vm,
                    "gpasid": a.svm.gpasid,
                    "flags": a.svm.flags,
                    "devs": {d: s.users for d, s in a.svm.devs.items()},
                }
                for a in allocated.values()
                if a.svm is not None
            },
            "pasid_entries": entries,
            "pasid_dirs": {name: dev.pasid_dir.base for name, dev in self.vfio.phys.items()},
            "vms": {
                str(d.vm): {
                    "vmm": d.vmm,
                    "ioasids": sorted(d.ioasids),
                    "quota": d.quota,
                    "ram_frames": len(d.ram_frames),
                }
                for d in self.vfio.domains.values()
            },
            **self.prq.snapshot(),
            "policy": self.policy.value,
            "kernel": self.kernel.value,
            "reclaiming": {str(p): vm for p, vm in self.ioasid.reclaiming.items()},
            "quarantined": {str(p): vm for p, vm in self.ioasid.quarantined.items()},
            "free_pool": len(self.ioasid.pool),
            "teardowns": list(self.teardowns),
            "notify_failures": self.notify_failures,
            "owned_frames": {str(vm): int(n) for vm, n in zip(*np.unique(owners, return_counts=True)) if vm},
            "caches": _wire_safe(self.iommu.cache_dump()),
            "counters": self.iommu.counters(),
            "dma": {**asdict(self.dma), "foreign": list(self.dma.foreign)},
            "hotpath": hotpath.IMPLEMENTATION,
        }


def _wire_safe(value: Any) -> Any:
    """Make a cache dump msgpack-safe: map keys as strings, tuples as lists."""
    if isinstance(value, dict):
        return {str(k): _wire_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_wire_safe(v) for v in value]
    return value
