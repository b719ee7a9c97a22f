"""Semantics of the hot path, run on the compiled module and on the pure twin."""

import os
import subprocess
import sys

import numpy as np
import pytest

from vsva.hotpath.layout import (
    ACCESS_EXEC,
    ACCESS_PRIV,
    ACCESS_READ,
    ACCESS_WRITE,
    FAULT_DEFUNCT,
    FAULT_FL_NOT_PRESENT,
    FAULT_FL_PERMISSION,
    FAULT_FL_RESERVED,
    FAULT_NO_CONTEXT,
    FAULT_NON_CANONICAL,
    FAULT_OWNER,
    FAULT_PASID_INVALID,
    FAULT_PDE_NOT_PRESENT,
    FAULT_PE_NOT_PRESENT,
    FAULT_SL_NOT_PRESENT,
    FAULT_SL_PERMISSION,
    FL_A,
    FL_D,
    FL_EA,
    FL_PS,
    FL_RW,
    FL_US,
    PAGE_SIZE,
    SL_R,
    fault_code,
)
from vsva.hotpath.testing import clear_pasid

VA = 0x7F00_0000_0000
R, W, X, PRIV = ACCESS_READ, ACCESS_WRITE, ACCESS_EXEC, ACCESS_PRIV


def refs(io):
    return io.counters()["memory_refs"]


def test_cold_walk_is_24_refs_and_hit_is_free(world):
    io = world.iommu
    pa, f = io.translate_one(0, 5, VA + 0x123, R)
    assert f == 0 and pa == world.p5.va_to_hpa(VA + 0x123)
    c = io.counters()
    assert c["memory_refs"] == 24 and c["walks"] == 1 and c["pasid_refs"] == 2
    assert c["iotlb_misses"] == 1 and c["iotlb_fills"] == 1
    pa2, f = io.translate_one(0, 5, VA + 0xFFF, R)
    assert f == 0 and pa2 == (pa & ~0xFFF) | 0xFFF
    c = io.counters()
    assert c["memory_refs"] == 24 and c["iotlb_hits"] == 1 and c["pasid_refs"] == 2
    assert c["pasid_cache_hits"] == 1


def test_translation_matches_guest_tables_for_every_page(world):
    for pasid, proc in ((5, world.p5), (6, world.p6), (9, world.p9)):
        for i in range(8):
            va = VA + i * PAGE_SIZE + 8 * i
            pa, f = world.iommu.translate_one(0, pasid, va, R | W)
            assert f == 0 and pa == proc.va_to_hpa(va)
            assert world.host.owners[pa >> 12] == proc.vm.vm_id


def test_batch_matches_single(world, Impl):
    rng = np.random.default_rng(1)
    n = 200
    pasids = rng.choice(np.array([5, 6, 9, 7], dtype=np.uint32), n)
    vas = (VA + rng.integers(0, 10 * PAGE_SIZE, n)).astype(np.uint64)
    acc = rng.choice(np.array([R, W, R | W, X], dtype=np.uint8), n)
    out_pa = np.zeros(n, np.uint64)
    out_f = np.zeros(n, np.int32)
    nf = world.iommu.translate(0, pasids, vas, acc, out_pa, out_f)
    other = type(world)(Impl)
    expect = [other.iommu.translate_one(0, int(p), int(v), int(a)) for p, v, a in zip(pasids, vas, acc)]
    assert [int(x) for x in out_pa] == [e[0] for e in expect]
    assert [int(x) for x in out_f] == [e[1] for e in expect]
    assert nf == sum(1 for e in expect if e[1])
    assert other.iommu.counters() == world.iommu.counters()


def test_batch_scalar_pasid_and_access(world):
    vas = np.array([VA, VA + PAGE_SIZE, VA + 100 * PAGE_SIZE], dtype=np.uint64)
    out_pa = np.zeros(3, np.uint64)
    out_f = np.zeros(3, np.int32)
    assert world.iommu.translate(0, 5, vas, R, out_pa, out_f) == 1
    assert out_f[2] == fault_code(FAULT_FL_NOT_PRESENT, 1) and out_pa[2] == 0
    assert int(out_pa[0]) == world.p5.va_to_hpa(VA)


def test_context_and_pasid_faults(world):
    io = world.iommu
    assert io.translate_one(3, 5, VA, R) == (0, FAULT_NO_CONTEXT)
    assert io.translate_one(0, 1 << 20, VA, R) == (0, FAULT_PASID_INVALID)
    assert io.translate_one(0, 7, VA, R) == (0, FAULT_PE_NOT_PRESENT)
    assert io.translate_one(0, 64 * 100, VA, R) == (0, FAULT_PDE_NOT_PRESENT)
    assert io.translate_one(0, 5, 1 << 48, R) == (0, FAULT_NON_CANONICAL)
    assert io.translate_one(0, 5, VA + 8 * PAGE_SIZE, R) == (0, fault_code(FAULT_FL_NOT_PRESENT, 1))
    assert io.translate_one(0, 5, 0x1000, R) == (0, fault_code(FAULT_FL_NOT_PRESENT, 4))
    c = io.counters()
    assert c["faults"] == 7
    assert c["faults_by_reason"]["fl-not-present"] == 2
    io.detach_device(0)
    assert io.translate_one(0, 5, VA, R) == (0, FAULT_NO_CONTEXT)


def test_rights_are_judged_over_the_whole_path(world):
    """VT-d 3.6.1: R/W, U/S and XD combine over every level; the fault names the leaf."""
    io, p = world.iommu, world.p5
    # read-only leaf: user write refused at L1, read fine
    p.map(VA + 0x20000, rw=False)
    assert io.translate_one(0, 5, VA + 0x20000, W) == (0, fault_code(FAULT_FL_PERMISSION, 1))
    assert io.translate_one(0, 5, VA + 0x20000, R)[1] == 0
    # supervisor-only PD entry (level 2): a user access is refused, judged at the leaf
    va = VA + (1 << 21) * 3
    p.map(va)
    p.set_entry(va, p.get_entry(va, 2) & ~FL_US, 2)
    assert io.translate_one(0, 5, va, R) == (0, fault_code(FAULT_FL_PERMISSION, 1))
    # ... and a non-present leaf under it is a not-present fault, whatever the rights above
    assert io.translate_one(0, 5, va + PAGE_SIZE, R) == (0, fault_code(FAULT_FL_NOT_PRESENT, 1))
    # supervisor request without SRE
    assert io.translate_one(0, 5, va, R | PRIV) == (0, fault_code(FAULT_FL_PERMISSION, 0))
    world.reinstall(5, sre=True)
    io.inv_pasid_cache("pasid", did=1, pasid=5)
    assert io.translate_one(0, 5, va, R | PRIV)[1] == 0
    # supervisor write to a read-only page: allowed without WPE, refused with WPE
    assert io.translate_one(0, 5, VA + 0x20000, W | PRIV)[1] == 0
    world.reinstall(5, sre=True, wpe=True)
    io.inv_pasid_cache("pasid", did=1, pasid=5)
    io.inv_iotlb("pasid", did=1, pasid=5)
    assert io.translate_one(0, 5, VA + 0x20000, W | PRIV) == (0, fault_code(FAULT_FL_PERMISSION, 1))
    # execute on an XD page
    p.map(VA + 0x30000, xd=True)
    assert io.translate_one(0, 5, VA + 0x30000, X) == (0, fault_code(FAULT_FL_PERMISSION, 1))
    assert io.translate_one(0, 5, VA + 0x30000, R)[1] == 0


def test_supervisor_fetch_from_a_user_page_is_refused(world):
    """VT-d 3.6.1: supervisor instruction fetches only from supervisor pages (SMEP always on),
    supervisor data reads from user pages are allowed (no SMAP); the IOTLB entry a user read
    filled must not serve the supervisor fetch."""
    world.reinstall(5, sre=True)
    io, p = world.iommu, world.p5
    assert io.translate_one(0, 5, VA, R)[1] == 0
    assert io.translate_one(0, 5, VA, R | PRIV)[1] == 0
    assert io.translate_one(0, 5, VA, X | PRIV) == (0, fault_code(FAULT_FL_PERMISSION, 1))
    assert io.translate_one(0, 5, VA, X)[1] == 0
    p.set_entry(VA + PAGE_SIZE, p.get_entry(VA + PAGE_SIZE) & ~FL_US)
    assert io.translate_one(0, 5, VA + PAGE_SIZE, X | PRIV)[1] == 0
    assert io.translate_one(0, 5, VA + PAGE_SIZE, X) == (0, fault_code(FAULT_FL_PERMISSION, 1))


def test_canonical_addresses(world):
    """Bits 63:47 must be equal: a non-canonical address faults before any lookup or walk;
    an upper-half address is walked like any other (here a supervisor mapping, SRE set)."""
    world.reinstall(5, sre=True)
    io, p = world.iommu, world.p5
    upper = 0xFFFF_8000_0000_0000 | (5 << 39) | 0x3000
    p.map(upper)
    p.set_entry(upper, p.get_entry(upper) & ~FL_US)
    for va in (1 << 47, 0x8000_0000_0000_0000, 0xFFFF_7FFF_FFFF_F000, 1 << 64, -1):
        assert io.translate_one(0, 5, va, R | PRIV) == (0, FAULT_NON_CANONICAL)
    assert io.counters()["walks"] == 0
    pa, f = io.translate_one(0, 5, upper + 0x10, R | PRIV)
    assert f == 0 and pa == p.va_to_hpa(upper) + 0x10
    assert io.translate_one(0, 5, upper, R) == (0, fault_code(FAULT_FL_PERMISSION, 1))
    # the caches key on the low 48 bits: the upper-half page does not alias the lower one
    assert io.translate_one(0, 5, upper & ((1 << 47) - 1), R | PRIV)[1] != 0


def test_reserved_bits_fault(make_world):
    """VT-d 9.7 (x86-64 paging): PS in a PML4E, address bits 51:48 and the alignment bits of
    a large page's address are reserved; bit 12 of a large leaf is PAT, not reserved."""
    w = make_world(nframes=8192)
    io, p = w.iommu, w.p5
    pml4e = p.get_entry(VA, 4)
    p.set_entry(VA, pml4e | FL_PS, 4)
    assert io.translate_one(0, 5, VA, R) == (0, fault_code(FAULT_FL_RESERVED, 4))
    p.set_entry(VA, pml4e, 4)
    leaf = p.get_entry(VA, 1)
    p.set_entry(VA, leaf | (1 << 50), 1)
    assert io.translate_one(0, 5, VA, R) == (0, fault_code(FAULT_FL_RESERVED, 1))
    p.set_entry(VA, leaf | (1 << 55), 1)  # bits 58:52 are ignored, not reserved
    assert io.translate_one(0, 5, VA, R)[1] == 0
    va2 = 0x1234_0000_0000
    vm = w.vm1
    base = w.host.alloc_contig(512, owner=1, align=512)
    vm.sl_map(0x40000000 >> 12, base, level=2)
    p.map(va2, gpa_page=0x40000000 >> 12, level=2)
    e = p.get_entry(va2, 2)
    p.set_entry(va2, e | (1 << 12), 2)  # PAT
    assert io.translate_one(0, 5, va2 + 0x1234, R)[1] == 0
    io.inv_iotlb("global")
    p.set_entry(va2, e | (1 << 13), 2)
    assert io.translate_one(0, 5, va2 + 0x1234, R) == (0, fault_code(FAULT_FL_RESERVED, 2))


def test_second_level_faults(world):
    io, p, vm = world.iommu, world.p5, world.vm1
    gpa_page = p.va_to_gpa(VA + 0x3000) >> 12
    frame = vm.gpa_frames[gpa_page]
    vm.sl_map(gpa_page, frame, perms=SL_R)  # write-protected in the second level
    assert io.translate_one(0, 5, VA + 0x3000, W) == (0, fault_code(FAULT_SL_PERMISSION, 1))
    assert io.translate_one(0, 5, VA + 0x3000, R)[1] == 0
    vm.sl_set(gpa_page, 0)
    io.inv_iotlb("page", did=1, pasid=5, addr=VA + 0x3000)
    assert io.translate_one(0, 5, VA + 0x3000, R) == (0, fault_code(FAULT_SL_NOT_PRESENT, 1))


def test_sl_write_needed_for_accessed_bit_update(world):
    io, p, vm = world.iommu, world.p5, world.vm1
    # the leaf table page of VA is read-only in the second level: A cannot be set there
    pt_gpa = p.get_entry(VA, 2) & 0x000FFFFFFFFFF000
    vm.sl_map(pt_gpa >> 12, vm.gpa_frames[pt_gpa >> 12], perms=SL_R)
    assert io.translate_one(0, 5, VA, R) == (0, fault_code(FAULT_SL_PERMISSION, 1))


def test_accessed_and_dirty_bits_written(world):
    io, p = world.iommu, world.p5
    va = VA + 0x5000
    assert all(not p.get_entry(va, lvl) & FL_A for lvl in (1,)) and not p.get_entry(va, 1) & FL_D
    assert io.translate_one(0, 5, va, R)[1] == 0
    for lvl in (4, 3, 2, 1):
        assert p.get_entry(va, lvl) & FL_A
    assert not p.get_entry(va, 1) & FL_D
    assert io.translate_one(0, 5, va, W)[1] == 0  # cached without D: walks again, sets D
    assert p.get_entry(va, 1) & FL_D
    assert io.counters()["walks"] == 2
    assert io.translate_one(0, 5, va + 8, W)[1] == 0
    assert io.counters()["walks"] == 2


def test_accessed_and_dirty_bits_whatever_eafe(world):
    """VT-d 3.6.2: A on every entry used and D on a written leaf whatever EAFE says; EAFE only
    adds the extended-accessed bit (10). A write served by an entry a read cached (D clear)
    walks again and sets D."""
    world.reinstall(6, eafe=False)
    io, p = world.iommu, world.p6
    assert io.translate_one(0, 6, VA, R)[1] == 0
    assert all(p.get_entry(VA, lvl) & FL_A for lvl in (4, 3, 2, 1))
    assert not p.get_entry(VA, 1) & (FL_D | FL_EA)
    assert io.translate_one(0, 6, VA, W)[1] == 0
    assert p.get_entry(VA, 1) & FL_D and io.counters()["walks"] == 2
    assert io.translate_one(0, 5, VA, R)[1] == 0  # PASID 5 has EAFE
    assert all(world.p5.get_entry(VA, lvl) & (FL_A | FL_EA) == FL_A | FL_EA for lvl in (4, 3, 2, 1))
    # a refused access sets no A/D on the leaf
    p.set_entry(VA + PAGE_SIZE, p.get_entry(VA + PAGE_SIZE) & ~FL_RW)
    assert io.translate_one(0, 6, VA + PAGE_SIZE, W)[1] == fault_code(FAULT_FL_PERMISSION, 1)
    assert not p.get_entry(VA + PAGE_SIZE) & (FL_A | FL_D)


def test_owner_violation_counted_on_walk_and_on_hit(world):
    io = world.iommu
    pa, f = io.translate_one(0, 5, VA, R)
    assert f == 0
    world.host.owners[pa >> 12] = 2  # frame handed to VM 2 behind the IOTLB's back
    assert io.translate_one(0, 5, VA, R) == (0, FAULT_OWNER)
    assert io.counters()["owner_violations"] == 1
    assert io.counters()["iotlb_hits"] == 1
    pa6 = world.p6.va_to_hpa(VA)
    world.host.owners[pa6 >> 12] = 0
    assert io.translate_one(1, 6, VA, R) == (0, FAULT_OWNER)
    assert io.counters()["owner_violations"] == 2
    assert io.cache_dump()["iotlb"] == [(1, 5, VA >> 12, pa >> 12, io.cache_dump()["iotlb"][0][4])]


def test_defunct_drops(world):
    io = world.iommu
    assert io.translate_one(1, 5, VA, R)[1] == 0
    io.set_defunct(5, True)
    assert io.translate_one(0, 5, VA, R) == (0, FAULT_DEFUNCT)
    assert io.translate_one(1, 5, VA, R) == (0, FAULT_DEFUNCT)
    io.set_defunct(5, False)
    io.set_defunct(6, True, dev=1)
    assert io.translate_one(1, 6, VA, R) == (0, FAULT_DEFUNCT)
    assert io.translate_one(0, 6, VA, R)[1] == 0
    assert io.translate_one(1, 5, VA, R)[1] == 0
    c = io.counters()
    assert c["defunct_drops"] == 3 and c["faults_by_reason"] == {"defunct": 3}
    assert io.cache_dump()["defunct_dev"] == {1: [6]}
    assert io.is_defunct(6, dev=1) and not io.is_defunct(6)


def _fill_all(io, dev=0):
    for pasid in (5, 6, 9):
        for i in range(8):
            assert io.translate_one(dev, pasid, VA + i * PAGE_SIZE, R)[1] == 0


def _keys(io):
    return {(e[0], e[1], e[2]) for e in io.cache_dump()["iotlb"]}


def test_iotlb_invalidation_granularities(make_world):
    w = make_world()
    io = w.iommu
    vpn0 = VA >> 12
    allk = {(did, pasid, vpn0 + i) for did, pasid in ((1, 5), (1, 6), (2, 9)) for i in range(8)}
    _fill_all(io)
    assert _keys(io) == allk
    assert io.inv_iotlb("page", did=1, pasid=5, addr=VA + 2 * PAGE_SIZE + 5, size_order=1) == 2
    assert _keys(io) == allk - {(1, 5, vpn0 + 2), (1, 5, vpn0 + 3)}
    assert io.inv_iotlb("page", did=2, pasid=5, addr=VA, size_order=3) == 0  # wrong domain
    assert io.inv_iotlb("pasid", did=1, pasid=6) == 8
    assert _keys(io) == {k for k in allk if k[1] == 9 or (k[1] == 5 and k[2] - vpn0 not in (2, 3))}
    assert io.inv_iotlb("domain", did=1) == 6
    assert _keys(io) == {k for k in allk if k[0] == 2}
    assert io.inv_iotlb("global") == 8 and _keys(io) == set()
    c = io.counters()
    assert (
        c["iotlb_inv_page"],
        c["iotlb_inv_pasid"],
        c["iotlb_inv_domain"],
        c["iotlb_inv_global"],
        c["iotlb_inv_entries"],
    ) == (2, 1, 1, 1, 24)
    # after an invalidation the range walks again
    io.reset_counters()
    _fill_all(io)
    assert io.counters()["walks"] == 24


def test_large_range_invalidation_scan_path(make_world):
    w = make_world(iotlb_sets=4, iotlb_ways=8)
    io = w.iommu
    _fill_all(io)
    # 2^9 pages >= 4 sets: whole-cache scan; same result as probing
    assert io.inv_iotlb("page", did=1, pasid=5, addr=VA + 0x1000, size_order=9) == 8
    assert {k[1] for k in _keys(io)} == {6, 9}


def test_stale_entry_until_invalidated(world):
    io, p = world.iommu, world.p5
    old = io.translate_one(0, 5, VA + 0x4000, R)[0]
    new_gpa = p.map(VA + 0x4000)  # guest remaps the page, no invalidation yet
    assert io.translate_one(0, 5, VA + 0x4000, R)[0] == old  # stale, as hardware
    p.unmap(VA + 0x6000)
    io.translate_one(0, 5, VA + 0x6000, R)  # walks: not present
    io.inv_iotlb("page", did=1, pasid=5, addr=VA + 0x4000)
    pa = io.translate_one(0, 5, VA + 0x4000, R)[0]
    assert pa == world.vm1.gpa_to_hpa(new_gpa << 12) and pa != old


def test_pasid_cache_stale_until_invalidated(world):
    io = world.iommu
    assert io.translate_one(0, 5, VA, R)[1] == 0
    clear_pasid(world.host, world.dir, 5)
    assert io.translate_one(0, 5, VA, R)[1] == 0  # cached PASID entry and IOTLB
    io.inv_pasid_cache("domain", did=2)
    assert io.translate_one(0, 5, VA, R)[1] == 0
    io.inv_pasid_cache("pasid", did=1, pasid=5)
    assert io.translate_one(0, 5, VA, R) == (0, FAULT_PE_NOT_PRESENT)
    assert io.cache_dump()["pasid_cache"] == []


def test_device_tlb(world):
    io = world.iommu
    assert io.translate_one(1, 5, VA, R)[1] == 0
    assert io.translate_one(1, 5, VA + 1, R)[1] == 0
    c = io.counters()
    assert c["devtlb_hits"] == 1 and c["devtlb_fills"] == 1 and c["iotlb_lookups"] == 1
    dump = io.cache_dump()["devtlb"]
    assert [e[:2] for e in dump[1]] == [(5, VA >> 12)] and dump[0] == []
    # devTLB hit survives an IOTLB invalidation (separate invalidation needed)
    io.inv_iotlb("global")
    assert io.translate_one(1, 5, VA, R)[1] == 0 and io.counters()["iotlb_lookups"] == 1
    for pasid in (5, 6):
        for i in range(4):
            io.translate_one(1, pasid, VA + i * PAGE_SIZE, R)
    assert len(io.cache_dump()["devtlb"][1]) == 8
    assert io.inv_devtlb(1, pasid=5, addr=VA + PAGE_SIZE, size_order=1) == 2
    assert io.inv_devtlb(1, pasid=6) == 4
    assert {e[1] - (VA >> 12) for e in io.cache_dump()["devtlb"][1]} == {2, 3}  # aligned down to page 0
    assert io.inv_devtlb(1) == 2 and io.cache_dump()["devtlb"][1] == []


def test_plru_replacement(make_world):
    # two ways: PLRU is exact LRU
    w = make_world(iotlb_sets=1, iotlb_ways=2)
    io = w.iommu
    a, b, c = VA, VA + PAGE_SIZE, VA + 2 * PAGE_SIZE
    for va in (a, b, a, c):  # a is more recent than b when c arrives: b evicted
        io.translate_one(0, 5, va, R)
    assert {e[2] for e in io.cache_dump()["iotlb"]} == {a >> 12, c >> 12}
    assert io.counters()["iotlb_evictions"] == 1
    # four ways: fill ways 0..3 with pages 0..3, touch page 0, then page 4 arrives.
    # Tree-PLRU evicts page 2 (true LRU would evict page 1).
    w = make_world(iotlb_sets=1, iotlb_ways=4)
    io = w.iommu
    for i in (0, 1, 2, 3, 0, 4):
        assert io.translate_one(0, 5, VA + i * PAGE_SIZE, R)[1] == 0
    assert {e[2] - (VA >> 12) for e in io.cache_dump()["iotlb"]} == {0, 1, 3, 4}


def test_invalidated_way_is_refilled_first(make_world):
    w = make_world(iotlb_sets=1, iotlb_ways=4)
    io = w.iommu
    for i in range(4):
        io.translate_one(0, 5, VA + i * PAGE_SIZE, R)
    io.inv_iotlb("page", did=1, pasid=5, addr=VA + 2 * PAGE_SIZE)
    io.translate_one(0, 5, VA + 4 * PAGE_SIZE, R)
    assert io.counters()["iotlb_evictions"] == 0
    assert {e[2] - (VA >> 12) for e in io.cache_dump()["iotlb"]} == {0, 1, 3, 4}


def test_geometry_validation(Impl, world):
    with pytest.raises(ValueError):
        Impl(world.host.mem, world.host.owners, iotlb_sets=3)
    with pytest.raises(ValueError):
        Impl(world.host.mem, world.host.owners, iotlb_ways=16)
    with pytest.raises(ValueError):
        Impl(world.host.mem, world.host.owners.astype(np.int64))
    with pytest.raises(ValueError):
        world.iommu.attach_device(0, 0x1234)
    with pytest.raises(ValueError):
        world.iommu.inv_iotlb("bogus")


def test_large_pages(make_world):
    w = make_world(nframes=8192)
    host, vm, p = w.host, w.vm1, w.p5
    io = w.iommu
    # second level: GPA 2 MiB page 0x4000_0000 -> 512 contiguous host frames
    base = host.alloc_contig(512, owner=1, align=512)
    vm.sl_map(0x40000000 >> 12, base, level=2)
    # first level: VA 2 MiB page -> that GPA range
    va = 0x5555_4000_0000
    p.map(va, gpa_page=0x40000000 >> 12, level=2)
    pa, f = io.translate_one(0, 5, va + 0x12345, R)
    assert f == 0 and pa == (base << 12) + 0x12345
    assert io.counters()["memory_refs"] == 3 * (4 + 1) + 3  # 3 FL levels; final SL stops at L2
    assert p.get_entry(va, 2) & FL_A


def test_dma_copy_fill_compare(world):
    io, p = world.iommu, world.p5
    src, dst = VA + 0x100, VA + 0x3F80  # dst crosses a page boundary
    data = bytes(range(256)) * 20
    p.write(src, data[:5000])
    before = {va: p.read(va, PAGE_SIZE) for va in (VA + i * PAGE_SIZE for i in range(8))}
    assert io.dma_copy(1, 5, src, dst, 5000) == (0, 0, 5000)
    assert p.read(dst, 5000) == data[:5000]
    # nothing else changed: every other byte of the process's pages is as before
    whole = b"".join(before.values())
    after = p.read(VA, 8 * PAGE_SIZE)
    expect = bytearray(whole)
    expect[dst - VA : dst - VA + 5000] = data[:5000]
    assert after == bytes(expect)
    assert io.dma_compare(1, 5, src, dst, 5000)[:3] == (0, 0, 0)
    assert io.dma_fill(1, 5, dst + 10, 3, 0xAB) == (0, 0, 3)
    assert p.read(dst + 9, 5) == bytes([data[9], 0xAB, 0xAB, 0xAB, data[13]])
    assert io.dma_compare(1, 5, src, dst, 5000) == (0, 0, 11, 10)
    c = io.counters()
    assert c["dma_descriptors"] == 4 and c["dma_faults"] == 0


def test_dma_fault_stops_descriptor(world):
    io, p = world.iommu, world.p5
    p.unmap(VA + 3 * PAGE_SIZE)
    p.write(VA, b"\x11" * (3 * PAGE_SIZE))
    dst = VA + 4 * PAGE_SIZE
    st, fva, done = io.dma_copy(0, 5, VA + 0x800, dst, 3 * PAGE_SIZE)
    assert st == fault_code(FAULT_FL_NOT_PRESENT, 1)
    assert fva == VA + 3 * PAGE_SIZE and done == 3 * PAGE_SIZE - 0x800
    assert p.read(dst, done) == b"\x11" * done and p.read(dst + done, 16) == bytes(16)
    st, fva, done = io.dma_fill(0, 5, VA + 2 * PAGE_SIZE + 16, PAGE_SIZE, 0x5A)
    assert (st, fva, done) == (fault_code(FAULT_FL_NOT_PRESENT, 1), VA + 3 * PAGE_SIZE, PAGE_SIZE - 16)
    edge = VA + 3 * PAGE_SIZE - 8
    st, fva, res, done = io.dma_compare(0, 5, edge, edge, 100)
    assert (st, fva, res, done) == (fault_code(FAULT_FL_NOT_PRESENT, 1), VA + 3 * PAGE_SIZE, 0, 8)
    # read-only destination: write fault at the exact VA
    p.map(VA + 0x3F000)
    p.map(VA + 0x40000, rw=False)
    st, fva, done = io.dma_copy(0, 5, VA, VA + 0x40000 - 8, 32)
    assert (st, fva, done) == (fault_code(FAULT_FL_PERMISSION, 1), VA + 0x40000, 8)
    assert io.counters()["dma_faults"] == 4


def test_counters_names_match(world):
    from vsva import hotpath

    c = world.iommu.counters()
    assert list(c)[:-1] == list(hotpath.COUNTER_NAMES)
    world.iommu.translate_one(0, 5, VA, R)
    world.iommu.reset_counters()
    assert all(v == 0 for k, v in world.iommu.counters().items() if k != "faults_by_reason")


def test_detach_drops_device_state(world):
    io = world.iommu
    io.translate_one(1, 5, VA, R)
    io.set_defunct(9, True, dev=1)
    io.detach_device(1)
    d = io.cache_dump()
    assert 1 not in d["devtlb"] and all(e[0] != 1 for e in d["pasid_cache"])
    assert d["defunct_dev"] == {} and len(d["iotlb"]) == 1


def test_env_var_forces_twin():
    code = "import hotpath; print(hotpath.IMPLEMENTATION, hotpath.Iommu is hotpath.PureIommu)"
    env = dict(os.environ, VSVA_PUREPYTHON="1")
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )
    assert out.stdout.split() == ["python", "True"]


def test_mmap_memory_and_readonly_inputs(Impl):
    from conftest import World

    w = World(Impl, nframes=1024, seed=3)
    # same tables copied into an anonymous mmap, as the product maps its shared memory
    import mmap

    m = mmap.mmap(-1, len(w.host.mem))
    m[:] = bytes(w.host.mem)
    io = Impl(m, w.host.owners)
    io.attach_device(0, w.dir)
    vas = np.array([VA, VA + PAGE_SIZE + 7], np.uint64)
    pas = np.array([5, 9], np.uint32)
    acc = np.array([R, W], np.uint8)
    for a in (vas, pas, acc):
        a.setflags(write=False)
    out_pa, out_f = np.zeros(2, np.uint64), np.zeros(2, np.int32)
    assert io.translate(0, pas, vas, acc, out_pa, out_f) == 0
    assert int(out_pa[0]) == w.p5.va_to_hpa(VA)
    assert int(out_pa[1]) == w.p9.va_to_hpa(VA + PAGE_SIZE + 7)
    assert io.dma_fill(0, 9, VA, 100, 0x3C) == (0, 0, 100)
    h = w.p9.va_to_hpa(VA)
    assert m[h : h + 100] == b"\x3c" * 100


def test_huge_size_order_is_clamped(world):
    io = world.iommu
    _fill_all(io)
    assert io.inv_iotlb("page", did=1, pasid=5, addr=VA, size_order=60) == 8
    assert io.inv_devtlb(1, pasid=5, addr=VA, size_order=99) == 0
    with pytest.raises(ValueError):
        io.inv_iotlb("page", did=1, pasid=5, addr=VA, size_order=-1)
