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

/* x86-64 canonical form (layout.is_canonical): bits 63:47 all equal. */
static inline __attribute__((always_inline)) int vs_canonical(uint64_t va) {
    return (uint64_t)(((int64_t)va >> (VS_VA_BITS - 1)) + 1) <= 1;
}

/* Nested walk (first level over second level), hotpath._pure.Iommu._walk: per level the
   table's GPA through the second level (SL_R), then the entry: P, reserved bits, A on a
   non-leaf entry; at the leaf the combined rights, then A (and D on a write) with a locked
   cmpxchg (needs SL_W on the table page). Returns 0 or a fault code; counts entries read
   in *refs and A/D updates in *adw. */
static inline __attribute__((always_inline)) int32_t
vs_nested_walk(unsigned char *mem, uint64_t mem_size, int atomic_ok, uint64_t flptr,
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
/* Prefetching for cold batches: a read-only walk of up to VS_PREWALK requests in lockstep,
   one table level at a time, so that the cache misses of different requests overlap (as
   the several page-walk engines of an IOMMU do) and the real walks that follow, one request
   at a time and with every check, find their entries (and the owner entry of the final
   frame) in the CPU cache. It reads only what those walks will read, checks only what it
   needs to know where to read next, and changes nothing. */
#define VS_PREWALK 8
static volatile uint64_t vs_prewalk_sink;

static inline uint64_t vs_level_mask(int level) {
    return (1ULL << (VS_PAGE_SHIFT + 9 * (unsigned)(level - 1))) - 1;
}
static inline uint64_t vs_index_of(uint64_t addr, int level) {
    return ((addr >> (VS_PAGE_SHIFT + 9 * (unsigned)(level - 1))) & 511) * 8;
}
static void
vs_prewalk(const unsigned char *mem, uint64_t mem_size, const int32_t *owners,
           uint64_t nframes, int n, const uint64_t *flptr, const uint64_t *slptr,
           const uint64_t *va) {
    uint64_t g[VS_PREWALK], t[VS_PREWALK], e, ea, sink = 0;
    int stage[VS_PREWALK], lvl[VS_PREWALK], insl[VS_PREWALK];
    int r, step, sl;
    for (r = 0; r < n; r++) { g[r] = flptr[r]; stage[r] = 1; lvl[r] = 4; }
    for (step = 0; step < 5; step++) {
        for (r = 0; r < n; r++) {
            t[r] = slptr[r];
            insl[r] = stage[r] != 0 && g[r] < VS_GPA_LIMIT;
            if (stage[r] && !insl[r]) stage[r] = 0;
        }
        for (sl = 4; sl >= 1; sl--) {
            for (r = 0; r < n; r++) {
                if (!insl[r]) continue;
                ea = t[r] + vs_index_of(g[r], sl);
                if (ea + 8 > mem_size) { insl[r] = stage[r] = 0; continue; }
                e = vs_load64(mem + ea);
                if (!(e & (VS_SL_R | VS_SL_W | VS_SL_X))) { insl[r] = stage[r] = 0; continue; }
                if (sl == 1 || (sl <= 3 && (e & VS_SL_PS))) {
                    t[r] = (e & VS_ADDR_MASK & ~vs_level_mask(sl)) | (g[r] & vs_level_mask(sl));
                    insl[r] = 0;
                } else {
                    t[r] = e & VS_ADDR_MASK;
                }
            }
        }
        for (r = 0; r < n; r++) {
            if (stage[r] == 2) {  /* the final frame: its owner entry is read next */
                stage[r] = 0;
                sink ^= t[r];
                if ((t[r] >> VS_PAGE_SHIFT) < nframes) vs_prefetch(owners + (t[r] >> VS_PAGE_SHIFT));
                continue;
            }
            if (stage[r] != 1) continue;
            ea = t[r] + vs_index_of(va[r], lvl[r]);
            if (ea + 8 > mem_size) { stage[r] = 0; continue; }
            e = vs_load64(mem + ea);
            if (!(e & VS_FL_P)) { stage[r] = 0; continue; }
            if (lvl[r] == 1 || (lvl[r] <= 3 && (e & VS_FL_PS))) {
                g[r] = (e & VS_ADDR_MASK & ~vs_level_mask(lvl[r])) | (va[r] & vs_level_mask(lvl[r]));
                stage[r] = 2;
            } else {
                g[r] = e & VS_ADDR_MASK;
                lvl[r]--;
            }
        }
    }
    vs_prewalk_sink = sink;
}
#endif
