"""Cache invalidation passed down by a VMM (intel_iommu_sva_invalidate, iommu.c's uapi checks).

`checks` says whether an invalidation record may be applied (the uapi rules and the caller's
ownership of the PASID); `apply` flushes the IOTLB, PASID cache and device TLB it names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vsva.actors import errno as E
from vsva.actors.uapi import (
    IOMMU_CACHE_INV_TYPE_DEV_IOTLB,
    IOMMU_CACHE_INV_TYPE_IOTLB,
    IOMMU_CACHE_INV_TYPE_PASID,
    IOMMU_INV_ADDR_FLAGS_LEAF,
    IOMMU_INV_ADDR_FLAGS_PASID,
    IOMMU_INV_GRANU_ADDR,
    IOMMU_INV_GRANU_DOMAIN,
    IOMMU_INV_GRANU_PASID,
)
from vsva.hotpath.layout import PAGE_SHIFT, PAGE_SIZE, PASID_MAX

if TYPE_CHECKING:
    from vsva.actors.host.vfio import PhysDevice, VmDomain
    from vsva.hotpath.api import IommuApi

# Which caches accept which granularity (uapi table).
INV_GRANU_OK = {
    IOMMU_INV_GRANU_DOMAIN: IOMMU_CACHE_INV_TYPE_IOTLB | IOMMU_CACHE_INV_TYPE_PASID,
    IOMMU_INV_GRANU_PASID: IOMMU_CACHE_INV_TYPE_IOTLB
    | IOMMU_CACHE_INV_TYPE_DEV_IOTLB
    | IOMMU_CACHE_INV_TYPE_PASID,
    IOMMU_INV_GRANU_ADDR: IOMMU_CACHE_INV_TYPE_IOTLB | IOMMU_CACHE_INV_TYPE_DEV_IOTLB,
}
INV_CACHE_ALL = IOMMU_CACHE_INV_TYPE_IOTLB | IOMMU_CACHE_INV_TYPE_DEV_IOTLB | IOMMU_CACHE_INV_TYPE_PASID


def checks(info: dict[str, Any], dom: VmDomain) -> tuple[int, str]:
    """The uapi rules: known version, cache bits, a granularity every named cache supports."""
    if info.get("version") != 1:
        return -E.EINVAL, "invalidation info version"
    cache, granu = info.get("cache"), info.get("granularity")
    if (
        not isinstance(cache, int)
        or not cache
        or cache & ~INV_CACHE_ALL
        or not isinstance(granu, int)
        or granu not in INV_GRANU_OK
        or not isinstance(info.get("flags", 0), int)
    ):
        return -E.EINVAL, "cache type, granularity or flags"
    if cache & ~INV_GRANU_OK[granu]:
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
        if (
            size != PAGE_SIZE
            or not isinstance(count, int)
            or not 0 < count <= 1 << 18
            or not isinstance(addr, int)
            or addr & (PAGE_SIZE - 1)
            or not 0 <= addr < 1 << 48
        ):
            return -E.EINVAL, "address range"
    return 0, ""


def apply(iommu: IommuApi, pdev: PhysDevice, dom: VmDomain, info: dict[str, Any]) -> None:
    """Flush what a checked record names, for the VM's domain and the record's PASID."""
    granu, cache, pasid = info["granularity"], info["cache"], info.get("pasid", 0)
    if granu == IOMMU_INV_GRANU_ADDR:
        order = max(0, (info["granule_size"] * info["nb_granules"] - 1).bit_length() - PAGE_SHIFT)
        if cache & IOMMU_CACHE_INV_TYPE_IOTLB:
            iommu.inv_iotlb(
                "addr",
                did=dom.vm,
                pasid=pasid,
                addr=info["addr"],
                size_order=order,
                ih=bool(info.get("flags", 0) & IOMMU_INV_ADDR_FLAGS_LEAF),
            )
        if cache & IOMMU_CACHE_INV_TYPE_DEV_IOTLB:
            iommu.inv_devtlb(pdev.id, pasid=pasid, addr=info["addr"], size_order=order)
        return
    scope = "pasid" if granu == IOMMU_INV_GRANU_PASID else "domain"
    if cache & IOMMU_CACHE_INV_TYPE_IOTLB:
        iommu.inv_iotlb(scope, did=dom.vm, pasid=pasid)
    if cache & IOMMU_CACHE_INV_TYPE_PASID:
        iommu.inv_pasid_cache(scope, did=dom.vm, pasid=pasid)
    if cache & IOMMU_CACHE_INV_TYPE_DEV_IOTLB:
        iommu.inv_devtlb(pdev.id, pasid=pasid)
