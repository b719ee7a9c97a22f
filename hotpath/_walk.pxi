# The nested walk and the checks every translation makes (included by _translate.pyx); the
# walkers themselves are C (_walk.h), the rules are documented in hotpath._pure.Iommu._walk.

cdef extern from "_walk.h" nogil:
    uint32_t vs_need_fast(uint32_t access, uint32_t flags) noexcept
    const uint32_t *vs_need_row(uint32_t flags) noexcept
    void vs_need_init() noexcept
    void vs_judge_init() noexcept
    int vs_canonical(uint64_t va) noexcept
    int32_t vs_nested_walk(unsigned char *mem, uint64_t mem_size, int atomic_ok,
                           uint64_t flptr, uint64_t slptr, uint32_t flags, uint64_t va,
                           uint32_t access, uint64_t *frame_out, uint32_t *perms_out,
                           uint64_t *refs, uint64_t *adw) noexcept
    enum: VS_GROUP
    enum: VS_NEED_NEVER
    ctypedef struct vs_spec_t:
        uint64_t flptr, slptr, va
        uint32_t flags, access
        uint64_t frame
        uint32_t perms, refs
    void vs_walk_group(const unsigned char *mem, uint64_t mem_size, int n,
                       vs_spec_t *q) noexcept

vs_need_init()  # the table of required permissions, before any translation
vs_judge_init()  # and what a walk of the common case must find

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
                  uint32_t access, uint64_t *frame_out, uint32_t *perms_out,
                  const vs_spec_t *sp) noexcept nogil:
    """Nested walk (C: vs_nested_walk); counters added once at the end. `sp`: the result of
    this request's walk in its batch's group walk (vs_walk_group), or NULL; used when it
    has one, was made with the same PASID entry and no A/D update has changed memory since
    (the group walk reads the same entries as this walk would, with no side effects)."""
    cdef uint64_t refs = 0, adw = 0
    cdef int32_t f
    s.cnt[VS_C_WALKS] += 1
    if sp != NULL and sp.refs != 0 and s.group_adw == s.cnt[VS_C_AD_WRITES] and \
            sp.flptr == flptr and sp.slptr == slptr and sp.flags == flags:
        s.cnt[VS_C_MEMORY_REFS] += sp.refs
        frame_out[0] = sp.frame
        perms_out[0] = sp.perms
        return 0
    f = vs_nested_walk(s.mem, s.mem_size, s.atomic_ok, flptr, slptr, flags, va, access,
                       frame_out, perms_out, &refs, &adw)
    s.cnt[VS_C_MEMORY_REFS] += refs
    s.cnt[VS_C_AD_WRITES] += adw
    if f:
        return fault(s, f)
    return 0

