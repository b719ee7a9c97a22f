"""Simulated physical memory as real bytes, and the writers of the tables that live in it.

Host memory is one shared-memory file that every process maps (the host, and the VMM and
guest for the VM's RAM, as QEMU maps guest RAM). A VM's RAM is a list of host frames in no
particular order: GPA frame i is host frame `ram_frames[i]`. The tables are written in the
formats of hotpath.layout so the hot path walks exactly these bytes.
"""

from __future__ import annotations

import mmap
import os
from array import array
from collections import deque
from collections.abc import Callable, Iterable
from typing import Literal, Protocol, overload

from vsva.hotpath.layout import (
    ADDR_MASK,
    ENTRIES_PER_TABLE,
    FL_P,
    FL_RW,
    FL_US,
    LEVELS,
    PAGE_SHIFT,
    PAGE_SIZE,
    PASID_DIR_FRAMES,
    PASID_ENTRY_SIZE,
    PDE_PRESENT,
    SL_R,
    SL_W,
    SL_X,
    pasid_dir_index,
    pasid_table_index,
    table_index,
)


class Space(Protocol):
    """An address space whose 8-byte words can be read and written (host or guest physical)."""

    def read_u64(self, addr: int) -> int: ...
    def write_u64(self, addr: int, value: int) -> None: ...


class WordSpace(Space, Protocol):
    """A Space that also moves several consecutive words of one page at once (a PASID entry:
    one slice of the memory instead of a call per word)."""

    def read_words(self, addr: int, count: int) -> list[int]: ...
    def write_words(self, addr: int, words: list[int]) -> None: ...


class PhysMem:
    """Host physical memory over a writable buffer (an mmap of the run's shared-memory file)."""

    def __init__(self, buf: mmap.mmap | bytearray, path: str | None = None):
        self.buf = buf
        self.path = path
        self.view = memoryview(buf)
        self.words = self.view.cast("Q")
        self.nframes = len(buf) // PAGE_SIZE

    @classmethod
    def create(cls, path: str, nframes: int) -> PhysMem:
        """Create the shared-memory file (zero-filled) and map it."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, nframes * PAGE_SIZE)
            return cls(mmap.mmap(fd, nframes * PAGE_SIZE), path)
        finally:
            os.close(fd)

    @classmethod
    def open(cls, path: str) -> PhysMem:
        """Map an existing shared-memory file (another process created it)."""
        fd = os.open(path, os.O_RDWR)
        try:
            return cls(mmap.mmap(fd, os.fstat(fd).st_size), path)
        finally:
            os.close(fd)

    @classmethod
    def anonymous(cls, nframes: int) -> PhysMem:
        """Memory private to one process: the deterministic runtime and unit tests."""
        return cls(mmap.mmap(-1, nframes * PAGE_SIZE))

    def read_u64(self, addr: int) -> int:
        return self.words[addr >> 3]

    def write_u64(self, addr: int, value: int) -> None:
        self.words[addr >> 3] = value

    def read_words(self, addr: int, count: int) -> list[int]:
        first = addr >> 3
        return self.words[first : first + count].tolist()

    def write_words(self, addr: int, words: list[int]) -> None:
        first = addr >> 3
        self.words[first : first + len(words)] = array("Q", words)

    def read(self, addr: int, length: int) -> bytes:
        return bytes(self.view[addr : addr + length])

    def write(self, addr: int, data: bytes) -> None:
        self.view[addr : addr + len(data)] = data

    def zero_frame(self, frame: int) -> None:
        base = frame << PAGE_SHIFT
        self.view[base : base + PAGE_SIZE] = bytes(PAGE_SIZE)

    def zero_frames(self, frame: int, count: int) -> None:
        """Zero `count` frames from `frame`. Shared memory gives the pages back instead
        (MADV_REMOVE: they read as zeros, for every process that maps them, and cost
        nothing until touched): the host's 32-frame PASID directories of 256 VMs were 8,224
        page faults and 33 MB of writes at its start."""
        if isinstance(self.buf, mmap.mmap) and hasattr(mmap, "MADV_REMOVE"):
            try:
                self.buf.madvise(mmap.MADV_REMOVE, frame << PAGE_SHIFT, count << PAGE_SHIFT)
                return
            except OSError:  # a file system that cannot punch holes: write the zeros
                pass
        self.view[frame << PAGE_SHIFT : (frame + count) << PAGE_SHIFT] = bytes(count << PAGE_SHIFT)

    def close(self) -> None:
        """Release the mapping (views first: mmap refuses to close while exported)."""
        self.words.release()
        self.view.release()
        if isinstance(self.buf, mmap.mmap):
            self.buf.close()


class GuestRam:
    """A VM's RAM seen at guest physical addresses: GPA frame i is host frame ram_frames[i]."""

    def __init__(self, mem: PhysMem, ram_frames: list[int]):
        self.mem = mem
        self.frames = list(ram_frames)

    def hpa(self, gpa: int) -> int:
        index = gpa >> PAGE_SHIFT
        if not 0 <= index < len(self.frames):
            raise ValueError(f"GPA {gpa:#x} outside guest RAM")
        return (self.frames[index] << PAGE_SHIFT) | (gpa & (PAGE_SIZE - 1))

    def read_u64(self, gpa: int) -> int:
        return self.mem.read_u64(self.hpa(gpa))

    def write_u64(self, gpa: int, value: int) -> None:
        self.mem.write_u64(self.hpa(gpa), value)

    def read_words(self, gpa: int, count: int) -> list[int]:
        return self.mem.read_words(self._hpa_in_page(gpa, count), count)

    def write_words(self, gpa: int, words: list[int]) -> None:
        self.mem.write_words(self._hpa_in_page(gpa, len(words)), words)

    def _hpa_in_page(self, gpa: int, count: int) -> int:
        """The host address of `count` words at `gpa`, which must not cross a guest page (the
        next GPA page is another host frame)."""
        if (gpa & (PAGE_SIZE - 1)) + 8 * count > PAGE_SIZE:
            raise ValueError(f"{count} words at GPA {gpa:#x} cross a page")
        return self.hpa(gpa)

    def read(self, gpa: int, length: int) -> bytes:
        return b"".join(self.mem.read(self.hpa(a), n) for a, n in _page_chunks(gpa, length))

    def write(self, gpa: int, data: bytes) -> None:
        offset = 0
        for addr, n in _page_chunks(gpa, len(data)):
            self.mem.write(self.hpa(addr), data[offset : offset + n])
            offset += n

    def zero_frame(self, gpa_frame: int) -> None:
        self.mem.zero_frame(self.frames[gpa_frame])


def _page_chunks(addr: int, length: int) -> Iterable[tuple[int, int]]:
    """Split [addr, addr+length) at page boundaries."""
    end = addr + length
    while addr < end:
        n = min(end, (addr | (PAGE_SIZE - 1)) + 1) - addr
        yield addr, n
        addr += n


class FrameAllocator:
    """Hands out frame numbers from a pool; `order` shuffles it so RAM is not contiguous."""

    def __init__(self, frames: Iterable[int]):
        self.free = deque(frames)  # `alloc` takes from the right, `take_run` from the left
        self.used: set[int] = set()

    def alloc(self) -> int:
        if not self.free:
            raise MemoryError("out of frames")
        frame = self.free.pop()
        self.used.add(frame)
        return frame

    def release(self, frame: int) -> None:
        self.used.discard(frame)
        self.free.append(frame)

    def take_run(self, count: int) -> int:
        """`count` consecutive frames from the far end of the pool (where `alloc` does not
        take: a pool made in descending order has its highest frames there); returns the
        lowest. MemoryError, and the pool unchanged, unless those frames are consecutive."""
        free = self.free
        run = [free.popleft() for _ in range(min(count, len(free)))]
        if len(run) < count or run != list(range(run[0], run[0] - count, -1)):
            free.extendleft(reversed(run))
            raise MemoryError(f"no {count} consecutive frames")
        self.used.update(run)
        return run[-1]

    def __len__(self) -> int:
        return len(self.free)


def radix_tables(pages: int) -> int:
    """The tables a RadixTable builds to map `pages` contiguous, aligned pages: at each of the
    LEVELS levels one table per ENTRIES_PER_TABLE entries of the level below (the root
    included)."""
    tables = 0
    for _ in range(LEVELS):
        pages = -(-pages // ENTRIES_PER_TABLE)
        tables += pages
    return tables


class RadixTable:
    """A 4-level radix page table in some address space (x86-64 first level or VT-d second level).

    `alloc_table` returns the address (in the same space) of a zeroed 4 KiB table; `link`
    are the bits of non-leaf entries, `present` the bits that make an entry present.
    """

    def __init__(self, space: Space, root: int, alloc_table: Callable[[], int], *, link: int, present: int):
        self.space = space
        self.root = root
        self.alloc_table = alloc_table
        self.link = link
        self.present = present

    @overload
    def _entry_addr(self, va: int, create: Literal[True], leaf_level: int = 1) -> int: ...
    @overload
    def _entry_addr(self, va: int, create: bool, leaf_level: int = 1) -> int | None: ...
    def _entry_addr(self, va: int, create: bool, leaf_level: int = 1) -> int | None:
        table = self.root
        for level in range(LEVELS, leaf_level, -1):
            addr = table + 8 * table_index(va, level)
            entry = self.space.read_u64(addr)
            if not entry & self.present:
                if not create:
                    return None
                entry = self.alloc_table() | self.link
                self.space.write_u64(addr, entry)
            table = entry & ADDR_MASK
        return table + 8 * table_index(va, leaf_level)

    def map(self, va: int, target: int, flags: int, level: int = 1) -> None:
        """Map the page at `va` to `target` with leaf `flags`: a 4 KiB page (level 1) or a
        large one whose entry sits at level 2 (2 MiB) or 3 (1 GiB); `flags` carry its PS bit."""
        self.space.write_u64(self._entry_addr(va, True, level), (target & ADDR_MASK) | flags)

    def unmap(self, va: int) -> int:
        """Clear the leaf entry for `va`; return what it held (0 if nothing)."""
        addr = self._entry_addr(va, False)
        if addr is None:
            return 0
        old = self.space.read_u64(addr)
        self.space.write_u64(addr, 0)
        return old

    def set_flags(self, va: int, set_bits: int = 0, clear_bits: int = 0) -> int:
        """Change a present leaf's flags (e.g. mprotect); return the new entry, 0 if absent."""
        addr = self._entry_addr(va, False)
        if addr is None or not self.space.read_u64(addr) & self.present:
            return 0
        entry = (self.space.read_u64(addr) | set_bits) & ~clear_bits
        self.space.write_u64(addr, entry)
        return entry

    def lookup(self, va: int) -> int:
        """The leaf entry for `va` (0 if not mapped)."""
        addr = self._entry_addr(va, False)
        return 0 if addr is None else self.space.read_u64(addr)

    def tables(self) -> list[int]:
        """Addresses of every table of this radix tree, root first (to free them)."""
        found, stack = [], [(self.root, LEVELS)]
        while stack:
            table, level = stack.pop()
            found.append(table)
            if level == 1:
                continue
            for i in range(ENTRIES_PER_TABLE):
                entry = self.space.read_u64(table + 8 * i)
                if entry & self.present:
                    stack.append((entry & ADDR_MASK, level - 1))
        return found


FL_LINK = FL_P | FL_RW | FL_US
SL_LINK = SL_R | SL_W | SL_X
FL_PRESENT = FL_P
SL_PRESENT = SL_R | SL_W | SL_X


class PasidDirectory:
    """A scalable-mode PASID directory and its PASID tables (64 entries x 64 bytes each).

    The directory itself is PASID_DIR_FRAMES contiguous frames at `base`; tables are
    allocated on first use of a directory slot by `alloc_table` (returns a zeroed table's
    address in the same space).
    """

    def __init__(self, space: WordSpace, base: int, alloc_table: Callable[[], int]):
        self.space = space
        self.base = base
        self.alloc_table = alloc_table

    @overload
    def _entry_addr(self, pasid: int, create: Literal[True]) -> int: ...
    @overload
    def _entry_addr(self, pasid: int, create: bool) -> int | None: ...
    def _entry_addr(self, pasid: int, create: bool) -> int | None:
        pde_addr = self.base + 8 * pasid_dir_index(pasid)
        pde = self.space.read_u64(pde_addr)
        if not pde & PDE_PRESENT:
            if not create:
                return None
            pde = self.alloc_table() | PDE_PRESENT
            self.space.write_u64(pde_addr, pde)
        return (pde & ADDR_MASK) + PASID_ENTRY_SIZE * pasid_table_index(pasid)

    def write_entry(self, pasid: int, words: list[int]) -> None:
        """Write a PASID entry; word 0 (with the present bit) last, as a driver must."""
        addr = self._entry_addr(pasid, True)
        self.space.write_words(addr + 8, words[1:8])
        self.space.write_u64(addr, words[0])

    def read_entry(self, pasid: int) -> list[int] | None:
        addr = self._entry_addr(pasid, False)
        return None if addr is None else self.space.read_words(addr, 8)

    def clear_entry(self, pasid: int) -> bool:
        """Tear the entry down (present bit first); True if it was present."""
        addr = self._entry_addr(pasid, False)
        if addr is None:
            return False
        was_present = bool(self.space.read_u64(addr) & 1)
        self.space.write_u64(addr, 0)
        self.space.write_words(addr + 8, [0] * 7)
        return was_present

    def present_pasids(self) -> list[int]:
        """Every PASID with a present entry (the audit walks the real bytes). One read per
        directory frame and per present table, not per entry: the host's snapshot scans every
        device's whole directory, at 128 VMs 129 x 16,384 entries (a read per entry took the
        snapshot ~1 s, 2 s on a loaded machine: the live audit's answer bound)."""
        found = []
        per_frame = PAGE_SIZE // 8
        for f in range(PASID_DIR_FRAMES):
            pdes = self.space.read_words(self.base + f * PAGE_SIZE, per_frame)
            if not any(pdes):
                continue
            for i, pde in enumerate(pdes):
                if pde & PDE_PRESENT:
                    table = self.space.read_words(pde & ADDR_MASK, per_frame)
                    first = (f * per_frame + i) * 64
                    found += [first + e for e in range(64) if table[e * PASID_ENTRY_SIZE // 8] & 1]
        return found

    def tables(self) -> list[int]:
        """Addresses of the allocated PASID tables (to free them)."""
        return [
            self.space.read_u64(self.base + 8 * d) & ADDR_MASK
            for d in range(PASID_DIR_FRAMES * PAGE_SIZE // 8)
            if self.space.read_u64(self.base + 8 * d) & PDE_PRESENT
        ]
