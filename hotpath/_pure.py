"""Pure-Python twin of the compiled DMA translation hot path (hotpath/_translate.pyx).

Both implementations have the same semantics, bit for bit: same results, fault codes,
counters, cache contents and cache replacement decisions. The differential tests in
tests/hotpath/ check that. This module favours clarity; speed lives in the .pyx.

Model summary (see the package docstring of hotpath for the full conventions):

* ``mem`` is host physical memory (a writable buffer), ``owners`` an int32 array with the
  owning VM of each 4 KiB frame (0 = host). The domain id of a PASID entry is the VM id, so a
  translation whose final frame is not owned by the entry's DID fails with FAULT_OWNER (I1).
* Translation order for one request (dev, pasid, va, access):
  device attached? -> PASID < 2^20? -> PASID defunct? -> va canonical? -> device TLB (ATS)
  -> PASID cache (fill by reading directory + table: ``pasid_refs``) -> supervisor request
  without SRE? -> IOTLB -> nested walk (``memory_refs``) -> owner check -> fills.
* Caches are set-associative (ways 1, 2, 4 or 8) with tree-PLRU replacement
  inside a set (see _Cache); a fill takes the lowest-numbered invalid way, else the PLRU
  victim (an eviction). A fill whose tag is already present overwrites that way.
  Set index = ((key * 0x9E3779B97F4A7C15) mod 2^64 >> 32) & (sets - 1).
* A cached translation serves a request only if its stored permissions cover the request
  (layout.required_perms); otherwise the request counts as a miss, walks, and the fill
  overwrites the entry. The owner check runs on every translation, hits included.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeAlias, TypedDict, TypeVar

import numpy as np
from numpy.typing import NDArray

from vsva.hotpath.layout import (
    ACCESS_EXEC,
    ACCESS_PRIV,
    ACCESS_READ,
    ACCESS_WRITE,
    ADDR_MASK,
    AW_48,
    COUNTER_NAMES,
    FAULT_BAD_PASID_ENTRY,
    FAULT_DEFUNCT,
    FAULT_FL_NOT_PRESENT,
    FAULT_FL_PERMISSION,
    FAULT_FL_RESERVED,
    FAULT_NAMES,
    FAULT_NO_CONTEXT,
    FAULT_NON_CANONICAL,
    FAULT_OOR_ADDRESS,
    FAULT_OWNER,
    FAULT_PASID_INVALID,
    FAULT_PDE_NOT_PRESENT,
    FAULT_PE_NOT_PRESENT,
    FAULT_SL_NOT_PRESENT,
    FAULT_SL_PERMISSION,
    FL_A,
    FL_D,
    FL_EA,
    FL_P,
    FL_PAT_LARGE,
    FL_PS,
    FL_RSVD_ADDR,
    FL_RW,
    FL_US,
    FL_XD,
    GPA_LIMIT,
    HASH_MULT,
    INV_DOMAIN,
    INV_GLOBAL,
    INV_PASID,
    MAX_DEVICES,
    N_FAULT_REASONS,
    PAGE_SHIFT,
    PAGE_SIZE,
    PASID_CACHE_WAYS,
    PASID_DIR_FRAMES,
    PASID_ENTRY_SIZE,
    PASID_MAX,
    PDE_PRESENT,
    PE_EAFE,
    PE_FLAG_MASK,
    PE_PRESENT,
    PE_SRE,
    PE_WPE,
    PERM_FL_D,
    PERM_FL_RW,
    PERM_FL_SUPV,
    PERM_FL_US,
    PERM_FL_X,
    PGTT_NESTED,
    SL_PS,
    SL_R,
    SL_W,
    SL_X,
    VPN_MASK,
    inv_granularity,
    is_canonical,
    required_perms,
)

_C = {name: i for i, name in enumerate(COUNTER_NAMES)}
M64 = (1 << 64) - 1
VALID = 1 << 63
_SL_PRESENT = SL_R | SL_W | SL_X
_Q = struct.Struct("<Q")


def set_index(key: int, sets: int) -> int:
    """Set selection shared by every cache (Fibonacci hash, high half of the product)."""
    return (((key * HASH_MULT) & M64) >> 32) & (sets - 1)


def _check_pow2(name: str, n: int) -> int:
    n = int(n)
    if n < 1 or n & (n - 1):
        raise ValueError(f"{name} must be a power of two >= 1, got {n}")
    return n


def _fl_reserved(level: int, leaf: bool) -> int:
    """Reserved bits of a present first-level entry at `level` (VT-d 9.7, as x86-64): PS in a
    PML4E, output-address bits 51:48, and the alignment bits of a large page's address
    (bit 12 of a large leaf is its PAT bit, not reserved)."""
    if level == 4:
        return FL_RSVD_ADDR | FL_PS
    if leaf and level > 1:
        return FL_RSVD_ADDR | (ADDR_MASK & ((1 << (PAGE_SHIFT + 9 * (level - 1))) - 1) & ~FL_PAT_LARGE)
    return FL_RSVD_ADDR


def _rights_fault(access: int, flags: int, all_rw: int, all_us: int, any_xd: int) -> int:
    """FAULT_FL_PERMISSION when the rights combined over the whole path refuse `access`.

    VT-d 3.6.1 (access rights), with the x86-64 meaning of R/W, U/S and XD:
    * a user request (no ACCESS_PRIV) needs U/S on every level; a user write needs R/W on
      every level; a user fetch needs no XD on any level;
    * a supervisor request may read any page (VT-d has no SMAP); a supervisor write needs
      R/W on every level only when the PASID entry has WPE (the CR0.WP equivalent, which
      the kernel sets from the guest's CR0.WP); a supervisor instruction fetch needs no XD
      and is never allowed from a user page (U/S on every level): SMEP is always on.
    XD is always honoured (first-level translation behaves as if EFER.NXE = 1)."""
    user = not access & ACCESS_PRIV
    if user and not all_us:
        return FAULT_FL_PERMISSION
    if access & ACCESS_WRITE and (user or flags & PE_WPE) and not all_rw:
        return FAULT_FL_PERMISSION
    if access & ACCESS_EXEC and (any_xd or (not user and all_us)):
        return FAULT_FL_PERMISSION
    return 0


D = TypeVar("D")
IotlbData: TypeAlias = tuple[int, int]  # frame, perms
DevtlbData: TypeAlias = tuple[int, int, int]  # frame, perms | PASID-entry flags << 8, did
PasidData: TypeAlias = tuple[int, int, int, int]  # did, flptr, slptr, flags


class _Cache(Generic[D]):
    """Set-associative cache, tree-PLRU replacement inside a set.

    ``tags`` hold key | VALID (0 = invalid way); ``extra`` is a second tag word compared on
    lookup (the DID for IOTLB entries, 0 elsewhere); ``data`` holds a payload tuple (`empty`
    in an invalid way, never read there).
    Tree-PLRU (ways a power of two): node bits 1..ways-1 in heap order per set; an access to
    way w sets each node on its path to point away from w (bit 1 = victim on the right);
    the victim follows the bits from the root. A fill takes the lowest-numbered invalid way,
    else the PLRU victim; a fill whose tag is already present overwrites that way.
    Invalidation only clears tags (PLRU bits untouched).
    """

    __slots__ = ("sets", "ways", "lg", "tags", "extra", "data", "plru")

    def __init__(self, sets: int, ways: int, empty: D):
        self.sets = sets
        self.ways = ways
        self.lg = ways.bit_length() - 1
        n = sets * ways
        self.tags = [0] * n
        self.extra = [0] * n
        self.data = [empty] * n
        self.plru = [0] * sets

    def find(self, key: int, extra: int) -> int:
        base = set_index(key, self.sets) * self.ways
        tag = key | VALID
        tags = self.tags
        for i in range(base, base + self.ways):
            if tags[i] == tag and self.extra[i] == extra:
                return i
        return -1

    def touch(self, i: int) -> None:
        s, w = divmod(i, self.ways)
        bits = self.plru[s]
        node = 1
        for lvl in range(self.lg - 1, -1, -1):
            b = (w >> lvl) & 1
            if b:
                bits &= ~(1 << node)
            else:
                bits |= 1 << node
            node = 2 * node + b
        self.plru[s] = bits

    def victim(self, s: int) -> int:
        bits = self.plru[s]
        node = 1
        for _ in range(self.lg):
            node = 2 * node + ((bits >> node) & 1)
        return s * self.ways + (node - self.ways)

    def fill(self, key: int, extra: int, data: D) -> bool:
        """Insert or overwrite; return True when a valid entry was evicted."""
        s = set_index(key, self.sets)
        base = s * self.ways
        tag = key | VALID
        tags = self.tags
        slot = -1
        for i in range(base, base + self.ways):
            if tags[i] == tag and self.extra[i] == extra:
                slot = i
                break
        evicted = False
        if slot < 0:
            for i in range(base, base + self.ways):
                if tags[i] == 0:
                    slot = i
                    break
        if slot < 0:
            slot = self.victim(s)
            evicted = True
        tags[slot] = tag
        self.extra[slot] = extra
        self.data[slot] = data
        self.touch(slot)
        return evicted

    def remove_where(self, pred: Callable[[int, int, D], bool]) -> int:
        n = 0
        tags = self.tags
        for i in range(len(tags)):
            if tags[i] and pred(tags[i] & ~VALID, self.extra[i], self.data[i]):
                tags[i] = 0
                n += 1
        return n

    def remove_range(self, hi_key: int, first: int, count: int, extra_ok: Callable[[int, D], bool]) -> int:
        """Remove entries whose key is (hi_key | vpn), vpn in [first, first+count).

        Rule (both implementations): if count >= sets, scan the whole cache (cost
        sets*ways); otherwise probe only the set of each page (cost count*ways).
        """
        n = 0
        tags = self.tags
        if count >= self.sets:
            lo, hi = hi_key + first, hi_key + first + count
            for i in range(len(tags)):
                t = tags[i]
                if t and lo <= (t & ~VALID) < hi and extra_ok(self.extra[i], self.data[i]):
                    tags[i] = 0
                    n += 1
            return n
        for vpn in range(first, first + count):
            key = hi_key | vpn
            tag = key | VALID
            base = set_index(key, self.sets) * self.ways
            for i in range(base, base + self.ways):
                if tags[i] == tag and extra_ok(self.extra[i], self.data[i]):
                    tags[i] = 0
                    n += 1
        return n

    def entries(self) -> Iterator[tuple[int, int, D]]:
        for i, t in enumerate(self.tags):
            if t:
                yield t & ~VALID, self.extra[i], self.data[i]


class _Device(TypedDict):
    """A device's context: its PASID directory, ATS, and its device TLB."""

    dir: int
    ats: bool
    tlb: _Cache[DevtlbData]


class Iommu:
    """Pure-Python IOMMU: PASID cache, IOTLB, device TLBs, nested walker, DMA engine."""

    implementation = "python"

    def __init__(
        self,
        mem: bytearray | mmap.mmap,
        owners: NDArray[np.int32],
        *,
        iotlb_sets: int = 256,
        iotlb_ways: int = 8,
        devtlb_entries: int = 1024,
        devtlb_ways: int = 4,
        pasid_cache_entries: int = 1024,
    ):
        self._mv = memoryview(mem).cast("B")
        if self._mv.readonly:
            raise ValueError("mem must be a writable buffer")
        self._mem = mem
        if not isinstance(owners, np.ndarray) or owners.dtype != np.int32 or owners.ndim != 1:
            raise ValueError("owners must be a 1-d numpy int32 array")
        self._owners = owners
        self.mem_size = len(self._mv)
        self.nframes = min(self.mem_size >> PAGE_SHIFT, len(owners))
        self.iotlb_sets = _check_pow2("iotlb_sets", iotlb_sets)
        self.iotlb_ways = _check_pow2("iotlb_ways", iotlb_ways)
        self.devtlb_ways = _check_pow2("devtlb_ways", devtlb_ways)
        if self.iotlb_ways > 8 or self.devtlb_ways > 8:
            raise ValueError("at most 8 ways")
        self.devtlb_sets = _check_pow2(
            "devtlb_entries / devtlb_ways", max(1, int(devtlb_entries) // self.devtlb_ways)
        )
        self.pasid_cache_sets = _check_pow2(
            "pasid_cache_entries / 4", max(1, int(pasid_cache_entries) // PASID_CACHE_WAYS)
        )
        self._iotlb: _Cache[IotlbData] = _Cache(self.iotlb_sets, self.iotlb_ways, (0, 0))
        self._pc: _Cache[PasidData] = _Cache(self.pasid_cache_sets, PASID_CACHE_WAYS, (0, 0, 0, 0))
        self._devs: dict[int, _Device] = {}
        self._defunct_global: set[int] = set()
        self._defunct_dev: dict[int, set[int]] = {}
        self._cnt = [0] * len(COUNTER_NAMES)
        self._fault_reasons = [0] * N_FAULT_REASONS

    # ------------------------------------------------------------------ memory helpers
    def _read(self, addr: int) -> int:
        value: int = _Q.unpack_from(self._mv, addr)[0]
        return value

    # ------------------------------------------------------------------ devices
    def attach_device(self, dev: int, pasid_dir_hpa: int, ats: bool = True) -> None:
        dev = int(dev)
        if not 0 <= dev < MAX_DEVICES:
            raise ValueError(f"device id must be in [0, {MAX_DEVICES}), got {dev}")
        pasid_dir_hpa = int(pasid_dir_hpa)
        if (
            pasid_dir_hpa & (PAGE_SIZE - 1)
            or pasid_dir_hpa <= 0
            or pasid_dir_hpa + PASID_DIR_FRAMES * PAGE_SIZE > self.mem_size
        ):
            raise ValueError(f"bad PASID directory address {pasid_dir_hpa:#x}")
        if dev in self._devs:
            self.detach_device(dev)
        self._devs[dev] = {
            "dir": pasid_dir_hpa,
            "ats": bool(ats),
            "tlb": _Cache(self.devtlb_sets, self.devtlb_ways, (0, 0, 0)),
        }

    def detach_device(self, dev: int) -> None:
        """Drop the context, the device TLB and the device's PASID-cache entries.

        IOTLB entries are tagged by (DID, PASID), not by device, so they stay."""
        dev = int(dev)
        if self._devs.pop(dev, None) is None:
            return
        self._pc.remove_where(lambda key, extra, data: (key >> 20) == dev)
        self._defunct_dev.pop(dev, None)

    # ------------------------------------------------------------------ defunct PASIDs
    def set_defunct(self, pasid: int, defunct: bool, dev: int | None = None) -> None:
        """Mark/unmark a PASID defunct globally (dev=None) or for one device only.

        Caches are not touched; a defunct PASID's requests are dropped before any lookup."""
        pasid = int(pasid)
        if not 0 <= pasid < PASID_MAX:
            raise ValueError("PASID out of range")
        if dev is None:
            s = self._defunct_global
        else:
            dev = int(dev)
            if not 0 <= dev < MAX_DEVICES:
                raise ValueError("bad device id")
            s = self._defunct_dev.setdefault(dev, set())
        if defunct:
            s.add(pasid)
        else:
            s.discard(pasid)

    def is_defunct(self, pasid: int, dev: int | None = None) -> bool:
        if pasid in self._defunct_global:
            return True
        return dev is not None and pasid in self._defunct_dev.get(dev, ())

    # ------------------------------------------------------------------ translation
    def _fault(self, code: int) -> int:
        self._cnt[_C["faults"]] += 1
        self._fault_reasons[code & 0xFF] += 1
        return code

    def _pasid_entry(self, dev: int, dir_hpa: int, pasid: int) -> PasidData | int:
        """PASID-cache lookup/fill. Returns (did, flptr, slptr, flags) or a fault int."""
        c = self._cnt
        c[_C["pasid_cache_lookups"]] += 1
        key = (dev << 20) | pasid
        i = self._pc.find(key, 0)
        if i >= 0:
            c[_C["pasid_cache_hits"]] += 1
            self._pc.touch(i)
            return self._pc.data[i]
        c[_C["pasid_cache_misses"]] += 1
        pde_addr = dir_hpa + (pasid >> 6) * 8
        c[_C["pasid_refs"]] += 1
        pde = self._read(pde_addr)
        if not pde & PDE_PRESENT:
            return self._fault(FAULT_PDE_NOT_PRESENT)
        pe_addr = (pde & ADDR_MASK) + (pasid & 63) * PASID_ENTRY_SIZE
        if pe_addr + PASID_ENTRY_SIZE > self.mem_size:
            return self._fault(FAULT_OOR_ADDRESS)
        c[_C["pasid_refs"]] += 1
        w0, w1, w2 = struct.unpack_from("<3Q", self._mv, pe_addr)
        if not w0 & PE_PRESENT:
            return self._fault(FAULT_PE_NOT_PRESENT)
        if ((w0 >> 6) & 7) != PGTT_NESTED or ((w0 >> 2) & 7) != AW_48 or (w2 >> 2) & 3:
            return self._fault(FAULT_BAD_PASID_ENTRY)
        data = (w1 & 0xFFFF, w2 & ADDR_MASK, w0 & ADDR_MASK, w2 & PE_FLAG_MASK)
        c[_C["pasid_cache_fills"]] += 1
        if self._pc.fill(key, 0, data):
            c[_C["pasid_cache_evictions"]] += 1
        return data

    def _sl(self, slptr: int, gpa: int, need: int) -> tuple[int, int, int] | int:
        """Second-level translation of a GPA: (hpa, perms R|W combined, leaf level) or fault."""
        c = self._cnt
        if gpa >= GPA_LIMIT:
            return self._fault(FAULT_OOR_ADDRESS)
        table = slptr
        perms = SL_R | SL_W
        for level in (4, 3, 2, 1):
            ea = table + ((gpa >> (PAGE_SHIFT + 9 * (level - 1))) & 511) * 8
            if ea + 8 > self.mem_size:
                return self._fault(FAULT_OOR_ADDRESS | (level << 8))
            c[_C["memory_refs"]] += 1
            e = self._read(ea)
            if not e & _SL_PRESENT:
                return self._fault(FAULT_SL_NOT_PRESENT | (level << 8))
            if need & ~e & (SL_R | SL_W):
                return self._fault(FAULT_SL_PERMISSION | (level << 8))
            perms &= e
            if level == 1 or (level <= 3 and e & SL_PS):
                mask = (1 << (PAGE_SHIFT + 9 * (level - 1))) - 1
                return ((e & ADDR_MASK & ~mask) | (gpa & mask)), perms & (SL_R | SL_W), level
            table = e & ADDR_MASK
        raise AssertionError("unreachable")

    def _walk(self, did: int, flptr: int, slptr: int, flags: int, va: int, access: int) -> IotlbData | int:
        """Nested walk. Returns (frame, perms) or a fault int (owner check not included).

        The first-level rules, as x86-64 paging and VT-d first-level translation define them
        (VT-d specification 3.6 "First-Level Translation", 3.6.1 access rights, 3.6.2
        accessed/dirty flags, 9.7 first-level paging entries); the walk is checked against an
        independent x86-64 MMU in tests/hotpath/test_mmu_differential.py:

        * per level: the table's GPA through the second level (SL_R), then the entry: not
          present -> FAULT_FL_NOT_PRESENT at that level, whatever the rights above it; a
          reserved bit (PS in a PML4E, address bits 51:48, the alignment bits of a large
          page's address) -> FAULT_FL_RESERVED at that level;
        * the accessed flag A of every non-leaf entry is set as the walk uses it; once the
          leaf is found the rights are judged over the whole path (_rights_fault), and only a
          permitted access sets A on the leaf and D on a written leaf, whatever EAFE says;
          EAFE adds the extended-accessed bit (FL_EA) wherever A is set. An A/D update needs
          the second level to allow writes to the table page (else FAULT_SL_PERMISSION).
        """
        c = self._cnt
        c[_C["walks"]] += 1
        write = access & ACCESS_WRITE
        ad = FL_A | FL_EA if flags & PE_EAFE else FL_A
        all_rw, all_us, any_xd = FL_RW, FL_US, 0
        table_gpa = flptr
        for level in (4, 3, 2, 1):
            r = self._sl(slptr, table_gpa, SL_R)
            if isinstance(r, int):
                return r
            table_hpa, tperms, sl_level = r
            ea = table_hpa + ((va >> (PAGE_SHIFT + 9 * (level - 1))) & 511) * 8
            if ea + 8 > self.mem_size:
                return self._fault(FAULT_OOR_ADDRESS | (level << 8))
            c[_C["memory_refs"]] += 1
            e = self._read(ea)
            if not e & FL_P:
                return self._fault(FAULT_FL_NOT_PRESENT | (level << 8))
            leaf = level == 1 or (level <= 3 and e & FL_PS != 0)
            if e & _fl_reserved(level, leaf):
                return self._fault(FAULT_FL_RESERVED | (level << 8))
            all_rw &= e
            all_us &= e
            any_xd |= e & FL_XD
            if leaf:
                f = _rights_fault(access, flags, all_rw, all_us, any_xd)
                if f:
                    return self._fault(f | (level << 8))
            bits = (ad | (FL_D if leaf and write else 0)) & ~e
            if bits:
                f = self._set_flags(ea, e, bits, tperms, sl_level)
                if f:
                    return f
                e |= bits
            if leaf:
                mask = (1 << (PAGE_SHIFT + 9 * (level - 1))) - 1
                gpa = (e & ADDR_MASK & ~mask) | (va & mask)
                break
            table_gpa = e & ADDR_MASK
        sl_need = 0
        if write:
            sl_need |= SL_W
        if access & (ACCESS_READ | ACCESS_EXEC) or not write:
            sl_need |= SL_R
        r = self._sl(slptr, gpa, sl_need)
        if isinstance(r, int):
            return r
        hpa, sperms, _ = r
        perms = sperms  # PERM_SL_R == SL_R, PERM_SL_W == SL_W
        perms |= PERM_FL_RW if all_rw else 0
        perms |= PERM_FL_US if all_us else PERM_FL_SUPV
        perms |= 0 if any_xd else PERM_FL_X
        perms |= PERM_FL_D if e & FL_D else 0
        return hpa >> PAGE_SHIFT, perms

    def _set_flags(self, ea: int, e: int, bits: int, tperms: int, sl_level: int) -> int:
        """Set A/D bits in the entry at ea (read as e); 0 or a second-level fault.

        Hardware does a locked compare-and-exchange; a lost race leaves the entry alone and
        the walk goes on with what it read."""
        if not tperms & SL_W:
            return self._fault(FAULT_SL_PERMISSION | (sl_level << 8))
        if self._read(ea) == e:
            _Q.pack_into(self._mv, ea, e | bits)
            self._cnt[_C["ad_writes"]] += 1
        return 0

    def _owner_ok(self, frame: int, did: int) -> int:
        if frame >= self.nframes:
            return self._fault(FAULT_OOR_ADDRESS)
        if int(self._owners[frame]) != did:
            self._cnt[_C["owner_violations"]] += 1
            return self._fault(FAULT_OWNER)
        return 0

    def _translate1(self, dev: int, pasid: int, va: int, access: int) -> tuple[int, int]:
        """One request: returns (pa, 0) or (0, fault code)."""
        c = self._cnt
        c[_C["translations"]] += 1
        d = self._devs.get(dev)
        if d is None:
            return 0, self._fault(FAULT_NO_CONTEXT)
        if not 0 <= pasid < PASID_MAX:
            return 0, self._fault(FAULT_PASID_INVALID)
        if pasid in self._defunct_global or pasid in self._defunct_dev.get(dev, ()):
            c[_C["defunct_drops"]] += 1
            return 0, self._fault(FAULT_DEFUNCT)
        if not is_canonical(va):
            return 0, self._fault(FAULT_NON_CANONICAL)
        vpn = (va >> PAGE_SHIFT) & VPN_MASK
        off = va & (PAGE_SIZE - 1)
        tkey = (pasid << 36) | vpn
        ats = d["ats"]
        if ats:
            tlb = d["tlb"]
            c[_C["devtlb_lookups"]] += 1
            i = tlb.find(tkey, 0)
            if i >= 0:
                frame, perms, did = tlb.data[i]
                need = required_perms(access, perms >> 8)
                if (perms & need) == need and (not access & ACCESS_PRIV or perms >> 8 & PE_SRE):
                    c[_C["devtlb_hits"]] += 1
                    tlb.touch(i)
                    f = self._owner_ok(frame, did)
                    if f:
                        return 0, f
                    return (frame << PAGE_SHIFT) | off, 0
            c[_C["devtlb_misses"]] += 1
        pe = self._pasid_entry(dev, d["dir"], pasid)
        if isinstance(pe, int):
            return 0, pe
        did, flptr, slptr, flags = pe
        if access & ACCESS_PRIV and not flags & PE_SRE:
            return 0, self._fault(FAULT_FL_PERMISSION)
        need = required_perms(access, flags)
        c[_C["iotlb_lookups"]] += 1
        i = self._iotlb.find(tkey, did)
        hit = False
        if i >= 0:
            frame, perms = self._iotlb.data[i]
            if (perms & need) == need:
                hit = True
                c[_C["iotlb_hits"]] += 1
                self._iotlb.touch(i)
        if not hit:
            c[_C["iotlb_misses"]] += 1
            r = self._walk(did, flptr, slptr, flags, va, access)
            if isinstance(r, int):
                return 0, r
            frame, perms = r
        f = self._owner_ok(frame, did)
        if f:
            return 0, f
        if not hit:
            c[_C["iotlb_fills"]] += 1
            if self._iotlb.fill(tkey, did, (frame, perms)):
                c[_C["iotlb_evictions"]] += 1
        if ats:
            c[_C["devtlb_fills"]] += 1
            if d["tlb"].fill(tkey, 0, (frame, perms | (flags << 8), did)):
                c[_C["devtlb_evictions"]] += 1
        return (frame << PAGE_SHIFT) | off, 0

    def translate_one(self, dev: int, pasid: int, va: int, access: int) -> tuple[int, int]:
        """Translate one request: (pa, 0) on success, (0, fault code) on a fault."""
        return self._translate1(int(dev), int(pasid), int(va), int(access))

    def translate(
        self,
        dev: int,
        pasids: int | Sequence[int] | NDArray[np.integer[Any]],
        vas: Sequence[int] | NDArray[np.integer[Any]],
        access: int | Sequence[int] | NDArray[np.integer[Any]],
        out_pa: NDArray[np.integer[Any]],
        out_fault: NDArray[np.integer[Any]],
    ) -> int:
        """Batch translate. pasids/access may be arrays or scalars; returns the fault count."""
        n = len(vas)
        dev = int(dev)
        pas = [int(pasids)] * n if isinstance(pasids, (int, np.integer)) else [int(x) for x in pasids]
        acc = [int(access)] * n if isinstance(access, (int, np.integer)) else [int(x) for x in access]
        if len(pas) != n or len(acc) != n or len(out_pa) < n or len(out_fault) < n:
            raise ValueError("batch arrays differ in length")
        nf = 0
        for k in range(n):
            pa, f = self._translate1(dev, pas[k], int(vas[k]), acc[k])
            out_pa[k] = pa
            out_fault[k] = f
            if f:
                nf += 1
        return nf

    # ------------------------------------------------------------------ invalidation
    def inv_iotlb(
        self,
        granularity: int | str,
        did: int = 0,
        pasid: int = 0,
        addr: int = 0,
        size_order: int = 0,
        ih: bool = False,
    ) -> int:
        """IOTLB invalidation; returns the number of entries removed.

        granularity: 'global' | 'domain' | 'pasid' | 'page' (or INV_*). 'page' removes
        (did, pasid) pages [addr>>12 aligned down to 1<<size_order, +1<<size_order).
        ih (invalidation hint: leaf only) is accepted; no paging-structure cache is
        modelled, so it changes nothing."""
        g = inv_granularity(granularity)
        did, pasid = int(did), int(pasid)
        c = self._cnt
        if g == INV_GLOBAL:
            c[_C["iotlb_inv_global"]] += 1
            n = self._iotlb.remove_where(lambda k, e, d: True)
        elif g == INV_DOMAIN:
            c[_C["iotlb_inv_domain"]] += 1
            n = self._iotlb.remove_where(lambda k, e, d: e == did)
        elif g == INV_PASID:
            c[_C["iotlb_inv_pasid"]] += 1
            n = self._iotlb.remove_where(lambda k, e, d: e == did and (k >> 36) == pasid)
        else:
            c[_C["iotlb_inv_page"]] += 1
            first, count = _page_range(addr, size_order)
            n = self._iotlb.remove_range(pasid << 36, first, count, lambda e, d: e == did)
        c[_C["iotlb_inv_entries"]] += n
        return n

    def inv_pasid_cache(self, granularity: int | str, did: int = 0, pasid: int = 0) -> int:
        """PASID-cache invalidation ('global' | 'domain' | 'pasid'); returns entries removed."""
        g = inv_granularity(granularity)
        did, pasid = int(did), int(pasid)
        c = self._cnt
        if g == INV_GLOBAL:
            c[_C["pasid_cache_inv_global"]] += 1
            n = self._pc.remove_where(lambda k, e, d: True)
        elif g == INV_DOMAIN:
            c[_C["pasid_cache_inv_domain"]] += 1
            n = self._pc.remove_where(lambda k, e, d: d[0] == did)
        elif g == INV_PASID:
            c[_C["pasid_cache_inv_pasid"]] += 1
            n = self._pc.remove_where(lambda k, e, d: d[0] == did and (k & (PASID_MAX - 1)) == pasid)
        else:
            raise ValueError("the PASID cache has no address granularity")
        c[_C["pasid_cache_inv_entries"]] += n
        return n

    def inv_devtlb(
        self, dev: int, pasid: int | None = None, addr: int | None = None, size_order: int = 0
    ) -> int:
        """Device-TLB invalidation of one device: everything (pasid None), one PASID
        (addr None), or PASID + 1<<size_order pages from addr aligned down.
        Returns entries removed (0 for a device without context)."""
        dev = int(dev)
        d = self._devs.get(dev)
        c = self._cnt
        if pasid is None:
            c[_C["devtlb_inv_all"]] += 1
            n = d["tlb"].remove_where(lambda k, e, x: True) if d else 0
        elif addr is None:
            c[_C["devtlb_inv_pasid"]] += 1
            pasid = int(pasid)
            n = d["tlb"].remove_where(lambda k, e, x: (k >> 36) == pasid) if d else 0
        else:
            c[_C["devtlb_inv_addr"]] += 1
            first, count = _page_range(addr, size_order)
            n = d["tlb"].remove_range(int(pasid) << 36, first, count, lambda e, x: True) if d else 0
        c[_C["devtlb_inv_entries"]] += n
        return n

    # ------------------------------------------------------------------ counters / dump
    def counters(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: self._cnt[i] for i, name in enumerate(COUNTER_NAMES)}
        out["faults_by_reason"] = {
            FAULT_NAMES.get(r, f"fault-{r}"): n for r, n in enumerate(self._fault_reasons) if n
        }
        return out

    def reset_counters(self) -> None:
        self._cnt = [0] * len(COUNTER_NAMES)
        self._fault_reasons = [0] * N_FAULT_REASONS

    def cache_dump(self) -> dict[str, Any]:
        """Plain contents of every cache, sorted (for differential tests and the audit)."""
        iotlb = sorted((e, k >> 36, k & ((1 << 36) - 1), d[0], d[1]) for k, e, d in self._iotlb.entries())
        pc = sorted((k >> 20, k & (PASID_MAX - 1)) + tuple(d) for k, e, d in self._pc.entries())
        devtlb = {}
        devices = {}
        for dev in sorted(self._devs):
            dd = self._devs[dev]
            devices[dev] = {"pasid_dir": dd["dir"], "ats": dd["ats"]}
            devtlb[dev] = sorted(
                (k >> 36, k & ((1 << 36) - 1), d[0], d[1], d[2]) for k, e, d in dd["tlb"].entries()
            )
        return {
            "iotlb": iotlb,  # (did, pasid, vpn, frame, perms)
            "pasid_cache": pc,  # (dev, pasid, did, flptr, slptr, flags)
            "devtlb": devtlb,  # dev -> (pasid, vpn, frame, perms | pe_flags << 8, did)
            "devices": devices,
            "defunct": sorted(self._defunct_global),
            "defunct_dev": {dev: sorted(s) for dev, s in sorted(self._defunct_dev.items()) if s},
        }

    # ------------------------------------------------------------------ DMA engine
    def _dma(
        self,
        dev: int,
        pasid: int,
        streams: list[tuple[int, int]],
        length: int,
        step: Callable[[list[int], int], int | None],
    ) -> tuple[int, int, int, bool]:
        """Run one descriptor over chunks that end at the page boundaries of every stream.

        `streams` are (va, access) pairs, translated in that order for each chunk (so a
        fault names the first failing stream's VA). `step(pas, n)` moves or checks the
        chunk's bytes and returns None to go on, or k (bytes of the chunk that count) to
        stop early. Returns (status, fault_va, done, stopped)."""
        c = self._cnt
        c[_C["dma_descriptors"]] += 1
        done = 0
        while done < length:
            vas = [va + done for va, _ in streams]
            n = min([length - done] + [PAGE_SIZE - (va & (PAGE_SIZE - 1)) for va in vas])
            pas = []
            for va, (_, access) in zip(vas, streams):
                pa, f = self._translate1(dev, pasid, va, access)
                if f:
                    c[_C["dma_faults"]] += 1
                    return f, va, done, False
                pas.append(pa)
            stop = step(pas, n)
            if stop is not None:
                c[_C["dma_bytes"]] += stop
                return 0, 0, done + stop, True
            done += n
            c[_C["dma_bytes"]] += n
        return 0, 0, done, False

    def dma_copy(
        self, dev: int, pasid: int, src: int, dst: int, length: int, access_flags: int = 0
    ) -> tuple[int, int, int]:
        """Copy `length` bytes from VA src to VA dst of (dev, pasid).

        Returns (status, fault_va, done): status 0 or the fault code of the first failing
        translation, fault_va the exact VA that failed (src+done or dst+done; source is
        translated before destination in each chunk), done the bytes copied before it.
        Chunks end at the page boundaries of both streams and are copied in ascending order;
        overlapping ranges get forward-copy semantics."""
        mv = self._mv

        def move(pas: list[int], n: int) -> None:
            mv[pas[1] : pas[1] + n] = bytes(mv[pas[0] : pas[0] + n])

        streams = [(int(src), ACCESS_READ | access_flags), (int(dst), ACCESS_WRITE | access_flags)]
        return self._dma(int(dev), int(pasid), streams, int(length), move)[:3]

    def dma_fill(
        self, dev: int, pasid: int, dst: int, length: int, pattern: int, access_flags: int = 0
    ) -> tuple[int, int, int]:
        """Fill `length` bytes at VA dst with the byte `pattern`; (status, fault_va, done)."""
        mv, byte = self._mv, bytes([int(pattern) & 0xFF])

        def fill(pas: list[int], n: int) -> None:
            mv[pas[0] : pas[0] + n] = byte * n

        streams = [(int(dst), ACCESS_WRITE | access_flags)]
        return self._dma(int(dev), int(pasid), streams, int(length), fill)[:3]

    def dma_compare(
        self, dev: int, pasid: int, a: int, b: int, length: int, access_flags: int = 0
    ) -> tuple[int, int, int, int]:
        """Compare `length` bytes at VAs a and b: (status, fault_va, result, done).

        result 0 = equal (over the bytes compared), else offset+1 of the first differing
        byte (the compare stops there; done = that offset). On a fault result is 0 and done
        counts the bytes found equal before the faulting chunk."""
        mv = self._mv

        def differ(pas: list[int], n: int) -> int | None:
            x, y = mv[pas[0] : pas[0] + n], mv[pas[1] : pas[1] + n]
            return None if x == y else next(k for k in range(n) if x[k] != y[k])

        access = ACCESS_READ | access_flags
        status, va, done, stopped = self._dma(
            int(dev), int(pasid), [(int(a), access), (int(b), access)], int(length), differ
        )
        return status, va, done + 1 if stopped else 0, done


def _page_range(addr: int, size_order: int) -> tuple[int, int]:
    # size_order beyond the 2^36 pages of a 48-bit space is clamped (over-invalidating is
    # always safe); a negative one is an error.
    size_order = int(size_order)
    if size_order < 0:
        raise ValueError("size_order must be >= 0")
    size_order = min(size_order, 36)
    count = 1 << size_order
    first = (int(addr) >> PAGE_SHIFT) & ~(count - 1) & ((1 << 36) - 1)
    return first, count
