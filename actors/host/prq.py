"""The page request queue (intel_svm prq, drivers/iommu/intel/svm.c) and its statistics.

`PageRequestQueue` owns the outstanding requests (oldest first), the overflow flag (PRO),
the per-device 9-bit group indexes, the requests a drain took off the queue after the VMM
was told of them (`drained`: the iommu core's fault list keeps such an event until its
response), and the counters. The fault-to-response flow itself is `Host.page_request` (it
waits on the response); the queue answers what can be decided from its own state: is it
full, which group a response matches, what a drain removes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, NotRequired, TypedDict

from vsva.actors import errno as E
from vsva.actors.uapi import PRQ_GRPID_MAX
from vsva.hotpath.layout import PAGE_SIZE

LATENCIES_KEPT = 4096


class PageRequestRecord(TypedDict):
    """One page request as the queue holds it (and the snapshot shows it): the physical
    device and the (virtual) device that faulted, the host PASID, the VM, the page, the
    IOMMU_FAULT_PERM_* bits, its group index, the F6 flow tag, when it was queued and, once
    a drain took it off the queue, when."""

    dev: str
    vdev: str
    pasid: int
    vm: int
    addr: int
    perm: int
    grpid: int
    last: bool
    flow: str
    queued: float
    drained_at: NotRequired[float]


@dataclass
class PrqStats:
    """What the queue counted: requests queued, answered, auto-responded under overflow, timed
    out, drained by a teardown, dropped (no svm for the PASID), responses rejected, drain
    waits issued (fenced, with the drain flag) and faults a device did not report because a
    FAILURE response disabled its page requests."""

    requests: int = 0
    responses: int = 0
    auto_responses: int = 0
    timeouts: int = 0
    drained: int = 0
    dropped: int = 0
    rejected: int = 0
    drain_waits: int = 0
    failure_drops: int = 0


@dataclass
class PageRequestQueue:
    """Outstanding page requests of every physical device, at most `depth`."""

    depth: int = 32
    timeout: float = 1.0  # the host answers INVALID for the guest after this long
    max_faults: int = 1024  # page requests one descriptor may raise
    pending: list[PageRequestRecord] = field(default_factory=list)
    overflow: bool = False  # PRO: set when a request found the queue full, cleared when it empties
    stats: PrqStats = field(default_factory=PrqStats)
    latencies: list[float] = field(default_factory=list)  # queued -> response, the last LATENCIES_KEPT
    drained: list[PageRequestRecord] = field(default_factory=list)  # drained, told to the VMM, unanswered
    _grpid: dict[str, int] = field(default_factory=dict)  # physical device -> next group index
    _seq: dict[int, int] = field(default_factory=dict)  # VM -> F6 instance number, for the flow tag

    @classmethod
    def configured(cls, config: dict[str, Any]) -> PageRequestQueue:
        return cls(
            depth=max(1, int(config.get("prq_depth", 32))),
            timeout=float(config.get("prq_timeout", 1.0)),
            max_faults=int(config.get("prq_max_faults", 1024)),
        )

    def full(self) -> bool:
        """VT-d: a request that finds the queue full sets PRO; while PRO is set every new
        request is auto-responded too."""
        if self.overflow or len(self.pending) >= self.depth:
            self.overflow = True
            self.stats.auto_responses += 1
            return True
        return False

    def queue(
        self, dev: str, vdev: str, hpasid: int, vm: int, addr: int, perm: int, now: float
    ) -> PageRequestRecord:
        """A new request for the page of `addr`, with a free group index on `dev`."""
        seq = self._seq[vm] = self._seq.get(vm, 0) + 1
        req: PageRequestRecord = {
            "dev": dev,
            "vdev": vdev,
            "pasid": hpasid,
            "vm": vm,
            "addr": addr & ~(PAGE_SIZE - 1),
            "perm": perm,
            "grpid": self._next_grpid(dev),
            "last": True,
            "flow": f"F6:vm{vm}.{seq}",
            "queued": now,
        }
        self.pending.append(req)
        self.stats.requests += 1
        return req

    def _next_grpid(self, dev: str) -> int:
        """A 9-bit page request group index not in use on this device."""
        busy = {r["grpid"] for r in self.pending + self.drained if r["dev"] == dev}
        grpid = self._grpid.get(dev, 0)
        while grpid in busy:
            grpid = (grpid + 1) % PRQ_GRPID_MAX
        self._grpid[dev] = (grpid + 1) % PRQ_GRPID_MAX
        return grpid

    def remove(self, req: PageRequestRecord) -> None:
        if req in self.pending:
            self.pending.remove(req)
        if not self.pending:
            self.overflow = False  # the queue drained: clear PRO

    def answered(self, req: PageRequestRecord, now: float) -> None:
        self.latencies = self.latencies[-(LATENCIES_KEPT - 1) :] + [now - req["queued"]]

    def drain(self, dev: str, hpasid: int, now: float) -> list[PageRequestRecord]:
        """intel_svm_drain_prq() for (device, PASID), in its two steps.

        1. Wait until no request of the PASID is in the queue. Here a request is reported to
           its VMM in the step that queues it (prq_event_thread's work is done inline), so
           the wait ends at once: the PASID's requests leave the queue now.
        2. The fenced invalidation wait with the page-request-drain flag (QI_IWD_FENCE,
           QI_IWD_PRQ_DRAIN): afterwards no request or response of the PASID is in flight
           between the device and the queue (`stats.drain_waits`). The kernel retries it
           while PRO is set; a request that met the overflow was auto-responded in the step
           that raised it, so none of this PASID can still be in flight here.
        The drained requests stay known in `drained` (the VMM was told of them and may still
        answer: that answer is refused with -ENODEV, Host._match_response)."""
        if self.drained:  # (every unbind drains: the empty queue is the common case)
            self._expire(now)
        out = [r for r in self.pending if r["dev"] == dev and r["pasid"] == hpasid] if self.pending else []
        for req in out:
            self.remove(req)
        if out:
            self.drained += [{**r, "drained_at": now} for r in out]
            self.stats.drained += len(out)
        self.stats.drain_waits += 1
        return out

    def _expire(self, now: float) -> None:
        """A drained request unanswered after `timeout` is forgotten (the queue stays bounded)."""
        self.drained = [r for r in self.drained if now - r["drained_at"] < self.timeout]

    def forget_vm(self, vm: int) -> None:
        """The VM's VFIO fd closed: nobody is left to answer its drained requests."""
        self.drained = [r for r in self.drained if r["vm"] != vm]

    def match(
        self, dev: str, vdev: str, vm: int, hpasid: int, grpid: int, now: float
    ) -> tuple[int, str, PageRequestRecord | None]:
        """The request a response of VM `vm` answers (a queued one, or one a drain took off
        the queue: `drained_at` set), or why it answers none (iommu_page_response)."""
        self._expire(now)
        req = next((r for r in self.pending + self.drained if r["dev"] == dev and r["grpid"] == grpid), None)
        if req is None:
            return -E.EINVAL, f"no outstanding page request group {grpid} on {dev}", None
        if req["vm"] != vm:
            return -E.EACCES, f"page request group {grpid} belongs to VM {req['vm']}", None
        if req["pasid"] != hpasid or req["vdev"] != vdev:
            return -E.EINVAL, f"group {grpid} was requested by {req['vdev']} PASID {req['pasid']}", None
        return 0, "", req

    def consume_drained(self, req: PageRequestRecord) -> None:
        """The response to a drained request was handled: its event is gone."""
        if req in self.drained:
            self.drained.remove(req)

    def snapshot(self) -> dict[str, Any]:
        return {
            "prq": list(self.pending),
            "prq_depth": self.depth,
            "prq_overflow": self.overflow,
            "prq_stats": asdict(self.stats),
            "prq_latencies": list(self.latencies),
            "prq_drained": list(self.drained),
        }
