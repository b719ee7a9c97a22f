"""The VMM: the emulated virtual IOMMU in front of the guest and the VFIO user API behind it.

Its handlers model what QEMU's vIOMMU does on a trap:
    on_vm_start     open the VM's devices through VFIO, get guest RAM (its host frames)
    on_vcmd_alloc   the virtual command "allocate PASID": host IOASID, then a guest PASID
                    (identity for passthrough devices, vmm-chosen for mediated devices)
    on_qi_submit    the guest's invalidation queue: context-cache, PASID-cache, PASID-based
                    IOTLB and device-TLB descriptors, then the wait descriptor's completion.
                    A PASID-cache invalidation makes the vmm read the guest's PASID entry in
                    guest RAM and bind or unbind it on the host (the shadow of the table);
                    it is never passed down (the VT-d driver flushes no PASID cache for
                    user space: the host's PASID entries and their cache are its own).
    on_page_request the host reports a page request of this VM (F6): inject it into the
                    guest's virtual page request queue with the guest PASID
    on_page_response the guest's page group response, passed down with the host PASID
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from vsva.actors import errno as E
from vsva.actors.base import Actor, ActorEnv, Body, Call, Handler, Steps, failed
from vsva.actors.catalogue import (
    BindGpasid,
    CacheInvalidate,
    IoasidAlloc,
    IoasidFree,
    PageRequest,
    PageResponse,
    QiSubmit,
    UnbindGpasid,
    VcmdAlloc,
    VcmdFree,
    VfioClose,
    VfioOpen,
    VmInfo,
    VmStart,
    VmStop,
    VPageRequest,
    VPageResponse,
)
from vsva.actors.memory import GuestRam, PasidDirectory
from vsva.actors.messages import Envelope
from vsva.actors.uapi import (
    IOMMU_CACHE_INV_TYPE_DEV_IOTLB,
    IOMMU_CACHE_INV_TYPE_IOTLB,
    IOMMU_GPASID_BIND_VERSION_1,
    IOMMU_INV_ADDR_FLAGS_LEAF,
    IOMMU_INV_ADDR_FLAGS_PASID,
    IOMMU_INV_GRANU_ADDR,
    IOMMU_INV_GRANU_PASID,
    IOMMU_INV_PASID_FLAGS_PASID,
    IOMMU_PAGE_RESP_INVALID,
    IOMMU_PASID_FORMAT_INTEL_VTD,
    IOMMU_SVA_GPASID_VAL,
    VTD_FLAG_EAFE,
    VTD_FLAG_SRE,
    VTD_FLAG_WPE,
)
from vsva.hotpath.layout import PAGE_SIZE, PASID_DIR_FRAMES, PASID_MAX, PGTT_FIRST_ONLY, decode_pasid_entry

# Guest PASIDs the vmm chooses for mediated devices (non-identity) count down from the top of
# the space, while host PASIDs (identity for passthrough devices) count up from 1.
GUEST_PASID_TOP = PASID_MAX - 1
BIND_ARGSZ = 72  # sizeof(struct iommu_gpasid_bind_data) with the VT-d vendor data (uapi iommu.h)


@dataclass
class Shadow:
    """The vmm's copy of one bound guest PASID entry (what it last told the host)."""

    gpgd: int
    hpasid: int


@dataclass
class VprqStats:
    """What the virtual page request queue counted: host page requests injected into the
    guest, those it could not map (answered INVALID for the guest), the guest's responses
    passed down, and the responses refused (here or by the host)."""

    injected: int = 0
    unmapped: int = 0
    responses: int = 0
    refused: int = 0


class Vmm(Actor):
    """One per VM."""

    def __init__(self, name: str, env: ActorEnv):
        super().__init__(name, env)
        self.vm: int = self.config["vm"]
        self.host: str = self.config["host"]
        self.guest: str = self.config["guest"]
        self.devices: list[str] = list(self.config["devices"])
        self.mdevs: set[str] = set(self.config.get("mdevs", []))
        self.ram: GuestRam | None = None
        self.g2h: dict[int, int] = {}  # guest PASID -> host PASID
        self.pasid_dirs: dict[str, PasidDirectory] = {}  # dev -> guest PASID directory (GPA)
        self.shadow: dict[tuple[str, int], Shadow] = {}  # (dev, gpasid) -> bound entry
        self.next_gpasid = GUEST_PASID_TOP
        self.prq_stats = VprqStats()

    def on_vm_start(self, msg: Envelope, req: VmStart) -> Handler:
        """Open the VM's devices through VFIO and map guest RAM (QEMU's VFIO container setup)."""
        if self.ram is not None:
            return failed(-E.EBUSY, error="VM already started")
        reply: Body = yield Call(
            self.host,
            VfioOpen(
                vm=self.vm,
                ram_pages=self.config["ram_pages"],
                devices=self.devices,
                quota=self.config["quota"],
            ),
        )
        if reply["ret"]:
            return reply
        self.ram = GuestRam(self.memory, reply["ram_frames"])
        return {"ret": 0, "ram_frames": reply["ram_frames"]}

    def on_vm_stop(self, msg: Envelope, req: VmStop) -> Handler:
        """Normal shutdown: close the VFIO fd; the host frees the whole IOASID set (F8)."""
        if self.ram is None:
            return failed(-E.ENODEV, error="VM not started")
        reply: Body = yield Call(
            self.host,
            VfioClose(),
            flow=msg.flow or f"F8:vm{self.vm}.1",
            timeout=self.config.get("teardown_timeout", 30.0),
        )
        if reply["ret"] == 0:
            self.ram = None
            self.g2h.clear()
            self.shadow.clear()
            self.pasid_dirs.clear()
        return reply

    def on_vm_info(self, msg: Envelope, req: VmInfo) -> dict[str, Any]:
        """What the guest's firmware tables say: its RAM (as host frames it maps) and devices."""
        if msg.src != self.guest:
            return failed(-E.EPERM)
        if self.ram is None:
            return failed(-E.ENODEV, error="VM not started")
        return {"ret": 0, "ram_frames": self.ram.frames, "devices": self.devices, "mdevs": sorted(self.mdevs)}

    # ---- F1 / F5: virtual commands --------------------------------------------------------------
    def on_vcmd_alloc(self, msg: Envelope, req: VcmdAlloc) -> Handler:
        if msg.src != self.guest or req.dev not in self.devices:
            return failed(-E.EPERM if msg.src != self.guest else -E.ENODEV)
        identity = self._identity(req.dev)
        reply: Body = yield Call(self.host, IoasidAlloc())
        colliding: list[int] = []  # host PASIDs equal to guest PASIDs this vmm chose for mdevs
        while identity and reply["ret"] == 0 and reply["hpasid"] in self.g2h and len(colliding) < 8:
            colliding.append(reply["hpasid"])
            reply = yield Call(self.host, IoasidAlloc())
        for hpasid in colliding:  # given back only now, so the allocator cannot hand them out again
            yield Call(self.host, IoasidFree(hpasid=hpasid))
        if reply["ret"] or reply["hpasid"] in self.g2h:
            return reply if reply["ret"] else failed(-E.EBUSY, error="no host PASID free of collisions")
        hpasid = reply["hpasid"]
        if self.ram is None:  # the VM was stopped while the host allocated: its set is gone
            return failed(-E.ENODEV, error="VM stopped during the allocation")
        gpasid = hpasid if identity else self._choose_guest_pasid()
        self.g2h[gpasid] = hpasid
        return {"ret": 0, "gpasid": gpasid, "hpasid": hpasid}

    def _identity(self, dev: str) -> bool:
        """Passthrough devices are programmed with host PASIDs: identity. mdevs may differ."""
        return dev not in self.mdevs or not self.config.get("non_identity", True)

    def _choose_guest_pasid(self) -> int:
        while self.next_gpasid in self.g2h or self.next_gpasid <= 0:
            self.next_gpasid = GUEST_PASID_TOP if self.next_gpasid <= 0 else self.next_gpasid - 1
        gpasid, self.next_gpasid = self.next_gpasid, self.next_gpasid - 1
        return gpasid

    def on_vcmd_free(self, msg: Envelope, req: VcmdFree) -> Handler:
        if msg.src != self.guest:
            return failed(-E.EPERM)
        gpasid = req.gpasid
        hpasid = self.g2h.get(gpasid)
        if hpasid is None:
            return failed(-E.EINVAL, error=f"guest PASID {gpasid} not allocated")
        reply: Body = yield Call(self.host, IoasidFree(hpasid=hpasid))
        if reply["ret"] == 0:
            del self.g2h[gpasid]
            for key in [k for k in self.shadow if k[1] == gpasid]:
                del self.shadow[key]
        return reply

    # ---- F2 / F3 / F4: the invalidation queue ---------------------------------------------------
    def on_qi_submit(self, msg: Envelope, req: QiSubmit) -> Handler:
        """Process descriptors in order; the reply is the wait descriptor's completion."""
        if msg.src != self.guest:
            return failed(-E.EPERM)
        done: list[Body] = []
        for desc in req.descs:
            if (
                not isinstance(desc, dict)
                or not isinstance(desc.get("type"), str)
                or desc["type"] not in _DESC_HANDLERS
            ):
                return failed(-E.EINVAL, error=f"bad descriptor {desc!r}", done=done)
            result = yield from getattr(self, _DESC_HANDLERS[desc["type"]])(desc)
            done.append(result)
            if result["ret"]:
                return {"ret": result["ret"], "error": result.get("error", ""), "done": done}
        return {"ret": 0, "done": done}

    def qi_context(self, desc: dict[str, Any]) -> Steps[Body]:
        """Context-cache invalidation: the guest (re)programmed a device's PASID directory pointer."""
        dev, pdir = desc.get("dev"), desc.get("pdir")
        if self.ram is None:
            return failed(-E.ENODEV, error="VM not started")
        if (
            dev not in self.devices
            or not isinstance(pdir, int)
            or pdir & (PAGE_SIZE - 1)
            or not 0 <= pdir <= (len(self.ram.frames) - PASID_DIR_FRAMES) * PAGE_SIZE
        ):
            return failed(-E.EINVAL, error="context descriptor")
        self.pasid_dirs[dev] = PasidDirectory(self.ram, pdir, self._no_alloc)
        return {"ret": 0, "type": "cc"}
        yield  # a generator like its siblings

    @staticmethod
    def _no_alloc() -> int:
        raise PermissionError("the vmm never allocates in the guest's PASID table")

    def qi_pasid_cache(self, desc: dict[str, Any]) -> Steps[Body]:
        """PASID-cache invalidation: sync the shadow with the guest's entry (bind / unbind)."""
        dev, gpasid = desc.get("dev"), desc.get("gpasid")
        if (
            not isinstance(dev, str)
            or dev not in self.pasid_dirs
            or not isinstance(gpasid, int)
            or not 0 < gpasid < PASID_MAX
        ):
            return failed(-E.EINVAL, error="PASID-cache descriptor")
        try:
            words = self.pasid_dirs[dev].read_entry(gpasid)
        except ValueError:  # the guest's directory entry points outside guest RAM
            return failed(-E.EFAULT, error=f"PASID table of {dev} for PASID {gpasid} outside guest RAM")
        entry = decode_pasid_entry(words) if words else {"present": False}
        bound = self.shadow.get((dev, gpasid))
        if bound is not None and (not entry["present"] or entry["flptr"] != bound.gpgd):
            reply: Body = yield Call(self.host, UnbindGpasid(dev=dev, hpasid=bound.hpasid))
            if reply["ret"]:
                return reply
            del self.shadow[(dev, gpasid)]
        if entry["present"] and (dev, gpasid) not in self.shadow:
            return (yield from self._bind(dev, gpasid, entry))
        return {"ret": 0, "type": "pc", "action": "unbind" if bound else "none"}

    def _bind(self, dev: str, gpasid: int, entry: dict[str, Any]) -> Steps[Body]:
        """Check the guest's first-level entry and pass it down as a bind record."""
        hpasid = self.g2h.get(gpasid)
        if hpasid is None:
            return failed(-E.EINVAL, error=f"guest PASID {gpasid} was never allocated")
        if entry["pgtt"] != PGTT_FIRST_ONLY or entry["flpm"] != 0:
            return failed(-E.EINVAL, error="guest entry is not a 4-level first-level entry")
        data = {
            "argsz": BIND_ARGSZ,
            "version": IOMMU_GPASID_BIND_VERSION_1,
            "format": IOMMU_PASID_FORMAT_INTEL_VTD,
            "flags": 0,
            "gpgd": entry["flptr"],
            "hpasid": hpasid,
            "gpasid": gpasid,
            "addr_width": 48,
            "vtd_flags": (VTD_FLAG_SRE if entry["sre"] else 0)
            | (VTD_FLAG_WPE if entry["wpe"] else 0)
            | (VTD_FLAG_EAFE if entry["eafe"] else 0),
        }
        if gpasid != hpasid:
            data["flags"] |= IOMMU_SVA_GPASID_VAL
        reply: Body = yield Call(self.host, BindGpasid(dev=dev, data=data))
        if reply["ret"] == 0 and self.ram is None:  # stopped meanwhile: torn down with the VM
            return failed(-E.ENODEV, error="VM stopped during the bind", type="pc", action="bind")
        if reply["ret"] == 0:
            self.shadow[(dev, gpasid)] = Shadow(entry["flptr"], hpasid)
        return {**reply, "type": "pc", "action": "bind", "hpasid": hpasid}

    def qi_piotlb(self, desc: dict[str, Any]) -> Steps[Body]:
        """PASID-based IOTLB invalidation (address range or whole PASID) -> cache_invalidate."""
        return (yield from self._invalidate(desc, IOMMU_CACHE_INV_TYPE_IOTLB))

    def qi_dev_iotlb(self, desc: dict[str, Any]) -> Steps[Body]:
        """PASID-based device-TLB invalidation -> cache_invalidate."""
        return (yield from self._invalidate(desc, IOMMU_CACHE_INV_TYPE_DEV_IOTLB))

    def _invalidate(self, desc: dict[str, Any], cache: int) -> Steps[Body]:
        dev, gpasid = desc.get("dev"), desc.get("gpasid")
        hpasid = self.g2h.get(gpasid) if isinstance(gpasid, int) else None
        if dev not in self.devices or hpasid is None:
            return failed(-E.EINVAL, error="invalidation of an unknown device or PASID")
        info: dict[str, Any] = {"version": 1, "cache": cache, "pasid": hpasid}
        if "addr" in desc:
            order = desc.get("size_order", 0)
            if not isinstance(order, int) or not 0 <= order <= 52:
                return failed(-E.EINVAL, error="invalidation size order")
            info.update(
                granularity=IOMMU_INV_GRANU_ADDR,
                addr=desc["addr"],
                granule_size=PAGE_SIZE,
                nb_granules=1 << order,
                flags=IOMMU_INV_ADDR_FLAGS_PASID | (IOMMU_INV_ADDR_FLAGS_LEAF if desc.get("ih") else 0),
            )
        else:
            info.update(granularity=IOMMU_INV_GRANU_PASID, flags=IOMMU_INV_PASID_FLAGS_PASID)
        reply: Body = yield Call(self.host, CacheInvalidate(dev=dev, info=info))
        return {**reply, "type": desc["type"]}

    def qi_wait(self, desc: dict[str, Any]) -> Steps[Body]:
        """The wait descriptor: everything before it has completed once we get here."""
        return {"ret": 0, "type": "wait"}
        yield  # a generator like its siblings

    # ---- F6: the virtual page request queue ----------------------------------------------------
    def on_page_request(self, msg: Envelope, req: PageRequest) -> Handler:
        """The host reports a page request (host PASID): inject it into the guest's virtual
        PRQ with the guest PASID. One we cannot map (PASID freed here) is answered INVALID."""
        if msg.src != self.host:
            return failed(-E.EPERM)
        gpasid = next((g for g, h in self.g2h.items() if h == req.hpasid), None)
        if gpasid is None or req.dev not in self.devices or self.ram is None:
            self.prq_stats.unmapped += 1
            yield Call(
                self.host,
                PageResponse(dev=req.dev, hpasid=req.hpasid, grpid=req.grpid, code=IOMMU_PAGE_RESP_INVALID),
            )
            return None
        self.prq_stats.injected += 1
        self.send(
            self.guest,
            VPageRequest(
                dev=req.dev, gpasid=gpasid, grpid=req.grpid, addr=req.addr, perm=req.perm, last=req.last
            ),
        )
        return None

    def on_vpage_response(self, msg: Envelope, req: VPageResponse) -> Handler:
        """The guest's page group response (its vPRQ response descriptor): to the host PASID."""
        if msg.src != self.guest:
            return failed(-E.EPERM)
        hpasid = self.g2h.get(req.gpasid)
        if hpasid is None or req.dev not in self.devices:
            self.prq_stats.refused += 1
            return failed(-E.EINVAL, error=f"page response for unknown device or guest PASID {req.gpasid}")
        reply: Body = yield Call(
            self.host, PageResponse(dev=req.dev, hpasid=hpasid, grpid=req.grpid, code=req.code)
        )
        if reply["ret"] == 0:
            self.prq_stats.responses += 1
        else:
            self.prq_stats.refused += 1
        return reply

    def snapshot(self) -> dict[str, Any]:
        return {
            **super().snapshot(),
            "vm": self.vm,
            "prq": asdict(self.prq_stats),
            "g2h": {str(g): h for g, h in self.g2h.items()},
            "bound": [{"dev": d, "gpasid": g, "hpasid": s.hpasid} for (d, g), s in self.shadow.items()],
        }


_DESC_HANDLERS = {
    "cc": "qi_context",
    "pc": "qi_pasid_cache",
    "piotlb": "qi_piotlb",
    "dev_iotlb": "qi_dev_iotlb",
    "wait": "qi_wait",
}
