"""Cache invalidation passed down by a VMM: the uapi record checks (iommu.c) and the VT-d
driver's own table (intel_iommu_sva_invalidate, drivers/iommu/intel/iommu.c).

`checks` says whether a record may go to the driver at all: the generic uapi rules of
iommu_check_cache_invl_data (v5.10+, applied under both semantics, like the bind record's
merged checks), the fields' C types, and the caller's ownership of the PASID it names.
`sva_invalidate` is the driver: it turns a checked record into the flushes it performs, or
-ERANGE. `apply` performs them on the hot path's caches.

The driver's table (inv_type_granu_table) is narrower than the uapi's: per cache type,
IOTLB: PASID -> PASID-selective, ADDR -> page-selective within the PASID; device TLB: ADDR
only; the PASID cache: nothing. The driver walks the named caches in bit order (IOTLB,
device TLB, PASID cache) and stops at the first one the table does not support, with ret
still 0: that cache and every later one is *skipped* (the call succeeds, nothing is flushed
for them). With ATS enabled an IOTLB flush also flushes the device TLB.

Where the two semantics differ (`Kernel`):
  v11 (the seed, as merged in v5.8): an ADDR flush of the IOTLB whose address is not
      aligned to its size order (> 0) is -ERANGE and nothing is flushed; the device-TLB
      flush an IOTLB flush implies at PASID granularity uses the record's address field
      with size order 0 (one page, address 0 when unset: the whole PASID is *not*
      flushed from the device TLB); an explicit device-TLB flush takes the record's PASID
      whether or not the PASID flag is set.
  v5.9 ("Warn on out-of-range invalidation address", "Fix devTLB flush for vSVA"): the
      misaligned address is accepted (the hardware ignores the low bits: the aligned
      range around it is flushed); the implied device-TLB flush at PASID granularity
      covers the whole PASID; both device-TLB flushes use the PASID the flags select.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vsva.actors import errno as E
from vsva.actors.semantics import Kernel
from vsva.actors.uapi import (
    IOMMU_CACHE_INV_TYPE_DEV_IOTLB,
    IOMMU_CACHE_INV_TYPE_IOTLB,
    IOMMU_CACHE_INV_TYPE_PASID,
    IOMMU_INV_ADDR_FLAGS_ARCHID,
    IOMMU_INV_ADDR_FLAGS_LEAF,
    IOMMU_INV_ADDR_FLAGS_PASID,
    IOMMU_INV_GRANU_ADDR,
    IOMMU_INV_GRANU_DOMAIN,
    IOMMU_INV_GRANU_PASID,
    IOMMU_INV_PASID_FLAGS_ARCHID,
    IOMMU_INV_PASID_FLAGS_PASID,
)
from vsva.hotpath.layout import PAGE_SHIFT, PASID_MAX

if TYPE_CHECKING:
    from vsva.actors.host.vfio import PhysDevice, VmDomain
    from vsva.hotpath.api import IommuApi

INV_CACHE_ALL = IOMMU_CACHE_INV_TYPE_IOTLB | IOMMU_CACHE_INV_TYPE_DEV_IOTLB | IOMMU_CACHE_INV_TYPE_PASID
CACHE_NAMES = {
    IOMMU_CACHE_INV_TYPE_IOTLB: "iotlb",
    IOMMU_CACHE_INV_TYPE_DEV_IOTLB: "devtlb",
    IOMMU_CACHE_INV_TYPE_PASID: "pasid_cache",
}
# inv_type_granu_table: the (cache, granularity) pairs the VT-d driver flushes at all.
VTD_SUPPORTED = {
    (IOMMU_CACHE_INV_TYPE_IOTLB, IOMMU_INV_GRANU_PASID),
    (IOMMU_CACHE_INV_TYPE_IOTLB, IOMMU_INV_GRANU_ADDR),
    (IOMMU_CACHE_INV_TYPE_DEV_IOTLB, IOMMU_INV_GRANU_ADDR),
}
# iommu_check_cache_invl_data: the flags each granularity's info may carry.
GRANU_FLAGS = {
    IOMMU_INV_GRANU_DOMAIN: 0,
    IOMMU_INV_GRANU_PASID: IOMMU_INV_PASID_FLAGS_PASID | IOMMU_INV_PASID_FLAGS_ARCHID,
    IOMMU_INV_GRANU_ADDR: IOMMU_INV_ADDR_FLAGS_PASID
    | IOMMU_INV_ADDR_FLAGS_ARCHID
    | IOMMU_INV_ADDR_FLAGS_LEAF,
}
# The record's fields and their C widths; a field left out is 0, as in a zeroed struct.
U32_FIELDS = ("version", "cache", "granularity", "flags")
U64_FIELDS = ("pasid", "addr", "granule_size", "nb_granules")
U64_MASK = (1 << 64) - 1


@dataclass(frozen=True)
class Flush:
    """One flush the driver performs: the IOTLB or the device TLB, one PASID, an address
    range (`addr` None: the whole PASID) of 1 << size_order pages."""

    cache: str
    pasid: int
    addr: int | None
    size_order: int = 0
    ih: bool = False

    def wire(self) -> dict[str, Any]:
        return {"cache": self.cache, "pasid": self.pasid, "addr": self.addr, "size_order": self.size_order}


def record(info: dict[str, Any]) -> dict[str, int] | None:
    """The record as the C struct would hold it (absent fields 0), None if a field cannot be
    one of its integer type (the socket's bytes would not even form the struct)."""
    rec: dict[str, int] = {}
    for name in U32_FIELDS + U64_FIELDS:
        value = info.get(name, 0)
        hi = (1 << 32) if name in U32_FIELDS else (1 << 64)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < hi:
            return None
        rec[name] = value
    return rec


def check_cache_invl_data(rec: dict[str, int]) -> tuple[int, str]:
    """iommu_check_cache_invl_data (drivers/iommu/iommu.c, v5.10+): version, no unknown cache
    bits, a known granularity, no PASID cache at ADDR, no device TLB at DOMAIN, no unknown
    flags for the granularity."""
    if rec["version"] != 1:
        return -E.EINVAL, "invalidation info version"
    if rec["cache"] & ~INV_CACHE_ALL:
        return -E.EINVAL, "unknown cache type bits"
    granu, cache = rec["granularity"], rec["cache"]
    if granu not in GRANU_FLAGS:
        return -E.EINVAL, "unknown granularity"
    if granu == IOMMU_INV_GRANU_ADDR and cache & IOMMU_CACHE_INV_TYPE_PASID:
        return -E.EINVAL, "the PASID cache has no address granularity"
    if granu == IOMMU_INV_GRANU_DOMAIN and cache & IOMMU_CACHE_INV_TYPE_DEV_IOTLB:
        return -E.EINVAL, "the device TLB has no domain granularity"
    if rec["flags"] & ~GRANU_FLAGS[granu]:
        return -E.EINVAL, "unknown flags for this granularity"
    return 0, ""


def checks(info: dict[str, Any], dom: VmDomain) -> tuple[int, str, dict[str, int] | None]:
    """The record's C types, the uapi rules, and the caller's hold on the PASID it names
    (VFIO's part: a VM may name only PASIDs of its own set; PASID 0, the one a record
    without the PASID flag selects, is the domain's own requests-without-PASID)."""
    rec = record(info)
    if rec is None:
        return -E.EINVAL, "invalidation record field missing its integer type", None
    ret, why = check_cache_invl_data(rec)
    if ret:
        return ret, why, None
    pasid = rec["pasid"]
    if pasid >= PASID_MAX:
        return -E.EINVAL, "PASID out of range", None
    if pasid and rec["granularity"] != IOMMU_INV_GRANU_DOMAIN and pasid not in dom.ioasids:
        return -E.EACCES, f"PASID {pasid} is not in VM {dom.vm}'s IOASID set", None
    return 0, "", rec


def size_order(rec: dict[str, int]) -> int:
    """to_vtd_size: order_base_2 of the range in 4 KiB pages (nb_granules 0, or a range
    below one page, is one page; any granule size counts)."""
    pages = ((rec["granule_size"] * rec["nb_granules"]) & U64_MASK) >> PAGE_SHIFT
    return max(0, pages - 1).bit_length()


def sva_invalidate(rec: dict[str, int], kernel: Kernel, ats: bool) -> tuple[int, str, list[Flush], list[str]]:
    """intel_iommu_sva_invalidate for a checked record: (ret, why, flushes, skipped caches)."""
    granu, flags = rec["granularity"], rec["flags"]
    addr_granu = granu == IOMMU_INV_GRANU_ADDR
    selects = IOMMU_INV_ADDR_FLAGS_PASID if addr_granu else IOMMU_INV_PASID_FLAGS_PASID
    pasid = rec["pasid"] if granu != IOMMU_INV_GRANU_DOMAIN and flags & selects else 0
    order = size_order(rec) if addr_granu else 0
    addr = rec["addr"] if addr_granu else None
    flushes: list[Flush] = []
    named = [bit for bit in CACHE_NAMES if rec["cache"] & bit]
    for i, bit in enumerate(named):
        if (bit, granu) not in VTD_SUPPORTED:  # the loop breaks, ret still 0
            return 0, "", flushes, [CACHE_NAMES[b] for b in named[i:]]
        if bit == IOMMU_CACHE_INV_TYPE_IOTLB:
            if (
                kernel is Kernel.V11
                and addr_granu
                and order
                and rec["addr"] & ((1 << (PAGE_SHIFT + order)) - 1)
            ):
                return -E.ERANGE, f"address {rec['addr']:#x} not aligned to size order {order}", [], []
            flushes.append(
                Flush("iotlb", pasid, addr, order, addr_granu and bool(flags & IOMMU_INV_ADDR_FLAGS_LEAF))
            )
            if ats and kernel is Kernel.V11:  # the implied flush: the record's address, size order
                flushes.append(Flush("devtlb", pasid, rec["addr"], order))
            elif ats:  # falls through to the device-TLB case: the whole PASID at PASID granularity
                flushes.append(Flush("devtlb", pasid, addr, order))
        elif ats:  # the device TLB at ADDR granularity; without ATS there is none to flush
            flushes.append(Flush("devtlb", rec["pasid"] if kernel is Kernel.V11 else pasid, addr, order))
    return 0, "", flushes, []


def apply(iommu: IommuApi, pdev: PhysDevice, did: int, flushes: list[Flush]) -> None:
    """Perform the flushes on the VM's domain (IOTLB) and the device (device TLB)."""
    for fl in flushes:
        if fl.cache == "iotlb" and fl.addr is not None:
            iommu.inv_iotlb("addr", did=did, pasid=fl.pasid, addr=fl.addr, size_order=fl.size_order, ih=fl.ih)
        elif fl.cache == "iotlb":
            iommu.inv_iotlb("pasid", did=did, pasid=fl.pasid)
        else:
            iommu.inv_devtlb(pdev.id, pasid=fl.pasid, addr=fl.addr, size_order=fl.size_order)
