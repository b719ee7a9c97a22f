/* C walkers of the compiled hot path (hotpath/_walk.pxi): the second-level walk and the
   nested first-level walk, with the same checks in the same order as hotpath._pure
   (Iommu._sl, Iommu._walk, _fl_reserved, _rights_fault, whose docstrings give the rules
   and the VT-d sections they follow). Fault codes are returned uncounted. */
#ifndef VS_WALK_H
#define VS_WALK_H
#include "_cache.h"

#define VS_FAULT_AT(reason, level) ((int32_t)((reason) | ((uint32_t)(level) << 8)))

/* Second-level walk of one GPA (4 levels unrolled; 2 MiB / 1 GiB leaves). Returns 0 or a
   fault code; adds the entries read to *refs. */
static inline __attribute__((always_inline)) int32_t
vs_sl_walk(const unsigned char *mem, uint64_t mem_size, uint64_t slptr, uint64_t gpa,
           uint32_t need, uint64_t *hpa, uint32_t *perms, int *leaf, uint64_t *refs) {
    uint64_t table = slptr, e, ea, mask;
    uint32_t p = VS_SL_R | VS_SL_W;
    int level;
    if (gpa >= VS_GPA_LIMIT) return VS_FAULT_OOR_ADDRESS;
    #pragma GCC unroll 4
    for (level = 4; level >= 1; level--) {
        unsigned sh = VS_PAGE_SHIFT + 9 * (unsigned)(level - 1);
        ea = table + ((gpa >> sh) & 511) * 8;
        if (ea + 8 > mem_size) return VS_FAULT_AT(VS_FAULT_OOR_ADDRESS, level);
        (*refs)++;
        e = vs_load64(mem + ea);
        if (__builtin_expect(!(e & (VS_SL_R | VS_SL_W | VS_SL_X)) | (need & ~(uint32_t)e & (VS_SL_R | VS_SL_W)), 0))
            return VS_FAULT_AT((e & (VS_SL_R | VS_SL_W | VS_SL_X)) ? VS_FAULT_SL_PERMISSION
                               : VS_FAULT_SL_NOT_PRESENT, level);
        p &= (uint32_t)e;
        if (level == 1 || (level <= 3 && (e & VS_SL_PS))) {
            mask = (1ULL << sh) - 1;
            *hpa = (e & VS_ADDR_MASK & ~mask) | (gpa & mask);
            *perms = p & (VS_SL_R | VS_SL_W);
            *leaf = level;
            return 0;
        }
        table = e & VS_ADDR_MASK;
    }
    return VS_FAULT_OOR_ADDRESS;
}

/* Reserved bits of a present first-level entry (hotpath._pure._fl_reserved). */
static inline __attribute__((always_inline)) uint64_t
vs_fl_reserved(int level, int leaf) {
    if (level == 4) return VS_FL_RSVD_ADDR | VS_FL_PS;
    if (leaf && level > 1)
        return VS_FL_RSVD_ADDR | (VS_ADDR_MASK & ((1ULL << (VS_PAGE_SHIFT + 9 * (level - 1))) - 1)
                                  & ~VS_FL_PAT_LARGE);
    return VS_FL_RSVD_ADDR;
}

/* Rights combined over the whole path (hotpath._pure._rights_fault). */
static inline __attribute__((always_inline)) int32_t
vs_rights_fault(uint32_t access, uint32_t flags, uint64_t all_rw, uint64_t all_us,
                uint64_t any_xd) {
    int user = !(access & VS_ACCESS_PRIV);
    if (user && !all_us) return VS_FAULT_FL_PERMISSION;
    if ((access & VS_ACCESS_WRITE) && (user || (flags & VS_PE_WPE)) && !all_rw)
        return VS_FAULT_FL_PERMISSION;
    if ((access & VS_ACCESS_EXEC) && (any_xd || (!user && all_us)))
        return VS_FAULT_FL_PERMISSION;
    return 0;
}

/* PERM_* bits a cached translation must hold to serve `access` (layout.required_perms). */
static inline __attribute__((always_inline)) uint32_t
vs_required(uint32_t access, uint32_t flags) {
    int user = !(access & VS_ACCESS_PRIV);
    uint32_t need = 0;
    if (access & VS_ACCESS_WRITE) {
        need |= VS_PERM_SL_W | VS_PERM_FL_D;
        if (user || (flags & VS_PE_WPE)) need |= VS_PERM_FL_RW;
    }
    if ((access & (VS_ACCESS_READ | VS_ACCESS_EXEC)) || !(access & VS_ACCESS_WRITE))
        need |= VS_PERM_SL_R;
    if (access & VS_ACCESS_EXEC)
        need |= user ? VS_PERM_FL_X : (VS_PERM_FL_X | VS_PERM_FL_SUPV);
    if (user) need |= VS_PERM_FL_US;
    return need;
}

/* vs_required for every (access, SRE, WPE), with VS_NEED_NEVER added where a supervisor
   request meets an entry without SRE: the fast hit paths then take it for a miss and the
   full path raises the fault. One load instead of the branches above, per hit. */
#define VS_NEED_NEVER (1u << 31)
static uint32_t vs_need_tab[64] __attribute__((unused));
static __attribute__((unused)) void vs_need_init(void) {
    uint32_t i, access, flags;
    for (i = 0; i < 64; i++) {
        access = i & 15;
        flags = ((i & 16) ? VS_PE_WPE : 0) | ((i & 32) ? VS_PE_SRE : 0);
        vs_need_tab[i] = vs_required(access, flags)
                         | (((access & VS_ACCESS_PRIV) && !(flags & VS_PE_SRE)) ? VS_NEED_NEVER : 0);
    }
}
static inline __attribute__((always_inline)) const uint32_t *
vs_need_row(uint32_t flags) {  /* the row of one PASID entry's flags, indexed by access & 15 */
    return vs_need_tab + (((flags & VS_PE_WPE) ? 16 : 0) | ((flags & VS_PE_SRE) ? 32 : 0));
}
static inline __attribute__((always_inline)) uint32_t
vs_need_fast(uint32_t access, uint32_t flags) {
    return vs_need_row(flags)[access & 15];
}

/* x86-64 canonical form (layout.is_canonical): bits 63:47 all equal. */
static inline __attribute__((always_inline)) int vs_canonical(uint64_t va) {
    return (uint64_t)(((int64_t)va >> (VS_VA_BITS - 1)) + 1) <= 1;
}

/* Nested walk (first level over second level), hotpath._pure.Iommu._walk: per level the
   table's GPA through the second level (SL_R), then the entry: P, reserved bits, A on a
   non-leaf entry; at the leaf the combined rights, then A (and D on a write) with a locked
   cmpxchg (needs SL_W on the table page). Returns 0 or a fault code; counts entries read
   in *refs and A/D updates in *adw. */
static __attribute__((noinline)) int32_t
vs_nested_walk_checked(unsigned char *mem, uint64_t mem_size, int atomic_ok, uint64_t flptr,
               uint64_t slptr, uint32_t flags, uint64_t va, uint32_t access,
               uint64_t *frame_out, uint32_t *perms_out, uint64_t *refs, uint64_t *adw) {
    int write = (access & VS_ACCESS_WRITE) != 0;
    uint64_t ad = (flags & VS_PE_EAFE) ? (VS_FL_A | VS_FL_EA) : VS_FL_A;
    uint64_t all_rw = VS_FL_RW, all_us = VS_FL_US, any_xd = 0, table_gpa = flptr, gpa = 0;
    uint64_t e = 0, table_hpa, ea, bits, mask, hpa;
    uint32_t tperms, sperms, sl_need, perms;
    int sl_level, level, leaf;
    unsigned sh;
    int32_t f;
    #pragma GCC unroll 4
    for (level = 4; level >= 1; level--) {
        f = vs_sl_walk(mem, mem_size, slptr, table_gpa, VS_SL_R, &table_hpa, &tperms,
                       &sl_level, refs);
        if (f) return f;
        sh = VS_PAGE_SHIFT + 9 * (unsigned)(level - 1);
        ea = table_hpa + ((va >> sh) & 511) * 8;
        if (ea + 8 > mem_size) return VS_FAULT_AT(VS_FAULT_OOR_ADDRESS, level);
        (*refs)++;
        e = vs_load64(mem + ea);
        leaf = level == 1 || (level <= 3 && (e & VS_FL_PS));
        if (__builtin_expect(!(e & VS_FL_P) | ((e & vs_fl_reserved(level, leaf)) != 0), 0))
            return VS_FAULT_AT((e & VS_FL_P) ? VS_FAULT_FL_RESERVED : VS_FAULT_FL_NOT_PRESENT,
                               level);
        all_rw &= e;
        all_us &= e;
        any_xd |= e & VS_FL_XD;
        if (leaf) {
            f = vs_rights_fault(access, flags, all_rw, all_us, any_xd);
            if (f) return VS_FAULT_AT(f, level);
        }
        bits = (ad | ((leaf && write) ? VS_FL_D : 0)) & ~e;
        if (bits) {
            if (!(tperms & VS_SL_W)) return VS_FAULT_AT(VS_FAULT_SL_PERMISSION, sl_level);
            if (atomic_ok) {
                if (vs_cas64(mem + ea, e, e | bits)) (*adw)++;
            } else if (vs_load64(mem + ea) == e) {
                vs_store64(mem + ea, e | bits);
                (*adw)++;
            }
            e |= bits;
        }
        if (leaf) {
            mask = (1ULL << sh) - 1;
            gpa = (e & VS_ADDR_MASK & ~mask) | (va & mask);
            break;
        }
        table_gpa = e & VS_ADDR_MASK;
    }
    sl_need = write ? VS_SL_W : 0;
    if ((access & (VS_ACCESS_READ | VS_ACCESS_EXEC)) || !write) sl_need |= VS_SL_R;
    f = vs_sl_walk(mem, mem_size, slptr, gpa, sl_need, &hpa, &sperms, &sl_level, refs);
    if (f) return f;
    perms = sperms;  /* PERM_SL_R == SL_R, PERM_SL_W == SL_W */
    perms |= all_rw ? VS_PERM_FL_RW : 0;
    perms |= all_us ? VS_PERM_FL_US : VS_PERM_FL_SUPV;
    perms |= any_xd ? 0 : VS_PERM_FL_X;
    perms |= (e & VS_FL_D) ? VS_PERM_FL_D : 0;
    *frame_out = hpa >> VS_PAGE_SHIFT;
    *perms_out = perms;
    return 0;
}

/* What the walk of the common case must find, per (access, WPE, EAFE) (the checks of
   vs_nested_walk_checked for a walk that passes them, made once at import by vs_judge_init):
   bits the AND of the first-level entries must hold (need: P, A (and EA), U/S for a user
   request, R/W for a write that needs it, bit 63 = no XD for an execute) and must not
   (forbid: U/S for a supervisor execute), the rights of the final second-level walk
   (sneed), D in the leaf (dneed). */
typedef struct { uint64_t need, forbid, sneed, dneed; } vs_judge_t;
static vs_judge_t vs_judge_tab[64] __attribute__((unused));
static inline __attribute__((always_inline)) const vs_judge_t *
vs_judge_of(uint32_t access, uint32_t flags) {
    return &vs_judge_tab[(access & 15) | ((flags & VS_PE_WPE) ? 16 : 0)
                         | ((flags & VS_PE_EAFE) ? 32 : 0)];
}
static __attribute__((unused)) void vs_judge_init(void) {
    uint32_t i, a, flags, user, write, exec;
    vs_judge_t *j;
    for (i = 0; i < 64; i++) {
        a = i & 15;
        flags = ((i & 16) ? VS_PE_WPE : 0) | ((i & 32) ? VS_PE_EAFE : 0);
        user = !(a & VS_ACCESS_PRIV);
        write = (a & VS_ACCESS_WRITE) != 0;
        exec = (a & VS_ACCESS_EXEC) != 0;
        j = &vs_judge_tab[i];
        j->need = VS_FL_P | ((flags & VS_PE_EAFE) ? (VS_FL_A | VS_FL_EA) : VS_FL_A)
                  | (user ? VS_FL_US : 0)
                  | ((write && (user || (flags & VS_PE_WPE))) ? VS_FL_RW : 0)
                  | (exec ? VS_FL_XD : 0);
        j->forbid = (exec && !user) ? VS_FL_US : 0;
        j->sneed = (write ? VS_SL_W : 0)
                   | (((a & (VS_ACCESS_READ | VS_ACCESS_EXEC)) || !write) ? VS_SL_R : 0);
        j->dneed = write ? VS_FL_D : 0;
    }
}

/* The walk of the common case, for speed only: the walk of vs_nested_walk_checked, reading
   the same entries in the same order, but without side effects and without decoding
   faults. For a request whose every entry is present, permits the access, has no reserved
   bit set and needs no A/D update, it gives the checked walk's result (refs = entries
   read); for any other, refs 0, and the caller runs the checked walk from the start (so
   every fault, every A/D update and every counter comes from that one walk). The checks are
   accumulated (an AND of P, R/W, U/S, A and of "no XD" over the path, a word of failure
   flags) and judged once at the end; an entry that fails one still leads the walk on,
   through addresses clamped to memory, to a result that is discarded.

   It walks several requests in lockstep, one table level at a time: in a run of misses
   (the batch loop's group walk) the cache misses of different requests then overlap, as
   the several page-walk engines of an IOMMU do, where one walk after the other waits for
   each of its 24 reads in turn. The caller uses a group result only while no A/D update
   has changed memory since (walk in _walk.pxi). */
#define VS_GROUP 8
typedef struct {
    uint64_t flptr, slptr, va;  /* in: the PASID entry's pointers, the address */
    uint32_t flags, access;     /* in */
    uint64_t frame;             /* out */
    uint32_t perms, refs;       /* out; refs 0 = no result */
} vs_spec_t;

/* A second-level entry of GPA g at shift sh, in the table entry e points to (address bits
   taken as all the bits of e above 11: see vs_sl_lane); ANDed into *p. */
static inline __attribute__((always_inline)) uint64_t
vs_sl_next(const unsigned char *mem, uint64_t mem_last, uint64_t e, uint64_t g, const int sh,
           uint64_t *p, uint32_t *bad, const int r) {
    uint64_t ea = (e & ~0xFFFULL) + ((g >> (sh - 3)) & 0xFF8);  /* the next entry after e */
    if (__builtin_expect(ea > mem_last, 0)) { *bad |= 1u << r; ea = 0; }
    e = vs_load64(mem + ea);
    *p &= e;
    return e;
}

/* The end of vs_sl_lane at a leaf of `level`. */
static inline __attribute__((always_inline)) uint64_t
vs_sl_leaf(uint64_t e, uint64_t g, const int level, uint64_t p, uint64_t *pand, uint64_t *refs,
           const int r) {
    uint64_t mask = (1ULL << (VS_PAGE_SHIFT + 9 * (level - 1))) - 1;
    *pand = p;
    *refs += (uint64_t)(5 - level) << (8 * r);
    if (level == 1) return e & VS_ADDR_MASK;
    return (e & VS_ADDR_MASK & ~mask) | (g & mask);
}

/* The second-level walk of GPA g from table t for request r (4 levels, written out so that
   every shift and mask is a constant): returns the HPA (for a 4 KiB leaf without the page
   offset, which only the frame number of the final walk uses), the entries ANDed into
   *pand, and their count in request r's byte of *refs, added once at the leaf. A table
   entry's address bits are taken as all its bits above 11: an entry with any bit above the
   address set then points outside memory, so the walk is discarded (the checked walk, which
   ignores those bits, gives the result) at the price of one AND with a short immediate. */
static inline __attribute__((always_inline)) uint64_t
vs_sl_lane(const unsigned char *mem, uint64_t mem_last, uint64_t t, uint64_t g,
           uint64_t *pand, uint32_t *bad, uint64_t *refs, const int r) {
    uint64_t ea, e, p = *pand, i = g >> 39;
    if (__builtin_expect(i > 511, 0)) { *bad |= 1u << r; i = 0; }  /* g >= VS_GPA_LIMIT */
    ea = t + i * 8;
    if (__builtin_expect(ea > mem_last, 0)) { *bad |= 1u << r; ea = 0; }
    e = vs_load64(mem + ea);
    p &= e;
    e = vs_sl_next(mem, mem_last, e, g, 30, &p, bad, r);
    if (__builtin_expect((e & VS_SL_PS) != 0, 0)) return vs_sl_leaf(e, g, 3, p, pand, refs, r);
    e = vs_sl_next(mem, mem_last, e, g, 21, &p, bad, r);
    if (__builtin_expect((e & VS_SL_PS) != 0, 0)) return vs_sl_leaf(e, g, 2, p, pand, refs, r);
    e = vs_sl_next(mem, mem_last, e, g, 12, &p, bad, r);
    return vs_sl_leaf(e, g, 1, p, pand, refs, r);
}

/* Second-level walks of g[r] for every r, one after the other (each walk's state then
   stays in registers; the out-of-order core overlaps the walks of different requests, as
   the several page-walk engines of an IOMMU do): hpa[r], the AND of the entries read in
   pand[r]. Per-request flags are bits of one word, the entries read are counted in one
   word too (8 bits per request). */
static inline __attribute__((always_inline)) void
vs_sl_group(const unsigned char *mem, uint64_t mem_last, const vs_spec_t *q,
            const uint64_t *g, uint64_t *hpa, uint64_t *pand, uint32_t *bad, uint64_t *refs,
            const int N) {
    int r;
    #pragma GCC unroll 8
    for (r = 0; r < N; r++)
        hpa[r] = vs_sl_lane(mem, mem_last, q[r].slptr, g[r], &pand[r], bad, refs, r);
}

/* One first-level entry of the lockstep walk of request r at `level`, table HPA hr. */
static inline __attribute__((always_inline)) void
vs_fl_step(const unsigned char *mem, uint64_t mem_last, const vs_spec_t *qr, uint64_t hr,
           uint64_t *gr, uint64_t *acc, uint64_t *leafe, uint64_t *at_leaf, uint32_t *bad,
           uint64_t *refs, uint32_t *fdone, const int level, const int r) {
    unsigned sh = VS_PAGE_SHIFT + 9 * (unsigned)(level - 1);
    uint64_t ea = hr + ((qr->va >> sh) & 511) * 8, e, mask;
    int leaf;
    if (__builtin_expect(ea > mem_last, 0)) { *bad |= 1u << r; ea = 0; }
    e = vs_load64(mem + ea);
    leaf = level == 1 || (level <= 3 && (e & VS_FL_PS));
    if (__builtin_expect((e & vs_fl_reserved(level, leaf)) != 0, 0)) *bad |= 1u << r;
    *acc &= e ^ VS_FL_XD;  /* AND of P, R/W, U/S, A; bit 63 = no XD on the path */
    if (leaf) {
        mask = (1ULL << sh) - 1;
        *gr = (e & VS_ADDR_MASK & ~mask) | (qr->va & mask);
        *leafe = e;
        *refs += (uint64_t)(5 - level) << (8 * r);  /* the first-level entries read */
        *at_leaf = *refs;  /* the table walks after a large page read in vain */
        *fdone |= 1u << r;
    } else {
        *gr = e & VS_ADDR_MASK;
    }
}

/* The walks of q[0 .. N-1] (N a constant: the loops over r unroll, the state of every
   walk stays in registers). */
static inline __attribute__((always_inline)) void
vs_walk_lockstep(const unsigned char *mem, uint64_t mem_size, vs_spec_t *q, const int N) {
    uint64_t g[VS_GROUP], h[VS_GROUP], acc[VS_GROUP], tand[VS_GROUP], fand[VS_GROUP], leafe[VS_GROUP];
    uint64_t at_leaf[VS_GROUP], mem_last, refs = 0, before;
    uint32_t ok, bad = 0, fdone = 0, skip;
    const vs_judge_t *j;
    int level, r;
    for (r = 0; r < N; r++) q[r].refs = 0;
    if (mem_size < 8) return;
    mem_last = mem_size - 8;
    #pragma GCC unroll 8
    for (r = 0; r < N; r++) {
        g[r] = q[r].flptr;
        acc[r] = tand[r] = fand[r] = ~0ULL;
        leafe[r] = 0;
    }
    #pragma GCC unroll 4
    for (level = 4; level >= 1; level--) {
        vs_sl_group(mem, mem_last, q, g, h, tand, &bad, &refs, N);
        skip = level <= 2 ? fdone : 0;  /* the walks that ended in a large page above */
        if (__builtin_expect(!skip, 1)) {
            #pragma GCC unroll 8
            for (r = 0; r < N; r++)
                vs_fl_step(mem, mem_last, &q[r], h[r], &g[r], &acc[r], &leafe[r], &at_leaf[r],
                           &bad, &refs, &fdone, level, r);
        } else {
            #pragma GCC unroll 8
            for (r = 0; r < N; r++)
                if (!(skip & (1u << r)))
                    vs_fl_step(mem, mem_last, &q[r], h[r], &g[r], &acc[r], &leafe[r],
                               &at_leaf[r], &bad, &refs, &fdone, level, r);
        }
    }
    before = refs;
    vs_sl_group(mem, mem_last, q, g, h, fand, &bad, &refs, N);
    for (r = 0; r < N; r++) {
        j = vs_judge_of(q[r].access, q[r].flags);
        ok = !(bad & (1u << r)) && (tand[r] & VS_SL_R) && (fand[r] & j->sneed) == j->sneed
             && (acc[r] & j->need) == j->need && !(acc[r] & j->forbid)
             && (leafe[r] & j->dneed) == j->dneed;
        if (!ok) continue;
        q[r].frame = h[r] >> VS_PAGE_SHIFT;
        q[r].perms = (uint32_t)(fand[r] & (VS_SL_R | VS_SL_W))  /* == PERM_SL_R | PERM_SL_W */
                     | ((acc[r] & VS_FL_RW) ? VS_PERM_FL_RW : 0)
                     | ((acc[r] & VS_FL_US) ? VS_PERM_FL_US : VS_PERM_FL_SUPV)
                     | ((acc[r] & VS_FL_XD) ? VS_PERM_FL_X : 0)
                     | ((leafe[r] & VS_FL_D) ? VS_PERM_FL_D : 0);
        q[r].refs = (uint32_t)((at_leaf[r] >> (8 * r)) & 0xFF)
                    + (uint32_t)((refs >> (8 * r)) & 0xFF) - (uint32_t)((before >> (8 * r)) & 0xFF);
    }
}

/* Group walk of q[0 .. n-1], 1 <= n <= VS_GROUP (the slots above n are overwritten). */
static void
vs_walk_group(const unsigned char *mem, uint64_t mem_size, int n, vs_spec_t *q) {
    int r;
    if (n < 1) return;
    for (r = n; r < VS_GROUP; r++) q[r] = q[0];
    vs_walk_lockstep(mem, mem_size, q, VS_GROUP);
}

/* Nested walk: the common case without side effects first (the lockstep walk of one
   request), else the checked walk from the start. */
static inline __attribute__((always_inline)) int32_t
vs_nested_walk(unsigned char *mem, uint64_t mem_size, int atomic_ok, uint64_t flptr,
               uint64_t slptr, uint32_t flags, uint64_t va, uint32_t access,
               uint64_t *frame_out, uint32_t *perms_out, uint64_t *refs, uint64_t *adw) {
    vs_spec_t one;
    one.flptr = flptr;
    one.slptr = slptr;
    one.va = va;
    one.flags = flags;
    one.access = access;
    vs_walk_lockstep(mem, mem_size, &one, 1);
    if (__builtin_expect(one.refs != 0, 1)) {
        *frame_out = one.frame;
        *perms_out = one.perms;
        *refs += one.refs;
        return 0;
    }
    return vs_nested_walk_checked(mem, mem_size, atomic_ok, flptr, slptr, flags, va, access,
                                  frame_out, perms_out, refs, adw);
}
#endif
