# The DMA engine (included by _translate.pyx): one loop runs every descriptor kind over
# chunks that end at the page boundaries of each of its streams, translating each chunk's
# streams in order (so a fault names the first failing stream's VA), as
# hotpath._pure.Iommu._dma.

cdef enum DmaOp:
    DMA_COPY  # stream 0 (read) -> stream 1 (write), forward copy
    DMA_FILL  # stream 0 (write) := pattern
    DMA_COMPARE  # stream 0 (read) vs stream 1 (read); stops at the first difference


ctypedef struct DmaResult:
    int32_t status  # 0 or the fault code that stopped the descriptor
    uint64_t fault_va  # the exact VA whose translation failed
    uint64_t done  # bytes completed before the fault / the difference
    uint64_t result  # compare: 0 when equal, else offset of the first difference + 1


cdef inline uint64_t chunk_len(uint64_t left, uint64_t va) noexcept nogil:
    """Bytes of the chunk at va: up to the end of its page, at most `left`."""
    cdef uint64_t n = VS_PAGE_SIZE - (va & (VS_PAGE_SIZE - 1))
    return n if n < left else left


cdef DmaResult dma_run(State *s, uint32_t dev, uint64_t pasid, DmaOp op, uint64_t va0,
                       uint64_t va1, uint64_t length, uint32_t flags,
                       int pattern) noexcept nogil:
    cdef DmaResult r
    cdef int nstreams = 1 if op == DMA_FILL else 2, i
    cdef uint64_t va[2]
    cdef uint64_t pa[2]
    cdef uint32_t acc[2]
    cdef uint64_t n, k
    va[0] = va0
    va[1] = va1
    acc[0] = (VS_ACCESS_WRITE if op == DMA_FILL else VS_ACCESS_READ) | flags
    acc[1] = (VS_ACCESS_WRITE if op == DMA_COPY else VS_ACCESS_READ) | flags
    r.status = 0
    r.fault_va = 0
    r.done = 0
    r.result = 0
    s.cnt[VS_C_DMA_DESCRIPTORS] += 1
    while r.done < length:
        n = length - r.done
        for i in range(nstreams):
            n = chunk_len(n, va[i] + r.done)
        for i in range(nstreams):
            r.status = translate1(s, dev, pasid, va[i] + r.done, acc[i], &pa[i], NULL)
            if r.status:
                r.fault_va = va[i] + r.done
                s.cnt[VS_C_DMA_FAULTS] += 1
                return r
        if op == DMA_COPY:
            memmove(s.mem + pa[1], s.mem + pa[0], n)
        elif op == DMA_FILL:
            memset(s.mem + pa[0], pattern, n)
        elif memcmp(s.mem + pa[0], s.mem + pa[1], n) != 0:
            k = 0
            while s.mem[pa[0] + k] == s.mem[pa[1] + k]:
                k += 1
            s.cnt[VS_C_DMA_BYTES] += k
            r.done += k
            r.result = r.done + 1
            return r
        r.done += n
        s.cnt[VS_C_DMA_BYTES] += n
    return r
