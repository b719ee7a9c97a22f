# The nested walk and the checks every translation makes (included by _translate.pyx); the
# walkers themselves are C (_walk.h), the rules are documented in hotpath._pure.Iommu._walk.

cdef extern from "_walk.h" nogil:
    uint32_t vs_required(uint32_t access, uint32_t flags) noexcept
    int vs_canonical(uint64_t va) noexcept
    int32_t vs_nested_walk(unsigned char *mem, uint64_t mem_size, int atomic_ok,
                           uint64_t flptr, uint64_t slptr, uint32_t flags, uint64_t va,
                           uint32_t access, uint64_t *frame_out, uint32_t *perms_out,
                           uint64_t *refs, uint64_t *adw) noexcept
    enum: VS_PREWALK
    void vs_prewalk(const unsigned char *mem, uint64_t mem_size, const int32_t *owners,
                    uint64_t nframes, int n, const uint64_t *flptr, const uint64_t *slptr,
                    const uint64_t *va) noexcept

cdef inline int32_t fault(State *s, int32_t code) noexcept nogil:
    s.cnt[VS_C_FAULTS] += 1
    s.reasons[code & 0xFF] += 1
    return code

cdef inline int32_t owner_check(State *s, uint64_t frame, uint32_t did) noexcept nogil:
    if frame >= s.nframes:
        return fault(s, VS_FAULT_OOR_ADDRESS)
    if s.owners[frame] != <int32_t>did:
        s.cnt[VS_C_OWNER_VIOLATIONS] += 1
        return fault(s, VS_FAULT_OWNER)
    return 0

cdef int32_t walk(State *s, uint64_t flptr, uint64_t slptr, uint32_t flags, uint64_t va,
                  uint32_t access, uint64_t *frame_out, uint32_t *perms_out) noexcept nogil:
    """Nested walk (C: vs_nested_walk); counters added once at the end."""
    cdef uint64_t refs = 0, adw = 0
    cdef int32_t f
    s.cnt[VS_C_WALKS] += 1
    f = vs_nested_walk(s.mem, s.mem_size, s.atomic_ok, flptr, slptr, flags, va, access,
                       frame_out, perms_out, &refs, &adw)
    s.cnt[VS_C_MEMORY_REFS] += refs
    s.cnt[VS_C_AD_WRITES] += adw
    if f:
        return fault(s, f)
    return 0

