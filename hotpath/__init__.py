"""vsva hot path: DMA translation (PASID cache, IOTLB, device TLB, nested walk) and DMA engine.

``Iommu`` is the compiled implementation (hotpath._translate, Cython) when it is built and
the pure-Python twin (hotpath._pure) otherwise; ``IMPLEMENTATION`` says which
("compiled" | "python"). Setting the environment variable ``VSVA_PUREPYTHON=1`` forces the
twin. ``PureIommu`` is always the twin, so both can be compared in one process.

Conventions shared by both implementations:

* translate results: a physical address and a fault code; fault codes are
  ``reason | level << 8`` (layout.fault_code), 0 = success, and a faulting request yields
  pa 0. Checks in order: device attached (FAULT_NO_CONTEXT), PASID < 2^20
  (FAULT_PASID_INVALID), PASID defunct (FAULT_DEFUNCT, counted in ``defunct_drops``),
  va canonical (FAULT_NON_CANONICAL@0), device TLB, PASID cache (PDE/PE not present, bad entry),
  supervisor request without SRE (FAULT_FL_PERMISSION@0), IOTLB, nested walk (faults carry
  the FL level for first-level faults and the SL level for second-level faults), and the
  I1 owner check of the final frame on every translation, cache hits included
  (FAULT_OWNER@0, counted in ``owner_violations``).
* DMA results: copy/fill return (status, fault_va, done), compare returns
  (status, fault_va, result, done); status 0 or the fault code that stopped the descriptor,
  fault_va the exact VA whose translation failed, done the bytes completed before it (a
  page-request retry can resume at offset done). compare's result is 0 when equal, else
  the offset of the first differing byte + 1.
* Caches: set-associative (1, 2, 4 or 8 ways, power-of-two sets), tree-PLRU replacement
  within a set (hotpath._pure._Cache documents the exact rule); a fill takes the first
  invalid way, else the PLRU victim. Page-selective invalidation probes only the set of
  each page in the range unless the range has at least as many pages as the cache has
  sets, in which case it scans the whole cache (same result, cheaper).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from vsva.hotpath import layout
from vsva.hotpath.layout import (
    ACCESS_EXEC,
    ACCESS_PRIV,
    ACCESS_READ,
    ACCESS_WRITE,
    FAULT_NAMES,
    INV_DOMAIN,
    INV_GLOBAL,
    INV_PAGE,
    INV_PASID,
    PAGE_SHIFT,
    PAGE_SIZE,
    PASID_MAX,
    describe_fault,
    fault_code,
    fault_level,
    fault_reason,
)

# The implementations (numpy, the compiled module) load on first use of one of these names
# (PEP 562), so `import hotpath.layout` stays pure Python: actors that never translate do
# not pay for numpy. VSVA_PUREPYTHON is read then.
_LAZY = ("Iommu", "PureIommu", "CompiledIommu", "IMPLEMENTATION", "COUNTER_NAMES")

if TYPE_CHECKING:  # what the lazy names are (hotpath.api: the protocol both classes provide)
    from vsva.hotpath import _pure
    from vsva.hotpath.api import IommuFactory

    Iommu: IommuFactory
    PureIommu: type[_pure.Iommu]
    CompiledIommu: IommuFactory | None
    IMPLEMENTATION: str
    COUNTER_NAMES: tuple[str, ...]


def _load_implementations() -> None:
    from vsva.hotpath._pure import Iommu as PureIommu
    from vsva.hotpath.layout import COUNTER_NAMES

    try:  # the compiled class stays reachable even when the twin is forced (tests compare them)
        from vsva.hotpath._translate import Iommu as compiled
    except ImportError:
        compiled = None
    if compiled is None or os.environ.get("VSVA_PUREPYTHON", "") not in ("", "0"):
        iommu, implementation = PureIommu, "python"
    else:
        iommu, implementation = compiled, "compiled"
    globals().update(
        Iommu=iommu,
        PureIommu=PureIommu,
        CompiledIommu=compiled,
        IMPLEMENTATION=implementation,
        COUNTER_NAMES=COUNTER_NAMES,
    )


def load() -> str:
    """Load the implementations now rather than at their first use, and say which one
    `Iommu` is. The fork server calls it once, so the host it forks does not import
    numpy and the compiled module after the fork, on the start-up's critical path."""
    if "IMPLEMENTATION" not in globals():
        _load_implementations()
    return str(globals()["IMPLEMENTATION"])


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        _load_implementations()
        return globals()[name]
    raise AttributeError(f"module 'hotpath' has no attribute {name!r}")


def compiled_available() -> bool:
    """True when the compiled extension can be imported (regardless of VSVA_PUREPYTHON)."""
    import importlib.util

    return importlib.util.find_spec("vsva.hotpath._translate") is not None


__all__ = [
    "load",
    "Iommu",
    "PureIommu",
    "CompiledIommu",
    "IMPLEMENTATION",
    "COUNTER_NAMES",
    "compiled_available",
    "layout",
    "ACCESS_EXEC",
    "ACCESS_PRIV",
    "ACCESS_READ",
    "ACCESS_WRITE",
    "FAULT_NAMES",
    "INV_DOMAIN",
    "INV_GLOBAL",
    "INV_PAGE",
    "INV_PASID",
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "PASID_MAX",
    "describe_fault",
    "fault_code",
    "fault_level",
    "fault_reason",
]
