"""What the rest of vsva may call on an IOMMU, whichever implementation `hotpath.Iommu` is.

The compiled class (hotpath._translate) and its pure twin (hotpath._pure) both provide
these methods with these signatures; hotpath/__init__.py documents their shared
conventions (fault codes, DMA results, cache rules). The twin is checked against this
protocol by mypy (the assignment at the end); the compiled one by the differential tests
(tests/hotpath/test_differential.py), which run both on the same inputs.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from numpy.typing import NDArray


class IommuApi(Protocol):
    """The IOMMU model: PASID cache, IOTLB, device TLBs, nested walk, DMA engine."""

    def attach_device(self, dev: int, pasid_dir_hpa: int, ats: bool = True) -> None: ...
    def detach_device(self, dev: int) -> None: ...
    def set_defunct(self, pasid: int, defunct: bool, dev: int | None = None) -> None: ...
    def is_defunct(self, pasid: int, dev: int | None = None) -> bool: ...
    def translate_one(self, dev: int, pasid: int, va: int, access: int) -> tuple[int, int]: ...
    def translate(
        self,
        dev: int,
        pasids: int | Sequence[int] | NDArray[np.integer[Any]],
        vas: Sequence[int] | NDArray[np.integer[Any]],
        access: int | Sequence[int] | NDArray[np.integer[Any]],
        out_pa: NDArray[np.integer[Any]],
        out_fault: NDArray[np.integer[Any]],
    ) -> int: ...
    def inv_iotlb(
        self,
        granularity: int | str,
        did: int = 0,
        pasid: int = 0,
        addr: int = 0,
        size_order: int = 0,
        ih: bool = False,
    ) -> int: ...
    def inv_pasid_cache(self, granularity: int | str, did: int = 0, pasid: int = 0) -> int: ...
    def inv_devtlb(
        self, dev: int, pasid: int | None = None, addr: int | None = None, size_order: int = 0
    ) -> int: ...
    def counters(self) -> dict[str, Any]: ...
    def reset_counters(self) -> None: ...
    def cache_dump(self) -> dict[str, Any]: ...
    def dma_copy(
        self, dev: int, pasid: int, src: int, dst: int, length: int, access_flags: int = 0
    ) -> tuple[int, int, int]: ...
    def dma_fill(
        self, dev: int, pasid: int, dst: int, length: int, pattern: int, access_flags: int = 0
    ) -> tuple[int, int, int]: ...


class IommuFactory(Protocol):
    """An implementation's class: memory (the shared bytes), the frame -> owner table and
    the caches' geometry."""

    def __call__(
        self,
        mem: bytearray | mmap.mmap,
        owners: NDArray[np.int32],
        *,
        iotlb_sets: int = 256,
        iotlb_ways: int = 8,
        devtlb_entries: int = 1024,
        devtlb_ways: int = 4,
        pasid_cache_entries: int = 1024,
    ) -> IommuApi: ...


if TYPE_CHECKING:
    from vsva.hotpath._pure import Iommu as _Twin

    _twin_conforms: IommuFactory = _Twin
