# Statistics and the plain view of every cache (included by _translate.pyx): what
# Iommu.counters() and Iommu.cache_dump() return, in the twin's shapes.

if VS_NCOUNTERS != len(COUNTER_NAMES):  # import-time guard (both come from hotpath.layout)
    raise ImportError("hotpath._translate counter indices do not match COUNTER_NAMES")


cdef dict state_counters(State *s):
    out = {name: s.cnt[i] for i, name in enumerate(COUNTER_NAMES)}
    out["faults_by_reason"] = {FAULT_NAMES.get(r, f"fault-{r}"): s.reasons[r]
                               for r in range(VS_N_FAULT_REASONS) if s.reasons[r]}
    return out


cdef void state_reset_counters(State *s) noexcept:
    memset(s.cnt, 0, sizeof(s.cnt))
    memset(s.reasons, 0, sizeof(s.reasons))


cdef list cache_entries(Cache *c):
    """(key, payload, slot) of every valid way."""
    cdef uint64_t i, total = <uint64_t>c.sets * c.ways
    return [(tag_at(c, i)[0] & VS_KEYMASK, pay_at(c, i)[0], i)
            for i in range(total) if tag_at(c, i)[0] >> 63]


cdef dict state_cache_dump(State *s):
    """Sorted contents of every cache, as hotpath._pure.Iommu.cache_dump."""
    cdef uint64_t pk
    cdef int dev
    cdef Dev *d
    iotlb = sorted((pay >> VS_DID_SHIFT, key >> VS_VPN_BITS, key & VS_VPN_MASK,
                    pay & VS_FRAME_MASK, (pay >> VS_PERM_SHIFT) & 0xFFF)
                   for key, pay, _ in cache_entries(&s.iotlb))
    pc = sorted((key >> VS_PASID_BITS, key & (VS_PASID_MAX - 1), pay & 0xFFFF, s.pc.aux[i].flptr,
                 s.pc.aux[i].slptr, (pay >> 16) & 0xFF) for key, pay, i in cache_entries(&s.pc))
    devtlb = {}
    devices = {}
    defunct_dev = {}
    for dev in range(VS_MAX_DEVICES):
        d = &s.devs[dev]
        if d.attached:
            devices[dev] = {"pasid_dir": d.dir_hpa, "ats": bool(d.ats)}
            lst = []
            for key, pay, _ in cache_entries(&d.tlb):
                pk = (pay >> VS_PERM_SHIFT) & 0xFFF
                lst.append((key >> VS_VPN_BITS, key & VS_VPN_MASK, pay & VS_FRAME_MASK,
                            (pk & DEV_PERMS) | (dev_perm_flags(<uint32_t>pk) << 8),
                            pay >> VS_DID_SHIFT))
            devtlb[dev] = sorted(lst)
        if d.defunct != NULL:
            ds = _bitmap_list(d.defunct)
            if ds:
                defunct_dev[dev] = ds
    return {
        "iotlb": iotlb,
        "pasid_cache": pc,
        "devtlb": devtlb,
        "devices": devices,
        "defunct": _bitmap_list(s.gdefunct),
        "defunct_dev": defunct_dev,
    }


cdef list _bitmap_list(uint8_t *bm):
    cdef list out = []
    cdef uint64_t i
    cdef int b
    for i in range(VS_PASID_MAX // 8):
        if bm[i]:
            for b in range(8):
                if (bm[i] >> b) & 1:
                    out.append(<int>(i * 8 + b))
    return out

