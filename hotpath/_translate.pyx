# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled DMA translation hot path: PASID cache, IOTLB, device TLBs, nested walker, DMA engine.

Same semantics as the pure-Python twin (hotpath/_pure.py), bit for bit; the docstrings there
describe the model. Here everything the translation loop touches is a C structure:

* every cache is one array of set blocks: a set's tags (u64 key | VALID) followed by its
  payload words (frame | perms | did packed in a u64), so an 8-way lookup touches one
  128-byte block; replacement is tree-PLRU per set (hotpath._pure._Cache explains it);
* set index = ((key * 0x9E3779B97F4A7C15) mod 2^64 >> 32) & (sets - 1);
* host memory and the owner table are raw pointers into the caller's buffers (held alive by
  typed memoryviews); the batch loop and the DMA engine run without the GIL;
* the batch loop prefetches the IOTLB set of the request PREFETCH_AHEAD places ahead and
  tries a side-effect-free fast path (fast_hit: PASID-cache + IOTLB or device-TLB hit,
  permissions, owner) before the full translate1; counters and PLRU updates come out exactly
  as translate1 would make them, so the twin stays the reference;
* the walk counts memory references in a register and the second-level walk is unrolled
  C (vs_sl_walk); big caches sit on transparent huge pages.

The object is not thread-safe: do not call its methods concurrently. Host byte order must be
little-endian (x86). First-level A/D updates use a locked compare-and-exchange, as hardware.

Also here: the bare baselines the benchmark compares against (BareHash, bare_walk).
"""

cimport cython
from libc.stdint cimport uint64_t, uint32_t, uint16_t, uint8_t, int32_t, int64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memset, memcpy, memmove, memcmp
from cpython.buffer cimport (PyBUF_C_CONTIGUOUS, PyBUF_FORMAT, PyBUF_WRITABLE, PyBuffer_Release,
                             PyObject_GetBuffer)

import numpy as np

from vsva.hotpath._pure import COUNTER_NAMES, N_FAULT_REASONS, MAX_DEVICES, PASID_CACHE_WAYS
from vsva.hotpath.layout import FAULT_NAMES, PASID_DIR_FRAMES, inv_granularity

cdef extern from "stdlib.h" nogil:
    int posix_memalign(void **memptr, size_t alignment, size_t size)

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #define VS_ADDR_MASK 0x000FFFFFFFFFF000ULL
    #define VS_VALID (1ULL << 63)
    #define VS_KEYMASK ((1ULL << 56) - 1)
    #define VS_PLRU_MASK (0x7FULL << 56)
    #define VS_HASH_MULT 0x9E3779B97F4A7C15ULL
    #define VS_VA_LIMIT (1ULL << 48)
    #define VS_FL_XD (1ULL << 63)
    #define VS_VPN_MASK ((1ULL << 36) - 1)
    static inline uint64_t vs_load64(const unsigned char *p) {
        uint64_t v; memcpy(&v, p, 8); return v;
    }
    static inline void vs_store64(unsigned char *p, uint64_t v) { memcpy(p, &v, 8); }
    /* asm volatile, not __builtin_prefetch: GCC's IPA pure/const analysis treats a function
       made only of __builtin_prefetch calls as side-effect free and deletes its calls. */
    #if defined(__x86_64__) || defined(__i386__)
    static inline void vs_prefetch(const void *p) {
        __asm__ __volatile__("prefetcht0 %0" : : "m"(*(const char *)p));
    }
    #else
    static inline void vs_prefetch(const void *p) { __builtin_prefetch(p, 0, 3); }
    #endif
    #include <sys/mman.h>
    static inline void vs_hugepage(void *p, size_t n) {
    #ifdef MADV_HUGEPAGE
        madvise(p, n, MADV_HUGEPAGE);
    #endif
    }
    static inline uint32_t vs_ctz(uint32_t m) { return (uint32_t)__builtin_ctz(m); }
    static inline int vs_cas64(unsigned char *p, uint64_t expect, uint64_t val) {
        return __atomic_compare_exchange_n((uint64_t *)p, &expect, val, 0,
                                           __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    }
    """
    const uint64_t VS_ADDR_MASK
    const uint64_t VS_VALID
    const uint64_t VS_KEYMASK
    const uint64_t VS_PLRU_MASK
    const uint64_t VS_HASH_MULT
    const uint64_t VS_VA_LIMIT
    const uint64_t VS_FL_XD
    const uint64_t VS_VPN_MASK
    uint64_t vs_load64(const unsigned char *p) noexcept nogil
    void vs_store64(unsigned char *p, uint64_t v) noexcept nogil
    void vs_prefetch(const void *p) noexcept nogil
    uint32_t vs_ctz(uint32_t m) noexcept nogil
    void vs_hugepage(void *p, size_t n) noexcept nogil
    int vs_cas64(unsigned char *p, uint64_t expect, uint64_t val) noexcept nogil

# Small constants (must equal hotpath.layout; tests check the behaviour against the twin).
cdef enum:
    PG_SHIFT = 12
    PG_SIZE = 4096
    PASID_LIMIT = 1 << 20
    ACC_R = 1
    ACC_W = 2
    ACC_X = 4
    ACC_PRIV = 8
    F_NO_CONTEXT = 1
    F_PASID_INVALID = 2
    F_PDE_NOT_PRESENT = 3
    F_PE_NOT_PRESENT = 4
    F_BAD_PASID_ENTRY = 5
    F_FL_NOT_PRESENT = 6
    F_SL_NOT_PRESENT = 7
    F_FL_PERMISSION = 8
    F_SL_PERMISSION = 9
    F_OOR = 10
    F_OWNER = 11
    F_DEFUNCT = 12
    FLP = 1
    FLRW = 2
    FLUS = 4
    FLA = 0x20
    FLD = 0x40
    FLPS = 0x80
    SLR = 1
    SLW = 2
    SLX = 4
    SLPS = 0x80
    PE_SRE_ = 1
    PE_WPE_ = 0x10
    PE_EAFE_ = 0x80
    PE_FLAGS = 0x91
    P_SL_R = 1
    P_SL_W = 2
    P_FL_RW = 4
    P_FL_US = 8
    P_FL_X = 16
    P_FL_D = 32
    NDEV = 512  # device ids (requester ids of two buses): a PF per VM for 256+ VMs
    NREASONS = 16
    PREFETCH_AHEAD = 16
    HUGE_PAGE = 2 * 1024 * 1024

# Counter indices: same order as hotpath._pure.COUNTER_NAMES.
cdef enum:
    C_TRANSLATIONS, C_FAULTS, C_WALKS, C_MEMORY_REFS, C_AD_WRITES, C_PASID_REFS,
    C_OWNER_VIOLATIONS, C_DEFUNCT_DROPS,
    C_IOTLB_LOOKUPS, C_IOTLB_HITS, C_IOTLB_MISSES, C_IOTLB_FILLS, C_IOTLB_EVICTIONS,
    C_IOTLB_INV_GLOBAL, C_IOTLB_INV_DOMAIN, C_IOTLB_INV_PASID, C_IOTLB_INV_PAGE,
    C_IOTLB_INV_ENTRIES,
    C_PC_LOOKUPS, C_PC_HITS, C_PC_MISSES, C_PC_FILLS, C_PC_EVICTIONS,
    C_PC_INV_GLOBAL, C_PC_INV_DOMAIN, C_PC_INV_PASID, C_PC_INV_ENTRIES,
    C_DEVTLB_LOOKUPS, C_DEVTLB_HITS, C_DEVTLB_MISSES, C_DEVTLB_FILLS, C_DEVTLB_EVICTIONS,
    C_DEVTLB_INV_ALL, C_DEVTLB_INV_PASID, C_DEVTLB_INV_ADDR, C_DEVTLB_INV_ENTRIES,
    C_DMA_DESCRIPTORS, C_DMA_BYTES, C_DMA_FAULTS,
    NCOUNTERS

if NCOUNTERS != len(COUNTER_NAMES):  # import-time guard against the two lists drifting
    raise ImportError("hotpath._translate counter enum does not match COUNTER_NAMES")

# Caches. Set s occupies blk[2*s*ways .. 2*(s+1)*ways): first the ways' tags (key | VALID,
# 0 = invalid), then their payload words, so a lookup touches one 128-byte block (8 ways).
# Payload (IOTLB, device TLB): frame (bits 35:0) | perms (bits 47:36) | did (bits 63:48).
# IOTLB perms = PERM_* bits; device-TLB perms = PERM_* | SRE << 6 | WPE << 7 | EAFE << 8
# (the PASID entry flags the translation was made under). PASID cache payload =
# did | pe_flags << 16, with flptr / slptr in the side array ``aux``.
# Replacement: tree-PLRU per set, as in hotpath._pure._Cache. The (ways - 1 <= 7) PLRU bits
# of a set live in bits 62:56 of its way-0 tag word (keys are at most 56 bits wide), so a
# lookup and its PLRU update touch only the set's own block. A tag word is valid when bit
# 63 is set; invalidation clears bit 63 and the key but keeps the PLRU bits.
ctypedef struct Aux:
    uint64_t flptr
    uint64_t slptr

ctypedef struct Cache:
    uint64_t *blk
    Aux *aux
    uint32_t sets
    uint32_t ways
    uint32_t mask
    uint32_t lg

ctypedef struct Dev:
    int attached
    int ats
    uint64_t dir_hpa
    Cache tlb
    uint8_t *defunct  # per-device PASID bitmap or NULL

ctypedef struct State:
    unsigned char *mem
    uint64_t mem_size
    int32_t *owners
    uint64_t nframes
    int atomic_ok
    Cache iotlb
    Cache pc
    uint8_t *gdefunct  # global PASID bitmap (PASID_LIMIT / 8 bytes)
    Dev devs[NDEV]
    uint64_t cnt[NCOUNTERS]
    uint64_t reasons[NREASONS]

cdef extern from *:
    """
    #define VS_FRAME_MASK ((1ULL << 36) - 1)
    /* Set lookup over the tag words of one set block: a branch-free match mask (the hit
       way is random, a compare-and-exit loop would mispredict on most lookups), then the
       payload check of the matching way(s). Returns the way or -1. */
    static inline __attribute__((always_inline)) int
    vs_set_find(const uint64_t *blk, uint32_t ways, uint64_t tag, uint64_t xmask, uint64_t xval) {
        uint32_t w;
        for (w = 0; w < ways; w++)
            if ((blk[w] & ~(0x7FULL << 56)) == tag && (blk[ways + w] & xmask) == xval)
                return (int)w;
        return -1;
    }
    /* Second-level walk of one GPA (4 levels unrolled; 2 MiB / 1 GiB leaves). Returns 0 or
       a fault code (reason | level << 8) that the caller counts; adds the entries read to
       *refs. Same checks, in the same order, as hotpath._pure.Iommu._sl. */
    static inline __attribute__((always_inline)) int32_t
    vs_sl_walk(const unsigned char *mem, uint64_t mem_size, uint64_t slptr, uint64_t gpa,
               uint32_t need, uint64_t *hpa, uint32_t *perms, int *leaf, uint64_t *refs) {
        uint64_t table = slptr, e, ea, mask;
        uint32_t p = 3;
        int level;
        if (gpa >= (1ULL << 48)) return 10;
        #pragma GCC unroll 4
        for (level = 4; level >= 1; level--) {
            unsigned sh = 12 + 9 * (unsigned)(level - 1);
            ea = table + ((gpa >> sh) & 511) * 8;
            if (ea + 8 > mem_size) return 10 | (level << 8);
            (*refs)++;
            e = vs_load64(mem + ea);
            if (!(e & 7)) return 7 | (level << 8);
            if (need & ~(uint32_t)e & 3) return 9 | (level << 8);
            p &= (uint32_t)e;
            if (level == 1 || (level <= 3 && (e & 0x80))) {
                mask = (1ULL << sh) - 1;
                *hpa = (e & 0x000FFFFFFFFFF000ULL & ~mask) | (gpa & mask);
                *perms = p & 3;
                *leaf = level;
                return 0;
            }
            table = e & 0x000FFFFFFFFFF000ULL;
        }
        return 10;
    }
    /* Nested walk (first level over second level), the checks and their order exactly as
       hotpath._pure.Iommu._walk: per first-level level, the table's GPA through the second
       level (SL_R), then the entry: P, R/W (writes; supervisor only with WPE), U/S (user),
       XD (exec), then A (and D on a written leaf) under EAFE with a locked cmpxchg (needs
       SL_W on the table page). Returns 0 or an uncounted fault code; counts entries read
       in *refs and A/D updates in *adw. */
    static inline __attribute__((always_inline)) int32_t
    vs_nested_walk(unsigned char *mem, uint64_t mem_size, int atomic_ok, uint64_t flptr,
                   uint64_t slptr, uint32_t flags, uint64_t va, uint32_t access,
                   uint64_t *frame_out, uint32_t *perms_out, uint64_t *refs, uint64_t *adw) {
        const uint64_t AM = 0x000FFFFFFFFFF000ULL;
        int user = !(access & 8), write = (access & 2) != 0, exe = (access & 4) != 0;
        int eafe = (flags & 0x80) != 0;
        int need_rw = write && (user || (flags & 0x10));
        uint64_t all_rw = 2, all_us = 4, any_xd = 0, table_gpa = flptr, gpa = 0, leaf_e = 0;
        uint64_t table_hpa, ea, e, bits, mask, hpa;
        uint32_t tperms, sperms, sl_need, perms;
        int sl_level, level, leaf;
        unsigned sh;
        int32_t f;
        for (level = 4; level >= 1; level--) {
            f = vs_sl_walk(mem, mem_size, slptr, table_gpa, 1, &table_hpa, &tperms, &sl_level,
                           refs);
            if (f) return f;
            sh = 12 + 9 * (unsigned)(level - 1);
            ea = table_hpa + ((va >> sh) & 511) * 8;
            if (ea + 8 > mem_size) return 10 | (level << 8);
            (*refs)++;
            e = vs_load64(mem + ea);
            if (!(e & 1)) return 6 | (level << 8);
            if ((need_rw && !(e & 2)) || (user && !(e & 4)) || (exe && (e >> 63)))
                return 8 | (level << 8);
            leaf = level == 1 || (level <= 3 && (e & 0x80));
            if (eafe) {
                bits = (e & 0x20) ? 0 : 0x20;
                if (leaf && write && !(e & 0x40)) bits |= 0x40;
                if (bits) {
                    if (!(tperms & 2)) return 9 | (sl_level << 8);
                    if (atomic_ok) {
                        if (vs_cas64(mem + ea, e, e | bits)) (*adw)++;
                    } else if (vs_load64(mem + ea) == e) {
                        vs_store64(mem + ea, e | bits);
                        (*adw)++;
                    }
                    e |= bits;
                }
            }
            all_rw &= e;
            all_us &= e;
            any_xd |= e & (1ULL << 63);
            if (leaf) {
                mask = (1ULL << sh) - 1;
                gpa = (e & AM & ~mask) | (va & mask);
                leaf_e = e;
                break;
            }
            table_gpa = e & AM;
        }
        sl_need = 0;
        if (write) sl_need |= 2;
        if ((access & 5) || !write) sl_need |= 1;
        f = vs_sl_walk(mem, mem_size, slptr, gpa, sl_need, &hpa, &sperms, &sl_level, refs);
        if (f) return f;
        perms = sperms;
        if (all_rw) perms |= 4;
        if (all_us) perms |= 8;
        if (!any_xd) perms |= 16;
        if (leaf_e & 0x40) perms |= 32;
        *frame_out = hpa >> 12;
        *perms_out = perms;
        return 0;
    }
    /* Tree-PLRU (hotpath._pure._Cache): node n (1 .. ways-1, heap order) of a set lives in
       bit 55 + n of its way-0 tag word, i.e. in bits 62:56 (never in VALID, bit 63). An
       access to way w rewrites the nodes on w's path: a precomputed clear mask and set mask
       per (lg, w); the victim is a lookup on the 7 node bits per lg. Built once at import
       by vs_plru_init with the twin's own loops. */
    static uint64_t vs_plru_clr[4][8], vs_plru_set[4][8];
    static uint8_t vs_plru_vic[4][128];
    static void vs_plru_init(void) {
        uint32_t lg, w, node, b, bits, i;
        int l;
        for (lg = 0; lg < 4; lg++) {
            for (w = 0; w < (1u << lg); w++) {
                uint64_t clr = 0, set = 0;
                node = 1;
                for (l = (int)lg - 1; l >= 0; l--) {
                    b = (w >> l) & 1;
                    clr |= 1ULL << (55 + node);
                    if (!b) set |= 1ULL << (55 + node);
                    node = 2 * node + b;
                }
                vs_plru_clr[lg][w] = clr;
                vs_plru_set[lg][w] = set;
            }
            for (bits = 0; bits < 128; bits++) {
                node = 1;
                for (i = 0; i < lg; i++)
                    node = 2 * node + (((bits << 1) >> node) & 1);
                vs_plru_vic[lg][bits] = (uint8_t)(node - (1u << lg));
            }
        }
    }
    static inline __attribute__((always_inline)) void
    vs_plru_touch(uint64_t *t0, uint32_t w, uint32_t lg) {
        *t0 = (*t0 & ~vs_plru_clr[lg][w]) | vs_plru_set[lg][w];
    }
    static inline __attribute__((always_inline)) uint32_t
    vs_plru_victim(uint64_t t0, uint32_t lg) {
        return vs_plru_vic[lg][(t0 >> 56) & 0x7F];
    }
    #define VS_DID_SHIFT 48
    #define VS_PERM_SHIFT 36
    """
    const uint64_t VS_FRAME_MASK
    int vs_set_find(const uint64_t *blk, uint32_t ways, uint64_t tag, uint64_t xmask,
                    uint64_t xval) noexcept nogil
    void vs_plru_touch(uint64_t *t0, uint32_t w, uint32_t lg) noexcept nogil
    uint32_t vs_plru_victim(uint64_t t0, uint32_t lg) noexcept nogil
    void vs_plru_init() noexcept nogil
    int32_t vs_sl_walk(const unsigned char *mem, uint64_t mem_size, uint64_t slptr,
                       uint64_t gpa, uint32_t need, uint64_t *hpa, uint32_t *perms,
                       int *leaf, uint64_t *refs) noexcept nogil
    int32_t vs_nested_walk(unsigned char *mem, uint64_t mem_size, int atomic_ok,
                           uint64_t flptr, uint64_t slptr, uint32_t flags, uint64_t va,
                           uint32_t access, uint64_t *frame_out, uint32_t *perms_out,
                           uint64_t *refs, uint64_t *adw) noexcept nogil
    const int VS_DID_SHIFT
    const int VS_PERM_SHIFT


vs_plru_init()  # the PLRU tables, before any cache is used


# ---------------------------------------------------------------------------- caches
cdef int cache_init(Cache *c, uint32_t sets, uint32_t ways, bint with_aux) noexcept nogil:
    cdef void *p = NULL
    c.sets = sets
    c.ways = ways
    c.mask = sets - 1
    c.lg = 0
    while (1u << c.lg) < ways:
        c.lg += 1
    cdef size_t size = <size_t>sets * ways * 2 * sizeof(uint64_t)
    if size >= HUGE_PAGE:
        # Big caches (the benchmark's) on transparent huge pages: random set lookups over
        # megabytes would otherwise pay a page walk in the CPU's own TLB most of the time.
        if posix_memalign(&p, HUGE_PAGE, (size + HUGE_PAGE - 1) & ~(<size_t>HUGE_PAGE - 1)) != 0:
            return -1
        vs_hugepage(p, (size + HUGE_PAGE - 1) & ~(<size_t>HUGE_PAGE - 1))
    elif posix_memalign(&p, 128, size) != 0:
        return -1
    c.blk = <uint64_t *>p
    memset(c.blk, 0, size)
    c.aux = NULL
    if with_aux:
        c.aux = <Aux *>calloc(<size_t>sets * ways, sizeof(Aux))
        if c.aux == NULL:
            return -1
    return 0

cdef void cache_free(Cache *c) noexcept nogil:
    free(c.blk)
    free(c.aux)
    c.blk = NULL
    c.aux = NULL

cdef inline uint32_t set_of(uint64_t key, uint32_t mask) noexcept nogil:
    return <uint32_t>(((key * VS_HASH_MULT) >> 32) & mask)

# slot = set * ways + way
cdef inline uint64_t *tag_at(Cache *c, uint64_t slot) noexcept nogil:
    cdef uint64_t st = slot >> c.lg
    return &c.blk[slot + st * c.ways]

cdef inline uint64_t *pay_at(Cache *c, uint64_t slot) noexcept nogil:
    cdef uint64_t st = slot >> c.lg
    return &c.blk[slot + st * c.ways + c.ways]

cdef inline void prefetch_set(Cache *c, uint64_t key) noexcept nogil:
    cdef uint64_t st = set_of(key, c.mask)
    cdef uint64_t *blk = c.blk + st * 2 * c.ways
    vs_prefetch(blk)
    vs_prefetch(blk + 8)  # payload line of an 8-way set (harmless extra line otherwise)

cdef inline int64_t cache_find(Cache *c, uint64_t key, uint64_t xmask,
                               uint64_t xval) noexcept nogil:
    """Slot whose tag is key and whose payload matches xval under xmask, or -1."""
    cdef uint64_t st = set_of(key, c.mask)
    cdef int w = vs_set_find(c.blk + st * 2 * c.ways, c.ways, key | VS_VALID, xmask, xval)
    if w < 0:
        return -1
    return <int64_t>(st * c.ways + <uint64_t>w)

cdef inline void cache_touch(Cache *c, uint64_t slot) noexcept nogil:
    """Tree-PLRU update for an access to `slot`."""
    cdef uint64_t st = slot >> c.lg
    vs_plru_touch(c.blk + st * 2 * c.ways, <uint32_t>(slot & (c.ways - 1)), c.lg)

cdef inline int64_t fill_way(Cache *c, uint64_t *blk, uint64_t st, int w, uint64_t tag,
                             uint64_t payload, int *evicted) noexcept nogil:
    """Fill set st (block blk) with tag (key | VALID): way w when the lookup just made on
    this set found the key there (w >= 0), else the first invalid way, else the PLRU victim
    (evicted = 1). Returns the slot."""
    cdef uint32_t i
    evicted[0] = 0
    if w < 0:
        for i in range(c.ways):
            if not (blk[i] >> 63):
                w = <int>i
                break
        if w < 0:
            w = <int>vs_plru_victim(blk[0], c.lg)
            evicted[0] = 1
    blk[w] = (blk[w] & VS_PLRU_MASK) | tag
    blk[c.ways + w] = payload
    vs_plru_touch(blk, <uint32_t>w, c.lg)
    return <int64_t>(st * c.ways + <uint64_t>w)

cdef int64_t cache_fill(Cache *c, uint64_t key, uint64_t xmask, uint64_t xval,
                        uint64_t payload, int *evicted) noexcept nogil:
    """Insert/overwrite key (existing match, first invalid way, else PLRU victim)."""
    cdef uint64_t st = set_of(key, c.mask)
    cdef uint64_t *blk = c.blk + st * 2 * c.ways
    cdef int w = vs_set_find(blk, c.ways, key | VS_VALID, xmask, xval)
    return fill_way(c, blk, st, w, key | VS_VALID, payload, evicted)

cdef uint64_t cache_clear(Cache *c) noexcept nogil:
    cdef uint64_t i, n = 0, total = <uint64_t>c.sets * c.ways
    cdef uint64_t *t
    for i in range(total):
        t = tag_at(c, i)
        if t[0] >> 63:
            t[0] &= VS_PLRU_MASK
            n += 1
    return n

# Selective removal. mode: 0 all, 1 did == a, 2 did == a and key>>36 == b,
# 3 (PASID cache) did == a, 4 (PASID cache) did == a and key & 0xFFFFF == b,
# 5 (PASID cache) key >> 20 == a, 6 key >> 36 == b.
cdef uint64_t cache_remove(Cache *c, int mode, uint64_t a, uint64_t b) noexcept nogil:
    cdef uint64_t i, n = 0, total = <uint64_t>c.sets * c.ways, key, pay
    cdef uint64_t *t
    cdef bint hit
    for i in range(total):
        t = tag_at(c, i)
        if not (t[0] >> 63):
            continue
        key = t[0] & VS_KEYMASK
        pay = pay_at(c, i)[0]
        if mode == 0:
            hit = True
        elif mode == 1:
            hit = (pay >> VS_DID_SHIFT) == a
        elif mode == 2:
            hit = (pay >> VS_DID_SHIFT) == a and (key >> 36) == b
        elif mode == 3:
            hit = (pay & 0xFFFF) == a
        elif mode == 4:
            hit = (pay & 0xFFFF) == a and (key & (PASID_LIMIT - 1)) == b
        elif mode == 5:
            hit = (key >> 20) == a
        else:
            hit = (key >> 36) == b
        if hit:
            t[0] &= VS_PLRU_MASK
            n += 1
    return n

cdef uint64_t cache_remove_range(Cache *c, uint64_t hi_key, uint64_t first, uint64_t count,
                                 uint64_t xmask, uint64_t xval) noexcept nogil:
    """Remove keys hi_key|vpn, vpn in [first, first+count); probe per page unless
    count >= sets, then scan everything (same rule as the twin)."""
    cdef uint64_t i, n = 0, total = <uint64_t>c.sets * c.ways, key, lo, hi, vpn, st, tag
    cdef uint64_t *t
    cdef uint64_t *blk
    cdef uint32_t w
    if count >= c.sets:
        lo = hi_key + first
        hi = hi_key + first + count
        for i in range(total):
            t = tag_at(c, i)
            if t[0] >> 63:
                key = t[0] & VS_KEYMASK
                if lo <= key < hi and (pay_at(c, i)[0] & xmask) == xval:
                    t[0] &= VS_PLRU_MASK
                    n += 1
        return n
    for vpn in range(first, first + count):
        key = hi_key | vpn
        tag = key | VS_VALID
        st = set_of(key, c.mask)
        blk = c.blk + st * 2 * c.ways
        for w in range(c.ways):
            if (blk[w] & ~VS_PLRU_MASK) == tag and (blk[c.ways + w] & xmask) == xval:
                blk[w] &= VS_PLRU_MASK
                n += 1
    return n


# ---------------------------------------------------------------------------- translation
cdef inline int32_t fault(State *s, int32_t code) noexcept nogil:
    s.cnt[C_FAULTS] += 1
    s.reasons[code & 0xFF] += 1
    return code

cdef inline uint32_t required(uint32_t access, uint32_t flags) noexcept nogil:
    cdef uint32_t need = 0
    cdef uint32_t priv = access & ACC_PRIV
    if access & ACC_W:
        need |= P_SL_W
        if not priv or (flags & PE_WPE_):
            need |= P_FL_RW
        if flags & PE_EAFE_:
            need |= P_FL_D
    if (access & (ACC_R | ACC_X)) or not (access & ACC_W):
        need |= P_SL_R
    if access & ACC_X:
        need |= P_FL_X
    if not priv:
        need |= P_FL_US
    return need

cdef inline int32_t owner_check(State *s, uint64_t frame, uint32_t did) noexcept nogil:
    if frame >= s.nframes:
        return fault(s, F_OOR)
    if s.owners[frame] != <int32_t>did:
        s.cnt[C_OWNER_VIOLATIONS] += 1
        return fault(s, F_OWNER)
    return 0

cdef int32_t walk(State *s, uint64_t flptr, uint64_t slptr, uint32_t flags, uint64_t va,
                  uint32_t access, uint64_t *frame_out, uint32_t *perms_out) noexcept nogil:
    """Nested walk (C: vs_nested_walk); counters added once at the end."""
    cdef uint64_t refs = 0, adw = 0
    cdef int32_t f
    s.cnt[C_WALKS] += 1
    f = vs_nested_walk(s.mem, s.mem_size, s.atomic_ok, flptr, slptr, flags, va, access,
                       frame_out, perms_out, &refs, &adw)
    s.cnt[C_MEMORY_REFS] += refs
    s.cnt[C_AD_WRITES] += adw
    if f:
        return fault(s, f)
    return 0


cdef int32_t pasid_miss(State *s, uint32_t dev, uint64_t dir_hpa, uint64_t pasid,
                       uint64_t key, int64_t *slot) noexcept nogil:
    """PASID-cache miss: read the directory and table entries, check, fill."""
    cdef uint64_t pde, pe_addr, w0, w1, w2
    cdef int64_t i
    cdef int ev
    s.cnt[C_PC_MISSES] += 1
    s.cnt[C_PASID_REFS] += 1
    pde = vs_load64(s.mem + dir_hpa + (pasid >> 6) * 8)
    if not (pde & 1):
        return fault(s, F_PDE_NOT_PRESENT)
    pe_addr = (pde & VS_ADDR_MASK) + (pasid & 63) * 64
    if pe_addr + 64 > s.mem_size:
        return fault(s, F_OOR)
    s.cnt[C_PASID_REFS] += 1
    w0 = vs_load64(s.mem + pe_addr)
    w1 = vs_load64(s.mem + pe_addr + 8)
    w2 = vs_load64(s.mem + pe_addr + 16)
    if not (w0 & 1):
        return fault(s, F_PE_NOT_PRESENT)
    if ((w0 >> 6) & 7) != 3 or ((w0 >> 2) & 7) != 2 or ((w2 >> 2) & 3) != 0:
        return fault(s, F_BAD_PASID_ENTRY)
    s.cnt[C_PC_FILLS] += 1
    i = cache_fill(&s.pc, key, 0, 0, (w1 & 0xFFFF) | ((w2 & PE_FLAGS) << 16), &ev)
    if ev:
        s.cnt[C_PC_EVICTIONS] += 1
    s.pc.aux[i].flptr = w2 & VS_ADDR_MASK
    s.pc.aux[i].slptr = w0 & VS_ADDR_MASK
    slot[0] = i
    return 0

cdef inline int32_t pasid_lookup(State *s, uint32_t dev, uint64_t dir_hpa, uint64_t pasid,
                                 int64_t *slot) noexcept nogil:
    cdef uint64_t key = (<uint64_t>dev << 20) | pasid
    cdef int64_t i
    s.cnt[C_PC_LOOKUPS] += 1
    i = cache_find(&s.pc, key, 0, 0)
    if i >= 0:
        s.cnt[C_PC_HITS] += 1
        cache_touch(&s.pc, <uint64_t>i)
        slot[0] = i
        return 0
    return pasid_miss(s, dev, dir_hpa, pasid, key, slot)

cdef inline bint is_defunct(State *s, uint32_t dev, uint64_t pasid) noexcept nogil:
    if (s.gdefunct[pasid >> 3] >> (pasid & 7)) & 1:
        return True
    cdef uint8_t *d = s.devs[dev].defunct
    return d != NULL and ((d[pasid >> 3] >> (pasid & 7)) & 1)

cdef inline uint32_t dev_perm_pack(uint32_t perms, uint32_t flags) noexcept nogil:
    return perms | ((flags & PE_SRE_) << 6) | (((flags >> 4) & 1) << 7) | (((flags >> 7) & 1) << 8)

cdef inline uint32_t dev_perm_flags(uint32_t packed) noexcept nogil:
    return ((packed >> 6) & 1) | (((packed >> 7) & 1) << 4) | (((packed >> 8) & 1) << 7)

cdef inline int32_t devtlb_hit(State *s, Dev *d, uint64_t tkey, uint64_t off, uint32_t access,
                               uint64_t *pa, int *way) noexcept nogil:
    """Device-TLB lookup: 0 = hit (pa set), fault code on a hit failing the owner check,
    -1 = miss (including a hit whose permissions do not cover the request). *way = the
    way holding tkey in its set, or -1 (the fill after a miss reuses it)."""
    cdef uint64_t *blk = d.tlb.blk + <uint64_t>set_of(tkey, d.tlb.mask) * 2 * d.tlb.ways
    cdef int w
    cdef uint64_t p
    cdef uint32_t packed, eflags, need
    cdef int32_t f
    s.cnt[C_DEVTLB_LOOKUPS] += 1
    w = vs_set_find(blk, d.tlb.ways, tkey | VS_VALID, 0, 0)
    way[0] = w
    if w >= 0:
        p = blk[d.tlb.ways + w]
        packed = <uint32_t>((p >> VS_PERM_SHIFT) & 0xFFF)
        eflags = dev_perm_flags(packed)
        need = required(access, eflags)
        if (packed & need) == need and (not (access & ACC_PRIV) or (eflags & PE_SRE_)):
            s.cnt[C_DEVTLB_HITS] += 1
            vs_plru_touch(blk, <uint32_t>w, d.tlb.lg)
            f = owner_check(s, p & VS_FRAME_MASK, <uint32_t>(p >> VS_DID_SHIFT))
            if f:
                return f
            pa[0] = ((p & VS_FRAME_MASK) << PG_SHIFT) | off
            return 0
    s.cnt[C_DEVTLB_MISSES] += 1
    return -1

cdef int32_t translate1(State *s, uint32_t dev, uint64_t pasid, uint64_t va, uint32_t access,
                        uint64_t *pa) noexcept nogil:
    cdef Dev *d
    cdef uint64_t vpn, off, tkey, frame = 0, p, pcpay, iset, dset, tag, didw
    cdef uint64_t *iblk
    cdef uint32_t need, perms = 0, did, flags
    cdef int64_t pslot
    cdef int32_t f
    cdef int ev, iw, dw = -1
    s.cnt[C_TRANSLATIONS] += 1
    pa[0] = 0
    if dev >= NDEV or not s.devs[dev].attached:
        return fault(s, F_NO_CONTEXT)
    d = &s.devs[dev]
    if pasid >= PASID_LIMIT:
        return fault(s, F_PASID_INVALID)
    if is_defunct(s, dev, pasid):
        s.cnt[C_DEFUNCT_DROPS] += 1
        return fault(s, F_DEFUNCT)
    if va >= VS_VA_LIMIT:
        return fault(s, F_OOR)
    vpn = va >> PG_SHIFT
    off = va & (PG_SIZE - 1)
    tkey = (pasid << 36) | vpn
    tag = tkey | VS_VALID
    if d.ats:
        f = devtlb_hit(s, d, tkey, off, access, pa, &dw)
        if f >= 0:
            return f
    f = pasid_lookup(s, dev, d.dir_hpa, pasid, &pslot)
    if f:
        return f
    pcpay = pay_at(&s.pc, <uint64_t>pslot)[0]
    did = <uint32_t>(pcpay & 0xFFFF)
    flags = <uint32_t>(pcpay >> 16) & 0xFF
    if (access & ACC_PRIV) and not (flags & PE_SRE_):
        return fault(s, F_FL_PERMISSION)
    need = required(access, flags)
    didw = (<uint64_t>did) << VS_DID_SHIFT
    s.cnt[C_IOTLB_LOOKUPS] += 1
    # One set lookup serves both the hit check and, on a miss, the fill (the walk in
    # between does not touch the IOTLB).
    iset = set_of(tkey, s.iotlb.mask)
    iblk = s.iotlb.blk + iset * 2 * s.iotlb.ways
    iw = vs_set_find(iblk, s.iotlb.ways, tag, 0xFFFFULL << VS_DID_SHIFT, didw)
    if iw >= 0:
        p = iblk[s.iotlb.ways + iw]
        perms = <uint32_t>((p >> VS_PERM_SHIFT) & 0xFFF)
        if (perms & need) == need:
            s.cnt[C_IOTLB_HITS] += 1
            vs_plru_touch(iblk, <uint32_t>iw, s.iotlb.lg)
            frame = p & VS_FRAME_MASK
            f = owner_check(s, frame, did)
            if f:
                return f
            if d.ats:
                s.cnt[C_DEVTLB_FILLS] += 1
                dset = set_of(tkey, d.tlb.mask)
                fill_way(&d.tlb, d.tlb.blk + dset * 2 * d.tlb.ways, dset, dw, tag,
                         frame | (<uint64_t>dev_perm_pack(perms, flags) << VS_PERM_SHIFT)
                         | didw, &ev)
                if ev:
                    s.cnt[C_DEVTLB_EVICTIONS] += 1
            pa[0] = (frame << PG_SHIFT) | off
            return 0
    s.cnt[C_IOTLB_MISSES] += 1
    f = walk(s, s.pc.aux[pslot].flptr, s.pc.aux[pslot].slptr, flags, va, access,
             &frame, &perms)
    if f:
        return f
    f = owner_check(s, frame, did)
    if f:
        return f
    s.cnt[C_IOTLB_FILLS] += 1
    fill_way(&s.iotlb, iblk, iset, iw, tag,
             frame | (<uint64_t>perms << VS_PERM_SHIFT) | didw, &ev)
    if ev:
        s.cnt[C_IOTLB_EVICTIONS] += 1
    if d.ats:
        s.cnt[C_DEVTLB_FILLS] += 1
        dset = set_of(tkey, d.tlb.mask)
        fill_way(&d.tlb, d.tlb.blk + dset * 2 * d.tlb.ways, dset, dw, tag,
                 frame | (<uint64_t>dev_perm_pack(perms, flags) << VS_PERM_SHIFT)
                 | didw, &ev)
        if ev:
            s.cnt[C_DEVTLB_EVICTIONS] += 1
    pa[0] = (frame << PG_SHIFT) | off
    return 0


cdef inline int fast_hit(State *s, Dev *d, uint32_t dev, uint64_t pasid, uint64_t va,
                         uint32_t access, uint64_t *pa) noexcept nogil:
    """The common case of translate1 without side effects until it is sure: an attached
    device, a live PASID, a PASID-cache hit and an IOTLB hit (no ATS) or a device-TLB hit
    (ATS) whose permissions cover the request and whose frame the domain owns. Returns 1
    (IOTLB) or 2 (device TLB) after applying exactly the PLRU updates translate1 would make
    (the caller adds the matching counters), else 0 having changed nothing, and the caller
    runs translate1."""
    cdef uint64_t tkey, p, frame, pcpay, key
    cdef uint64_t *pblk
    cdef uint64_t *iblk
    cdef int pw, iw
    cdef uint32_t did, flags, need, perms
    if va >= VS_VA_LIMIT or pasid >= PASID_LIMIT or is_defunct(s, dev, pasid):
        return 0
    tkey = (pasid << 36) | (va >> PG_SHIFT)
    if d.ats:
        iblk = d.tlb.blk + <uint64_t>set_of(tkey, d.tlb.mask) * 2 * d.tlb.ways
        iw = vs_set_find(iblk, d.tlb.ways, tkey | VS_VALID, 0, 0)
        if iw < 0:
            return 0
        p = iblk[d.tlb.ways + iw]
        perms = <uint32_t>((p >> VS_PERM_SHIFT) & 0xFFF)
        flags = dev_perm_flags(perms)
        need = required(access, flags)
        if (perms & need) != need or ((access & ACC_PRIV) and not (flags & PE_SRE_)):
            return 0
        frame = p & VS_FRAME_MASK
        if frame >= s.nframes or s.owners[frame] != <int32_t>(p >> VS_DID_SHIFT):
            return 0
        vs_plru_touch(iblk, <uint32_t>iw, d.tlb.lg)
        pa[0] = (frame << PG_SHIFT) | (va & (PG_SIZE - 1))
        return 2
    key = (<uint64_t>dev << 20) | pasid
    pblk = s.pc.blk + <uint64_t>set_of(key, s.pc.mask) * 2 * s.pc.ways
    pw = vs_set_find(pblk, s.pc.ways, key | VS_VALID, 0, 0)
    if pw < 0:
        return 0
    pcpay = pblk[s.pc.ways + pw]
    did = <uint32_t>(pcpay & 0xFFFF)
    flags = <uint32_t>(pcpay >> 16) & 0xFF
    if (access & ACC_PRIV) and not (flags & PE_SRE_):
        return 0
    need = required(access, flags)
    iblk = s.iotlb.blk + <uint64_t>set_of(tkey, s.iotlb.mask) * 2 * s.iotlb.ways
    iw = vs_set_find(iblk, s.iotlb.ways, tkey | VS_VALID, 0xFFFFULL << VS_DID_SHIFT,
                     (<uint64_t>did) << VS_DID_SHIFT)
    if iw < 0:
        return 0
    p = iblk[s.iotlb.ways + iw]
    perms = <uint32_t>((p >> VS_PERM_SHIFT) & 0xFFF)
    frame = p & VS_FRAME_MASK
    if (perms & need) != need or frame >= s.nframes or s.owners[frame] != <int32_t>did:
        return 0
    vs_plru_touch(pblk, <uint32_t>pw, s.pc.lg)
    vs_plru_touch(iblk, <uint32_t>iw, s.iotlb.lg)
    pa[0] = (frame << PG_SHIFT) | (va & (PG_SIZE - 1))
    return 1


cdef inline uint64_t min3(uint64_t a, uint64_t b, uint64_t c) noexcept nogil:
    if b < a:
        a = b
    if c < a:
        a = c
    return a


cdef uint64_t batch_loop(State *s, Dev *d, uint32_t dv, Py_ssize_t n, const uint64_t *v,
                         const uint32_t *pv, uint64_t pscalar, const uint8_t *av,
                         uint32_t ascalar, uint64_t *opa, int32_t *ofl) noexcept nogil:
    """The batch: fast hit path, else translate1; returns the number of faults."""
    cdef Py_ssize_t k
    cdef uint64_t nf = 0, pasid, hits_before
    cdef uint64_t n_iotlb_fast = 0, n_dev_fast = 0
    cdef uint32_t acc
    cdef int hitk
    cdef bint last_slow = False
    cdef bint pasid_arr = pv != NULL, acc_arr = av != NULL
    for k in range(n):
        # Software prefetch: start loading the IOTLB set of request k + D now (the set
        # does not depend on the domain, so no PASID-cache lookup is needed).
        if k + PREFETCH_AHEAD < n:
            pasid = pv[k + PREFETCH_AHEAD] if pasid_arr else pscalar
            prefetch_set(&s.iotlb, ((pasid & (PASID_LIMIT - 1)) << 36)
                         | ((v[k + PREFETCH_AHEAD] >> PG_SHIFT) & VS_VPN_MASK))
        pasid = pv[k] if pasid_arr else pscalar
        acc = av[k] if acc_arr else ascalar
        # Fast path, unless the previous request went the full way and was no cache hit
        # there either: then a run of misses (cold walks) does not pay for the fast
        # path's lookups twice. Purely a speed choice; results are the same.
        if d != NULL and not last_slow:
            hitk = fast_hit(s, d, dv, pasid, v[k], acc, &opa[k])
            if hitk == 1:
                n_iotlb_fast += 1
                ofl[k] = 0
                continue
            if hitk == 2:
                n_dev_fast += 1
                ofl[k] = 0
                continue
        hits_before = s.cnt[C_IOTLB_HITS] + s.cnt[C_DEVTLB_HITS]
        ofl[k] = translate1(s, dv, pasid, v[k], acc, &opa[k])
        last_slow = s.cnt[C_IOTLB_HITS] + s.cnt[C_DEVTLB_HITS] == hits_before
        if ofl[k]:
            nf += 1
    # counters of the fast hits, exactly as translate1 would have counted them
    s.cnt[C_TRANSLATIONS] += n_iotlb_fast + n_dev_fast
    s.cnt[C_PC_LOOKUPS] += n_iotlb_fast
    s.cnt[C_PC_HITS] += n_iotlb_fast
    s.cnt[C_IOTLB_LOOKUPS] += n_iotlb_fast
    s.cnt[C_IOTLB_HITS] += n_iotlb_fast
    s.cnt[C_DEVTLB_LOOKUPS] += n_dev_fast
    s.cnt[C_DEVTLB_HITS] += n_dev_fast
    return nf


cdef bint _fmt_ok(Py_buffer *b, Py_ssize_t itemsize, bint signed):
    cdef const char *f = b.format
    cdef char c
    if b.ndim != 1 or b.itemsize != itemsize:
        return False
    if f == NULL:
        return itemsize == 1 and not signed
    while f[0] == b'<' or f[0] == b'=' or f[0] == b'@':
        f += 1
    c = f[0]
    if c == 0 or f[1] != 0:
        return False
    if signed:
        return c == b'b' or c == b'h' or c == b'i' or c == b'l' or c == b'q' or c == b'n'
    return c == b'B' or c == b'H' or c == b'I' or c == b'L' or c == b'Q' or c == b'N'


cdef int _acquire(object obj, Py_buffer *b, Py_ssize_t itemsize, bint signed,
                  bint writable) except -1:
    """0 with the buffer held, or 1 (nothing held) if obj is no 1-d C-contiguous array of
    `itemsize`-byte (un)signed integers. Much cheaper than a typed memoryview."""
    cdef int flags = PyBUF_FORMAT | PyBUF_C_CONTIGUOUS
    if writable:
        flags |= PyBUF_WRITABLE
    try:
        PyObject_GetBuffer(obj, b, flags)
    except (BufferError, TypeError, ValueError):
        return 1
    if not _fmt_ok(b, itemsize, signed):
        PyBuffer_Release(b)
        return 1
    return 0


cdef int _acquire_in(object obj, Py_buffer *b, Py_ssize_t itemsize, object dtype) except -1:
    if _acquire(obj, b, itemsize, False, False) == 0:
        return 0
    obj = np.ascontiguousarray(obj, dtype=dtype)
    if obj.ndim != 1:
        raise ValueError("expected a 1-d array")
    if _acquire(obj, b, itemsize, False, False) == 0:
        return 0
    raise ValueError("unusable input array")


def _page_range(addr, size_order):
    # size_order beyond the 2^36 pages of a 48-bit space is clamped (over-invalidating is
    # always safe); a negative one is an error.
    size_order = int(size_order)
    if size_order < 0:
        raise ValueError("size_order must be >= 0")
    size_order = min(size_order, 36)
    count = 1 << size_order
    first = (int(addr) >> PG_SHIFT) & ~(count - 1) & ((1 << 36) - 1)
    return first, count


def _pow2(name, n):
    n = int(n)
    if n < 1 or n & (n - 1):
        raise ValueError(f"{name} must be a power of two >= 1, got {n}")
    return n


cdef class Iommu:
    """Compiled IOMMU (see module docstring and hotpath._pure.Iommu for the semantics)."""

    cdef State st
    cdef object _mem
    cdef object _owners
    cdef unsigned char[::1] _memv
    cdef int32_t[::1] _ownv
    cdef readonly uint64_t mem_size
    cdef readonly uint64_t nframes
    cdef readonly uint32_t iotlb_sets, iotlb_ways, devtlb_sets, devtlb_ways, pasid_cache_sets
    implementation = "compiled"

    def __cinit__(self):
        memset(&self.st, 0, sizeof(State))

    def __init__(self, mem, owners, *, iotlb_sets=256, iotlb_ways=8, devtlb_entries=1024,
                 devtlb_ways=4, pasid_cache_entries=1024):
        if not isinstance(owners, np.ndarray) or owners.dtype != np.int32 or owners.ndim != 1:
            raise ValueError("owners must be a 1-d numpy int32 array")
        mv = memoryview(mem)
        if mv.readonly:
            raise ValueError("mem must be a writable buffer")
        self._mem = mem
        self._owners = owners
        self._memv = mv.cast("B")
        self._ownv = owners
        self.mem_size = self._memv.shape[0]
        self.nframes = min(self.mem_size >> PG_SHIFT, <uint64_t>owners.shape[0])
        self.st.mem = &self._memv[0]
        self.st.mem_size = self.mem_size
        self.st.owners = &self._ownv[0] if owners.shape[0] else NULL
        self.st.nframes = self.nframes
        self.st.atomic_ok = (<size_t>self.st.mem & 7) == 0
        self.iotlb_sets = _pow2("iotlb_sets", iotlb_sets)
        self.iotlb_ways = _pow2("iotlb_ways", iotlb_ways)
        self.devtlb_ways = _pow2("devtlb_ways", devtlb_ways)
        if self.iotlb_ways > 8 or self.devtlb_ways > 8:
            raise ValueError("at most 8 ways")
        if self.nframes >= (1 << 36):
            raise ValueError("memory too large (the caches hold 36-bit frame numbers)")
        self.devtlb_sets = _pow2("devtlb_entries / devtlb_ways",
                                 max(1, int(devtlb_entries) // self.devtlb_ways))
        self.pasid_cache_sets = _pow2("pasid_cache_entries / 4",
                                      max(1, int(pasid_cache_entries) // PASID_CACHE_WAYS))
        if cache_init(&self.st.iotlb, self.iotlb_sets, self.iotlb_ways, False) or \
                cache_init(&self.st.pc, self.pasid_cache_sets, PASID_CACHE_WAYS, True):
            raise MemoryError()
        self.st.gdefunct = <uint8_t *>calloc(PASID_LIMIT // 8, 1)
        if self.st.gdefunct == NULL:
            raise MemoryError()

    def __dealloc__(self):
        cdef int i
        cache_free(&self.st.iotlb)
        cache_free(&self.st.pc)
        free(self.st.gdefunct)
        for i in range(NDEV):
            cache_free(&self.st.devs[i].tlb)
            free(self.st.devs[i].defunct)

    # ------------------------------------------------------------------ devices
    def attach_device(self, dev, pasid_dir_hpa, ats=True):
        dev = int(dev)
        if not 0 <= dev < NDEV:
            raise ValueError(f"device id must be in [0, {NDEV}), got {dev}")
        pasid_dir_hpa = int(pasid_dir_hpa)
        if pasid_dir_hpa & (PG_SIZE - 1) or pasid_dir_hpa <= 0 or \
                pasid_dir_hpa + PASID_DIR_FRAMES * PG_SIZE > self.mem_size:
            raise ValueError(f"bad PASID directory address {pasid_dir_hpa:#x}")
        if self.st.devs[dev].attached:
            self.detach_device(dev)
        cdef Dev *d = &self.st.devs[<int>dev]
        if cache_init(&d.tlb, self.devtlb_sets, self.devtlb_ways, False):
            raise MemoryError()
        d.dir_hpa = pasid_dir_hpa
        d.ats = 1 if ats else 0
        d.attached = 1

    def detach_device(self, dev):
        """Drop the context, device TLB and the device's PASID-cache entries (IOTLB stays)."""
        dev = int(dev)
        if not 0 <= dev < NDEV or not self.st.devs[dev].attached:
            return
        cdef Dev *d = &self.st.devs[<int>dev]
        d.attached = 0
        cache_free(&d.tlb)
        cache_remove(&self.st.pc, 5, <uint64_t>dev, 0)
        free(d.defunct)
        d.defunct = NULL

    # ------------------------------------------------------------------ defunct PASIDs
    def set_defunct(self, pasid, defunct, dev=None):
        pasid = int(pasid)
        if not 0 <= pasid < PASID_LIMIT:
            raise ValueError("PASID out of range")
        cdef uint8_t *bm
        if dev is None:
            bm = self.st.gdefunct
        else:
            dev = int(dev)
            if not 0 <= dev < NDEV:
                raise ValueError("bad device id")
            if self.st.devs[dev].defunct == NULL:
                if not defunct:
                    return
                self.st.devs[dev].defunct = <uint8_t *>calloc(PASID_LIMIT // 8, 1)
                if self.st.devs[dev].defunct == NULL:
                    raise MemoryError()
            bm = self.st.devs[dev].defunct
        if defunct:
            bm[pasid >> 3] |= (1 << (pasid & 7))
        else:
            bm[pasid >> 3] &= ~(1 << (pasid & 7))

    def is_defunct(self, pasid, dev=None):
        pasid = int(pasid)
        if not 0 <= pasid < PASID_LIMIT:
            return False
        if (self.st.gdefunct[pasid >> 3] >> (pasid & 7)) & 1:
            return True
        if dev is None or not 0 <= int(dev) < NDEV:
            return False
        cdef uint8_t *bm = self.st.devs[<int>dev].defunct
        return bm != NULL and bool((bm[pasid >> 3] >> (pasid & 7)) & 1)

    # ------------------------------------------------------------------ translation
    def translate_one(self, dev, pasid, va, access):
        """(pa, 0) on success, (0, fault code) on a fault."""
        cdef uint64_t pa = 0
        cdef int64_t dv = dev
        cdef int64_t ps = pasid
        cdef int64_t acc = access
        cdef int32_t f
        if va < 0 or va >= (1 << 64):
            va = (1 << 63)
        if dv < 0 or dv >= NDEV:
            dv = NDEV
        if ps < 0:
            ps = PASID_LIMIT
        f = translate1(&self.st, <uint32_t>dv, <uint64_t>ps, <uint64_t>va,
                       <uint32_t>acc, &pa)
        return pa, f

    def translate(self, dev, pasids, vas, access, out_pa, out_fault):
        """Batch translate (runs without the GIL). vas uint64[n]; pasids uint32[n] or a
        scalar; access uint8[n] or a scalar; out_pa uint64[>=n]; out_fault int32[>=n]
        (C-contiguous, writable). Inputs of another dtype are converted (a copy).
        Returns the number of faults."""
        cdef Py_buffer bv, bp, ba, bo, bf
        cdef bint hv = False, hp = False, ha = False, ho = False, hf = False
        cdef const uint64_t *v = NULL
        cdef const uint32_t *pv = NULL
        cdef const uint8_t *av = NULL
        cdef uint64_t *opa = NULL
        cdef int32_t *ofl = NULL
        cdef uint64_t pscalar = 0
        cdef uint32_t ascalar = 0
        cdef bint pasid_arr = False, acc_arr = False
        cdef Py_ssize_t n, k
        cdef uint64_t nf = 0
        cdef int64_t dv = dev
        cdef State *s = &self.st
        cdef Dev *d
        cdef uint64_t pasid
        cdef uint32_t acc
        cdef uint64_t n_iotlb_fast = 0, n_dev_fast = 0
        cdef int hitk
        cdef bint last_slow = False
        cdef uint64_t hits_before
        try:
            _acquire_in(vas, &bv, 8, np.uint64)
            hv = True
            v = <const uint64_t *>bv.buf
            n = bv.len // 8
            if isinstance(pasids, (int, np.integer)):
                pscalar = <uint64_t>pasids if pasids >= 0 else PASID_LIMIT
            else:
                _acquire_in(pasids, &bp, 4, np.uint32)
                hp = True
                pv = <const uint32_t *>bp.buf
                pasid_arr = True
                if bp.len // 4 != n:
                    raise ValueError("pasids and vas differ in length")
            if isinstance(access, (int, np.integer)):
                ascalar = <uint32_t>access
            else:
                _acquire_in(access, &ba, 1, np.uint8)
                ha = True
                av = <const uint8_t *>ba.buf
                acc_arr = True
                if ba.len != n:
                    raise ValueError("access and vas differ in length")
            if _acquire(out_pa, &bo, 8, False, True):
                raise ValueError("out_pa must be a writable C-contiguous uint64 array")
            ho = True
            if _acquire(out_fault, &bf, 4, True, True):
                raise ValueError("out_fault must be a writable C-contiguous int32 array")
            hf = True
            opa = <uint64_t *>bo.buf
            ofl = <int32_t *>bf.buf
            if bo.len // 8 < n or bf.len // 4 < n:
                raise ValueError("output arrays too short")
            if dv < 0 or dv >= NDEV:
                dv = NDEV
            d = &s.devs[dv] if dv < NDEV and s.devs[dv].attached else NULL
            with nogil:
                nf = batch_loop(s, d, <uint32_t>dv, n, v, pv, pscalar, av, ascalar, opa, ofl)
        finally:
            if hv:
                PyBuffer_Release(&bv)
            if hp:
                PyBuffer_Release(&bp)
            if ha:
                PyBuffer_Release(&ba)
            if ho:
                PyBuffer_Release(&bo)
            if hf:
                PyBuffer_Release(&bf)
        return nf


    # ------------------------------------------------------------------ invalidation
    def inv_iotlb(self, granularity, did=0, pasid=0, addr=0, size_order=0, ih=False):
        """IOTLB invalidation ('global'|'domain'|'pasid'|'page'); returns entries removed."""
        g = inv_granularity(granularity)
        cdef uint64_t n, first, count
        cdef uint64_t d = int(did) & 0xFFFFFFFF
        cdef uint64_t p = int(pasid) & 0xFFFFFFFFFFFF
        if g == 0:
            self.st.cnt[C_IOTLB_INV_GLOBAL] += 1
            n = cache_clear(&self.st.iotlb)
        elif g == 1:
            self.st.cnt[C_IOTLB_INV_DOMAIN] += 1
            n = cache_remove(&self.st.iotlb, 1, d, 0)
        elif g == 2:
            self.st.cnt[C_IOTLB_INV_PASID] += 1
            n = cache_remove(&self.st.iotlb, 2, d, p)
        else:
            self.st.cnt[C_IOTLB_INV_PAGE] += 1
            first, count = _page_range(addr, size_order)
            with nogil:
                n = cache_remove_range(&self.st.iotlb, p << 36, first, count,
                                       0xFFFFULL << VS_DID_SHIFT, d << VS_DID_SHIFT)
        self.st.cnt[C_IOTLB_INV_ENTRIES] += n
        return n

    def inv_pasid_cache(self, granularity, did=0, pasid=0):
        """PASID-cache invalidation ('global'|'domain'|'pasid'); returns entries removed."""
        g = inv_granularity(granularity)
        cdef uint64_t n
        cdef uint64_t d = int(did) & 0xFFFFFFFF
        cdef uint64_t p = int(pasid) & 0xFFFFFFFFFFFF
        if g == 0:
            self.st.cnt[C_PC_INV_GLOBAL] += 1
            n = cache_clear(&self.st.pc)
        elif g == 1:
            self.st.cnt[C_PC_INV_DOMAIN] += 1
            n = cache_remove(&self.st.pc, 3, d, 0)
        elif g == 2:
            self.st.cnt[C_PC_INV_PASID] += 1
            n = cache_remove(&self.st.pc, 4, d, p)
        else:
            raise ValueError("the PASID cache has no address granularity")
        self.st.cnt[C_PC_INV_ENTRIES] += n
        return n

    def inv_devtlb(self, dev, pasid=None, addr=None, size_order=0):
        """Device-TLB invalidation: whole (pasid None), PASID (addr None), PASID + range."""
        dev = int(dev)
        cdef bint attached = 0 <= dev < NDEV and self.st.devs[dev].attached
        cdef Cache *c = &self.st.devs[dev].tlb if attached else NULL
        cdef uint64_t n = 0, first, count, p
        if pasid is None:
            self.st.cnt[C_DEVTLB_INV_ALL] += 1
            if attached:
                n = cache_clear(c)
        elif addr is None:
            self.st.cnt[C_DEVTLB_INV_PASID] += 1
            if attached:
                n = cache_remove(c, 6, 0, <uint64_t>int(pasid))
        else:
            self.st.cnt[C_DEVTLB_INV_ADDR] += 1
            first, count = _page_range(addr, size_order)
            p = int(pasid) & 0xFFFFFFFFFFFF
            if attached:
                n = cache_remove_range(c, p << 36, first, count, 0, 0)
        self.st.cnt[C_DEVTLB_INV_ENTRIES] += n
        return n

    # ------------------------------------------------------------------ counters / dump
    def counters(self):
        out = {name: self.st.cnt[i] for i, name in enumerate(COUNTER_NAMES)}
        out["faults_by_reason"] = {FAULT_NAMES.get(r, f"fault-{r}"): self.st.reasons[r]
                                   for r in range(NREASONS) if self.st.reasons[r]}
        return out

    def reset_counters(self):
        memset(self.st.cnt, 0, sizeof(self.st.cnt))
        memset(self.st.reasons, 0, sizeof(self.st.reasons))

    def cache_dump(self):
        cdef uint64_t i, total, key, pay, pk
        cdef Cache *c
        cdef int dev
        iotlb = []
        c = &self.st.iotlb
        total = <uint64_t>c.sets * c.ways
        for i in range(total):
            if tag_at(c, i)[0] >> 63:
                key = tag_at(c, i)[0] & VS_KEYMASK
                pay = pay_at(c, i)[0]
                iotlb.append((pay >> VS_DID_SHIFT, key >> 36, key & VS_VPN_MASK,
                              pay & VS_FRAME_MASK, (pay >> VS_PERM_SHIFT) & 0xFFF))
        pc = []
        c = &self.st.pc
        total = <uint64_t>c.sets * c.ways
        for i in range(total):
            if tag_at(c, i)[0] >> 63:
                key = tag_at(c, i)[0] & VS_KEYMASK
                pay = pay_at(c, i)[0]
                pc.append((key >> 20, key & (PASID_LIMIT - 1), pay & 0xFFFF, c.aux[i].flptr,
                           c.aux[i].slptr, (pay >> 16) & 0xFF))
        devtlb = {}
        devices = {}
        defunct_dev = {}
        for dev in range(NDEV):
            if self.st.devs[dev].attached:
                devices[dev] = {"pasid_dir": self.st.devs[dev].dir_hpa,
                                "ats": bool(self.st.devs[dev].ats)}
                lst = []
                c = &self.st.devs[dev].tlb
                total = <uint64_t>c.sets * c.ways
                for i in range(total):
                    if tag_at(c, i)[0] >> 63:
                        key = tag_at(c, i)[0] & VS_KEYMASK
                        pay = pay_at(c, i)[0]
                        pk = (pay >> VS_PERM_SHIFT) & 0xFFF
                        lst.append((key >> 36, key & VS_VPN_MASK, pay & VS_FRAME_MASK,
                                    (pk & 0x3F) | (dev_perm_flags(<uint32_t>pk) << 8),
                                    pay >> VS_DID_SHIFT))
                devtlb[dev] = sorted(lst)
            if self.st.devs[dev].defunct != NULL:
                ds = _bitmap_list(self.st.devs[dev].defunct)
                if ds:
                    defunct_dev[dev] = ds
        return {
            "iotlb": sorted(iotlb),
            "pasid_cache": sorted(pc),
            "devtlb": devtlb,
            "devices": devices,
            "defunct": _bitmap_list(self.st.gdefunct),
            "defunct_dev": defunct_dev,
        }

    # ------------------------------------------------------------------ DMA engine
    def dma_copy(self, dev, pasid, src, dst, length, access_flags=0):
        """(status, fault_va, done); see hotpath._pure.Iommu.dma_copy."""
        cdef State *s = &self.st
        cdef uint64_t S = src, D = dst, L = length, done = 0, sv, dv, n, spa, dpa
        cdef uint64_t ps = pasid
        cdef uint32_t dv_ = dev if 0 <= dev < NDEV else NDEV
        cdef uint32_t ra = ACC_R | <uint32_t>access_flags, wa = ACC_W | <uint32_t>access_flags
        cdef int32_t f = 0
        cdef uint64_t fva = 0
        s.cnt[C_DMA_DESCRIPTORS] += 1
        with nogil:
            while done < L:
                sv = S + done
                dv = D + done
                n = min3(L - done, PG_SIZE - (sv & (PG_SIZE - 1)), PG_SIZE - (dv & (PG_SIZE - 1)))
                f = translate1(s, dv_, ps, sv, ra, &spa)
                if f:
                    fva = sv
                    break
                f = translate1(s, dv_, ps, dv, wa, &dpa)
                if f:
                    fva = dv
                    break
                memmove(s.mem + dpa, s.mem + spa, n)
                done += n
                s.cnt[C_DMA_BYTES] += n
        if f:
            s.cnt[C_DMA_FAULTS] += 1
        return f, fva, done

    def dma_fill(self, dev, pasid, dst, length, pattern, access_flags=0):
        """(status, fault_va, done); see hotpath._pure.Iommu.dma_fill."""
        cdef State *s = &self.st
        cdef uint64_t D = dst, L = length, done = 0, dv, n, dpa
        cdef uint64_t ps = pasid
        cdef uint32_t dv_ = dev if 0 <= dev < NDEV else NDEV
        cdef uint32_t wa = ACC_W | <uint32_t>access_flags
        cdef int pat = int(pattern) & 0xFF
        cdef int32_t f = 0
        cdef uint64_t fva = 0
        s.cnt[C_DMA_DESCRIPTORS] += 1
        with nogil:
            while done < L:
                dv = D + done
                n = min3(L - done, PG_SIZE - (dv & (PG_SIZE - 1)), PG_SIZE)
                f = translate1(s, dv_, ps, dv, wa, &dpa)
                if f:
                    fva = dv
                    break
                memset(s.mem + dpa, pat, n)
                done += n
                s.cnt[C_DMA_BYTES] += n
        if f:
            s.cnt[C_DMA_FAULTS] += 1
        return f, fva, done

    def dma_compare(self, dev, pasid, a, b, length, access_flags=0):
        """(status, fault_va, result, done); see hotpath._pure.Iommu.dma_compare."""
        cdef State *s = &self.st
        cdef uint64_t A = a, B = b, L = length, done = 0, xv, yv, n, xpa, ypa, k
        cdef uint64_t ps = pasid
        cdef uint32_t dv_ = dev if 0 <= dev < NDEV else NDEV
        cdef uint32_t ra = ACC_R | <uint32_t>access_flags
        cdef int32_t f = 0
        cdef uint64_t fva = 0, result = 0
        s.cnt[C_DMA_DESCRIPTORS] += 1
        with nogil:
            while done < L:
                xv = A + done
                yv = B + done
                n = min3(L - done, PG_SIZE - (xv & (PG_SIZE - 1)), PG_SIZE - (yv & (PG_SIZE - 1)))
                f = translate1(s, dv_, ps, xv, ra, &xpa)
                if f:
                    fva = xv
                    break
                f = translate1(s, dv_, ps, yv, ra, &ypa)
                if f:
                    fva = yv
                    break
                if memcmp(s.mem + xpa, s.mem + ypa, n) != 0:
                    k = 0
                    while s.mem[xpa + k] == s.mem[ypa + k]:
                        k += 1
                    s.cnt[C_DMA_BYTES] += k
                    result = done + k + 1
                    done += k
                    break
                done += n
                s.cnt[C_DMA_BYTES] += n
        if f:
            s.cnt[C_DMA_FAULTS] += 1
        return f, fva, result, done


cdef list _bitmap_list(uint8_t *bm):
    cdef list out = []
    cdef uint64_t i
    cdef int b
    for i in range(PASID_LIMIT // 8):
        if bm[i]:
            for b in range(8):
                if (bm[i] >> b) & 1:
                    out.append(<int>(i * 8 + b))
    return out


# ---------------------------------------------------------------------------- baselines
cdef class BareHash:
    """Bare open-addressing hash (linear probing, load <= 0.5, Fibonacci hash) mapping
    key = pasid << 36 | vpn to a frame; interleaved [key + 1, frame] u64 pairs."""

    cdef uint64_t *slots
    cdef uint64_t mask
    cdef int shift

    def __cinit__(self):
        self.slots = NULL

    def __init__(self, pasids, vpns, frames):
        cdef const uint32_t[::1] p = np.ascontiguousarray(pasids, dtype=np.uint32)
        cdef const uint64_t[::1] v = np.ascontiguousarray(vpns, dtype=np.uint64)
        cdef const uint64_t[::1] fr = np.ascontiguousarray(frames, dtype=np.uint64)
        cdef uint64_t size = 2, n = v.shape[0], i, key, h
        cdef int bits = 1
        while size < 2 * n:
            size <<= 1
            bits += 1
        self.mask = size - 1
        self.shift = 64 - bits
        self.slots = <uint64_t *>calloc(size * 2, sizeof(uint64_t))
        if self.slots == NULL:
            raise MemoryError()
        for i in range(n):
            key = ((<uint64_t>p[i]) << 36) | v[i]
            h = (key * VS_HASH_MULT) >> self.shift
            while self.slots[2 * h] != 0 and self.slots[2 * h] != key + 1:
                h = (h + 1) & self.mask
            self.slots[2 * h] = key + 1
            self.slots[2 * h + 1] = fr[i]

    def __dealloc__(self):
        free(self.slots)

    def lookup(self, const uint32_t[::1] pasids, const uint64_t[::1] vas, uint64_t[::1] out):
        """out[k] = pa of (pasids[k], vas[k]) or 0 if absent; returns the misses."""
        cdef Py_ssize_t k, n = vas.shape[0]
        cdef uint64_t key, h, miss = 0, va
        with nogil:
            for k in range(n):
                va = vas[k]
                key = ((<uint64_t>pasids[k]) << 36) | (va >> PG_SHIFT)
                h = (key * VS_HASH_MULT) >> self.shift
                while True:
                    if self.slots[2 * h] == key + 1:
                        out[k] = (self.slots[2 * h + 1] << PG_SHIFT) | (va & (PG_SIZE - 1))
                        break
                    if self.slots[2 * h] == 0:
                        out[k] = 0
                        miss += 1
                        break
                    h = (h + 1) & self.mask
        return miss


cdef inline uint64_t bare_sl(const unsigned char *mem, uint64_t slptr, uint64_t gpa) noexcept nogil:
    cdef uint64_t t = slptr
    cdef int level
    for level in range(4, 0, -1):
        t = vs_load64(mem + (t & VS_ADDR_MASK) + ((gpa >> (PG_SHIFT + 9 * (level - 1))) & 511) * 8)
    return (t & VS_ADDR_MASK) | (gpa & (PG_SIZE - 1))


def bare_walk(mem, const uint64_t[::1] flptrs, const uint64_t[::1] slptrs,
              const uint32_t[::1] pasids, const uint64_t[::1] vas, uint64_t[::1] out):
    """Bare nested 4x4 walk (24 reads, no checks, 4 KiB pages only): flptrs/slptrs are
    indexed by PASID. For the benchmark baseline only."""
    cdef const unsigned char[::1] mv = memoryview(mem).cast("B")
    cdef const unsigned char *m = &mv[0]
    cdef Py_ssize_t k, n = vas.shape[0]
    cdef uint64_t va, gpa, sl, e
    cdef uint32_t p
    cdef int level
    with nogil:
        for k in range(n):
            va = vas[k]
            p = pasids[k]
            sl = slptrs[p]
            gpa = flptrs[p]
            for level in range(4, 0, -1):
                e = vs_load64(m + bare_sl(m, sl, gpa & VS_ADDR_MASK) +
                              ((va >> (PG_SHIFT + 9 * (level - 1))) & 511) * 8)
                gpa = e & VS_ADDR_MASK
            out[k] = bare_sl(m, sl, gpa | (va & (PG_SIZE - 1)))
    return None
