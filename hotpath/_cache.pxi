# Set-associative caches with tree-PLRU replacement (included by _translate.pyx); the
# layout of a cache block is described in _state.pxi, the C helpers are in _cache.h.

cdef extern from "stdlib.h" nogil:
    int posix_memalign(void **memptr, size_t alignment, size_t size)

cdef extern from "_cache.h" nogil:
    const uint64_t VS_VALID
    const uint64_t VS_KEYMASK
    const uint64_t VS_PLRU_MASK
    const uint64_t VS_FRAME_MASK
    const int VS_PERM_SHIFT
    const int VS_DID_SHIFT
    uint64_t vs_load64(const unsigned char *p) noexcept
    void vs_store64(unsigned char *p, uint64_t v) noexcept
    void vs_prefetch(const void *p) noexcept
    void vs_hugepage(void *p, size_t n) noexcept
    uint32_t vs_set_of(uint64_t key, uint32_t mask) noexcept
    int vs_set_find(const uint64_t *blk, uint32_t ways, uint64_t tag, uint64_t xmask,
                    uint64_t xval) noexcept
    void vs_plru_touch(uint64_t *t0, uint32_t w, uint32_t lg) noexcept
    uint32_t vs_plru_victim(uint64_t t0, uint32_t lg) noexcept
    uint64_t vs_plru_clr_of(uint32_t lg, uint32_t w) noexcept
    uint64_t vs_plru_set_of(uint32_t lg, uint32_t w) noexcept
    void vs_plru_init() noexcept

cdef enum:
    HUGE_PAGE = 2 * 1024 * 1024  # big caches sit on transparent huge pages

vs_plru_init()  # the PLRU tables, before any cache is used

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

cdef inline uint64_t *set_block(Cache *c, uint64_t key) noexcept nogil:
    """The block (tags, then payloads) of the set that holds `key`."""
    return c.blk + <uint64_t>vs_set_of(key, c.mask) * 2 * c.ways

# slot = set * ways + way
cdef inline uint64_t *tag_at(Cache *c, uint64_t slot) noexcept nogil:
    cdef uint64_t st = slot >> c.lg
    return &c.blk[slot + st * c.ways]

cdef inline uint64_t *pay_at(Cache *c, uint64_t slot) noexcept nogil:
    cdef uint64_t st = slot >> c.lg
    return &c.blk[slot + st * c.ways + c.ways]

cdef inline void prefetch_set(Cache *c, uint64_t key) noexcept nogil:
    cdef uint64_t *blk = set_block(c, key)
    vs_prefetch(blk)
    vs_prefetch(blk + 8)  # payload line of an 8-way set (harmless extra line otherwise)

cdef inline int64_t cache_find(Cache *c, uint64_t key, uint64_t xmask,
                               uint64_t xval) noexcept nogil:
    """Slot whose tag is key and whose payload matches xval under xmask, or -1."""
    cdef uint64_t st = vs_set_of(key, c.mask)
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
    cdef uint64_t st = vs_set_of(key, c.mask)
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
            hit = (pay >> VS_DID_SHIFT) == a and (key >> VS_VPN_BITS) == b
        elif mode == 3:
            hit = (pay & 0xFFFF) == a
        elif mode == 4:
            hit = (pay & 0xFFFF) == a and (key & (VS_PASID_MAX - 1)) == b
        elif mode == 5:
            hit = (key >> VS_PASID_BITS) == a
        else:
            hit = (key >> VS_VPN_BITS) == b
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
        st = vs_set_of(key, c.mask)
        blk = c.blk + st * 2 * c.ways
        for w in range(c.ways):
            if (blk[w] & ~VS_PLRU_MASK) == tag and (blk[c.ways + w] & xmask) == xval:
                blk[w] &= VS_PLRU_MASK
                n += 1
    return n

