# One translation (translate1), its side-effect-free fast path (fast_hit) and the batch loop
# (included by _translate.pyx). The order of the checks is the twin's
# (hotpath._pure.Iommu._translate1).

cdef enum:
    PREFETCH_AHEAD = 16  # the batch loop prefetches the IOTLB set this many requests ahead

cdef int32_t pasid_miss(State *s, uint32_t dev, uint64_t dir_hpa, uint64_t pasid,
                       uint64_t key, int64_t *slot) noexcept nogil:
    """PASID-cache miss: read the directory and table entries, check, fill."""
    cdef uint64_t pde, pe_addr, w0, w1, w2
    cdef int64_t i
    cdef int ev
    s.cnt[VS_C_PASID_CACHE_MISSES] += 1
    s.cnt[VS_C_PASID_REFS] += 1
    pde = vs_load64(s.mem + dir_hpa + (pasid // VS_PASID_TABLE_ENTRIES) * 8)
    if not (pde & VS_PDE_PRESENT):
        return fault(s, VS_FAULT_PDE_NOT_PRESENT)
    pe_addr = (pde & VS_ADDR_MASK) + (pasid % VS_PASID_TABLE_ENTRIES) * VS_PASID_ENTRY_SIZE
    if pe_addr + VS_PASID_ENTRY_SIZE > s.mem_size:
        return fault(s, VS_FAULT_OOR_ADDRESS)
    s.cnt[VS_C_PASID_REFS] += 1
    w0 = vs_load64(s.mem + pe_addr)
    w1 = vs_load64(s.mem + pe_addr + 8)
    w2 = vs_load64(s.mem + pe_addr + 16)
    if not (w0 & VS_PE_PRESENT):
        return fault(s, VS_FAULT_PE_NOT_PRESENT)
    if ((w0 >> VS_PE_PGTT_SHIFT) & 7) != VS_PGTT_NESTED or \
            ((w0 >> VS_PE_AW_SHIFT) & 7) != VS_AW_48 or ((w2 >> VS_PE_FLPM_SHIFT) & 3) != 0:
        return fault(s, VS_FAULT_BAD_PASID_ENTRY)
    s.cnt[VS_C_PASID_CACHE_FILLS] += 1
    i = cache_fill(&s.pc, key, 0, 0, (w1 & 0xFFFF) | ((w2 & VS_PE_FLAG_MASK) << 16), &ev)
    if ev:
        s.cnt[VS_C_PASID_CACHE_EVICTIONS] += 1
    s.pc.aux[i].flptr = w2 & VS_ADDR_MASK
    s.pc.aux[i].slptr = w0 & VS_ADDR_MASK
    slot[0] = i
    return 0

cdef inline int32_t pasid_lookup(State *s, uint32_t dev, uint64_t dir_hpa, uint64_t pasid,
                                 int64_t *slot) noexcept nogil:
    cdef uint64_t key = (<uint64_t>dev << VS_PASID_BITS) | pasid
    cdef int64_t i
    s.cnt[VS_C_PASID_CACHE_LOOKUPS] += 1
    i = cache_find(&s.pc, key, 0, 0)
    if i >= 0:
        s.cnt[VS_C_PASID_CACHE_HITS] += 1
        cache_touch(&s.pc, <uint64_t>i)
        slot[0] = i
        return 0
    return pasid_miss(s, dev, dir_hpa, pasid, key, slot)

cdef inline bint is_defunct(State *s, uint32_t dev, uint64_t pasid) noexcept nogil:
    if (s.gdefunct[pasid >> 3] >> (pasid & 7)) & 1:
        return True
    cdef uint8_t *d = s.devs[dev].defunct
    return d != NULL and ((d[pasid >> 3] >> (pasid & 7)) & 1)

# A device-TLB entry keeps the PASID entry flags it was made under next to its PERM_* bits.
cdef enum:
    DEV_PERMS = (1 << 7) - 1  # the PERM_* bits
    DEV_SRE = 1 << 7
    DEV_WPE = 1 << 8
    DEV_EAFE = 1 << 9

cdef inline uint32_t dev_perm_pack(uint32_t perms, uint32_t flags) noexcept nogil:
    return (perms | (DEV_SRE if flags & VS_PE_SRE else 0) | (DEV_WPE if flags & VS_PE_WPE else 0)
            | (DEV_EAFE if flags & VS_PE_EAFE else 0))

cdef inline uint32_t dev_perm_flags(uint32_t packed) noexcept nogil:
    return ((VS_PE_SRE if packed & DEV_SRE else 0) | (VS_PE_WPE if packed & DEV_WPE else 0)
            | (VS_PE_EAFE if packed & DEV_EAFE else 0))

cdef inline int32_t devtlb_hit(State *s, Dev *d, uint64_t tkey, uint64_t off, uint32_t access,
                               uint64_t *pa, int *way) noexcept nogil:
    """Device-TLB lookup: 0 = hit (pa set), fault code on a hit failing the owner check,
    -1 = miss (including a hit whose permissions do not cover the request). *way = the
    way holding tkey in its set, or -1 (the fill after a miss reuses it)."""
    cdef uint64_t *blk = set_block(&d.tlb, tkey)
    cdef int w
    cdef uint64_t p
    cdef uint32_t packed, eflags, need
    cdef int32_t f
    s.cnt[VS_C_DEVTLB_LOOKUPS] += 1
    w = vs_set_find(blk, d.tlb.ways, tkey | VS_VALID, 0, 0)
    way[0] = w
    if w >= 0:
        p = blk[d.tlb.ways + w]
        packed = <uint32_t>((p >> VS_PERM_SHIFT) & 0xFFF)
        eflags = dev_perm_flags(packed)
        need = vs_need_fast(access, eflags)  # VS_NEED_NEVER: a supervisor request without SRE
        if (packed & need) == need:
            s.cnt[VS_C_DEVTLB_HITS] += 1
            vs_plru_touch(blk, <uint32_t>w, d.tlb.lg)
            f = owner_check(s, p & VS_FRAME_MASK, <uint32_t>(p >> VS_DID_SHIFT))
            if f:
                return f
            pa[0] = ((p & VS_FRAME_MASK) << VS_PAGE_SHIFT) | off
            return 0
    s.cnt[VS_C_DEVTLB_MISSES] += 1
    return -1

cdef int32_t translate1(State *s, uint32_t dev, uint64_t pasid, uint64_t va, uint32_t access,
                        uint64_t *pa, const vs_spec_t *sp) noexcept nogil:
    """One request; `sp` is its group-walk result (see walk) or NULL."""
    cdef Dev *d
    cdef uint64_t vpn, off, tkey, frame = 0, p, pcpay, iset, dset, tag, didw
    cdef uint64_t *iblk
    cdef uint32_t need, perms = 0, did, flags
    cdef int64_t pslot
    cdef int32_t f
    cdef int ev, iw, dw = -1
    s.cnt[VS_C_TRANSLATIONS] += 1
    pa[0] = 0
    if dev >= VS_MAX_DEVICES or not s.devs[dev].attached:
        return fault(s, VS_FAULT_NO_CONTEXT)
    d = &s.devs[dev]
    if pasid >= VS_PASID_MAX:
        return fault(s, VS_FAULT_PASID_INVALID)
    if is_defunct(s, dev, pasid):
        s.cnt[VS_C_DEFUNCT_DROPS] += 1
        return fault(s, VS_FAULT_DEFUNCT)
    if not vs_canonical(va):
        return fault(s, VS_FAULT_NON_CANONICAL)
    vpn = (va >> VS_PAGE_SHIFT) & VS_VPN_MASK
    off = va & (VS_PAGE_SIZE - 1)
    tkey = (pasid << VS_VPN_BITS) | vpn
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
    if (access & VS_ACCESS_PRIV) and not (flags & VS_PE_SRE):
        return fault(s, VS_FAULT_FL_PERMISSION)
    need = vs_need_fast(access, flags)
    didw = (<uint64_t>did) << VS_DID_SHIFT
    s.cnt[VS_C_IOTLB_LOOKUPS] += 1
    # One set lookup serves both the hit check and, on a miss, the fill (the walk in
    # between does not touch the IOTLB).
    iset = vs_set_of(tkey, s.iotlb.mask)
    iblk = s.iotlb.blk + iset * 2 * s.iotlb.ways
    iw = vs_set_find(iblk, s.iotlb.ways, tag, 0xFFFFULL << VS_DID_SHIFT, didw)
    if iw >= 0:
        p = iblk[s.iotlb.ways + iw]
        perms = <uint32_t>((p >> VS_PERM_SHIFT) & 0xFFF)
        if (perms & need) == need:
            s.cnt[VS_C_IOTLB_HITS] += 1
            vs_plru_touch(iblk, <uint32_t>iw, s.iotlb.lg)
            frame = p & VS_FRAME_MASK
            f = owner_check(s, frame, did)
            if f:
                return f
            if d.ats:
                s.cnt[VS_C_DEVTLB_FILLS] += 1
                dset = vs_set_of(tkey, d.tlb.mask)
                fill_way(&d.tlb, d.tlb.blk + dset * 2 * d.tlb.ways, dset, dw, tag,
                         frame | (<uint64_t>dev_perm_pack(perms, flags) << VS_PERM_SHIFT)
                         | didw, &ev)
                if ev:
                    s.cnt[VS_C_DEVTLB_EVICTIONS] += 1
            pa[0] = (frame << VS_PAGE_SHIFT) | off
            return 0
    s.cnt[VS_C_IOTLB_MISSES] += 1
    f = walk(s, s.pc.aux[pslot].flptr, s.pc.aux[pslot].slptr, flags, va, access,
             &frame, &perms, sp)
    if f:
        return f
    f = owner_check(s, frame, did)
    if f:
        return f
    s.cnt[VS_C_IOTLB_FILLS] += 1
    fill_way(&s.iotlb, iblk, iset, iw, tag,
             frame | (<uint64_t>perms << VS_PERM_SHIFT) | didw, &ev)
    if ev:
        s.cnt[VS_C_IOTLB_EVICTIONS] += 1
    if d.ats:
        s.cnt[VS_C_DEVTLB_FILLS] += 1
        dset = vs_set_of(tkey, d.tlb.mask)
        fill_way(&d.tlb, d.tlb.blk + dset * 2 * d.tlb.ways, dset, dw, tag,
                 frame | (<uint64_t>dev_perm_pack(perms, flags) << VS_PERM_SHIFT)
                 | didw, &ev)
        if ev:
            s.cnt[VS_C_DEVTLB_EVICTIONS] += 1
    pa[0] = (frame << VS_PAGE_SHIFT) | off
    return 0


# The batch loop's memo of PASID-cache lookups: the requests of a batch come from a few
# PASIDs, and the PASID cache changes only by a fill (translate1, on a miss), so a lookup
# made once serves every later request of its PASID until the next fill. A memo entry is
# valid while its epoch is the batch's (the PASID-cache fill count + 1); it is made only for
# a PASID below PASID_MAX that is not defunct (the bitmaps do not change during a batch) and
# holds the entry's PLRU update, which every hit still applies, exactly as translate1.
cdef enum:
    PC_MEMO = 16  # entries, indexed by the PASID's low bits

ctypedef struct PcMemo:
    uint64_t pasid
    uint64_t epoch
    uint64_t *pblk  # the set block of the PASID-cache entry
    uint64_t plru_clr, plru_set
    const uint32_t *need  # the vs_need_tab row of the entry's flags
    uint64_t didw  # did << VS_DID_SHIFT
    int32_t did
    uint32_t flags  # the PASID entry's flags
    uint64_t flptr, slptr


cdef inline uint64_t pc_epoch(State *s) noexcept nogil:
    return s.cnt[VS_C_PASID_CACHE_FILLS] + 1


cdef inline PcMemo *pc_memo(State *s, uint32_t dev, uint64_t pasid, PcMemo *memo,
                            uint64_t epoch) noexcept nogil:
    """The memo entry of `pasid` (made now by a lookup without side effects when it has
    none), or NULL: PASID out of range, defunct, or not in the PASID cache."""
    cdef PcMemo *m = &memo[pasid & (PC_MEMO - 1)]
    cdef uint64_t key, pcpay, st
    cdef uint64_t *pblk
    cdef int pw
    if m.pasid == pasid and m.epoch == epoch:
        return m
    if pasid >= VS_PASID_MAX or is_defunct(s, dev, pasid):
        return NULL
    key = (<uint64_t>dev << VS_PASID_BITS) | pasid
    st = vs_set_of(key, s.pc.mask)
    pblk = s.pc.blk + st * 2 * s.pc.ways
    pw = vs_set_find(pblk, s.pc.ways, key | VS_VALID, 0, 0)
    if pw < 0:
        return NULL
    pcpay = pblk[s.pc.ways + pw]
    m.pasid = pasid
    m.epoch = epoch
    m.pblk = pblk
    m.plru_clr = vs_plru_clr_of(s.pc.lg, <uint32_t>pw)
    m.plru_set = vs_plru_set_of(s.pc.lg, <uint32_t>pw)
    m.flags = <uint32_t>(pcpay >> 16) & 0xFF
    m.need = vs_need_row(m.flags)
    m.did = <int32_t>(pcpay & 0xFFFF)
    m.didw = (pcpay & 0xFFFF) << VS_DID_SHIFT
    m.flptr = s.pc.aux[st * s.pc.ways + <uint64_t>pw].flptr
    m.slptr = s.pc.aux[st * s.pc.ways + <uint64_t>pw].slptr
    return m


cdef inline int fast_hit(State *s, Dev *d, uint32_t dev, uint64_t pasid, uint64_t va,
                         uint32_t access, uint64_t *pa, PcMemo *memo,
                         uint64_t epoch) noexcept nogil:
    """The common case of translate1 without side effects until it is sure: an attached
    device, a live PASID, a PASID-cache hit and an IOTLB hit (no ATS) or a device-TLB hit
    (ATS) whose permissions cover the request and whose frame the domain owns. Returns 1
    (IOTLB) or 2 (device TLB) after applying exactly the PLRU updates translate1 would make
    (the caller adds the matching counters), else 0 having changed nothing (but the memo),
    and the caller runs translate1."""
    cdef uint64_t tkey, p, frame
    cdef uint64_t *iblk
    cdef int iw
    cdef uint32_t flags, need, perms
    cdef PcMemo *m
    if not vs_canonical(va):
        return 0
    tkey = (pasid << VS_VPN_BITS) | ((va >> VS_PAGE_SHIFT) & VS_VPN_MASK)
    if d.ats:
        if pasid >= VS_PASID_MAX or is_defunct(s, dev, pasid):
            return 0
        iblk = set_block(&d.tlb, tkey)
        iw = vs_set_find(iblk, d.tlb.ways, tkey | VS_VALID, 0, 0)
        if iw < 0:
            return 0
        p = iblk[d.tlb.ways + iw]
        perms = <uint32_t>((p >> VS_PERM_SHIFT) & 0xFFF)
        flags = dev_perm_flags(perms)
        need = vs_need_fast(access, flags)
        if (perms & need) != need:
            return 0
        frame = p & VS_FRAME_MASK
        if frame >= s.nframes or s.owners[frame] != <int32_t>(p >> VS_DID_SHIFT):
            return 0
        vs_plru_touch(iblk, <uint32_t>iw, d.tlb.lg)
        pa[0] = (frame << VS_PAGE_SHIFT) | (va & (VS_PAGE_SIZE - 1))
        return 2
    m = pc_memo(s, dev, pasid, memo, epoch)
    if m == NULL:
        return 0
    need = m.need[access & 15]  # VS_NEED_NEVER: the hit check below fails
    iblk = set_block(&s.iotlb, tkey)
    iw = vs_set_find(iblk, s.iotlb.ways, tkey | VS_VALID, 0xFFFFULL << VS_DID_SHIFT, m.didw)
    if iw < 0:
        return 0
    p = iblk[s.iotlb.ways + iw]
    perms = <uint32_t>((p >> VS_PERM_SHIFT) & 0xFFF)
    frame = p & VS_FRAME_MASK
    if (perms & need) != need or frame >= s.nframes or s.owners[frame] != m.did:
        return 0
    m.pblk[0] = (m.pblk[0] & ~m.plru_clr) | m.plru_set
    vs_plru_touch(iblk, <uint32_t>iw, s.iotlb.lg)
    pa[0] = (frame << VS_PAGE_SHIFT) | (va & (VS_PAGE_SIZE - 1))
    return 1


# What the group walk's lookups found for one of its requests (a member), so that the batch
# loop can finish the member's translation without looking up again (finish_member).
ctypedef struct Member:
    uint64_t *iblk  # its IOTLB set block
    uint64_t iset
    uint64_t tag  # key | VS_VALID
    uint64_t *pblk  # its PASID-cache set block, and the entry's PLRU update
    uint64_t plru_clr, plru_set
    uint64_t didw
    int iw  # the way holding its key without the rights it needs, or -1
    bint direct  # no ATS, and no earlier member of the group may share its IOTLB set


cdef Py_ssize_t group_ahead(State *s, Dev *d, uint32_t dev, Py_ssize_t k, Py_ssize_t n,
                           const uint64_t *v, const uint32_t *pv, uint64_t pscalar,
                           const uint8_t *av, uint32_t ascalar, PcMemo *memo,
                           uint64_t epoch, vs_spec_t *spec, Member *mb,
                           int *spec_of) noexcept nogil:
    """Group walk (vs_walk_group) of the requests k .. k + VS_GROUP - 1 that have a cached
    PASID entry and miss in the IOTLB (lookups without side effects); spec_of[j - k] = the
    index of request j in spec and mb, or -1. Returns the first request not in the group."""
    cdef uint64_t pasid, tkey, bucket, seen = 0
    cdef uint64_t *iblk
    cdef uint32_t iset, acc, need
    cdef int iw, c = 0
    cdef PcMemo *m
    cdef Py_ssize_t j, end = min(n, k + VS_GROUP)
    for j in range(k, end):
        spec_of[j - k] = -1
        pasid = pv[j] if pv != NULL else pscalar
        acc = av[j] if av != NULL else ascalar
        if not vs_canonical(v[j]):
            continue
        m = pc_memo(s, dev, pasid, memo, epoch)
        if m == NULL:
            continue
        need = m.need[acc & 15]
        if need & VS_NEED_NEVER:
            continue  # translate1 raises the fault before any walk
        tkey = (pasid << VS_VPN_BITS) | ((v[j] >> VS_PAGE_SHIFT) & VS_VPN_MASK)
        iset = vs_set_of(tkey, s.iotlb.mask)
        iblk = s.iotlb.blk + <uint64_t>iset * 2 * s.iotlb.ways
        iw = vs_set_find(iblk, s.iotlb.ways, tkey | VS_VALID, 0xFFFFULL << VS_DID_SHIFT, m.didw)
        if iw >= 0 and ((iblk[s.iotlb.ways + iw] >> VS_PERM_SHIFT) & need) == need:
            continue  # an IOTLB hit (unless an earlier request of the group evicts it)
        spec[c].flptr = m.flptr
        spec[c].slptr = m.slptr
        spec[c].flags = m.flags
        spec[c].va = v[j]
        spec[c].access = acc
        mb[c].iblk = iblk
        mb[c].iset = iset
        mb[c].tag = tkey | VS_VALID
        mb[c].pblk = m.pblk
        mb[c].plru_clr = m.plru_clr
        mb[c].plru_set = m.plru_set
        mb[c].didw = m.didw
        mb[c].iw = iw
        bucket = 1ULL << (iset & 63)
        mb[c].direct = not d.ats and not (seen & bucket)
        seen |= bucket
        spec_of[j - k] = c
        c += 1
    vs_walk_group(s.mem, s.mem_size, c, spec)
    s.group_adw = s.cnt[VS_C_AD_WRITES]
    return end


cdef inline bint finish_member(State *s, const vs_spec_t *sp, const Member *mb, uint64_t va,
                               uint64_t *pa, uint64_t *evictions) noexcept nogil:
    """The rest of translate1 for a group member whose walk stands: the owner check, the
    PLRU update of its PASID-cache entry, the IOTLB fill. Valid while nothing but other
    members' fills (in other sets: Member.direct) changed the caches or memory since the
    group's lookups. False, having changed nothing, when the owner check fails (translate1
    then raises the fault); the caller counts as translate1 would."""
    cdef uint64_t frame = sp.frame
    cdef int ev
    if frame >= s.nframes or s.owners[frame] != <int32_t>(mb.didw >> VS_DID_SHIFT):
        return False
    mb.pblk[0] = (mb.pblk[0] & ~mb.plru_clr) | mb.plru_set
    fill_way(&s.iotlb, mb.iblk, mb.iset, mb.iw, mb.tag,
             frame | (<uint64_t>sp.perms << VS_PERM_SHIFT) | mb.didw, &ev)
    evictions[0] += <uint64_t>ev
    pa[0] = (frame << VS_PAGE_SHIFT) | (va & (VS_PAGE_SIZE - 1))
    return True


cdef inline uint64_t request_key(Py_ssize_t j, const uint64_t *v, const uint32_t *pv,
                                 uint64_t pscalar) noexcept nogil:
    """The IOTLB / device-TLB key of request j (PASID bits masked: for prefetching only)."""
    cdef uint64_t pasid = pv[j] if pv != NULL else pscalar
    return ((pasid & (VS_PASID_MAX - 1)) << VS_VPN_BITS) | ((v[j] >> VS_PAGE_SHIFT) & VS_VPN_MASK)


cdef uint64_t batch_loop(State *s, Dev *d, uint32_t dv, Py_ssize_t n, const uint64_t *v,
                         const uint32_t *pv, uint64_t pscalar, const uint8_t *av,
                         uint32_t ascalar, uint64_t *opa, int32_t *ofl) noexcept nogil:
    """The batch: fast hit path, else a group member's finish, else translate1; returns the
    number of faults."""
    cdef Py_ssize_t k
    cdef uint64_t nf = 0, pasid, hits_before
    cdef uint64_t n_iotlb_fast = 0, n_dev_fast = 0, n_member = 0, member_refs = 0
    cdef uint64_t member_evictions = 0
    cdef uint32_t acc
    cdef int hitk, c
    cdef bint last_slow = False, clean = False
    cdef bint pasid_arr = pv != NULL, acc_arr = av != NULL
    cdef Cache *tlb = &d.tlb if d != NULL and d.ats else &s.iotlb  # where this device hits
    cdef Py_ssize_t grouped = 0, gbase = 0
    cdef vs_spec_t spec[VS_GROUP]
    cdef Member mb[VS_GROUP]
    cdef int spec_of[VS_GROUP]
    cdef const vs_spec_t *sp
    cdef PcMemo memo[PC_MEMO]
    cdef uint64_t epoch = pc_epoch(s)
    for k in range(PC_MEMO):
        memo[k].epoch = 0
    for k in range(n):
        # Software prefetch: start loading the IOTLB set of request k + D now (the set
        # does not depend on the domain, so no PASID-cache lookup is needed); not in a run
        # of misses, where the group walks look the sets up several at a time.
        if not last_slow and k + PREFETCH_AHEAD < n:
            prefetch_set(tlb, request_key(k + PREFETCH_AHEAD, v, pv, pscalar))
        pasid = pv[k] if pasid_arr else pscalar
        acc = av[k] if acc_arr else ascalar
        # Fast path, unless the previous request went the full way and was no cache hit
        # there either: then a run of misses (cold walks) does not pay for the fast
        # path's lookups twice. Purely a speed choice; results are the same.
        if d != NULL and not last_slow:
            hitk = fast_hit(s, d, dv, pasid, v[k], acc, &opa[k], memo, epoch)
            if hitk == 1:
                n_iotlb_fast += 1
                ofl[k] = 0
                continue
            if hitk == 2:
                n_dev_fast += 1
                ofl[k] = 0
                continue
        # In a run of walks, walk the next few requests together.
        if last_slow and d != NULL and k >= grouped:
            gbase = k
            grouped = group_ahead(s, d, dv, k, n, v, pv, pscalar, av, ascalar, memo, epoch,
                                  spec, mb, spec_of)
            clean = True
        sp = NULL
        c = spec_of[k - gbase] if k < grouped else -1
        if c >= 0:
            sp = &spec[c]
            # While the group is clean (see below), a member's lookups and walk stand.
            if clean and mb[c].direct and sp.refs != 0 and \
                    finish_member(s, sp, &mb[c], v[k], &opa[k], &member_evictions):
                n_member += 1
                member_refs += sp.refs
                ofl[k] = 0
                last_slow = True
                continue
        hits_before = s.cnt[VS_C_IOTLB_HITS] + s.cnt[VS_C_DEVTLB_HITS]
        ofl[k] = translate1(s, dv, pasid, v[k], acc, &opa[k], sp)
        epoch = pc_epoch(s)
        # translate1 of a member whose group walk stands changes the IOTLB only in the
        # member's own set (no PASID-cache fill, no A/D update); anything else may change
        # what the group's lookups and walk found.
        if sp == NULL or sp.refs == 0:
            clean = False
        last_slow = s.cnt[VS_C_IOTLB_HITS] + s.cnt[VS_C_DEVTLB_HITS] == hits_before
        if ofl[k]:
            nf += 1
    # counters of the fast hits and the members, exactly as translate1 would have counted
    s.cnt[VS_C_TRANSLATIONS] += n_iotlb_fast + n_dev_fast + n_member
    s.cnt[VS_C_PASID_CACHE_LOOKUPS] += n_iotlb_fast + n_member
    s.cnt[VS_C_PASID_CACHE_HITS] += n_iotlb_fast + n_member
    s.cnt[VS_C_IOTLB_LOOKUPS] += n_iotlb_fast + n_member
    s.cnt[VS_C_IOTLB_HITS] += n_iotlb_fast
    s.cnt[VS_C_IOTLB_MISSES] += n_member
    s.cnt[VS_C_WALKS] += n_member
    s.cnt[VS_C_MEMORY_REFS] += member_refs
    s.cnt[VS_C_IOTLB_FILLS] += n_member
    s.cnt[VS_C_IOTLB_EVICTIONS] += member_evictions
    s.cnt[VS_C_DEVTLB_LOOKUPS] += n_dev_fast
    s.cnt[VS_C_DEVTLB_HITS] += n_dev_fast
    return nf
