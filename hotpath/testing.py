"""Small table builders for hot-path tests and the benchmark (not the product's writers).

    host = HostMemory(nframes=4096, seed=1)        # bytearray memory + owners + frame allocator
    vm = GuestVM(host, vm_id=1)                     # second-level table, GPA pages -> host frames
    proc = GuestProcess(vm)                         # first-level tables in guest RAM, CR3 = GPA
    proc.map(0x400000)                              # VA page -> fresh GPA page (fresh host frame)
    dir_hpa = make_pasid_dir(host)
    install_pasid(host, dir_hpa, pasid=5, flptr=proc.cr3, slptr=vm.sl_root, did=vm.vm_id)
    iommu = Iommu(host.mem, host.owners); iommu.attach_device(0, dir_hpa)

Host frames are handed out in a shuffled (seeded) order, so guest RAM is not contiguous.
"""

from __future__ import annotations

import mmap
import random
from typing import Literal, overload

import numpy as np

from vsva.hotpath.layout import (
    ADDR_MASK,
    FL_P,
    FL_PS,
    FL_RW,
    FL_US,
    FL_XD,
    PAGE_SHIFT,
    PAGE_SIZE,
    PASID_DIR_FRAMES,
    PASID_ENTRY_SIZE,
    PDE_PRESENT,
    SL_PS,
    SL_R,
    SL_W,
    encode_pasid_entry,
    table_index,
)

_INTERMEDIATE_FL = FL_P | FL_RW | FL_US
_INTERMEDIATE_SL = SL_R | SL_W


class HostMemory:
    """Host physical memory (bytearray, or anonymous mmap with use_mmap) and frame owners."""

    def __init__(
        self, nframes: int = 4096, seed: int = 0, use_mmap: bool = False, contig_frames: int | None = None
    ):
        """contig_frames (default nframes // 8, at least 64): the top frames, kept out of the
        shuffled pool and handed out in order by alloc_contig (PASID directories, large pages)."""
        self.nframes = nframes
        if contig_frames is None:
            contig_frames = max(64, nframes // 8)
        self.contig_next = nframes - contig_frames
        self.mem = mmap.mmap(-1, nframes * PAGE_SIZE) if use_mmap else bytearray(nframes * PAGE_SIZE)
        self.q = np.frombuffer(self.mem, dtype="<u8")  # u64 view for the builders
        self.owners = np.zeros(nframes, dtype=np.int32)
        self.rng = random.Random(seed)
        self.free = list(range(1, self.contig_next))  # frame 0 never used
        self.rng.shuffle(self.free)

    def alloc(self, owner: int = 0) -> int:
        """One zeroed frame (random position) owned by `owner`; returns the frame number."""
        f = self.free.pop()
        self.q[f * 512 : (f + 1) * 512] = 0
        self.owners[f] = owner
        return f

    def alloc_contig(self, n: int, owner: int = 0, align: int = 1) -> int:
        """n contiguous zeroed frames, first one a multiple of `align`; returns the first."""
        start = -(-self.contig_next // align) * align
        if start + n <= self.nframes:
            self.contig_next = start + n
            self.q[start * 512 : (start + n) * 512] = 0
            self.owners[start : start + n] = owner
            return start
        fs = set(self.free)
        start = align
        while start + n <= self.nframes:
            if all((start + i) in fs for i in range(n)):
                taken = set(range(start, start + n))
                self.free = [f for f in self.free if f not in taken]
                self.q[start * 512 : (start + n) * 512] = 0
                self.owners[start : start + n] = owner
                return start
            start += align
        raise MemoryError(f"no {n} contiguous free frames")

    def free_frame(self, frame: int) -> None:
        self.owners[frame] = 0
        self.free.append(frame)

    def read_u64(self, addr: int) -> int:
        return int(self.q[addr >> 3])

    def write_u64(self, addr: int, value: int) -> None:
        self.q[addr >> 3] = value

    def read(self, addr: int, n: int) -> bytes:
        return bytes(self.mem[addr : addr + n])

    def write(self, addr: int, data: bytes) -> None:
        self.mem[addr : addr + len(data)] = data


class GuestVM:
    """A VM: its second-level table (host-owned frames) and its guest RAM (GPA pages)."""

    def __init__(self, host: HostMemory, vm_id: int):
        self.host = host
        self.vm_id = vm_id
        self.sl_root = host.alloc(owner=0) << PAGE_SHIFT
        self.next_gpa_page = 1
        self.gpa_frames: dict[int, int] = {}  # GPA page -> host frame (4 KiB mappings)

    @overload
    def sl_entry_addr(self, gpa: int, level: int, create: Literal[True] = True) -> int: ...
    @overload
    def sl_entry_addr(self, gpa: int, level: int, create: bool) -> int | None: ...
    def sl_entry_addr(self, gpa: int, level: int, create: bool = True) -> int | None:
        """Host address of the level-`level` SL entry for gpa (allocating tables)."""
        q = self.host.q
        table = self.sl_root
        for lvl in range(4, level, -1):
            ea = table + table_index(gpa, lvl) * 8
            e = int(q[ea >> 3])
            if not e & (SL_R | SL_W | 4):
                if not create:
                    return None
                e = (self.host.alloc(owner=0) << PAGE_SHIFT) | _INTERMEDIATE_SL
                q[ea >> 3] = e
            elif e & SL_PS:
                raise ValueError("large SL page in the way")
            table = e & ADDR_MASK
        return table + table_index(gpa, level) * 8

    def sl_map(self, gpa_page: int, frame: int, perms: int = SL_R | SL_W, level: int = 1) -> None:
        """Map GPA page -> host frame (level 2/3: a 2 MiB / 1 GiB page, caller aligns)."""
        ea = self.sl_entry_addr(gpa_page << PAGE_SHIFT, level)
        self.host.q[ea >> 3] = (frame << PAGE_SHIFT) | perms | (SL_PS if level > 1 else 0)
        if level == 1:
            self.gpa_frames[gpa_page] = frame

    def sl_set(self, gpa_page: int, value: int, level: int = 1) -> None:
        ea = self.sl_entry_addr(gpa_page << PAGE_SHIFT, level)
        self.host.q[ea >> 3] = value

    def alloc_gpa_page(self, perms: int = SL_R | SL_W) -> int:
        """A fresh zeroed GPA page backed by a fresh host frame owned by this VM."""
        g = self.next_gpa_page
        self.next_gpa_page += 1
        self.sl_map(g, self.host.alloc(owner=self.vm_id), perms)
        return g

    def alloc_gpa_range(self, n: int, perms: int = SL_R | SL_W) -> np.ndarray:
        """n consecutive fresh GPA pages (each on a random host frame owned by this VM),
        mapped with vectorised table writes; returns the GPA page numbers."""
        g0 = self.next_gpa_page
        self.next_gpa_page += n
        frames = np.array([self.host.alloc(owner=self.vm_id) for _ in range(n)], dtype=np.uint64)
        q = self.host.q
        i = 0
        while i < n:
            g = g0 + i
            k = min(n - i, 512 - (g & 511))
            ea = self.sl_entry_addr(g << PAGE_SHIFT, 1)
            q[ea >> 3 : (ea >> 3) + k] = (frames[i : i + k] << np.uint64(PAGE_SHIFT)) | np.uint64(perms)
            for j in range(k):
                self.gpa_frames[g + j] = int(frames[i + j])
            i += k
        return np.arange(g0, g0 + n, dtype=np.uint64)

    def gpa_to_hpa(self, gpa: int) -> int | None:
        """Software SL walk (presence only); None if unmapped."""
        q = self.host.q
        table = self.sl_root
        for lvl in (4, 3, 2, 1):
            e = int(q[(table + table_index(gpa, lvl) * 8) >> 3])
            if not e & (SL_R | SL_W | 4):
                return None
            if lvl == 1 or (lvl <= 3 and e & SL_PS):
                mask = (1 << (PAGE_SHIFT + 9 * (lvl - 1))) - 1
                return (e & ADDR_MASK & ~mask) | (gpa & mask)
            table = e & ADDR_MASK
        return None


class GuestProcess:
    """A guest process: x86-64 4-level first-level tables in its VM's guest RAM."""

    def __init__(self, vm: GuestVM):
        self.vm = vm
        self.host = vm.host
        self.cr3 = vm.alloc_gpa_page() << PAGE_SHIFT  # GPA of the PML4

    def _hpa(self, gpa: int) -> int:
        h = self.vm.gpa_to_hpa(gpa)
        if h is None:
            raise ValueError(f"GPA {gpa:#x} not mapped")
        return h

    @overload
    def entry_addr(self, va: int, level: int = 1, create: Literal[True] = True) -> int: ...
    @overload
    def entry_addr(self, va: int, level: int = 1, *, create: bool) -> int | None: ...
    def entry_addr(self, va: int, level: int = 1, create: bool = True) -> int | None:
        """Host address of the level-`level` FL entry for va (allocating tables)."""
        q = self.host.q
        table_gpa = self.cr3
        for lvl in range(4, level, -1):
            ea = self._hpa(table_gpa) + table_index(va, lvl) * 8
            e = int(q[ea >> 3])
            if not e & FL_P:
                if not create:
                    return None
                e = (self.vm.alloc_gpa_page() << PAGE_SHIFT) | _INTERMEDIATE_FL
                q[ea >> 3] = e
            elif e & FL_PS:
                raise ValueError("large FL page in the way")
            table_gpa = e & ADDR_MASK
        return self._hpa(table_gpa) + table_index(va, level) * 8

    def map(
        self,
        va: int,
        gpa_page: int | None = None,
        *,
        rw: bool = True,
        us: bool = True,
        xd: bool = False,
        level: int = 1,
    ) -> int:
        """Map the VA page (level 2/3: a large page; gpa_page required, aligned) and return
        its GPA page (a fresh one when gpa_page is None)."""
        if gpa_page is None:
            if level != 1:
                raise ValueError("large pages need an explicit gpa_page")
            gpa_page = self.vm.alloc_gpa_page()
        e = (gpa_page << PAGE_SHIFT) | FL_P | (FL_RW if rw else 0) | (FL_US if us else 0)
        e |= (FL_XD if xd else 0) | (FL_PS if level > 1 else 0)
        ea = self.entry_addr(va, level)
        self.host.q[ea >> 3] = e
        return gpa_page

    def map_range(self, va: int, npages: int) -> list[int]:
        """Map npages consecutive 4 KiB pages (user, writable) from va to fresh GPA pages
        with vectorised table writes; return the GPA pages."""
        va &= ~(PAGE_SIZE - 1)
        gpas = self.vm.alloc_gpa_range(npages)
        q = self.host.q
        bits = np.uint64(FL_P | FL_RW | FL_US)
        i = 0
        while i < npages:
            v = va + i * PAGE_SIZE
            k = min(npages - i, 512 - table_index(v, 1))
            ea = self.entry_addr(v, 1)
            q[ea >> 3 : (ea >> 3) + k] = (gpas[i : i + k] << np.uint64(PAGE_SHIFT)) | bits
            i += k
        return [int(g) for g in gpas]

    def set_entry(self, va: int, value: int, level: int = 1) -> None:
        self.host.q[self.entry_addr(va, level) >> 3] = value

    def get_entry(self, va: int, level: int = 1) -> int:
        ea = self.entry_addr(va, level, create=False)
        return 0 if ea is None else int(self.host.q[ea >> 3])

    def unmap(self, va: int) -> None:
        self.set_entry(va, 0, 1)

    def va_to_gpa(self, va: int) -> int | None:
        q = self.host.q
        table_gpa = self.cr3
        for lvl in (4, 3, 2, 1):
            hpa = self.vm.gpa_to_hpa(table_gpa)
            if hpa is None:
                return None
            e = int(q[(hpa + table_index(va, lvl) * 8) >> 3])
            if not e & FL_P:
                return None
            if lvl == 1 or (lvl <= 3 and e & FL_PS):
                mask = (1 << (PAGE_SHIFT + 9 * (lvl - 1))) - 1
                return (e & ADDR_MASK & ~mask) | (va & mask)
            table_gpa = e & ADDR_MASK
        return None

    def va_to_hpa(self, va: int) -> int | None:
        g = self.va_to_gpa(va)
        return None if g is None else self.vm.gpa_to_hpa(g)

    def read(self, va: int, n: int) -> bytes:
        """Read through the process's own tables (as the guest CPU would)."""
        out = bytearray()
        while n:
            k = min(n, PAGE_SIZE - (va & (PAGE_SIZE - 1)))
            h = self.va_to_hpa(va)
            if h is None:
                raise ValueError(f"VA {va:#x} not mapped")
            out += self.host.mem[h : h + k]
            va += k
            n -= k
        return bytes(out)

    def write(self, va: int, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            k = min(len(data) - pos, PAGE_SIZE - (va & (PAGE_SIZE - 1)))
            h = self.va_to_hpa(va)
            if h is None:
                raise ValueError(f"VA {va:#x} not mapped")
            self.host.mem[h : h + k] = data[pos : pos + k]
            va += k
            pos += k


def make_pasid_dir(host: HostMemory) -> int:
    """A zeroed PASID directory (PASID_DIR_FRAMES contiguous host frames); returns its HPA."""
    return host.alloc_contig(PASID_DIR_FRAMES, owner=0) << PAGE_SHIFT


def install_pasid(
    host: HostMemory,
    dir_hpa: int,
    pasid: int,
    *,
    flptr: int,
    slptr: int,
    did: int,
    sre: bool = False,
    wpe: bool = False,
    eafe: bool = True,
) -> int:
    """Write a nested PASID entry (allocating the PASID table if needed); return its HPA."""
    q = host.q
    pde_addr = dir_hpa + (pasid >> 6) * 8
    pde = int(q[pde_addr >> 3])
    if not pde & PDE_PRESENT:
        pde = (host.alloc(owner=0) << PAGE_SHIFT) | PDE_PRESENT
        q[pde_addr >> 3] = pde
    pe = (pde & ADDR_MASK) + (pasid & 63) * PASID_ENTRY_SIZE
    words = encode_pasid_entry(flptr=flptr, slptr=slptr, did=did, sre=sre, wpe=wpe, eafe=eafe)
    q[pe >> 3 : (pe >> 3) + 8] = np.array(words, dtype=np.uint64)
    return pe


def clear_pasid(host: HostMemory, dir_hpa: int, pasid: int) -> None:
    """Clear a PASID entry's present bit (and the whole entry)."""
    pde = host.read_u64(dir_hpa + (pasid >> 6) * 8)
    if pde & PDE_PRESENT:
        pe = (pde & ADDR_MASK) + (pasid & 63) * PASID_ENTRY_SIZE
        host.q[pe >> 3 : (pe >> 3) + 8] = 0
