"""F3: a guest changes a PTE and invalidates; the host's IOTLB and device TLB follow.

The guest of VM 1 (and VM 2 where needed) is driven by hand: its page tables and PASID
table are bytes in guest RAM written here, its invalidations go through the vmm's queue.
Cache contents are read from the hot path (`cache_dump`), the data through the process's
own page tables.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vsva import hotpath
from vsva.actors import errno as E
from vsva.actors.semantics import Kernel
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
    IOMMU_INV_ADDR_FLAGS_LEAF,
    IOMMU_INV_ADDR_FLAGS_PASID,
    IOMMU_INV_PASID_FLAGS_PASID,
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


@pytest.mark.parametrize("kernel", [k.value for k in Kernel])
def test_whole_pasid_flush_and_other_pasids_untouched(vsva, kernel):
    """The guest's whole-PASID flush (PASID-based IOTLB + device TLB at PASID granularity):
    intel_iommu_sva_invalidate flushes the IOTLB for the PASID and skips the explicit
    device-TLB record (inv_type_granu_table); the device TLB goes through the flush the
    IOTLB one implies under ATS, the whole PASID from v5.9 on, one page at address 0 in
    v5.8 (so under v11 the PASID's device-TLB entries stay)."""
    w = vsva.world(2, hand=(1, 2), kernel=kernel)
    v1 = Vm(vsva, w, 1)
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
    assert iotlb(w.host, v1.pasid) == {}
    assert set(devtlb(w.host, "pf1", v1.pasid)) == (set(VPNS) if kernel == Kernel.V11 else set())
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


# ---- intel_iommu_sva_invalidate and iommu_check_cache_invl_data, under both kernels ---------------
# drivers/iommu/intel/iommu.c: intel_iommu_sva_invalidate, inv_type_granu_table, to_vtd_size
# (v5.8 as merged from the seed's series; v5.9: "Warn on out-of-range invalidation address",
# "Fix devTLB flush for vSVA"); drivers/iommu/iommu.c: iommu_check_cache_invl_data (v5.10+).
# Each test runs on both hot-path implementations (the caches are the real ones).

IMPLS = [("python", hotpath.PureIommu)] + (
    [("compiled", hotpath.Iommu)] if hotpath.IMPLEMENTATION == "compiled" else []
)


@pytest.fixture(params=[(k.value, name) for k in Kernel for name, _ in IMPLS], ids="-".join)
def wk(vsva, request, monkeypatch):
    """A world under one kernel's semantics and one hot-path implementation, VM 1's
    process bound to pf1 (ATS on) with IOTLB, device-TLB and PASID-cache entries."""
    kernel, impl = request.param
    monkeypatch.setattr(hotpath, "Iommu", dict(IMPLS)[impl])
    w = vsva.world(2, hand=(1, 2), kernel=kernel)
    assert type(w.host.iommu).__name__ == dict(IMPLS)[impl].__name__
    w.kernel = Kernel(kernel)
    w.v1 = Vm(vsva, w, 1)
    w.inv = lambda info, dev="pf1", src="vm1.vmm": vsva.ask(
        w.rt, "host", "cache_invalidate", {"dev": dev, "info": info}, src=src
    )
    return w


def _info(granu, cache, pasid, /, **over):
    info = {"version": 1, "cache": cache, "granularity": granu, "pasid": pasid}
    if granu == ADDR:
        info.update(addr=VA, granule_size=PAGE_SIZE, nb_granules=1, flags=IOMMU_INV_ADDR_FLAGS_PASID)
    if granu == PASID:
        info.update(flags=IOMMU_INV_PASID_FLAGS_PASID)
    info.update(over)
    return info


def _left(w):
    """(IOTLB pages, device-TLB pages, PASID cached) of VM 1's PASID on pf1."""
    p = w.v1.pasid
    return set(iotlb(w.host, p)), set(devtlb(w.host, "pf1", p)), pasid_cached(w.host, "pf1", p)


ALL, FIRST, NONE = set(VPNS), {VPNS[0]}, set()
# What each (granularity, cache bits) record flushes of VM 1's PASID, read off the sources:
# "einval" is iommu_check_cache_invl_data's refusal (DOMAIN + device TLB, ADDR + PASID cache);
# otherwise (IOTLB pages flushed, device-TLB pages flushed). The driver walks the bits in order
# IOTLB, device TLB, PASID cache and stops at the first pair inv_type_granu_table lacks (ret 0);
# the PASID cache is never flushed. At PASID granularity the IOTLB flush implies a device-TLB
# flush (ATS): the whole PASID under v5.9, one page at the record's address 0 under v11.
PASID_DEVTLB = {Kernel.V11: NONE, Kernel.V5_9: ALL}
EXPECT = {
    (DOMAIN, TLB): (NONE, NONE),
    (DOMAIN, DEV): "einval",
    (DOMAIN, TLB | DEV): "einval",
    (DOMAIN, PC): (NONE, NONE),
    (DOMAIN, TLB | PC): (NONE, NONE),
    (DOMAIN, DEV | PC): "einval",
    (DOMAIN, TLB | DEV | PC): "einval",
    (PASID, TLB): (ALL, "implied"),
    (PASID, DEV): (NONE, NONE),
    (PASID, TLB | DEV): (ALL, "implied"),
    (PASID, PC): (NONE, NONE),
    (PASID, TLB | PC): (ALL, "implied"),
    (PASID, DEV | PC): (NONE, NONE),
    (PASID, TLB | DEV | PC): (ALL, "implied"),
    (ADDR, TLB): (FIRST, FIRST),
    (ADDR, DEV): (NONE, FIRST),
    (ADDR, TLB | DEV): (FIRST, FIRST),
    (ADDR, PC): "einval",
    (ADDR, TLB | PC): "einval",
    (ADDR, DEV | PC): "einval",
    (ADDR, TLB | DEV | PC): "einval",
}


@pytest.mark.parametrize("granu,cache", list(EXPECT))
def test_vtd_table_flushes_or_skips(wk, granu, cache):
    """intel_iommu_sva_invalidate with inv_type_granu_table: DOMAIN skipped for any cache,
    the PASID cache skipped at any granularity, the device TLB skipped at PASID granularity
    (ret 0, nothing flushed for it); an IOTLB flush with ATS also flushes the device TLB."""
    before = wk.host.iommu.cache_dump()
    reply = wk.inv(_info(granu, cache, wk.v1.pasid))
    expect = EXPECT[(granu, cache)]
    if expect == "einval":
        assert reply["ret"] == -E.EINVAL
        assert wk.host.iommu.cache_dump() == before
        return
    assert reply["ret"] == 0, reply
    tlb_gone, dev_gone = expect
    dev_gone = PASID_DEVTLB[wk.kernel] if dev_gone == "implied" else dev_gone
    assert _left(wk) == (ALL - tlb_gone, ALL - dev_gone, True)
    assert bool(reply["skipped"]) == bool(cache & PC or granu == DOMAIN or (granu == PASID and cache & DEV))


def test_iotlb_flush_implies_devtlb_only_with_ats(wk):
    """intel_iommu_sva_invalidate: the device-TLB flush that follows an IOTLB flush, and an
    explicit one, happen only when ATS is enabled on the device (info->ats_enabled)."""
    wk.host.vfio.phys["pf1"].ats = False
    assert wk.inv(_info(ADDR, TLB | DEV, wk.v1.pasid))["flushed"] == [
        {"cache": "iotlb", "pasid": wk.v1.pasid, "addr": VA, "size_order": 0}
    ]
    assert _left(wk) == (ALL - FIRST, ALL, True)


def test_no_cache_bit_is_0_and_flushes_nothing(wk):
    """intel_iommu_sva_invalidate: no bit set, the loop never runs; ret 0."""
    before = wk.host.iommu.cache_dump()
    for granu in (DOMAIN, PASID, ADDR):
        assert wk.inv(_info(granu, 0, wk.v1.pasid)) == {"ret": 0, "flushed": [], "skipped": []}
    assert wk.host.iommu.cache_dump() == before


@pytest.mark.parametrize(
    "granule,count,flushed",
    [
        (PAGE_SIZE, 0, {VPNS[0]}),  # nb_granules 0: order_base_2(0) = 0, one page
        (512, 1, {VPNS[0]}),  # below a page: one page
        (2 * PAGE_SIZE, 1, set(VPNS[:2])),  # a granule other than 4 KiB, with its order
        (3 * PAGE_SIZE, 1, set(VPNS)),  # 3 pages round up to order 2
        (2 << 20, 1, set(VPNS)),  # a 2 MiB granule: order 9 covers every page
    ],
)
def test_size_order_from_any_granule(wk, granule, count, flushed):
    """to_vtd_size: order_base_2(granule_size * nb_granules / 4 KiB); no granule is refused."""
    reply = wk.inv(_info(ADDR, TLB, wk.v1.pasid, granule_size=granule, nb_granules=count))
    assert reply["ret"] == 0, reply
    assert _left(wk)[:2] == (ALL - flushed, ALL - flushed)


def test_misaligned_address_erange_v11_accepted_v5_9(wk):
    """intel_iommu_sva_invalidate, IOTLB case: an address not aligned to a size order > 0 is
    -ERANGE in v5.8 (nothing flushed) and accepted from v5.9 ("HW will ignore LSB bits"):
    the aligned range around it is flushed. The check is the IOTLB case's only."""
    before = wk.host.iommu.cache_dump()
    rec = _info(ADDR, TLB | DEV, wk.v1.pasid, addr=VA + 3 * PAGE_SIZE, nb_granules=2)
    reply = wk.inv(rec)
    if wk.kernel is Kernel.V11:
        assert reply["ret"] == -E.ERANGE
        assert wk.host.iommu.cache_dump() == before
        assert wk.inv({**rec, "cache": DEV})["ret"] == 0  # no IOTLB bit: no alignment check
        assert _left(wk)[:2] == (ALL, ALL - set(VPNS[2:]))
    else:
        assert reply["ret"] == 0
        assert _left(wk)[:2] == (ALL - set(VPNS[2:]), ALL - set(VPNS[2:]))
    # size order 0: never checked; the page holding the address goes
    assert wk.inv(_info(ADDR, TLB, wk.v1.pasid, addr=VA + 5))["ret"] == 0
    assert VPNS[0] not in _left(wk)[0]


def test_addr_without_pasid_flag_flushes_pasid_0(wk):
    """intel_iommu_sva_invalidate: the PASID comes from the record only with
    IOMMU_INV_ADDR_FLAGS_PASID; without it PASID 0 (requests without PASID) is flushed. The
    explicit device-TLB flush of v5.8 takes addr_info.pasid whatever the flag says."""
    reply = wk.inv(_info(ADDR, TLB | DEV, wk.v1.pasid, flags=0))
    assert reply["ret"] == 0
    assert {fl["pasid"] for fl in reply["flushed"] if fl["cache"] == "iotlb"} == {0}
    dev_pasids = {fl["pasid"] for fl in reply["flushed"] if fl["cache"] == "devtlb"}
    if wk.kernel is Kernel.V11:
        assert dev_pasids == {0, wk.v1.pasid}
        assert _left(wk)[:2] == (ALL, ALL - FIRST)
    else:
        assert dev_pasids == {0}
        assert _left(wk)[:2] == (ALL, ALL)


@pytest.mark.parametrize(
    "granu,flags",
    [
        (ADDR, 1 << 3),
        (PASID, IOMMU_INV_ADDR_FLAGS_LEAF),
        (PASID, 1 << 5),
        (DOMAIN, IOMMU_INV_PASID_FLAGS_PASID),
    ],
)
def test_unknown_flags_einval(wk, granu, flags):
    """iommu_check_cache_invl_data (v5.10+, both semantics: the merged uapi checks): flags
    outside the granularity's mask (ADDR: PASID, ARCHID, LEAF; PASID: PASID, ARCHID;
    DOMAIN: none) -> -EINVAL, nothing flushed."""
    before = wk.host.iommu.cache_dump()
    assert wk.inv(_info(granu, TLB, wk.v1.pasid, flags=flags))["ret"] == -E.EINVAL
    assert wk.host.iommu.cache_dump() == before


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
        ({"cache": 8}, -E.EINVAL),
        ({"granularity": 3}, -E.EINVAL),
        ({"flags": "x"}, -E.EINVAL),
        ({"addr": -PAGE_SIZE}, -E.EINVAL),
        ({"addr": 1 << 64}, -E.EINVAL),
        ({"nb_granules": True}, -E.EINVAL),
        ({"granule_size": None}, -E.EINVAL),
        ({"pasid": 1 << 20}, -E.EINVAL),
        ({"pasid": 4242}, -E.EACCES),
    ],
)
def test_bad_info_refused_nothing_flushed(vsva, w, v1, over, expect):
    """A record whose fields do not fit the C struct, or that iommu_check_cache_invl_data
    refuses, or that names another VM's PASID, changes nothing."""
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


_FIELD = st.one_of(
    st.integers(0, 3),
    st.integers(-(1 << 64), 1 << 65),
    st.sampled_from([VA, VA + 5, PAGE_SIZE, 1 << 20, (1 << 64) - 1]),
    st.none(),
    st.booleans(),
    st.text(max_size=2),
)
_RECORDS = st.fixed_dictionaries(
    {
        "version": st.sampled_from([1, 1, 1, 2, "1"]),
        "cache": st.integers(-1, 9),
        "granularity": st.integers(-1, 3),
    },
    optional={k: _FIELD for k in ("flags", "pasid", "addr", "granule_size", "nb_granules")},
)


def test_random_records_never_crash_and_refusals_change_nothing(vsva, w, v1):
    """Any record: an errno of the checks or the driver, never a crash; a refusal flushes
    nothing; an accepted one never touches another VM's entries nor any PASID cache entry."""
    v2 = Vm(vsva, w, 2)
    pc_before = w.host.iommu.cache_dump()["pasid_cache"]

    @settings(max_examples=150, deadline=None, derandomize=True, database=None)
    @given(_RECORDS, st.sampled_from([v1.pasid, v2.pasid, 0]))
    def check(info, pasid):
        if "pasid" not in info:
            info = {**info, "pasid": pasid}
        before = w.host.iommu.cache_dump()
        reply = vsva.ask(w.rt, "host", "cache_invalidate", {"dev": "pf1", "info": info}, src="vm1.vmm")
        assert reply["ret"] in (0, -E.EINVAL, -E.EACCES, -E.ERANGE), reply
        if reply["ret"]:
            assert w.host.iommu.cache_dump() == before
        assert set(iotlb(w.host, v2.pasid)) == set(VPNS) and set(devtlb(w.host, "pf2", v2.pasid)) == set(VPNS)
        assert w.host.iommu.cache_dump()["pasid_cache"] == pc_before

    check()


def test_vmm_never_passes_a_pasid_cache_invalidation_down(vsva, w):
    """The VT-d driver flushes no PASID cache for user space; the vmm handles a guest's
    PASID-cache invalidation itself: bind on a present entry, unbind on a cleared one."""
    start = len(w.rt.trace)
    v1 = Vm(vsva, w, 1)  # bind: a "pc" descriptor
    assert v1.g.flush("pf1", v1.pasid, VA)["ret"] == 0
    assert v1.g.qi([{"type": "piotlb", "dev": "pf1", "gpasid": v1.pasid}, {"type": "wait"}])["ret"] == 0
    assert v1.g.unbind("pf1", v1.pasid)["ret"] == 0  # unbind: a "pc" descriptor
    down = [
        r
        for r in w.rt.trace[start:]
        if r["kind"] in ("cache_invalidate", "bind_gpasid", "unbind_gpasid") and r["corr"] is None
    ]
    assert [r["kind"] for r in down if r["kind"] != "cache_invalidate"] == ["bind_gpasid", "unbind_gpasid"]
    assert down and all(not r["body"]["info"]["cache"] & PC for r in down if r["kind"] == "cache_invalidate")
    assert v1.g.qi([{"type": "pasid_flush", "dev": "pf1", "gpasid": v1.pasid}])["ret"] == -E.EINVAL


def test_domain_flush_is_skipped(vsva, w, v1):
    """inv_type_granu_table has no DOMAIN entry for any cache: ret 0, nothing flushed."""
    v2 = Vm(vsva, w, 2)
    before = w.host.iommu.cache_dump()
    reply = vsva.ask(
        w.rt, "host", "cache_invalidate", {"dev": "pf1", "info": _info(DOMAIN, TLB, 0)}, src="vm1.vmm"
    )
    assert reply == {"ret": 0, "flushed": [], "skipped": ["iotlb"]}
    assert w.host.iommu.cache_dump() == before
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
