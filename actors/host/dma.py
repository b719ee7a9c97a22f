"""The devices' DMA engines: one work descriptor through the IOMMU's translation (hot path).

`run_descriptor` moves the bytes (copy or fill) and reports where a translation fault
stopped it; `pri_recoverable` says whether that fault becomes a page request. The flow
around it (page requests, retries, outcome) is `Host.on_dev_submit`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vsva.hotpath.layout import FAULT_FL_NOT_PRESENT, FAULT_FL_PERMISSION, fault_reason

if TYPE_CHECKING:
    from vsva.hotpath.api import IommuApi


@dataclass
class DmaStats:
    """Descriptors completed and failed, and DMA that used a PASID another VM now owns (I7)."""

    done: int = 0
    faults: int = 0
    foreign: list[dict[str, int]] = field(default_factory=list)


def run_descriptor(iommu: IommuApi, device_id: int, work: dict[str, Any]) -> tuple[int, int, int]:
    """(status, fault_va, done): done counts the bytes moved before the fault."""
    hpasid, n = work["hpasid"], work["len"]
    if work["op"] == "copy":
        status, fault_va, done = iommu.dma_copy(device_id, hpasid, work["src"], work["dst"], n)[:3]
    else:
        status, fault_va, done = iommu.dma_fill(device_id, hpasid, work["dst"], n, work["pattern"])[:3]
    return status, fault_va, done


def pri_recoverable(pri: bool, status: int) -> bool:
    """A fault the guest can fix by making the page present (or writable): a page request."""
    return pri and fault_reason(status) in (FAULT_FL_NOT_PRESENT, FAULT_FL_PERMISSION)
