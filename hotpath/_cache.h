/* C helpers of the compiled hot path's caches (hotpath/_cache.pxi): word access to host
   memory, prefetch, the set lookup and tree-PLRU. Constants come from _layout.h. */
#ifndef VS_CACHE_H
#define VS_CACHE_H
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include "_layout.h"

/* Cache tag word: key (at most 56 bits) | PLRU node bits 62:56 (way-0 word of a set) |
   VALID (bit 63). Payload word (IOTLB, device TLB): frame 35:0 | perms 47:36 | did 63:48. */
#define VS_VALID (1ULL << 63)
#define VS_KEYMASK ((1ULL << 56) - 1)
#define VS_PLRU_MASK (0x7FULL << 56)
#define VS_FRAME_MASK ((1ULL << 36) - 1)
#define VS_PERM_SHIFT 36
#define VS_DID_SHIFT 48

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
static inline void vs_hugepage(void *p, size_t n) {
#ifdef MADV_HUGEPAGE
    madvise(p, n, MADV_HUGEPAGE);
#endif
}
static inline int vs_cas64(unsigned char *p, uint64_t expect, uint64_t val) {
    return __atomic_compare_exchange_n((uint64_t *)p, &expect, val, 0,
                                       __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

/* Set index shared by every cache (hotpath._pure.set_index). */
static inline uint32_t vs_set_of(uint64_t key, uint32_t mask) {
    return (uint32_t)(((key * VS_HASH_MULT) >> 32) & mask);
}

/* Match mask of `tag` over the tag words of one set block: bits 2w and 2w + 1 set when way
   w holds it (one bit per 32-bit half of its tag word). Branch-free (the way that hits is
   random, so a compare-and-exit loop would mispredict on most lookups): SSE2, part of every
   x86-64, compares two ways per instruction; the PLRU bits live only in way 0's word, so
   only that word is masked. */
#if defined(__SSE2__)
#include <emmintrin.h>
static inline __attribute__((always_inline)) uint32_t
vs_set_match(const uint64_t *blk, uint32_t ways, uint64_t tag) {
    const __m128i t = _mm_set1_epi64x((long long)tag), z = _mm_setzero_si128();
    const __m128i k0 = _mm_set_epi64x(-1LL, (long long)~VS_PLRU_MASK);
    __m128i e01, e23, e45, e67;
    if (ways == 1) return ((blk[0] & ~VS_PLRU_MASK) == tag) ? 3u : 0u;
    e01 = _mm_cmpeq_epi32(_mm_and_si128(_mm_loadu_si128((const __m128i *)blk), k0), t);
    if (ways == 2) return (uint32_t)_mm_movemask_epi8(_mm_packs_epi16(_mm_packs_epi32(e01, z), z));
    e23 = _mm_cmpeq_epi32(_mm_loadu_si128((const __m128i *)(blk + 2)), t);
    if (ways == 4)
        return (uint32_t)_mm_movemask_epi8(_mm_packs_epi16(_mm_packs_epi32(e01, e23), z));
    e45 = _mm_cmpeq_epi32(_mm_loadu_si128((const __m128i *)(blk + 4)), t);
    e67 = _mm_cmpeq_epi32(_mm_loadu_si128((const __m128i *)(blk + 6)), t);
    return (uint32_t)_mm_movemask_epi8(_mm_packs_epi16(_mm_packs_epi32(e01, e23),
                                                       _mm_packs_epi32(e45, e67)));
}
#else
static inline __attribute__((always_inline)) uint32_t
vs_set_match(const uint64_t *blk, uint32_t ways, uint64_t tag) {
    uint32_t w, m = ((blk[0] & ~VS_PLRU_MASK) == tag) ? 3u : 0u;
    for (w = 1; w < ways; w++) m |= (blk[w] == tag) ? 3u << (2 * w) : 0u;
    return m;
}
#endif

/* Set lookup: the matching way whose payload matches xval under xmask, or -1. */
static inline __attribute__((always_inline)) int
vs_set_find(const uint64_t *blk, uint32_t ways, uint64_t tag, uint64_t xmask, uint64_t xval) {
    uint32_t w, m = vs_set_match(blk, ways, tag);
    m &= (m >> 1) & 0x5555u;  /* both halves equal: bit 2w */
    while (m) {
        w = (uint32_t)__builtin_ctz(m) >> 1;
        if ((blk[ways + w] & xmask) == xval) return (int)w;
        m &= m - 1;
    }
    return -1;
}

/* Tree-PLRU (hotpath._pure._Cache): node n (1 .. ways-1, heap order) of a set lives in
   bit 55 + n of its way-0 tag word, i.e. in bits 62:56 (never in VALID, bit 63). An
   access to way w rewrites the nodes on w's path: a precomputed clear mask and set mask
   per (lg, w); the victim is a lookup on the 7 node bits per lg. Built once at import
   by vs_plru_init with the twin's own loops. */
static uint64_t vs_plru_clr[4][8] __attribute__((unused)), vs_plru_set[4][8] __attribute__((unused));
static uint8_t vs_plru_vic[4][128] __attribute__((unused));
static __attribute__((unused)) void vs_plru_init(void) {
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
static inline __attribute__((always_inline)) uint64_t vs_plru_clr_of(uint32_t lg, uint32_t w) {
    return vs_plru_clr[lg][w];
}
static inline __attribute__((always_inline)) uint64_t vs_plru_set_of(uint32_t lg, uint32_t w) {
    return vs_plru_set[lg][w];
}
static inline __attribute__((always_inline)) uint32_t
vs_plru_victim(uint64_t t0, uint32_t lg) {
    return vs_plru_vic[lg][(t0 >> 56) & 0x7F];
}
#endif
