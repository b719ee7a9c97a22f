"""The VFIO side of the host: physical devices, host frames, and each VM's container.

`Vfio` owns what the host knows about devices and open VMs: every physical function with
its context entry (a PASID directory in host memory), the domain (second-level table over
the VM's RAM) of each open VM, and which VMM holds which VM's fd. Its checks are the ones
VFIO makes before any IOMMU call: the caller holds an open VM, the device is in its
container.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from vsva.actors import errno as E
from vsva.actors.memory import SL_LINK, SL_PRESENT, FrameAllocator, PasidDirectory, PhysMem, RadixTable
from vsva.actors.messages import Envelope
from vsva.hotpath.layout import PAGE_SHIFT, PASID_DIR_FRAMES, PASID_MAX, SL_R, SL_W

if TYPE_CHECKING:
    from vsva.hotpath.api import IommuApi


@dataclass(slots=True)
class PhysDevice:
    """A physical PCI function: its context entry (PASID directory) and capabilities."""

    name: str
    id: int
    pci: bool
    max_pasids: int
    ats: bool
    pasid_dir: PasidDirectory
    pasid_enabled: bool = False
    pri: bool = True  # Page Request Interface: recoverable faults become page requests
    prg_failed: bool = False  # a FAILURE page response stopped its page requests until reset


@dataclass(slots=True)
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


class HostFrames:
    """Host physical frames: the allocator and the frame -> owning VM table the hot path checks (I1)."""

    def __init__(self, mem: PhysMem):
        self.mem = mem
        self.pool = FrameAllocator(range(mem.nframes - 1, 0, -1))
        self.owners = np.zeros(mem.nframes, dtype=np.int32)

    def table(self, owner: int = 0) -> int:
        """A zeroed frame for a page table; returns its address."""
        frame = self.pool.alloc()
        self.mem.zero_frame(frame)
        self.owners[frame] = owner
        return frame << PAGE_SHIFT

    def contiguous(self, count: int) -> int:
        """Frames for a PASID directory, zeroed: taken from the top of the pool, contiguous.
        Devices are probed at start, when the pool still holds the highest frames in
        descending order at the end that allocations do not take from."""
        frame = self.pool.take_run(count)
        self.mem.zero_frames(frame, count)
        return frame

    def release(self, frame: int) -> None:
        self.owners[frame] = 0
        self.pool.release(frame)


class Vfio:
    """Devices and open VMs, and the checks VFIO makes on every request."""

    def __init__(self, config: dict[str, Any], frames: HostFrames, iommu: IommuApi):
        self.devices_cfg: dict[str, dict[str, Any]] = config["devices"]
        self.vm_names: dict[int, dict[str, Any]] = {int(k): v for k, v in config.get("vms", {}).items()}
        self.vdcm: str = config.get("vdcm", "vdcm")
        self.frames = frames
        self.iommu = iommu
        self.domains: dict[int, VmDomain] = {}
        self.vmm_of: dict[str, int] = {}  # vmm actor name -> vm id (the open VFIO fds)
        self.phys: dict[str, PhysDevice] = {
            name: self._probe(name, cfg) for name, cfg in self.devices_cfg.items() if "parent" not in cfg
        }

    def _probe(self, name: str, cfg: dict[str, Any]) -> PhysDevice:
        """Give a physical device its context entry: a PASID directory in host memory."""
        base = self.frames.contiguous(PASID_DIR_FRAMES) << PAGE_SHIFT
        dev = PhysDevice(
            name,
            cfg["id"],
            cfg.get("pci", True),
            cfg.get("max_pasids", PASID_MAX),
            cfg.get("ats", True),
            PasidDirectory(self.frames.mem, base, self.frames.table),
            pri=bool(cfg.get("pri", True)),
        )
        self.iommu.attach_device(dev.id, base, dev.ats)
        return dev

    def physical(self, dev: str) -> PhysDevice | None:
        """The physical device behind `dev` (an mdev's parent, as mdev_get_iommu_device)."""
        cfg = self.devices_cfg.get(dev)
        if cfg is None:
            return None
        return self.phys.get(cfg.get("parent", dev))

    def caller(self, msg: Envelope) -> VmDomain | None:
        """The VM whose VFIO fd the request came through (None: not a VMM of an open VM)."""
        vm = self.vmm_of.get(msg.src)
        return None if vm is None else self.domains.get(vm)

    def open_checks(self, src: str, vm: int, devices: list[Any], pages: int, quota: int) -> tuple[int, str]:
        """Why `src` may not open VM `vm` with these devices and sizes: (errno, why) or (0, "")."""
        names = self.vm_names.get(vm)
        if names is None or names["vmm"] != src:
            return -E.EPERM, f"{src} is not the VMM of VM {vm}"
        if vm in self.domains:
            return -E.EBUSY, f"VM {vm} is already open"
        if any(not isinstance(d, str) or self.devices_cfg.get(d, {}).get("vm") != vm for d in devices):
            return -E.ENODEV, "a device is not assigned to this VM"
        if not 16 <= pages <= len(self.frames.pool) - 64 or not 0 < quota < PASID_MAX:
            return -E.EINVAL, "ram_pages or quota out of range"
        return 0, ""

    def open(
        self,
        src: str,
        vm: int,
        devices: list[str],
        pages: int,
        quota: int,
        shuffle: Callable[[list[int]], None],
    ) -> VmDomain:
        """The VM's container: RAM frames (shuffled), the second level mapping them, its devices."""
        ram = [self.frames.pool.alloc() for _ in range(pages)]
        shuffle(ram)
        for frame in ram:
            self.frames.mem.zero_frame(frame)
            self.frames.owners[frame] = vm
        sl = RadixTable(
            self.frames.mem, self.frames.table(), self.frames.table, link=SL_LINK, present=SL_PRESENT
        )
        for gfn, frame in enumerate(ram):
            sl.map(gfn << PAGE_SHIFT, frame << PAGE_SHIFT, SL_R | SL_W)
        dom = self.domains[vm] = VmDomain(vm, src, self.vm_names[vm]["guest"], sl, ram, list(devices), quota)
        self.vmm_of[src] = vm
        return dom

    def release(self, dom: VmDomain) -> None:
        """Give the VM's frames and second-level tables back and flush what its domain cached."""
        for table in dom.sl.tables():
            self.frames.release(table >> PAGE_SHIFT)
        for frame in dom.ram_frames:
            self.frames.release(frame)
        self.iommu.inv_iotlb("domain", did=dom.vm)
        self.iommu.inv_pasid_cache("domain", did=dom.vm)
        del self.domains[dom.vm]

    def reset_released(self, dom: VmDomain) -> list[str]:
        """The released VM's devices are reset (VFIO's FLR on release): a passthrough function
        now, a parent of mdevs once no running VM holds one of its mdevs. A reset re-enables
        page requests a FAILURE response had stopped. Returns the devices reset."""
        in_use = {p.name for d in self.domains.values() for v in d.devices if (p := self.physical(v))}
        reset = sorted({p.name for v in dom.devices if (p := self.physical(v)) and p.name not in in_use})
        for name in reset:
            self.phys[name].prg_failed = False
        return reset

    def portal_owner(self, dev: str, vm: int) -> str | None:
        """Who may write `dev`'s work portal: vdcm for an mdev, the VM's guest for a function."""
        if "parent" in self.devices_cfg[dev]:
            return self.vdcm
        return self.vm_names.get(vm, {}).get("guest")
