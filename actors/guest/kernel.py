"""The guest kernel's memory management: processes, their first-level page tables in guest
RAM, the page allocator, CPU reads and writes, and the page-fault handler a device's page
request ends in (handle_mm_fault)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vsva.actors.memory import FL_LINK, FL_PRESENT, FrameAllocator, GuestRam, RadixTable
from vsva.actors.uapi import IOMMU_PAGE_RESP_FAILURE, IOMMU_PAGE_RESP_INVALID, IOMMU_PAGE_RESP_SUCCESS
from vsva.hotpath.layout import ADDR_MASK, FL_P, FL_RW, FL_US, PAGE_SHIFT, PAGE_SIZE, PASID_DIR_FRAMES


def reserved_frames(directories: int) -> int:
    """The low guest frames kept for `directories` PASID directories: frame 0 (unused) and
    PASID_DIR_FRAMES contiguous frames for each."""
    return 1 + directories * PASID_DIR_FRAMES


@dataclass
class Process:
    """A guest process: its mm (CR3 and first-level tables) and what it holds."""

    pid: int
    pt: RadixTable
    pasids: dict[str, int] = field(default_factory=dict)  # dev -> guest PASID
    vmas: list[tuple[int, int, bool]] = field(default_factory=list)  # (start, end, writable)

    @property
    def cr3(self) -> int:
        return self.pt.root

    def find_vma(self, va: int) -> tuple[int, int, bool] | None:
        return next((v for v in self.vmas if v[0] <= va < v[1]), None)


class GuestKernel:
    """Guest memory management: the page allocator, process address spaces, CPU accesses."""

    def __init__(self, ram: GuestRam, directories: int):
        """`directories`: how many PASID directories the guest will program (one per device
        of the VM). Their guest-contiguous frames are kept at the bottom of RAM (frame 0
        left unused), sized for exactly that many, so any number of devices fits a RAM of
        reserved_frames(directories) plus what the workload maps."""
        self.ram = ram
        self.contiguous_end = reserved_frames(directories)
        self.pages = FrameAllocator(range(len(ram.frames) - 1, self.contiguous_end - 1, -1))
        self.contiguous_next = 1  # low GPA frames are kept for PASID directories
        self.procs: dict[int, Process] = {}

    def alloc_page(self) -> int:
        """A zeroed guest page; returns its GPA."""
        gfn = self.pages.alloc()
        self.ram.zero_frame(gfn)
        return gfn << PAGE_SHIFT

    def alloc_contiguous(self, count: int) -> int:
        """`count` guest-contiguous pages (a PASID directory); returns the GPA of the first."""
        first = self.contiguous_next
        if first + count > self.contiguous_end:
            raise MemoryError("no room for another PASID directory")
        self.contiguous_next += count
        for gfn in range(first, first + count):
            self.ram.zero_frame(gfn)
        return first << PAGE_SHIFT

    def spawn(self, pid: int) -> Process:
        proc = Process(
            pid, RadixTable(self.ram, self.alloc_page(), self.alloc_page, link=FL_LINK, present=FL_PRESENT)
        )
        self.procs[pid] = proc
        return proc

    def mmap(self, proc: Process, va: int, pages: int, populate: bool = True, writable: bool = True) -> None:
        """Map anonymous memory (a VMA); with populate, every page gets a frame now (MAP_POPULATE),
        without it the pages stay non-present until a CPU or device (F6) fault."""
        proc.vmas.append((va, va + pages * PAGE_SIZE, writable))
        if populate:
            for i in range(pages):
                proc.pt.map(va + i * PAGE_SIZE, self.alloc_page(), FL_P | FL_RW | FL_US)

    def fault_in(self, proc: Process, va: int, write: bool) -> int:
        """handle_mm_fault() for a device's page request: a page response code."""
        vma = proc.find_vma(va)
        if vma is None or write and not vma[2]:
            return IOMMU_PAGE_RESP_INVALID  # outside every VMA, or a write to a read-only one
        page, entry = va & ~(PAGE_SIZE - 1), proc.pt.lookup(va)
        flags = FL_P | FL_US | (FL_RW if vma[2] else 0)
        if entry & FL_P:  # present: a write to a write-protected page the VMA allows (COW-like)
            proc.pt.map(page, entry & ADDR_MASK, flags)
            return IOMMU_PAGE_RESP_SUCCESS
        try:
            proc.pt.map(page, self.alloc_page(), flags)
        except MemoryError:
            return IOMMU_PAGE_RESP_FAILURE
        return IOMMU_PAGE_RESP_SUCCESS

    def migrate(self, proc: Process, va: int) -> tuple[int, int]:
        """Move one page to a new frame (page migration): copy, then switch the PTE."""
        old = proc.pt.lookup(va) & ADDR_MASK
        new = self.alloc_page()
        self.ram.write(new, self.ram.read(old, PAGE_SIZE))
        proc.pt.map(va, new, FL_P | FL_RW | FL_US)
        return old, new

    def gpa(self, proc: Process, va: int) -> int:
        entry = proc.pt.lookup(va)
        if not entry & FL_P:
            raise MemoryError(f"pid {proc.pid}: segfault at {va:#x}")
        return (entry & ADDR_MASK) | (va & (PAGE_SIZE - 1))

    def read(self, proc: Process, va: int, length: int) -> bytes:
        """What the process reads at `va` (the CPU walks the same first-level tables)."""
        out = bytearray()
        while length:
            n = min(length, PAGE_SIZE - (va & (PAGE_SIZE - 1)))
            out += self.ram.read(self.gpa(proc, va), n)
            va, length = va + n, length - n
        return bytes(out)

    def write(self, proc: Process, va: int, data: bytes) -> None:
        offset = 0
        while offset < len(data):
            n = min(len(data) - offset, PAGE_SIZE - (va & (PAGE_SIZE - 1)))
            self.ram.write(self.gpa(proc, va), data[offset : offset + n])
            va, offset = va + n, offset + n
