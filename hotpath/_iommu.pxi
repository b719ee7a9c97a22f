# The Python-facing class (included by _translate.pyx): argument checks and buffer
# handling around the nogil C code of the other included files.

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
        self.nframes = min(self.mem_size >> VS_PAGE_SHIFT, <uint64_t>owners.shape[0])
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
        if self.nframes > VS_FRAME_MASK:
            raise ValueError("memory too large (the caches hold 36-bit frame numbers)")
        self.devtlb_sets = _pow2("devtlb_entries / devtlb_ways",
                                 max(1, int(devtlb_entries) // self.devtlb_ways))
        self.pasid_cache_sets = _pow2("pasid_cache_entries / 4",
                                      max(1, int(pasid_cache_entries) // VS_PASID_CACHE_WAYS))
        if cache_init(&self.st.iotlb, self.iotlb_sets, self.iotlb_ways, False) or \
                cache_init(&self.st.pc, self.pasid_cache_sets, VS_PASID_CACHE_WAYS, True):
            raise MemoryError()
        self.st.gdefunct = <uint8_t *>calloc(VS_PASID_MAX // 8, 1)
        if self.st.gdefunct == NULL:
            raise MemoryError()

    def __dealloc__(self):
        cdef int i
        cache_free(&self.st.iotlb)
        cache_free(&self.st.pc)
        free(self.st.gdefunct)
        for i in range(VS_MAX_DEVICES):
            cache_free(&self.st.devs[i].tlb)
            free(self.st.devs[i].defunct)

    # ------------------------------------------------------------------ devices
    def attach_device(self, dev, pasid_dir_hpa, ats=True):
        dev = int(dev)
        if not 0 <= dev < VS_MAX_DEVICES:
            raise ValueError(f"device id must be in [0, {VS_MAX_DEVICES}), got {dev}")
        pasid_dir_hpa = int(pasid_dir_hpa)
        if pasid_dir_hpa & (VS_PAGE_SIZE - 1) or pasid_dir_hpa <= 0 or \
                pasid_dir_hpa + VS_PASID_DIR_FRAMES * VS_PAGE_SIZE > self.mem_size:
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
        if not 0 <= dev < VS_MAX_DEVICES or not self.st.devs[dev].attached:
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
        if not 0 <= pasid < VS_PASID_MAX:
            raise ValueError("PASID out of range")
        cdef uint8_t *bm
        if dev is None:
            bm = self.st.gdefunct
        else:
            dev = int(dev)
            if not 0 <= dev < VS_MAX_DEVICES:
                raise ValueError("bad device id")
            if self.st.devs[dev].defunct == NULL:
                if not defunct:
                    return
                self.st.devs[dev].defunct = <uint8_t *>calloc(VS_PASID_MAX // 8, 1)
                if self.st.devs[dev].defunct == NULL:
                    raise MemoryError()
            bm = self.st.devs[dev].defunct
        if defunct:
            bm[pasid >> 3] |= (1 << (pasid & 7))
        else:
            bm[pasid >> 3] &= ~(1 << (pasid & 7))

    def is_defunct(self, pasid, dev=None):
        pasid = int(pasid)
        if not 0 <= pasid < VS_PASID_MAX:
            return False
        if (self.st.gdefunct[pasid >> 3] >> (pasid & 7)) & 1:
            return True
        if dev is None or not 0 <= int(dev) < VS_MAX_DEVICES:
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
        if dv < 0 or dv >= VS_MAX_DEVICES:
            dv = VS_MAX_DEVICES
        if ps < 0:
            ps = VS_PASID_MAX
        f = translate1(&self.st, <uint32_t>dv, <uint64_t>ps, <uint64_t>va,
                       <uint32_t>acc, &pa, NULL)
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
        cdef Py_ssize_t n
        cdef uint64_t nf = 0
        cdef int64_t dv = dev
        cdef State *s = &self.st
        cdef Dev *d
        try:
            _acquire_in(vas, &bv, 8, np.uint64)
            hv = True
            v = <const uint64_t *>bv.buf
            n = bv.len // 8
            if isinstance(pasids, (int, np.integer)):
                pscalar = <uint64_t>pasids if pasids >= 0 else VS_PASID_MAX
            else:
                _acquire_in(pasids, &bp, 4, np.uint32)
                hp = True
                pv = <const uint32_t *>bp.buf
                if bp.len // 4 != n:
                    raise ValueError("pasids and vas differ in length")
            if isinstance(access, (int, np.integer)):
                ascalar = <uint32_t>access
            else:
                _acquire_in(access, &ba, 1, np.uint8)
                ha = True
                av = <const uint8_t *>ba.buf
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
            if dv < 0 or dv >= VS_MAX_DEVICES:
                dv = VS_MAX_DEVICES
            d = &s.devs[dv] if dv < VS_MAX_DEVICES and s.devs[dv].attached else NULL
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
            self.st.cnt[VS_C_IOTLB_INV_GLOBAL] += 1
            n = cache_clear(&self.st.iotlb)
        elif g == 1:
            self.st.cnt[VS_C_IOTLB_INV_DOMAIN] += 1
            n = cache_remove(&self.st.iotlb, 1, d, 0)
        elif g == 2:
            self.st.cnt[VS_C_IOTLB_INV_PASID] += 1
            n = cache_remove(&self.st.iotlb, 2, d, p)
        else:
            self.st.cnt[VS_C_IOTLB_INV_PAGE] += 1
            first, count = _page_range(addr, size_order)
            with nogil:
                n = cache_remove_range(&self.st.iotlb, p << VS_VPN_BITS, first, count,
                                       0xFFFFULL << VS_DID_SHIFT, d << VS_DID_SHIFT)
        self.st.cnt[VS_C_IOTLB_INV_ENTRIES] += n
        return n

    def inv_pasid_cache(self, granularity, did=0, pasid=0):
        """PASID-cache invalidation ('global'|'domain'|'pasid'); returns entries removed."""
        g = inv_granularity(granularity)
        cdef uint64_t n
        cdef uint64_t d = int(did) & 0xFFFFFFFF
        cdef uint64_t p = int(pasid) & 0xFFFFFFFFFFFF
        if g == 0:
            self.st.cnt[VS_C_PASID_CACHE_INV_GLOBAL] += 1
            n = cache_clear(&self.st.pc)
        elif g == 1:
            self.st.cnt[VS_C_PASID_CACHE_INV_DOMAIN] += 1
            n = cache_remove(&self.st.pc, 3, d, 0)
        elif g == 2:
            self.st.cnt[VS_C_PASID_CACHE_INV_PASID] += 1
            n = cache_remove(&self.st.pc, 4, d, p)
        else:
            raise ValueError("the PASID cache has no address granularity")
        self.st.cnt[VS_C_PASID_CACHE_INV_ENTRIES] += n
        return n

    def inv_devtlb(self, dev, pasid=None, addr=None, size_order=0):
        """Device-TLB invalidation: whole (pasid None), PASID (addr None), PASID + range."""
        dev = int(dev)
        cdef bint attached = 0 <= dev < VS_MAX_DEVICES and self.st.devs[dev].attached
        cdef Cache *c = &self.st.devs[dev].tlb if attached else NULL
        cdef uint64_t n = 0, first, count, p
        if pasid is None:
            self.st.cnt[VS_C_DEVTLB_INV_ALL] += 1
            if attached:
                n = cache_clear(c)
        elif addr is None:
            self.st.cnt[VS_C_DEVTLB_INV_PASID] += 1
            if attached:
                n = cache_remove(c, 6, 0, <uint64_t>int(pasid))
        else:
            self.st.cnt[VS_C_DEVTLB_INV_ADDR] += 1
            first, count = _page_range(addr, size_order)
            p = int(pasid) & 0xFFFFFFFFFFFF
            if attached:
                n = cache_remove_range(c, p << VS_VPN_BITS, first, count, 0, 0)
        self.st.cnt[VS_C_DEVTLB_INV_ENTRIES] += n
        return n

    # ------------------------------------------------------------------ counters / dump
    def counters(self):
        return state_counters(&self.st)

    def reset_counters(self):
        state_reset_counters(&self.st)

    def cache_dump(self):
        return state_cache_dump(&self.st)

    # ------------------------------------------------------------------ DMA engine
    cdef tuple _dma(self, dev, pasid, DmaOp op, va0, va1, length, access_flags, pattern=0):
        cdef uint32_t d = dev if 0 <= dev < VS_MAX_DEVICES else VS_MAX_DEVICES
        cdef uint64_t p = pasid, a = va0, b = va1, n = length
        cdef uint32_t fl = <uint32_t>access_flags
        cdef int pat = int(pattern) & 0xFF
        cdef DmaResult r
        with nogil:
            r = dma_run(&self.st, d, p, op, a, b, n, fl, pat)
        return r.status, r.fault_va, r.done, r.result

    def dma_copy(self, dev, pasid, src, dst, length, access_flags=0):
        """(status, fault_va, done); see hotpath._pure.Iommu.dma_copy."""
        return self._dma(dev, pasid, DMA_COPY, src, dst, length, access_flags)[:3]

    def dma_fill(self, dev, pasid, dst, length, pattern, access_flags=0):
        """(status, fault_va, done); see hotpath._pure.Iommu.dma_fill."""
        return self._dma(dev, pasid, DMA_FILL, dst, 0, length, access_flags, pattern)[:3]

    def dma_compare(self, dev, pasid, a, b, length, access_flags=0):
        """(status, fault_va, result, done); see hotpath._pure.Iommu.dma_compare."""
        status, fault_va, done, result = self._dma(dev, pasid, DMA_COMPARE, a, b, length,
                                                   access_flags)
        return status, fault_va, result, done
