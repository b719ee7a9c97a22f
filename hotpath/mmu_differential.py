"""The first-level walk checked against an x86-64 MMU that no one on this project wrote.

The reference is unicorn (QEMU's TCG CPU emulator, with QEMU's own x86-64 page walker). One
random world is a set of first-level tables written with the project's own writer
(actors.memory.RadixTable: 4 KiB, 2 MiB and 1 GiB pages, random R/W, U/S, XD, A, D bits on
every level, non-present entries, reserved bits now and then) in a flat memory that is both
unicorn's physical memory and the project's guest-physical memory (the second level maps GPA
= HPA with one 1 GiB page, so the first level's output address is compared directly). The
same access then runs on both sides:

* project: ``Iommu.translate_one`` on a PASID entry with SRE (supervisor requests allowed),
  WPE as the world says, EAFE clear (bit 10 is not an x86 bit);
* unicorn, in 64-bit mode with CR0.PG|PE, CR4.PAE, EFER.LME|NXE, CR0.WP = WPE, CR4.SMEP = 1
  and CR4.SMAP = 0, which is how VT-d 3.6.1 treats supervisor requests (see
  hotpath._pure._rights_fault): a user access runs at CPL 3 (entered with iretq), a
  supervisor access at CPL 0; a read is ``mov rax, [rbx]``, a write ``mov [rbx], rax``, an
  execute the fetch of one instruction at the address.

Compared per access: fault or not; the fault kind (#GP for a non-canonical address <->
FAULT_NON_CANONICAL; #PF error code P=0 <-> FL_NOT_PRESENT, RSVD <-> FL_RESERVED, else
FL_PERMISSION); the physical address (every 8-byte word of the data pages starts with
``mov eax, imm32`` whose immediate is its own address / 8, so a read returns and a fetch
executes its address); and every first-level entry's bytes afterwards (the A and D bits).
Two modes: "fresh" restores the tables and empties the project's IOTLB before each access;
"cached" runs a sequence on one world through the IOTLB and the device TLB while unicorn
flushes its TLB every time, so a cached permission must answer as a fresh walk would.

unicorn exposes no register for the #PF error code: it is read from unicorn's saved CPU
context at an offset found at start-up by three page faults whose error codes x86 defines
(supervisor read, user write and supervisor fetch of a non-present page); start-up fails if
that offset is not unique. A fault's level is not compared (x86 does not report it).
"""

from __future__ import annotations

import ctypes
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from vsva.actors.memory import FL_LINK, FrameAllocator, PasidDirectory, PhysMem, RadixTable
from vsva.hotpath.api import IommuApi, IommuFactory
from vsva.hotpath.layout import (
    ACCESS_EXEC,
    ACCESS_PRIV,
    ACCESS_READ,
    ACCESS_WRITE,
    ADDR_MASK,
    FAULT_FL_NOT_PRESENT,
    FAULT_FL_PERMISSION,
    FAULT_FL_RESERVED,
    FAULT_NON_CANONICAL,
    FL_A,
    FL_D,
    FL_P,
    FL_PAT_LARGE,
    FL_PS,
    FL_RSVD_ADDR,
    FL_RW,
    FL_US,
    FL_XD,
    PAGE_SHIFT,
    PAGE_SIZE,
    PASID_DIR_FRAMES,
    SL_PS,
    SL_R,
    SL_W,
    SL_X,
    describe_fault,
    encode_pasid_entry,
    fault_reason,
    is_canonical,
    table_index,
)

if TYPE_CHECKING:
    from unicorn import Uc  # imported only where the reference runs (an optional dependency)

MEM_FRAMES = 2048  # 8 MiB of flat memory
TABLE_FRAMES = range(1, 512)  # the random first-level tables (compared after every access)
HARNESS_FRAMES = range(512, 600)  # code, GDT, stack and their tables (PML4 slot 1)
PROJECT_FRAMES = range(600, 1024)  # second level, PASID directory and table (project only)
DATA_BASE = 1024 << PAGE_SHIFT  # data pages: 4 MiB, two 2 MiB-aligned bases
DATA_END = MEM_FRAMES << PAGE_SHIFT
HARNESS_VA = 1 << 39  # PML4 slot 1; the random mappings avoid it
UNMAPPED_VA = 2 << 39  # PML4 slot 2 stays empty (the reference's calibration faults there)
PASID = 1
DID = 1
MARK = 0x5A5A_5A5A_5A5A_5A5A  # the value a write stores

# Access kinds: (name, project access bits, CPL 3?)
KINDS = (
    ("user-read", ACCESS_READ, True),
    ("user-write", ACCESS_WRITE, True),
    ("user-exec", ACCESS_READ | ACCESS_EXEC, True),
    ("sup-read", ACCESS_READ | ACCESS_PRIV, False),
    ("sup-write", ACCESS_WRITE | ACCESS_PRIV, False),
    ("sup-exec", ACCESS_READ | ACCESS_EXEC | ACCESS_PRIV, False),
)

PF_P, PF_RSVD = 1 << 0, 1 << 3  # x86 #PF error code bits
X86_GP, X86_PF = 13, 14


# Every 8-byte word of the data pages: mov eax, pa >> 3; jmp +1; nop. The jump ends the
# emulator's translation block inside the word: without it the translator reads ahead into
# the next page and a fetch of the last word of a page faults on the page after it.
DATA_TAIL = 0x9001EB << 40


def data_word(pa: int) -> int:
    """The 8 bytes at data address pa (see DATA_TAIL)."""
    return 0xB8 | ((pa >> 3) << 8) | DATA_TAIL


@dataclass
class Outcome:
    """What one side made of one access: ("ok", pa) or ("fault", kind)."""

    status: str
    value: int | str

    def __str__(self) -> str:
        return f"{self.status}:{self.value:#x}" if self.status == "ok" else f"fault:{self.value}"


@dataclass
class Difference:
    mode: str
    kind: str
    va: int
    project: str
    reference: str
    entries: list[tuple[int, int, int]] = field(default_factory=list)  # (addr, project, ref)

    def __str__(self) -> str:
        s = f"[{self.mode}] {self.kind} va={self.va:#x}: project {self.project}, unicorn {self.reference}"
        for addr, a, b in self.entries[:4]:
            s += f"\n    entry {addr:#x}: project {a:#018x} unicorn {b:#018x}"
        return s


def _project_outcome(pa: int, fault: int) -> Outcome:
    if not fault:
        return Outcome("ok", pa)
    reason = fault_reason(fault)
    kinds = {
        FAULT_NON_CANONICAL: "non-canonical",
        FAULT_FL_NOT_PRESENT: "not-present",
        FAULT_FL_RESERVED: "reserved",
        FAULT_FL_PERMISSION: "permission",
    }
    return Outcome("fault", kinds.get(reason, describe_fault(fault)))


class World:
    """One random set of first-level tables in a flat memory, and the project's IOMMU on it."""

    def __init__(self, rng: random.Random, iommu_cls: IommuFactory, *, wpe: bool, maps: int = 24):
        self.rng = rng
        self.wpe = wpe
        self.phys = PhysMem(bytearray(MEM_FRAMES * PAGE_SIZE))
        self.q = np.frombuffer(self.phys.buf, dtype="<u8")
        pa = np.arange(DATA_BASE, DATA_END, 8, dtype=np.uint64)
        self.q[DATA_BASE // 8 :] = (
            np.uint64(0xB8) | ((pa >> np.uint64(3)) << np.uint64(8)) | np.uint64(DATA_TAIL)
        )
        self.tables = FrameAllocator(reversed(TABLE_FRAMES))
        harness = FrameAllocator(reversed(HARNESS_FRAMES))
        project = FrameAllocator(reversed(PROJECT_FRAMES))
        self.fl = RadixTable(
            self.phys, self._table(self.tables), lambda: self._table(self.tables), link=FL_LINK, present=FL_P
        )
        self.harness = Harness.build(self.phys, self.fl.root, lambda: self._table(harness))
        slot = self.fl.root + 8 * table_index(HARNESS_VA, 4)  # A set: the CPU sets it anyway
        self.phys.write_u64(slot, self.phys.read_u64(slot) | FL_A)
        self.mapped: list[tuple[int, int]] = []  # (va of the page, page size)
        self._map_random(maps)
        self._randomise_upper_levels()
        self.levels = self._table_levels()
        self.span = slice(
            TABLE_FRAMES.start * PAGE_SIZE, (TABLE_FRAMES.start + len(self.tables.used)) * PAGE_SIZE
        )
        # second level: GPA = HPA (one 1 GiB page); PASID directory and entry
        sl = RadixTable(
            self.phys,
            self._table(project),
            lambda: self._table(project),
            link=SL_R | SL_W | SL_X,
            present=SL_R | SL_W | SL_X,
        )
        sl.map(0, 0, SL_R | SL_W | SL_X | SL_PS, level=3)
        dir_frames = [project.alloc() for _ in range(PASID_DIR_FRAMES)]
        dir_base = min(dir_frames) << PAGE_SHIFT
        if max(dir_frames) - min(dir_frames) != PASID_DIR_FRAMES - 1:
            raise AssertionError("PASID directory frames not contiguous")
        PasidDirectory(self.phys, dir_base, lambda: self._table(project)).write_entry(
            PASID,
            encode_pasid_entry(flptr=self.fl.root, slptr=sl.root, did=DID, sre=True, wpe=wpe, eafe=False),
        )
        self.template = bytes(self.phys.buf)
        owners = np.full(MEM_FRAMES, DID, dtype=np.int32)
        self.iommu: IommuApi = iommu_cls(self.phys.buf, owners)
        self.iommu.attach_device(0, dir_base, ats=False)  # fresh mode: IOTLB emptied each time
        self.iommu.attach_device(1, dir_base, ats=True)  # cached mode: IOTLB + device TLB

    def _table(self, alloc: FrameAllocator) -> int:
        frame = alloc.alloc()
        self.phys.zero_frame(frame)
        return frame << PAGE_SHIFT

    # ------------------------------------------------------------------ random tables
    def _random_va(self) -> int:
        while True:
            slot = self.rng.randrange(512)
            if slot not in (table_index(HARNESS_VA, 4), table_index(UNMAPPED_VA, 4)):
                break
        va = (slot << 39) | (self.rng.getrandbits(39) & ~(PAGE_SIZE - 1))
        return va | (0xFFFF << 48) if slot >= 256 else va

    def _map_random(self, n: int) -> None:
        """n leaves of random sizes; a large page never sits where a table already is."""
        taken: dict[int, set[int]] = {1: set(), 2: set(), 3: set()}  # prefixes per leaf level
        rng = self.rng
        while len(self.mapped) < n:
            level = rng.choices((1, 2, 3), (6, 3, 1))[0]
            va = self._random_va()
            size = 1 << (PAGE_SHIFT + 9 * (level - 1))
            va &= ~(size - 1)
            pfx = {lvl: va >> (PAGE_SHIFT + 9 * lvl) for lvl in (1, 2, 3)}  # table prefixes
            if level == 3 and (pfx[3] in taken[2] | taken[1] or va >> 30 in taken[3]):
                continue
            if level == 2 and (pfx[2] in taken[1] or pfx[3] in taken[3] or va >> 21 in taken[2]):
                continue
            if level == 1 and (pfx[2] in taken[2] or pfx[3] in taken[3]):
                continue
            if level == 1:
                taken[1].add(pfx[1])
                taken[1].add(pfx[2])
                taken[1].add(pfx[3])
            elif level == 2:
                taken[2].add(va >> 21)
                taken[2].add(pfx[3])
            else:
                taken[3].add(va >> 30)
            target, flags = self._random_leaf(level)
            self.fl.map(va, target, flags, level=level)
            self.mapped.append((va, size))
        self.huge = {va >> 30 for va, size in self.mapped if size == 1 << 30}

    def _random_leaf(self, level: int) -> tuple[int, int]:
        rng = self.rng
        if level == 1:
            target = rng.randrange(DATA_BASE, DATA_END, PAGE_SIZE)
        elif level == 2:
            target = rng.randrange(DATA_BASE, DATA_END, 1 << 21)
        else:
            target = 0  # the one 1 GiB frame holding the memory; accesses land in the data
        flags = FL_P if rng.random() < 0.92 else 0
        for bit, p in ((FL_RW, 0.7), (FL_US, 0.7), (FL_XD, 0.3), (FL_A, 0.3), (FL_D, 0.3)):
            flags |= bit if rng.random() < p else 0
        if level > 1:
            flags |= FL_PS | (FL_PAT_LARGE if rng.random() < 0.2 else 0)
            if rng.random() < 0.08:  # a non-zero alignment bit of the large page's address
                flags |= 1 << rng.randrange(PAGE_SHIFT + 1, PAGE_SHIFT + 9 * (level - 1))
        if rng.random() < 0.04:
            flags |= 1 << rng.randrange(48, 52)  # beyond the modelled address width
        return target, flags

    def _randomise_upper_levels(self) -> None:
        """Random R/W, U/S, XD, A, D on every non-leaf entry; some not present; now and then
        PS in a PML4E or an address bit above the modelled width (reserved)."""
        rng = self.rng
        harness_slot = table_index(HARNESS_VA, 4)
        stack = [(self.fl.root, 4)]
        while stack:
            table, level = stack.pop()
            for i in range(512):
                addr = table + 8 * i
                e = self.phys.read_u64(addr)
                if not e & FL_P or (level == 4 and i == harness_slot):
                    continue
                if level == 1 or (level <= 3 and e & FL_PS):
                    continue
                stack.append((e & ADDR_MASK, level - 1))
                e &= ADDR_MASK
                e |= FL_P if rng.random() < 0.95 else 0
                for bit, p in ((FL_RW, 0.85), (FL_US, 0.85), (FL_XD, 0.12), (FL_A, 0.5), (FL_D, 0.2)):
                    e |= bit if rng.random() < p else 0
                if level == 4 and rng.random() < 0.03:
                    e |= FL_PS
                if rng.random() < 0.02:
                    e |= 1 << rng.randrange(48, 52)
                self.phys.write_u64(addr, e)

    def _table_levels(self) -> dict[int, int]:
        """Table frame -> its level (4 = PML4), for naming the entries that differ."""
        levels, stack = {}, [(self.fl.root, 4)]
        while stack:
            table, level = stack.pop()
            levels[table >> PAGE_SHIFT] = level
            if level == 1:
                continue
            for i in range(512):
                e = self.phys.read_u64(table + 8 * i)
                if e & FL_P and not (level <= 3 and e & FL_PS) and not e & FL_RSVD_ADDR:
                    stack.append((e & ADDR_MASK, level - 1))
        return levels

    def random_va(self) -> int:
        """Mostly an 8-aligned address in a mapped page, sometimes anywhere, sometimes not
        canonical."""
        rng = self.rng
        r = rng.random()
        if r < 0.08:
            va = rng.getrandbits(64) & ~7
            return va if not is_canonical(va) else va ^ (1 << 50)
        if r < 0.18:
            va, size = self._random_va() | rng.randrange(0, PAGE_SIZE - 8, 8), PAGE_SIZE
        else:
            va, size = rng.choice(self.mapped)
            va |= rng.randrange(0, size - 8, 8)
        if (va >> 30) in self.huge:  # keep the physical address in the data pages
            va = (va & ~((1 << 30) - 1)) | rng.randrange(DATA_BASE, DATA_END - 8, 8)
        return va

    def restore(self) -> None:
        """The tables as built (no A/D bits from earlier accesses)."""
        self.phys.buf[self.span] = self.template[self.span]

    def table_words(self) -> np.ndarray:
        return self.q[self.span.start // 8 : self.span.stop // 8]


@dataclass
class Harness:
    """Where the CPU side's code, GDT and stack live (PML4 slot 1, harness frames)."""

    kread: int
    kwrite: int
    kiret: int
    uread: int
    uwrite: int
    gdt: int
    stack: int  # VA of the stack page
    stack_pa: int

    GDT = (0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, 0x00AFFB000000FFFF, 0x00CFF3000000FFFF)
    KCODE, KDATA, UCODE, UDATA = 0x08, 0x10, 0x1B, 0x23

    @classmethod
    def build(cls, phys: PhysMem, root: int, alloc_table: Callable[[], int]) -> Harness:
        """Map the harness pages with the project's writer (their own tables)."""
        rt = RadixTable(phys, root, alloc_table, link=FL_LINK, present=FL_P)
        pages = {}
        code = {
            "kread": (b"\x48\x8b\x03", False),
            "kwrite": (b"\x48\x89\x03", False),
            "kiret": (b"\x48\xcf", False),
            "uread": (b"\x48\x8b\x03", True),
            "uwrite": (b"\x48\x89\x03", True),
        }
        for i, (name, (insn, user)) in enumerate(code.items()):
            pa = alloc_table()
            phys.write(pa, insn + b"\xf4")
            va = HARNESS_VA + i * PAGE_SIZE
            rt.map(va, pa, FL_P | FL_RW | (FL_US if user else 0))
            pages[name] = va
        gdt_pa = alloc_table()
        phys.write(gdt_pa, b"".join(struct.pack("<Q", d) for d in cls.GDT))
        rt.map(HARNESS_VA + 8 * PAGE_SIZE, gdt_pa, FL_P | FL_RW)
        stack_pa = alloc_table()
        rt.map(HARNESS_VA + 9 * PAGE_SIZE, stack_pa, FL_P | FL_RW | FL_US)
        return cls(
            gdt=HARNESS_VA + 8 * PAGE_SIZE, stack=HARNESS_VA + 9 * PAGE_SIZE, stack_pa=stack_pa, **pages
        )


class Reference:
    """unicorn's x86-64 CPU with paging on, running one access at a time."""

    def __init__(self) -> None:
        import unicorn
        from unicorn import x86_const as x

        self.uc_mod, self.x = unicorn, x
        self.mu = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
        self.mu.mem_map(0, MEM_FRAMES * PAGE_SIZE)
        self.fault: tuple[int, int] | None = None
        self.mu.hook_add(unicorn.UC_HOOK_INTR, self._on_interrupt)
        self.err_offset: int | None = None
        self.pristine = self.mu.context_save()  # before any exception: none pending
        self.clean = self.pristine

    def _on_interrupt(self, uc: Uc, intno: int, _data: object) -> None:
        self.fault = (intno, self._error_code() if intno == X86_PF else 0)
        self.cr2 = uc.reg_read(self.x.UC_X86_REG_CR2)
        uc.emu_stop()

    def _error_code(self) -> int:
        if self.err_offset is None:
            return -1
        ctx = self.mu.context_save()
        raw = ctypes.string_at(ctx.context, ctx.size)
        return int.from_bytes(raw[self.err_offset : self.err_offset + 4], "little")

    def load(self, world: World) -> None:
        """Memory, control registers (WP = the world's WPE), GDT; CPL 0."""
        x, mu = self.x, self.mu
        mu.context_restore(self.pristine)
        mu.mem_write(0, world.template)
        mu.reg_write(x.UC_X86_REG_CR3, world.fl.root)
        mu.reg_write(x.UC_X86_REG_MSR, (0xC0000080, (1 << 8) | (1 << 10) | (1 << 11)))  # LME LMA NXE
        mu.reg_write(x.UC_X86_REG_CR4, (1 << 5) | (1 << 20))  # PAE, SMEP; SMAP clear
        mu.reg_write(x.UC_X86_REG_CR0, (1 << 31) | (1 << 16 if world.wpe else 0) | 1)
        mu.reg_write(x.UC_X86_REG_GDTR, (0, world.harness.gdt, len(Harness.GDT) * 8 - 1, 0))
        mu.reg_write(x.UC_X86_REG_CS, Harness.KCODE)
        mu.reg_write(x.UC_X86_REG_SS, Harness.KDATA)
        self.clean = mu.context_save()
        self.world = world

    def calibrate(self, world: World) -> None:
        """Find env->error_code in the saved context: three page faults with known codes."""
        unmapped = UNMAPPED_VA
        cases = (
            (ACCESS_READ | ACCESS_PRIV, False, 0x0),
            (ACCESS_WRITE, True, 0x6),
            (ACCESS_READ | ACCESS_EXEC | ACCESS_PRIV, False, 0x10),
        )
        candidates = None
        for access, user, code in cases:
            self.run(access, user, unmapped)
            if self.fault is None or self.fault[0] != X86_PF:
                raise RuntimeError(f"calibration access did not page-fault: {self.fault}")
            ctx = self.mu.context_save()
            raw = ctypes.string_at(ctx.context, ctx.size)
            found = {i for i in range(0, len(raw) - 4, 4) if int.from_bytes(raw[i : i + 4], "little") == code}
            candidates = found if candidates is None else candidates & found
        if not candidates or len(candidates) != 1:
            raise RuntimeError(f"cannot locate the #PF error code in unicorn's context: {candidates}")
        self.err_offset = candidates.pop()

    def run(self, access: int, user: bool, va: int) -> None:
        """One access from a clean CPU state with an empty TLB (CR3 reload)."""
        x, mu, h = self.x, self.mu, self.world.harness
        mu.context_restore(self.clean)
        mu.reg_write(x.UC_X86_REG_CR3, self.world.fl.root)
        mu.reg_write(x.UC_X86_REG_RBX, va)
        mu.reg_write(x.UC_X86_REG_RAX, MARK)
        self.fault = None
        exe, write = access & ACCESS_EXEC, access & ACCESS_WRITE
        try:
            if user:
                rip = va if exe else (h.uwrite if write else h.uread)
                frame = struct.pack(
                    "<5Q", rip & (1 << 64) - 1, Harness.UCODE, 0x2, h.stack + 0x800, Harness.UDATA
                )
                mu.mem_write(h.stack_pa + 0xF00, frame)
                mu.reg_write(x.UC_X86_REG_RSP, h.stack + 0xF00)
                mu.emu_start(h.kiret, 0, count=2)
            elif exe:
                mu.emu_start(va, 0, count=1)
            else:
                mu.emu_start(h.kwrite if write else h.kread, 0, count=1)
        except self.uc_mod.UcError as e:
            if self.fault is None:
                self.fault = (-1, e.errno)

    def outcome(self, access: int, user: bool, va: int, expect_pa: int | None) -> Outcome:
        self.run(access, user, va)
        if self.fault is not None:
            intno, code = self.fault
            if intno == X86_GP:
                return Outcome("fault", "non-canonical")
            if intno != X86_PF:
                return Outcome("fault", f"x86-exception-{intno}")
            if not code & PF_P:
                return Outcome("fault", "not-present")
            return Outcome("fault", "reserved" if code & PF_RSVD else "permission")
        x, mu = self.x, self.mu
        if access & ACCESS_EXEC:
            return Outcome("ok", (mu.reg_read(x.UC_X86_REG_RAX) & 0xFFFFFFFF) << 3)
        if access & ACCESS_WRITE:
            return Outcome("ok", self._written_pa(expect_pa))
        rax = mu.reg_read(x.UC_X86_REG_RAX)
        pa = ((rax >> 8) & 0xFFFFFFFF) << 3
        return Outcome("ok", pa if rax == data_word(pa) else -1)

    def _written_pa(self, expect_pa: int | None) -> int:
        """Where the write went: the expected word if it holds MARK, else a search; the word
        gets its data back."""
        mu = self.mu
        if (
            expect_pa is not None
            and DATA_BASE <= expect_pa < DATA_END
            and struct.unpack("<Q", mu.mem_read(expect_pa, 8))[0] == MARK
        ):
            pa = expect_pa
        else:
            data = np.frombuffer(bytes(mu.mem_read(DATA_BASE, DATA_END - DATA_BASE)), "<u8")
            hits = np.flatnonzero(data == np.uint64(MARK))
            if len(hits) != 1:
                return -1
            pa = DATA_BASE + 8 * int(hits[0])
        mu.mem_write(pa, struct.pack("<Q", data_word(pa)))
        return pa

    def table_words(self) -> np.ndarray:
        span = self.world.span
        return np.frombuffer(bytes(self.mu.mem_read(span.start, span.stop - span.start)), "<u8")

    def restore_tables(self) -> None:
        span = self.world.span
        self.mu.mem_write(span.start, self.world.template[span])


def _entry_differences(world: World, ref: Reference) -> list[tuple[int, int, int]]:
    a, b = world.table_words(), ref.table_words()
    idx = np.flatnonzero(a != b)
    base = world.span.start
    return [(base + 8 * int(i), int(a[i]), int(b[i])) for i in idx]


def reference_quirk(world: World, d: Difference) -> str | None:
    """The name of a documented difference that `d` is, or None.

    "1gib-leaf-accessed": QEMU's walker sets A in a PDPTE as soon as it reads it, before it
    knows the entry is a 1 GiB leaf whose rights or reserved bits refuse the access; for a
    4 KiB or 2 MiB leaf the same walker sets A only for a permitted access. The project
    applies the second rule to every page size (VT-d 3.6.2: A/D record use of a
    translation; a refused access is no use), so after a refused access through a 1 GiB
    leaf the reference has A set in that leaf and the project does not.
    """
    if d.project != d.reference or not d.project.startswith("fault:") or len(d.entries) != 1:
        return None
    addr, mine, theirs = d.entries[0]
    if mine ^ theirs == FL_A and theirs & FL_PS and world.levels.get(addr >> PAGE_SHIFT) == 3:
        return "1gib-leaf-accessed"
    return None


@dataclass
class Report:
    cases: int = 0
    worlds: int = 0
    differences: list[Difference] = field(default_factory=list)  # unexplained
    documented: dict[str, int] = field(default_factory=dict)  # reference_quirk name -> count
    by_outcome: dict[str, int] = field(default_factory=dict)


def run(
    iommu_cls: IommuFactory,
    *,
    seed: int,
    worlds: int,
    accesses: int,
    report: Report | None = None,
    reference: Reference | None = None,
) -> Report:
    """`worlds` random worlds, `accesses` fresh and `accesses` cached accesses on each."""
    rng = random.Random(seed)
    report = report or Report()
    ref = reference or Reference()
    for _ in range(worlds):
        world = World(rng, iommu_cls, wpe=rng.random() < 0.5)
        ref.load(world)
        if ref.err_offset is None:
            ref.calibrate(world)
        report.worlds += 1
        for mode in ("fresh", "cached"):
            world.restore()
            ref.restore_tables()
            world.iommu.inv_iotlb("global")
            world.iommu.inv_devtlb(1)
            for _ in range(accesses):
                name, access, user = rng.choice(KINDS)
                va = world.random_va()
                if mode == "fresh":
                    world.restore()
                    ref.restore_tables()
                    world.iommu.inv_iotlb("global")
                    pa, fault = world.iommu.translate_one(0, PASID, va, access)
                else:
                    pa, fault = world.iommu.translate_one(1, PASID, va, access)
                mine = _project_outcome(pa, fault)
                theirs = ref.outcome(access, user, va, pa if not fault else None)
                entries = _entry_differences(world, ref)
                report.cases += 1
                key = f"{name} {mine}" if mine.status == "fault" else f"{name} ok"
                report.by_outcome[key] = report.by_outcome.get(key, 0) + 1
                if (mine.status, mine.value) != (theirs.status, theirs.value) or entries:
                    d = Difference(mode, name, va, str(mine), str(theirs), entries)
                    quirk = reference_quirk(world, d)
                    if quirk:
                        report.documented[quirk] = report.documented.get(quirk, 0) + 1
                    else:
                        report.differences.append(d)
                    # go on from the reference's view of the tables
                    world.table_words()[:] = ref.table_words()
                    world.iommu.inv_iotlb("global")
                    world.iommu.inv_devtlb(1)
    return report
