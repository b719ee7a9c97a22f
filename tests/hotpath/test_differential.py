"""Differential test: the compiled module and the pure twin agree on random workloads.

Both run the same operations on two copies of the same memory. After every operation the
results, counters, cache dumps and the memory bytes (A/D bit writes, DMA data) must agree.
Caches are tiny so evictions and set conflicts happen all the time; every geometry the
compiled module packs differently (2, 4 and 8 ways, whose PLRU bits share the way-0 tag
word) runs.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vsva import hotpath
from vsva.hotpath.layout import (
    ACCESS_EXEC,
    ACCESS_PRIV,
    ACCESS_READ,
    ACCESS_WRITE,
    FL_A,
    FL_D,
    FL_P,
    FL_PS,
    FL_RW,
    FL_US,
    FL_XD,
    PAGE_SIZE,
    SL_R,
    SL_W,
)
from vsva.hotpath.testing import GuestProcess, GuestVM, HostMemory, install_pasid, make_pasid_dir

pytestmark = pytest.mark.skipif(not hotpath.compiled_available(), reason="compiled module not built")

VA = 0x7F00_0000_0000
UPPER = 0xFFFF_FF80_0000_0000  # canonical upper half
PAGES = (
    [VA + i * PAGE_SIZE for i in range(7)]
    + [UPPER]
    + [VA + i * PAGE_SIZE for i in range(7, 10)]
    + [VA + (1 << 21), VA + (1 << 30) + 0x5000, 0x40_0000_0000, 1 << 47]
)  # last: non-canonical
R, W, X, PRIV = ACCESS_READ, ACCESS_WRITE, ACCESS_EXEC, ACCESS_PRIV
PASIDS = [5, 6, 9]
GEOMETRIES = {
    ways: dict(
        iotlb_sets=8 // ways,
        iotlb_ways=ways,
        devtlb_entries=2 * ways,
        devtlb_ways=ways,
        pasid_cache_entries=4,
    )
    for ways in (2, 4, 8)
}

page = st.integers(0, len(PAGES) - 1)
proc = st.integers(0, 2)
pasid_any = st.sampled_from([5, 6, 9, 7, 1 << 20])
did = st.sampled_from([1, 2])
access = st.sampled_from([R, W, R | W, X, R | PRIV, W | PRIV, 0, R | X])
size_order = st.sampled_from([0, 1, 3, 9, 36])
op = st.one_of(
    st.tuples(st.just("x"), st.integers(0, 2), pasid_any, page, st.sampled_from([0, 8, 0xFFF]), access),
    st.tuples(
        st.just("xb"),
        st.integers(0, 1),
        st.lists(st.tuples(pasid_any, page, access), min_size=1, max_size=12),
    ),
    st.tuples(st.just("map"), proc, page, st.booleans(), st.booleans(), st.booleans(), st.booleans()),
    st.tuples(st.just("unmap"), proc, page),
    st.tuples(
        st.just("upper"), proc, page, st.sampled_from([2, 3, 4]), st.sampled_from([FL_US, FL_RW, FL_P])
    ),
    st.tuples(
        st.just("bits"),
        proc,
        page,
        st.sampled_from([1, 2, 3, 4]),
        st.sampled_from([FL_PS, 1 << 50, FL_XD, FL_A | FL_D, 1 << 13]),
    ),
    st.tuples(st.just("sl"), proc, page, st.sampled_from([0, SL_R, SL_R | SL_W])),
    st.tuples(st.just("own"), proc, page, st.integers(0, 2)),
    st.tuples(st.just("ii"), st.integers(0, 3), did, st.sampled_from(PASIDS), page, size_order),
    st.tuples(st.just("ip"), st.integers(0, 2), did, st.sampled_from(PASIDS)),
    st.tuples(st.just("id"), st.integers(0, 2), st.integers(0, 2), st.sampled_from(PASIDS), page, size_order),
    st.tuples(st.just("df"), st.sampled_from(PASIDS), st.booleans(), st.sampled_from([None, 0, 1])),
    st.tuples(st.just("pe"), st.integers(0, 2), st.booleans(), st.booleans(), st.booleans()),
    st.tuples(
        st.just("dma"),
        st.integers(0, 2),
        st.integers(0, 1),
        st.sampled_from(PASIDS),
        page,
        st.integers(0, 4095),
        page,
        st.integers(0, 4095),
        st.integers(0, 9000),
        st.integers(0, 255),
    ),
    st.tuples(st.just("att"), st.integers(0, 1), st.booleans()),
    st.tuples(st.just("det"), st.integers(0, 1)),
)


class Pair:
    def __init__(self, seed, ways=2, **geometry):
        kw = {**GEOMETRIES[ways], **geometry}
        self.host = host = HostMemory(768, seed=seed)
        vm1, vm2 = GuestVM(host, 1), GuestVM(host, 2)
        self.procs = [GuestProcess(vm1), GuestProcess(vm1), GuestProcess(vm2)]
        self.dir = make_pasid_dir(host)
        for pasid, p in zip(PASIDS, self.procs):
            install_pasid(host, self.dir, pasid, flptr=p.cr3, slptr=p.vm.sl_root, did=p.vm.vm_id)
            for va in PAGES[:8]:
                p.map(va)
        self.mem_b = bytearray(host.mem)
        self.own_b = host.owners.copy()
        self.a = hotpath.CompiledIommu(host.mem, host.owners, **kw)
        self.b = hotpath.PureIommu(self.mem_b, self.own_b, **kw)
        for io in (self.a, self.b):
            io.attach_device(0, self.dir, ats=False)
            io.attach_device(1, self.dir, ats=True)

    def sync(self):
        self.mem_b[:] = self.host.mem
        self.own_b[:] = self.host.owners

    def both(self, name, *args, **kw):
        ra = getattr(self.a, name)(*args, **kw)
        rb = getattr(self.b, name)(*args, **kw)
        assert ra == rb, (name, args, kw)
        return ra

    def check(self):
        assert self.a.counters() == self.b.counters()
        assert self.a.cache_dump() == self.b.cache_dump()
        assert self.host.mem == self.mem_b

    def apply(self, o):
        kind = o[0]
        if kind == "x":
            _, dev, pasid, pg, off, acc = o
            self.both("translate_one", dev, pasid, PAGES[pg] + off, acc)
        elif kind == "xb":
            _, dev, items = o
            n = len(items)
            pas = np.array([i[0] for i in items], np.uint32)
            vas = np.array([PAGES[i[1]] + 16 * k for k, i in enumerate(items)], np.uint64)
            acc = np.array([i[2] for i in items], np.uint8)
            outs = []
            for io in (self.a, self.b):
                pa, fl = np.zeros(n, np.uint64), np.zeros(n, np.int32)
                nf = io.translate(dev, pas, vas, acc, pa, fl)
                outs.append((nf, pa.tolist(), fl.tolist()))
            assert outs[0] == outs[1]
        elif kind in ("map", "unmap", "upper", "bits", "sl", "own", "pe"):
            try:
                self.mutate(o)
            except ValueError:  # the test builder will not walk through a large page
                pass
            self.sync()
        elif kind == "ii":
            _, g, d, pasid, pg, so = o
            self.both("inv_iotlb", g, did=d, pasid=pasid, addr=PAGES[pg], size_order=so)
        elif kind == "ip":
            _, g, d, pasid = o
            self.both("inv_pasid_cache", g, did=d, pasid=pasid)
        elif kind == "id":
            _, dev, k, pasid, pg, so = o
            if k == 0:
                self.both("inv_devtlb", dev)
            elif k == 1:
                self.both("inv_devtlb", dev, pasid=pasid)
            else:
                self.both("inv_devtlb", dev, pasid=pasid, addr=PAGES[pg], size_order=so)
        elif kind == "df":
            _, pasid, flag, dev = o
            self.both("set_defunct", pasid, flag, dev=dev)
        elif kind == "dma":
            _, k, dev, pasid, pa_, oa, pb, ob, length, pat = o
            a, b = PAGES[pa_] + oa, PAGES[pb] + ob
            if k == 0:
                self.both("dma_copy", dev, pasid, a, b, length)
            elif k == 1:
                self.both("dma_fill", dev, pasid, b, length, pat)
            else:
                self.both("dma_compare", dev, pasid, a, b, length)
        elif kind == "att":
            self.both("attach_device", o[1], self.dir, ats=o[2])
        elif kind == "det":
            self.both("detach_device", o[1])
        self.check()

    def mutate(self, o):
        kind = o[0]
        if kind == "pe":
            _, i, sre, wpe, eafe = o
            p = self.procs[i]
            install_pasid(
                self.host,
                self.dir,
                PASIDS[i],
                flptr=p.cr3,
                slptr=p.vm.sl_root,
                did=p.vm.vm_id,
                sre=sre,
                wpe=wpe,
                eafe=eafe,
            )
            return
        p = self.procs[o[1]]
        va = PAGES[o[2]]
        if kind == "map":
            _, _, _, rw, us, xd, fresh = o
            old = p.va_to_gpa(va)
            gpa_page = None if fresh or old is None else old >> 12
            if len(self.host.free) < 8:
                return
            p.map(va, gpa_page, rw=rw, us=us, xd=xd)
        elif kind == "unmap":
            if p.entry_addr(va, 1, create=False) is not None:
                p.unmap(va)
        elif kind == "upper":
            _, _, _, level, bit = o
            ea = p.entry_addr(va, level, create=False)
            if ea is not None:
                self.host.write_u64(ea, self.host.read_u64(ea) & ~bit)
        elif kind == "bits":  # toggle a bit at one level: reserved, PS, XD, A|D
            _, _, _, level, bit = o
            ea = p.entry_addr(va, level, create=False)
            if ea is not None:
                self.host.write_u64(ea, self.host.read_u64(ea) ^ bit)
        elif kind == "sl":
            gpa = p.va_to_gpa(va)
            if gpa is not None and (gpa >> 12) in p.vm.gpa_frames:
                frame = p.vm.gpa_frames[gpa >> 12]
                p.vm.sl_set(gpa >> 12, (frame << 12) | o[3] if o[3] else 0)
        elif kind == "own":
            h = p.va_to_hpa(va)
            if h is not None:
                self.host.owners[h >> 12] = o[3]


@pytest.mark.parametrize("ways", sorted(GEOMETRIES))
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 3), ops=st.lists(op, max_size=40))
def test_compiled_and_twin_agree(ways, seed, ops):
    pair = Pair(seed, ways)
    for o in ops:
        pair.apply(o)


@pytest.mark.parametrize("ways", sorted(GEOMETRIES))
def test_agree_on_a_long_random_run(ways):
    """A longer fixed-seed run (no shrinking) mixing everything with many lookups."""
    rng = np.random.default_rng(2024)
    pair = Pair(1, ways)
    for _ in range(600):
        r = rng.random()
        if r < 0.6:
            pair.apply(
                (
                    "x",
                    int(rng.integers(0, 2)),
                    int(rng.choice([5, 6, 9])),
                    int(rng.integers(0, len(PAGES))),
                    0,
                    int(rng.choice([R, W, R | W, X, R | PRIV])),
                )
            )
        elif r < 0.7:
            pair.apply(
                (
                    "map",
                    int(rng.integers(0, 3)),
                    int(rng.integers(0, len(PAGES))),
                    bool(rng.random() < 0.8),
                    bool(rng.random() < 0.9),
                    False,
                    bool(rng.random() < 0.5),
                )
            )
        elif r < 0.8:
            pair.apply(
                (
                    "ii",
                    int(rng.integers(0, 4)),
                    int(rng.integers(1, 3)),
                    int(rng.choice([5, 6, 9])),
                    int(rng.integers(0, len(PAGES))),
                    int(rng.choice([0, 1, 3])),
                )
            )
        elif r < 0.85:
            pair.apply(("unmap", int(rng.integers(0, 3)), int(rng.integers(0, len(PAGES)))))
        elif r < 0.9:
            pair.apply(
                (
                    "id",
                    1,
                    int(rng.integers(0, 3)),
                    int(rng.choice([5, 6, 9])),
                    int(rng.integers(0, len(PAGES))),
                    0,
                )
            )
        else:
            pair.apply(
                (
                    "dma",
                    int(rng.integers(0, 3)),
                    1,
                    int(rng.choice([5, 6, 9])),
                    int(rng.integers(0, 8)),
                    int(rng.integers(0, 4096)),
                    int(rng.integers(0, 8)),
                    int(rng.integers(0, 4096)),
                    int(rng.integers(0, 6000)),
                    7,
                )
            )
    c = pair.a.counters()
    assert c["iotlb_hits"] > 0 and c["iotlb_evictions"] > 0 and c["walks"] > 0


def test_long_batches_of_walks_agree():
    """Batches of misses longer than a group: the compiled batch loop walks runs of misses
    several at a time (hotpath/_walk.h, vs_walk_group) and uses a result only while no A/D
    update has changed memory since; results, counters (memory_refs included), caches and
    memory must still be those of the twin's one-by-one walks. The tables hold what makes
    the common-case walk give up (large pages, clear A/D bits, reserved bits, SL and FL
    rights, unmapped pages), so groups mix usable and discarded results."""
    pair = Pair(3, 8)
    for i in range(len(pair.procs)):  # the unmapped pages of PAGES too
        for pg in range(8, len(PAGES) - 1):
            pair.apply(("map", i, pg, True, pg % 3 != 0, pg % 4 == 0, True))
    # large leaves: a 2 MiB FL page on a 2 MiB SL page, a 1 GiB FL page on a 1 GiB SL page
    p0, p1 = pair.procs[0], pair.procs[1]
    p0.vm.sl_map(3 << 9, 0, level=2)
    p0.map(PAGES[11], 3 << 9, level=2)
    p1.vm.sl_map(1 << 18, 0, level=3)
    p1.map(PAGES[12] & ~((1 << 30) - 1), 1 << 18, level=3)
    pair.sync()
    setup = [
        ("bits", 0, 9, 2, FL_PS),  # large leaves with reserved (alignment) bits
        ("bits", 2, 11, 2, FL_PS),
        ("bits", 0, 5, 2, 1 << 50),
        ("sl", 1, 4, SL_R),
        ("unmap", 2, 6),
        ("upper", 1, 1, 3, FL_US),
    ]
    for o in setup:
        pair.apply(o)
    rng = np.random.default_rng(7)
    for rnd in range(40):
        if rnd % 4 == 0:  # A/D bits cleared again: the next walks write them
            pair.apply(("bits", rnd % 3, int(rng.integers(0, 8)), int(rng.integers(1, 5)), FL_A | FL_D))
        pair.apply(("ii", 0, 1, 5, 0, 0))  # global: every request of the batch walks
        items = [
            (
                int(rng.choice(PASIDS)),
                int(rng.integers(0, len(PAGES))),
                int(rng.choice([R, W, R | W, X, R | PRIV])),
            )
            for _ in range(48)
        ]
        pair.apply(("xb", 0, items))
    c = pair.a.counters()
    assert 0 < c["faults"] < c["translations"] and c["ad_writes"] > 0 and c["walks"] > 1000


def test_group_members_finish_as_translate1_would():
    """In a run of misses the compiled batch loop finishes a group member's translation from
    the group's own lookups (its PASID-cache entry, its IOTLB set and way) while nothing but
    other members' fills into other sets has changed the caches or memory since. Whatever
    comes in between must leave results, counters, caches and memory those of the twin's
    one-by-one translations: PASID-cache misses whose fills evict a member's entry (six
    PASIDs, four entries), the same page twice in a group and members sharing a set (four
    sets of two ways: evictions), owner violations, a defunct PASID, an uninstalled one,
    A/D updates, supervisor requests without SRE, a device with ATS."""
    pair = Pair(4, 2, iotlb_sets=4, pasid_cache_entries=4)
    pasids = list(PASIDS)
    for pasid, i in ((11, 0), (12, 2), (13, 1)):  # three more processes, both VMs
        p = GuestProcess(pair.procs[i].vm)
        install_pasid(pair.host, pair.dir, pasid, flptr=p.cr3, slptr=p.vm.sl_root, did=p.vm.vm_id)
        for va in PAGES[:8]:
            p.map(va)
        pair.procs.append(p)
        pasids.append(pasid)
    pair.sync()
    rng = np.random.default_rng(11)
    for rnd in range(60):
        r = rnd % 6
        if r == 1:
            pair.apply(("own", int(rng.integers(0, 6)), int(rng.integers(0, 8)), int(rng.integers(0, 3))))
        elif r == 2:
            pair.apply(("bits", int(rng.integers(0, 6)), int(rng.integers(0, 8)), 1, FL_A | FL_D))
        elif r == 3:
            pair.apply(("df", int(rng.choice(pasids)), bool(rng.random() < 0.5), None))
        if rnd % 3:  # mostly cold batches: every request of the batch misses
            pair.apply(("ii", 0, 1, 5, 0, 0))
        items = [
            (
                int(rng.choice(pasids + [7])),
                int(rng.integers(0, 8)),
                int(rng.choice([R, R, R, W, R | W, R | PRIV])),
            )
            for _ in range(64)
        ]
        pair.apply(("xb", int(rnd % 5 == 4), items))
    c = pair.a.counters()
    assert c["owner_violations"] > 0 and c["pasid_cache_evictions"] > 0 and c["ad_writes"] > 0
    assert c["iotlb_evictions"] > 0 and c["defunct_drops"] > 0 and c["walks"] > 2000
