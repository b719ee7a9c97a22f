"""F3: a guest changes a PTE and invalidates; the host's IOTLB and device TLB follow.

The guest of VM 1 (and VM 2 where needed) is driven by hand: its page tables and PASID
table are bytes in guest RAM written here, its invalidations go through the vmm's queue.
Cache contents are read from the hot path (`cache_dump`), the data through the process's
own page tables.
"""

from __future__ import annotations

import itertools

import pytest

from vsva.actors import errno as E
from vsva.actors.uapi import (
    IOMMU_CACHE_INV_TYPE_DEV_IOTLB as DEV,
)
from vsva.actors.uapi import (
    IOMMU_CACHE_INV_TYPE_IOTLB as TLB,
)
from vsva.actors.uapi import (
    IOMMU_CACHE_INV_TYPE_PASID as PC,
)
from vsva.actors.uapi import (
    IOMMU_INV_ADDR_FLAGS_PASID,
)
from vsva.actors.uapi import (
    IOMMU_INV_GRANU_ADDR as ADDR,
)
from vsva.actors.uapi import (
    IOMMU_INV_GRANU_DOMAIN as DOMAIN,
)
from vsva.actors.uapi import (
    IOMMU_INV_GRANU_PASID as PASID,
)
from vsva.analysis.audit import audit
from vsva.hotpath.layout import PAGE_SHIFT, PAGE_SIZE

VA, PAGES = 0x4000_0000, 4
VPNS = [(VA >> PAGE_SHIFT) + i for i in range(PAGES)]


def iotlb(host, pasid):
    return {vpn: frame for _did, p, vpn, frame, _perm in host.iommu.cache_dump()["iotlb"] if p == pasid}


def devtlb(host, dev, pasid):
    entries = host.iommu.cache_dump()["devtlb"].get(host.vfio.phys[dev].id, [])
    return {e[1]: e[2] for e in entries if e[0] == pasid}


def pasid_cached(host, dev, pasid):
    return any(
        d == host.vfio.phys[dev].id and p == pasid for d, p, *_ in host.iommu.cache_dump()["pasid_cache"]
    )


class Vm:
    """A hand-driven guest with one process bound to the passthrough function, DMA done."""

    def __init__(self, vsva, w, vm, pid=1, fill=0x11):
        self.g = vsva.HandGuest(w.rt, vm, devices=[f"pf{vm}"])
        self.dev = f"pf{vm}"
        self.proc = self.g.spawn(pid, VA, PAGES)
        reply = self.g.alloc(self.dev)
        assert reply["ret"] == 0
        self.pasid = reply["gpasid"]
        assert self.g.bind(self.proc, self.dev, self.pasid)["ret"] == 0
        self.dma(fill)

    def dma(self, pattern, va=VA, pages=PAGES):
        reply = self.g.submit(self.dev, self.pasid, "fill", dst=va, length=pages * PAGE_SIZE, pattern=pattern)
        assert reply["ret"] == 0, reply
        return reply


@pytest.fixture
def w(vsva):
    return vsva.world(2, hand=(1, 2))


@pytest.fixture
def v1(vsva, w):
    return Vm(vsva, w, 1)


def test_dma_fills_both_caches(w, v1):
    """Precondition of everything below: the DMA left IOTLB and device-TLB entries."""
    frames = [v1.g.frame_of(v1.proc, VA + i * PAGE_SIZE) for i in range(PAGES)]
    assert iotlb(w.host, v1.pasid) == dict(zip(VPNS, frames))
    assert devtlb(w.host, "pf1", v1.pasid) == dict(zip(VPNS, frames))
    assert v1.g.kernel.read(v1.proc, VA, PAGES * PAGE_SIZE) == b"\x11" * PAGES * PAGE_SIZE


def test_stale_without_flush_then_coherent_after(w, v1):
    """Hardware semantics: a PTE change without invalidation leaves the stale translation in
    use; after the guest's IOTLB + device-TLB invalidation nothing covers the page any more,
    other pages keep their entries, and the next DMA lands in the new frame."""
    va2 = VA + 2 * PAGE_SIZE
    old_gpa, new_gpa = v1.g.remap(v1.proc, va2)
    old_bytes = v1.g.kernel.ram.read(old_gpa, PAGE_SIZE)

    v1.dma(0x22, va=va2, pages=1)  # stale: the device still writes the old frame
    assert v1.g.kernel.ram.read(old_gpa, PAGE_SIZE) == b"\x22" * PAGE_SIZE
    assert v1.g.kernel.ram.read(new_gpa, PAGE_SIZE) == bytes(PAGE_SIZE)
    assert old_bytes != b"\x22" * PAGE_SIZE

    reply = v1.g.flush("pf1", v1.pasid, va2)
    assert reply["ret"] == 0, reply
    assert [d["type"] for d in reply["done"]] == ["piotlb", "dev_iotlb", "wait"]
    assert VPNS[2] not in iotlb(w.host, v1.pasid)
    assert VPNS[2] not in devtlb(w.host, "pf1", v1.pasid)
    assert set(iotlb(w.host, v1.pasid)) == {VPNS[0], VPNS[1], VPNS[3]}
    assert set(devtlb(w.host, "pf1", v1.pasid)) == {VPNS[0], VPNS[1], VPNS[3]}

    v1.dma(0x33, va=va2, pages=1)
    assert v1.g.kernel.read(v1.proc, va2, PAGE_SIZE) == b"\x33" * PAGE_SIZE
    assert v1.g.kernel.ram.read(old_gpa, PAGE_SIZE) == b"\x22" * PAGE_SIZE
    new_frame = v1.g.kernel.ram.hpa(new_gpa) >> PAGE_SHIFT
    assert iotlb(w.host, v1.pasid)[VPNS[2]] == new_frame


def test_unmap_and_flush_makes_dma_fault(w, v1):
    w.host.vfio.phys["pf1"].pri = False  # no page request (F6): the fault is the descriptor's status
    v1.proc.pt.unmap(VA + PAGE_SIZE)
    assert v1.g.flush("pf1", v1.pasid, VA + PAGE_SIZE)["ret"] == 0
    assert VPNS[1] not in iotlb(w.host, v1.pasid) and VPNS[1] not in devtlb(w.host, "pf1", v1.pasid)
    reply = v1.g.submit("pf1", v1.pasid, "fill", dst=VA, length=2 * PAGE_SIZE, pattern=0x44)
    assert reply["ret"] == -E.EFAULT and reply["fault_va"] == VA + PAGE_SIZE
    assert reply["fault"].startswith("fl-not-present")


def test_range_flush_covers_size_order(w, v1):
    assert v1.g.flush("pf1", v1.pasid, VA + 2 * PAGE_SIZE, size_order=1)["ret"] == 0
    assert set(iotlb(w.host, v1.pasid)) == set(VPNS[:2])
    assert set(devtlb(w.host, "pf1", v1.pasid)) == set(VPNS[:2])


def test_whole_pasid_flush_and_other_pasids_untouched(vsva, w, v1):
    v2 = Vm(vsva, w, 2, pid=7, fill=0x55)
    proc_b = v1.g.spawn(2, VA, PAGES)  # a second process of VM 1 on the same device
    pasid_b = v1.g.alloc("pf1")["gpasid"]
    assert v1.g.bind(proc_b, "pf1", pasid_b)["ret"] == 0
    assert v1.g.submit("pf1", pasid_b, "fill", dst=VA, length=PAGE_SIZE, pattern=1)["ret"] == 0
    assert iotlb(w.host, pasid_b) and iotlb(w.host, v2.pasid)

    reply = v1.g.qi(
        [
            {"type": "piotlb", "dev": "pf1", "gpasid": v1.pasid},
            {"type": "dev_iotlb", "dev": "pf1", "gpasid": v1.pasid},
            {"type": "wait"},
        ]
    )
    assert reply["ret"] == 0
    assert iotlb(w.host, v1.pasid) == {} and devtlb(w.host, "pf1", v1.pasid) == {}
    assert set(iotlb(w.host, pasid_b)) == {VPNS[0]} and set(devtlb(w.host, "pf1", pasid_b)) == {VPNS[0]}
    assert set(iotlb(w.host, v2.pasid)) == set(VPNS) and set(devtlb(w.host, "pf2", v2.pasid)) == set(VPNS)


def test_guest_cannot_flush_a_pasid_it_does_not_hold(vsva, w, v1):
    v2 = Vm(vsva, w, 2)
    assert v2.pasid != v1.pasid
    before = w.host.iommu.cache_dump()
    reply = v1.g.qi([{"type": "piotlb", "dev": "pf1", "gpasid": v2.pasid, "addr": VA}, {"type": "wait"}])
    assert reply["ret"] == -E.EINVAL
    reply = v1.g.qi([{"type": "dev_iotlb", "dev": "pf2", "gpasid": v1.pasid}, {"type": "wait"}])
    assert reply["ret"] == -E.EINVAL
    assert w.host.iommu.cache_dump() == before


# ---- the uapi rules (include/uapi/linux/iommu.h: iommu_cache_invalidate_info), asked as the vmm --


def _info(granu, cache, pasid, /, **over):
    info = {"version": 1, "cache": cache, "granularity": granu, "pasid": pasid}
    if granu == ADDR:
        info.update(addr=VA, granule_size=PAGE_SIZE, nb_granules=1, flags=IOMMU_INV_ADDR_FLAGS_PASID)
    info.update(over)
    return info


_SUPPORTED = {DOMAIN: TLB | PC, PASID: TLB | DEV | PC, ADDR: TLB | DEV}


@pytest.mark.parametrize("granu,cache", list(itertools.product([DOMAIN, PASID, ADDR], range(1, 8))))
def test_granularity_cache_table(vsva, w, v1, granu, cache):
    ok = not cache & ~_SUPPORTED[granu]
    assert pasid_cached(w.host, "pf1", v1.pasid)
    before = w.host.iommu.cache_dump()
    reply = vsva.ask(
        w.rt, "host", "cache_invalidate", {"dev": "pf1", "info": _info(granu, cache, v1.pasid)}, src="vm1.vmm"
    )
    if not ok:
        assert reply["ret"] == -E.EINVAL
        assert w.host.iommu.cache_dump() == before
        return
    assert reply["ret"] == 0, reply
    gone = {VPNS[0]} if granu == ADDR else set(VPNS)
    left_tlb, left_dev = set(iotlb(w.host, v1.pasid)), set(devtlb(w.host, "pf1", v1.pasid))
    assert left_tlb == (set(VPNS) - gone if cache & TLB else set(VPNS))
    assert left_dev == (set(VPNS) - gone if cache & DEV else set(VPNS))
    assert pasid_cached(w.host, "pf1", v1.pasid) == (not cache & PC)


@pytest.mark.parametrize("granu,cache", [(PASID, TLB | DEV | PC), (ADDR, TLB | DEV), (ADDR, TLB)])
def test_foreign_pasid_eacces_nothing_flushed(vsva, w, v1, granu, cache):
    v2 = Vm(vsva, w, 2)
    for src, dev, pasid in (("vm1.vmm", "pf1", v2.pasid), ("vm2.vmm", "pf2", v1.pasid)):
        before = w.host.iommu.cache_dump()
        reply = vsva.ask(
            w.rt, "host", "cache_invalidate", {"dev": dev, "info": _info(granu, cache, pasid)}, src=src
        )
        assert reply["ret"] == -E.EACCES
        assert w.host.iommu.cache_dump() == before


@pytest.mark.parametrize(
    "over,expect",
    [
        ({"version": 2}, -E.EINVAL),
        ({"cache": 0}, -E.EINVAL),
        ({"cache": 8}, -E.EINVAL),
        ({"granularity": 3}, -E.EINVAL),
        ({"flags": 0}, -E.EINVAL),  # ADDR without the PASID flag
        ({"flags": "x"}, -E.EINVAL),
        ({"addr": VA + 1}, -E.EINVAL),
        ({"addr": -PAGE_SIZE}, -E.EINVAL),
        ({"granule_size": 2 * PAGE_SIZE}, -E.EINVAL),
        ({"nb_granules": 0}, -E.EINVAL),
        ({"pasid": 0}, -E.EINVAL),
        ({"pasid": 1 << 20}, -E.EINVAL),
        ({"pasid": 4242}, -E.EACCES),
    ],
)
def test_bad_info_refused_nothing_flushed(vsva, w, v1, over, expect):
    before = w.host.iommu.cache_dump()
    reply = vsva.ask(
        w.rt,
        "host",
        "cache_invalidate",
        {"dev": "pf1", "info": _info(ADDR, TLB | DEV, v1.pasid, **over)},
        src="vm1.vmm",
    )
    assert reply["ret"] == expect, reply
    assert w.host.iommu.cache_dump() == before


def test_domain_flush_spares_other_domains(vsva, w, v1):
    v2 = Vm(vsva, w, 2)
    reply = vsva.ask(
        w.rt, "host", "cache_invalidate", {"dev": "pf1", "info": _info(DOMAIN, TLB, 0)}, src="vm1.vmm"
    )
    assert reply["ret"] == 0
    assert iotlb(w.host, v1.pasid) == {}
    assert set(iotlb(w.host, v2.pasid)) == set(VPNS)


def test_non_vmm_and_wrong_device(vsva, w, v1):
    before = w.host.iommu.cache_dump()
    body = {"dev": "pf1", "info": _info(PASID, TLB, v1.pasid)}
    assert vsva.ask(w.rt, "host", "cache_invalidate", body, src="vm1.guest")["ret"] == -E.EPERM
    assert vsva.ask(w.rt, "host", "cache_invalidate", body, src="vm2.vmm")["ret"] == -E.ENODEV
    assert w.host.iommu.cache_dump() == before


def test_session_caches_agree_with_fresh_walks(vsva, monkeypatch):
    """I2 after a Controller session whose guests stop after the demo's migrate + flush +
    re-DMA: every IOTLB entry of a live PASID maps the frame the process's tables give now."""
    import vsva.actors.guest as guest

    def hold(g):
        proc = g.kernel.spawn(1)
        pf = next(d for d in g.pasid_dirs if d not in g.mdevs)
        pasid = yield from guest.demo_passthrough(g, proc, pf, VA)
        g.held = (proc, pasid)

    monkeypatch.setitem(guest.WORKLOADS, "hold", hold)
    rt, c = vsva.session(2, workload="hold", shutdown=False)
    assert c.result["violations"] == []
    host = rt.actors["host"]
    for vm in (1, 2):
        g = rt.actors[f"vm{vm}.guest"]
        proc, pasid = g.held
        assert all(s["ok"] for s in g.steps), g.steps
        cached = iotlb(host, pasid)
        assert cached, "the demo's DMA left no IOTLB entry"
        for vpn, frame in cached.items():
            gpa = proc.pt.lookup(vpn << PAGE_SHIFT) & ~0xFFF & ((1 << 52) - 1)
            assert g.kernel.ram.hpa(gpa) >> PAGE_SHIFT == frame, hex(vpn)
    assert host.snapshot()["stale_iotlb"] == []
    # The audit's I2 check: a page migrated behind the IOTLB's back (no invalidation yet).
    g = rt.actors["vm1.guest"]
    proc, pasid = g.held
    vpn = next(iter(iotlb(host, pasid)))
    old, new = g.kernel.migrate(proc, vpn << PAGE_SHIFT)
    stale = host.snapshot()["stale_iotlb"]
    assert [(e["pasid"], e["vpn"], e["cached"], e["fresh"]) for e in stale] == [
        (pasid, vpn, g.kernel.ram.hpa(old) >> PAGE_SHIFT, g.kernel.ram.hpa(new) >> PAGE_SHIFT)
    ]
    snaps = {name: actor.snapshot() for name, actor in rt.actors.items() if name in c.topology.names()}
    assert any(v["invariant"] == "I2" and v["pasid"] == pasid for v in audit(snaps, c.topology))
