"""The IOASID core (drivers/iommu/ioasid.c): allocated PASIDs in per-VM sets, the free pool,
and the states a freed-while-bound PASID passes through before it can be reused.

`IoasidCore` owns the lifecycle state the audit checks as I3: a host PASID is allocated
(maybe bound), reclaiming (freed, waiting for every notifier subscriber's acknowledgement),
quarantined (a subscriber never acknowledged: leaked, never reused) or free.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING

from vsva.hotpath.layout import PASID_MAX

if TYPE_CHECKING:
    from vsva.actors.host.svm import Svm

ALLOCATORS = ("reuse-first", "fresh")


class NotifierPrio(IntEnum):
    """Where a subscriber sits in the IOASID notifier chain (the ioasid_set series that
    followed the thread: include/linux/ioasid.h, enum ioasid_notifier_prios). A notifier chain
    calls the highest priority first (kernel/notifier.c, notifier_chain_register keeps it
    sorted), so the order is CPU (KVM), then the IOMMU driver, then the device (VDCM), as that
    series' Documentation/ioasid.rst lists it under "Ordering"."""

    LAST = 0
    DEVICE = 1
    IOMMU = 2
    CPU = 3

    @classmethod
    def chain(cls, subscribers: dict[str, str], iommu: str) -> list[str]:
        """The names in the order a FREE reaches them: each subscriber at its priority
        (`{"kvm": "cpu", "vdcm": "device"}`) and the IOMMU driver (`iommu`) at IOMMU."""
        ranked = {name: cls[prio.upper()] for name, prio in subscribers.items()}
        ranked[iommu] = cls.IOMMU
        return sorted(ranked, key=lambda name: -ranked[name])


@dataclass(slots=True)
class Ioasid:
    """An allocated IOASID: its set (the VM) and private data (the svm once bound)."""

    pasid: int
    vm: int
    svm: Svm | None = None


class IoasidCore:
    """Allocation from the system PASID space, reclaim and quarantine."""

    def __init__(self, allocator: str = "reuse-first"):
        if allocator not in ALLOCATORS:
            raise ValueError(f"unknown allocator {allocator!r}; valid: {', '.join(ALLOCATORS)}")
        self.allocator = allocator
        self.allocated: dict[int, Ioasid] = {}
        self.pool: list[int] = []  # freed PASIDs, handed out again last-freed-first
        self.next_pasid = 1
        self.reclaiming: dict[int, int] = {}  # PASID -> VM, defunct until subscribers acknowledge
        self.quarantined: dict[int, int] = {}  # PASID -> VM whose FREE was never acknowledged
        self.unacked: dict[int, set[str]] = {}  # quarantined PASID -> subscribers that never acked

    def find(self, pasid: int) -> Ioasid | None:
        """ioasid_find(): the allocated IOASID, or None."""
        return self.allocated.get(pasid)

    def alloc(self, vm: int) -> Ioasid | None:
        """ioasid_alloc(): reuse-first hands out the last freed PASID (so reuse hazards show);
        fresh counts up while it can. None: the system PASID space is exhausted."""
        if self.pool and (self.allocator == "reuse-first" or self.next_pasid >= PASID_MAX):
            pasid = self.pool.pop()
        elif self.next_pasid < PASID_MAX:
            pasid, self.next_pasid = self.next_pasid, self.next_pasid + 1
        else:
            return None
        ioasid = self.allocated[pasid] = Ioasid(pasid, vm)
        return ioasid

    def forget(self, ioasid: Ioasid) -> None:
        """The IOASID leaves its set; where its number goes is the caller's policy."""
        del self.allocated[ioasid.pasid]

    def release(self, pasid: int) -> None:
        """Back to the pool: the PASID can be handed out again."""
        self.pool.append(pasid)

    def reclaim(self, pasid: int, vm: int) -> None:
        self.reclaiming[pasid] = vm

    def reclaimed(self, pasid: int, vm: int, silent: set[str]) -> bool:
        """Every subscriber answered FREE (silent empty): the PASID may be reused (True); else
        it is quarantined until each silent subscriber resyncs (False)."""
        self.reclaiming.pop(pasid, None)
        if silent:
            self.quarantined[pasid] = vm
            self.unacked[pasid] = set(silent)
            return False
        self.release(pasid)
        return True

    def resynced(self, subscriber: str) -> list[int]:
        """A subscriber rebuilt its tables from the current bindings: that acknowledges every
        FREE it missed. Returns the PASIDs that leave quarantine (back in the pool)."""
        out = []
        for pasid in [p for p, subs in self.unacked.items() if subscriber in subs]:
            self.unacked[pasid].discard(subscriber)
            if not self.unacked[pasid] and pasid in self.quarantined:
                del self.unacked[pasid]
                del self.quarantined[pasid]
                self.release(pasid)
                out.append(pasid)
        return out

    def state(self, pasid: int) -> str:
        """The PASID's lifecycle state (I3): free, allocated, bound, reclaiming or quarantined."""
        if pasid in self.allocated:
            return "bound" if self.allocated[pasid].svm is not None else "allocated"
        if pasid in self.reclaiming:
            return "reclaiming"
        return "quarantined" if pasid in self.quarantined else "free"
