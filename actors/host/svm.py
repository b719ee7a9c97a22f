"""svm and sdev (drivers/iommu/intel/svm.c) and the PASID entry they program (pasid.c).

An `Svm` is the host's record of one guest PASID bound to a host PASID; its `Sdev`s are the
physical devices bound to it, each with a bind count. The entry writer and the bind record's
checks are here; the bind and unbind flows themselves read top to bottom in
`Host.on_bind_gpasid` / `Host.on_unbind_gpasid`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vsva.actors import errno as E
from vsva.actors.catalogue import IoasidNotify
from vsva.actors.uapi import (
    IOMMU_GPASID_BIND_VERSION_1,
    IOMMU_PASID_FORMAT_INTEL_VTD,
    IOMMU_SVA_GPASID_VAL,
    VTD_FLAG_EAFE,
    VTD_FLAG_SRE,
    VTD_FLAG_WPE,
    VTD_FLAGS_LAST,
)
from vsva.hotpath.layout import PAGE_SHIFT, PAGE_SIZE, PASID_MAX, encode_pasid_entry

if TYPE_CHECKING:
    from vsva.actors.host.vfio import PhysDevice, VmDomain
    from vsva.hotpath.api import IommuApi

# offsetof(struct iommu_gpasid_bind_data, vendor) and offsetofend(..., vendor.vtd) (uapi iommu.h)
BIND_DATA_MINSZ = 56
BIND_DATA_VTD_MINSZ = 72
IOMMU_PASID_FORMAT_LAST = 2
SUPPORTED_ADDR_WIDTH = 48  # 4-level first level (5-level is a later step)
VTD_FLAGS_MTS = (1 << 2) | (1 << 3) | (1 << 4) | (1 << 5)  # PCD, PWT, EMTE, CD: no memory type support
SVM_FLAG_GUEST_MODE = 1 << 2
SVM_FLAG_GUEST_PASID = 1 << 3
BIND_FIELDS = ("argsz", "version", "format", "flags", "hpasid", "gpasid", "gpgd", "addr_width")


@dataclass(slots=True)
class Sdev:
    """intel_svm_dev: one physical device bound to an svm, with its bind count."""

    dev: str
    users: int = 1


@dataclass(slots=True)
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
        return IoasidNotify(
            event=event,
            vm=self.vm,
            hpasid=self.pasid,
            gpasid=self.gpasid if self.gpasid >= 0 else self.pasid,
            dev=dev,
        )

    def vdev_bound(self, vdev: str) -> None:
        self.vdevs[vdev] = self.vdevs.get(vdev, 0) + 1

    def vdev_unbound(self, vdev: str) -> None:
        left = self.vdevs.get(vdev, 0) - 1
        if left > 0:
            self.vdevs[vdev] = left
        else:
            self.vdevs.pop(vdev, None)


def bind_checks(pdev: PhysDevice | None, data: dict[str, Any]) -> int:
    """The bind record's checks, in the kernel's order: 0 or its error code.

    iommu_check_bind_data (drivers/iommu/iommu.c, v5.10+): argsz up to the vendor union,
    version, format, no unknown flags; then intel_svm_bind_gpasid (drivers/iommu/intel/svm.c):
    argsz up to the end of the VT-d data, no unknown vendor flags (before the PCI and PASID
    checks), a PCI device with the full PASID width, the host PASID in range."""
    if pdev is None or not data:
        return -E.EINVAL
    vtd = data.get("vtd_flags", 0)
    for value in (*map(data.get, BIND_FIELDS), vtd):
        if type(value) is not int and not _is_int(value):  # exactly int: the cheap case
            return -E.EINVAL
    if (
        data["argsz"] < BIND_DATA_MINSZ
        or data["version"] != IOMMU_GPASID_BIND_VERSION_1
        or not 0 <= data["format"] < IOMMU_PASID_FORMAT_LAST
        or data["flags"] & ~IOMMU_SVA_GPASID_VAL
    ):
        return -E.EINVAL
    if data["format"] != IOMMU_PASID_FORMAT_INTEL_VTD or data["argsz"] < BIND_DATA_VTD_MINSZ:
        return -E.EINVAL
    if vtd & ~(VTD_FLAGS_LAST - 1):
        return -E.EINVAL
    if not pdev.pci:
        return -E.ENOTSUPP
    if pdev.max_pasids != PASID_MAX:
        return -E.EINVAL
    if data["hpasid"] <= 0 or data["hpasid"] >= PASID_MAX:
        return -E.EINVAL
    return 0


def _is_int(value: Any) -> bool:
    """An int and not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def setup_nested(iommu: IommuApi, pdev: PhysDevice, dom: VmDomain, data: dict[str, Any]) -> int:
    """intel_pasid_setup_nested() (drivers/iommu/intel/pasid.c): refuse a PASID entry that is
    already present (-EBUSY: the caller must not bind a PASID to a device twice), validate
    the guest's paging mode and flags, write the entry."""
    words = pdev.pasid_dir.read_entry(data["hpasid"])
    if words is not None and words[0] & 1:
        return -E.EBUSY
    vtd = data.get("vtd_flags", 0)
    if vtd & VTD_FLAGS_MTS:  # intel_pasid_setup_bind_data: "No memory type support"
        return -E.EINVAL
    if data["addr_width"] != SUPPORTED_ADDR_WIDTH:
        return -E.EINVAL
    # The first-level root is a GPA inside the domain (gpgd beyond its address range ->
    # -EINVAL); pasid_set_flptr keeps the page-frame bits only, so low bits are dropped.
    gpgd = data["gpgd"] & ~(PAGE_SIZE - 1)
    if not 0 <= data["gpgd"] < len(dom.ram_frames) << PAGE_SHIFT:
        return -E.EINVAL
    pdev.pasid_dir.write_entry(
        data["hpasid"],
        encode_pasid_entry(
            flptr=gpgd,
            slptr=dom.sl.root,
            did=dom.vm,
            sre=bool(vtd & VTD_FLAG_SRE),
            wpe=bool(vtd & VTD_FLAG_WPE),
            eafe=bool(vtd & VTD_FLAG_EAFE),
        ),
    )
    iommu.inv_pasid_cache("pasid", did=dom.vm, pasid=data["hpasid"])
    return 0


def tear_down_entry(iommu: IommuApi, pdev: PhysDevice, pasid: int, did: int) -> None:
    """intel_pasid_tear_down_entry() plus the PASID-cache, IOTLB and device-TLB flushes."""
    pdev.pasid_dir.clear_entry(pasid)
    iommu.inv_pasid_cache("pasid", did=did, pasid=pasid)
    iommu.inv_iotlb("pasid", did=did, pasid=pasid)
    iommu.inv_devtlb(pdev.id, pasid=pasid)
