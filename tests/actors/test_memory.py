"""PASID directories in real bytes: the audit's scan finds exactly the present entries, in
host memory and in a guest's RAM (frames out of order), with one read per directory frame
and per present table (the host's snapshot scans every device's whole directory)."""

from __future__ import annotations

import mmap

from hypothesis import given, settings
from hypothesis import strategies as st

from vsva.actors.memory import FrameAllocator, GuestRam, PasidDirectory, PhysMem
from vsva.hotpath.layout import PAGE_SHIFT, PASID_DIR_FRAMES, PASID_MAX, encode_pasid_entry

FRAMES = 96


class CountingSpace:
    """A word space that counts its reads (one call each)."""

    def __init__(self, space):
        self.space, self.u64, self.words = space, 0, 0

    def read_u64(self, addr):
        self.u64 += 1
        return self.space.read_u64(addr)

    def read_words(self, addr, count):
        self.words += 1
        return self.space.read_words(addr, count)

    def write_u64(self, addr, value):
        self.space.write_u64(addr, value)

    def write_words(self, addr, words):
        self.space.write_words(addr, words)


def directory(space) -> PasidDirectory:
    """A directory in frames 0.. of `space` (consecutive there), its tables after it."""
    tables = FrameAllocator(range(PASID_DIR_FRAMES, FRAMES))
    return PasidDirectory(space, 0, lambda: tables.alloc() << PAGE_SHIFT)


pasid_sets = st.sets(
    st.one_of(st.integers(0, 200), st.integers(1, PASID_MAX - 1), st.sampled_from([63, 64, PASID_MAX - 1])),
    max_size=12,
)


@settings(max_examples=40, deadline=None)
@given(pasid_sets, st.data())
def test_present_pasids_are_exactly_the_present_entries(pasids, data):
    mem = PhysMem.anonymous(FRAMES)
    guest = data.draw(st.booleans())
    order = data.draw(st.permutations(range(FRAMES))) if guest else list(range(FRAMES))
    space = GuestRam(mem, order) if guest else mem
    pdir = directory(space)
    entry = encode_pasid_entry(flptr=0x1000, slptr=0x2000, did=1)
    for pasid in pasids:
        pdir.write_entry(pasid, entry)
    cleared = set(data.draw(st.lists(st.sampled_from(sorted(pasids)), max_size=3))) if pasids else set()
    for pasid in cleared:
        assert pdir.clear_entry(pasid)  # its table stays, with the entry not present
    assert pdir.present_pasids() == sorted(pasids - cleared)


def test_the_scan_reads_a_directory_frame_or_a_table_at_once():
    mem = PhysMem.anonymous(FRAMES)
    counting = CountingSpace(mem)
    pdir = directory(counting)
    pasids = {5, 64, 65, 70_000, PASID_MAX - 1}  # four tables
    for pasid in pasids:
        pdir.write_entry(pasid, encode_pasid_entry(flptr=0x1000, slptr=0x2000, did=1))
    counting.u64 = counting.words = 0
    assert pdir.present_pasids() == sorted(pasids)
    assert (counting.u64, counting.words) == (0, PASID_DIR_FRAMES + 4)


@given(st.lists(st.integers(1, 64), unique=True, max_size=40), st.integers(1, 8))
def test_a_run_is_taken_only_when_its_frames_are_consecutive(frames, count):
    """take_run (the host's PASID directories): the `count` frames at the far end of the pool
    when they descend one by one, the lowest returned and all marked used; otherwise
    MemoryError and the pool exactly as it was."""
    pool = FrameAllocator(frames)
    head = frames[:count]
    if len(head) == count and head == list(range(head[0], head[0] - count, -1)):
        assert pool.take_run(count) == head[-1]
        assert list(pool.free) == frames[count:] and pool.used == set(head)
    else:
        try:
            pool.take_run(count)
        except MemoryError:
            pass
        else:
            raise AssertionError("took frames that are not consecutive")
        assert list(pool.free) == frames and not pool.used


def test_zero_frames_clears_shared_memory_for_every_process_mapping_it(tmp_path):
    """zero_frames gives shared pages back (MADV_REMOVE): another mapping of the same file (as
    each actor process has) reads zeros there at once, and the neighbours keep their bytes."""
    path = str(tmp_path / "mem")
    mine = PhysMem.create(path, 8)
    other = PhysMem.open(path)
    page = 1 << PAGE_SHIFT
    mine.write(0, b"\xab" * (8 * page))
    mine.zero_frames(2, 3)
    assert other.read(2 * page, 3 * page) == bytes(3 * page)
    assert other.read(page, page) == b"\xab" * page and other.read(5 * page, page) == b"\xab" * page
    # not shared memory (a buffer; a private mapping, where MADV_REMOVE fails): written instead
    for buf in (bytearray(4 * page), mmap.mmap(-1, 4 * page, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)):
        private = PhysMem(buf)
        private.write(0, b"\xcd" * (4 * page))
        private.zero_frames(1, 2)
        assert private.read(0, 4 * page) == b"\xcd" * page + bytes(2 * page) + b"\xcd" * page
        private.close()
    other.close()
    mine.close()
