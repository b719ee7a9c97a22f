"""Hardware formats the IOMMU walker reads: VT-d scalable-mode and x86-64 layouts.

Everything here describes bytes in simulated host memory. The host driver writes these
formats, the guest writes first-level tables in them, and both hot-path implementations
decode them; so the numbers live in exactly one place.

Only the fields the model uses are named. Bit positions follow the VT-d specification
(scalable-mode PASID directory/table entries, second-level entries; the kernel's
drivers/iommu/intel/pasid.h names the same fields) and the x86-64 paging format
(first-level entries).
"""

from __future__ import annotations

from typing import Any

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
ENTRIES_PER_TABLE = 512
ADDR_MASK = ((1 << 52) - 1) & ~(PAGE_SIZE - 1)  # bits 51:12
LEVELS = 4  # 4-level paging at both stages (5-level is a later step)
VA_BITS = 48

# PASID space and the two-level PASID structure (directory bits 19:6, table bits 5:0).
PASID_BITS = 20
PASID_MAX = 1 << PASID_BITS
PASID_TABLE_ENTRIES = 64
PASID_ENTRY_SIZE = 64
PASID_DIR_ENTRIES = PASID_MAX // PASID_TABLE_ENTRIES  # 16384 x 8 bytes = 32 frames
PASID_DIR_FRAMES = PASID_DIR_ENTRIES * 8 // PAGE_SIZE

# PASID directory entry (8 bytes).
PDE_PRESENT = 1 << 0
PDE_FPD = 1 << 1

# Scalable-mode PASID entry, eight little-endian u64 words.
# word 0
PE_PRESENT = 1 << 0
PE_FPD = 1 << 1
PE_AW_SHIFT = 2  # 3 bits: 2 = 48-bit (4-level) second level, 3 = 57-bit
PE_PGTT_SHIFT = 6  # 3 bits
PGTT_FIRST_ONLY = 1
PGTT_SECOND_ONLY = 2
PGTT_NESTED = 3
PGTT_PASS_THROUGH = 4
# word 1
PE_DID_MASK = 0xFFFF  # domain id; the model uses the VM id as the domain id
# word 2
PE_SRE = 1 << 0  # supervisor requests enabled
PE_FLPM_SHIFT = 2  # 2 bits: 0 = 4-level, 1 = 5-level
PE_WPE = 1 << 4  # write protect enable (supervisor writes honour R/W)
PE_EAFE = 1 << 7  # extended-accessed flag enable: also set FL_EA where A is set (VT-d 3.6.2)

PE_FLAG_MASK = PE_SRE | PE_WPE | PE_EAFE  # the word-2 flags the model keeps with an entry

AW_48 = 2

# First-level (x86-64) entry bits.
FL_P = 1 << 0
FL_RW = 1 << 1
FL_US = 1 << 2
FL_PWT = 1 << 3
FL_PCD = 1 << 4
FL_A = 1 << 5
FL_D = 1 << 6
FL_PS = 1 << 7
FL_EA = 1 << 10  # extended-accessed: set with A only when the PASID entry has EAFE
FL_PAT_LARGE = 1 << 12  # PAT bit of a 2 MiB / 1 GiB leaf (not part of its address)
FL_XD = 1 << 63
# Guest-physical width of first-level output addresses: the second level is 4-level (AW_48),
# so address bits 51:48 of a present first-level entry are reserved (VT-d 9.7).
FL_ADDR_BITS = 48
FL_RSVD_ADDR = ADDR_MASK & ~((1 << FL_ADDR_BITS) - 1)

# Second-level entry bits.
SL_R = 1 << 0
SL_W = 1 << 1
SL_X = 1 << 2
SL_PS = 1 << 7

# Access kinds of a DMA request (a bit set, as the page request perm field).
ACCESS_READ = 1
ACCESS_WRITE = 2
ACCESS_EXEC = 4
ACCESS_PRIV = 8  # supervisor request

# Translation results. A fault is a non-zero code: reason in bits 7:0, the table level in
# which the walk stopped in bits 15:8 (4 = PML4 ... 1 = PT; 0 where no level applies).
FAULT_NONE = 0
FAULT_NO_CONTEXT = 1  # device has no context entry / PASID directory
FAULT_PASID_INVALID = 2  # PASID out of range
FAULT_PDE_NOT_PRESENT = 3  # PASID directory entry not present
FAULT_PE_NOT_PRESENT = 4  # PASID table entry not present
FAULT_BAD_PASID_ENTRY = 5  # entry present but not a nested entry the model understands
FAULT_FL_NOT_PRESENT = 6  # first-level entry not present (page-request candidate)
FAULT_SL_NOT_PRESENT = 7  # second-level entry not present
FAULT_FL_PERMISSION = 8  # first-level R/W, U/S or XD refused the access
FAULT_SL_PERMISSION = 9  # second-level R/W refused the access
FAULT_OOR_ADDRESS = 10  # address beyond the entry's address width / memory size
FAULT_OWNER = 11  # I1: frame not owned by the PASID's VM (isolation violation)
FAULT_DEFUNCT = 12  # PASID marked defunct by the notifier: dropped
FAULT_NON_CANONICAL = 13  # address bits 63:47 not all equal: no lookup, no walk, no page request
FAULT_FL_RESERVED = 14  # a present first-level entry has a reserved bit set (not recoverable)

FAULT_NAMES = {
    FAULT_NONE: "ok",
    FAULT_NO_CONTEXT: "no-context",
    FAULT_PASID_INVALID: "pasid-invalid",
    FAULT_PDE_NOT_PRESENT: "pasid-dir-not-present",
    FAULT_PE_NOT_PRESENT: "pasid-entry-not-present",
    FAULT_BAD_PASID_ENTRY: "bad-pasid-entry",
    FAULT_FL_NOT_PRESENT: "fl-not-present",
    FAULT_SL_NOT_PRESENT: "sl-not-present",
    FAULT_FL_PERMISSION: "fl-permission",
    FAULT_SL_PERMISSION: "sl-permission",
    FAULT_OOR_ADDRESS: "out-of-range",
    FAULT_OWNER: "owner-violation",
    FAULT_DEFUNCT: "defunct",
    FAULT_NON_CANONICAL: "non-canonical",
    FAULT_FL_RESERVED: "fl-reserved",
}


def fault_code(reason: int, level: int = 0) -> int:
    """Pack a fault reason and the walk level it stopped at into one code."""
    return reason | (level << 8)


def fault_reason(code: int) -> int:
    return code & 0xFF


def fault_level(code: int) -> int:
    return (code >> 8) & 0xFF


def describe_fault(code: int) -> str:
    """Human-readable fault, e.g. 'fl-not-present@L1'."""
    name = FAULT_NAMES.get(fault_reason(code), f"fault-{fault_reason(code)}")
    level = fault_level(code)
    return f"{name}@L{level}" if level else name


def table_index(va: int, level: int) -> int:
    """Index into the level-`level` table (4 = PML4 .. 1 = PT) for address `va`."""
    return (va >> (PAGE_SHIFT + 9 * (level - 1))) & (ENTRIES_PER_TABLE - 1)


def pasid_dir_index(pasid: int) -> int:
    return pasid >> 6


def pasid_table_index(pasid: int) -> int:
    return pasid & (PASID_TABLE_ENTRIES - 1)


def encode_pasid_entry(
    *,
    flptr: int,
    slptr: int,
    did: int,
    sre: bool = False,
    wpe: bool = False,
    eafe: bool = True,
    fpd: bool = False,
    pgtt: int = PGTT_NESTED,
) -> list[int]:
    """The eight words of a present PASID entry (nested by default; the guest writes PGTT=1)."""
    w0 = PE_PRESENT | (AW_48 << PE_AW_SHIFT) | (pgtt << PE_PGTT_SHIFT) | (slptr & ADDR_MASK)
    if fpd:
        w0 |= PE_FPD
    w1 = did & PE_DID_MASK
    w2 = flptr & ADDR_MASK
    w2 |= PE_SRE if sre else 0
    w2 |= PE_WPE if wpe else 0
    w2 |= PE_EAFE if eafe else 0
    return [w0, w1, w2, 0, 0, 0, 0, 0]


def decode_pasid_entry(words: list[int]) -> dict[str, Any]:
    """Named fields of a PASID entry; used by snapshots, the audit and tests."""
    w0, w1, w2 = words[0], words[1], words[2]
    return {
        "present": bool(w0 & PE_PRESENT),
        "fpd": bool(w0 & PE_FPD),
        "aw": (w0 >> PE_AW_SHIFT) & 7,
        "pgtt": (w0 >> PE_PGTT_SHIFT) & 7,
        "slptr": w0 & ADDR_MASK,
        "did": w1 & PE_DID_MASK,
        "flptr": w2 & ADDR_MASK,
        "flpm": (w2 >> PE_FLPM_SHIFT) & 3,
        "sre": bool(w2 & PE_SRE),
        "wpe": bool(w2 & PE_WPE),
        "eafe": bool(w2 & PE_EAFE),
    }


# --- Added for the hot path (hotpath/_pure.py, hotpath/_translate.pyx) -------------------

# Invalidation granularities (VT-d queued-invalidation descriptors the model implements).
INV_GLOBAL = 0  # everything
INV_DOMAIN = 1  # one domain id
INV_PASID = 2  # one (domain id, PASID)
INV_PAGE = 3  # (domain id, PASID) + address range: 1 << size_order pages, address aligned down

INV_NAMES = {
    "global": INV_GLOBAL,
    "domain": INV_DOMAIN,
    "pasid": INV_PASID,
    "page": INV_PAGE,
    "addr": INV_PAGE,
    "pasid-addr": INV_PAGE,
}


def inv_granularity(g: int | str) -> int:
    """Accept an INV_* int or one of INV_NAMES; raise ValueError otherwise."""
    if isinstance(g, str):
        try:
            return INV_NAMES[g.lower()]
        except KeyError:
            raise ValueError(f"unknown invalidation granularity {g!r}") from None
    g = int(g)
    if g not in (INV_GLOBAL, INV_DOMAIN, INV_PASID, INV_PAGE):
        raise ValueError(f"unknown invalidation granularity {g!r}")
    return g


# Effective permissions cached with a translation (IOTLB and device-TLB entries): what the
# walk found, combined over every level, so that a cached entry answers every access kind as
# a fresh walk of unchanged tables would; a request needing a bit the entry lacks re-walks.
PERM_SL_R = 1 << 0  # second level readable on every level of the final GPA's walk
PERM_SL_W = 1 << 1  # second level writable on every level
PERM_FL_RW = 1 << 2  # first-level R/W set on every level
PERM_FL_US = 1 << 3  # first-level U/S set on every level (a user page)
PERM_FL_X = 1 << 4  # no XD on any first-level level
PERM_FL_D = 1 << 5  # first-level leaf dirty bit set (a write to a clean page must walk: D)
PERM_FL_SUPV = 1 << 6  # some first-level level has U/S clear (a supervisor page)

GPA_LIMIT = 1 << FL_ADDR_BITS  # second-level input addresses at or above fault (out of range)
VPN_BITS = VA_BITS - PAGE_SHIFT  # cache keys hold the low 36 bits of the page number
VPN_MASK = (1 << VPN_BITS) - 1


def is_canonical(va: int) -> bool:
    """x86-64 4-level canonical form: bits 63:47 all equal (VT-d 3.6: the first-level input
    address must be canonical; anything else faults before any lookup)."""
    top = va >> (VA_BITS - 1)
    return 0 <= va < 1 << 64 and (top == 0 or top == (1 << (65 - VA_BITS)) - 1)


def required_perms(access: int, pe_flags: int) -> int:
    """PERM_* bits a cached translation must hold to serve `access` without a walk.

    The same rules as the walk's rights check (hotpath._pure.Iommu._rights_fault);
    pe_flags are the PASID entry's word-2 flag bits (only PE_WPE matters here). A write
    always needs the leaf's D bit: the walk that serves it sets D (VT-d 3.6.2), so an
    entry filled by a read of a clean page does not serve a write.
    """
    user = not access & ACCESS_PRIV
    need = 0
    if access & ACCESS_WRITE:
        need |= PERM_SL_W | PERM_FL_D
        if user or pe_flags & PE_WPE:
            need |= PERM_FL_RW
    if access & (ACCESS_READ | ACCESS_EXEC) or not access & ACCESS_WRITE:
        need |= PERM_SL_R
    if access & ACCESS_EXEC:
        need |= PERM_FL_X if user else PERM_FL_X | PERM_FL_SUPV
    if user:
        need |= PERM_FL_US
    return need


# --- The model's shape, shared by both implementations ------------------------------------

MAX_DEVICES = 512  # device ids (requester ids of two buses): a PF per VM for 256+ VMs
PASID_CACHE_WAYS = 4
N_FAULT_REASONS = 16  # fault reasons counted per reason (FAULT_* < N_FAULT_REASONS)
HASH_MULT = 0x9E3779B97F4A7C15  # cache set index: ((key * HASH_MULT) mod 2^64 >> 32) & (sets-1)

# Statistics; order matters: the compiled module indexes a C array with these positions
# (hotpath/_layout.pxi, generated from this list, names them C_TRANSLATIONS ...).
COUNTER_NAMES = (
    "translations",
    "faults",
    "walks",
    "memory_refs",
    "ad_writes",
    "pasid_refs",
    "owner_violations",
    "defunct_drops",
    "iotlb_lookups",
    "iotlb_hits",
    "iotlb_misses",
    "iotlb_fills",
    "iotlb_evictions",
    "iotlb_inv_global",
    "iotlb_inv_domain",
    "iotlb_inv_pasid",
    "iotlb_inv_page",
    "iotlb_inv_entries",
    "pasid_cache_lookups",
    "pasid_cache_hits",
    "pasid_cache_misses",
    "pasid_cache_fills",
    "pasid_cache_evictions",
    "pasid_cache_inv_global",
    "pasid_cache_inv_domain",
    "pasid_cache_inv_pasid",
    "pasid_cache_inv_entries",
    "devtlb_lookups",
    "devtlb_hits",
    "devtlb_misses",
    "devtlb_fills",
    "devtlb_evictions",
    "devtlb_inv_all",
    "devtlb_inv_pasid",
    "devtlb_inv_addr",
    "devtlb_inv_entries",
    "dma_descriptors",
    "dma_bytes",
    "dma_faults",
)
