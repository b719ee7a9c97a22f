# The compiled IOMMU's state: C structures only (included by _translate.pyx).

# Caches. Set s occupies blk[2*s*ways .. 2*(s+1)*ways): first the ways' tags (key | VALID,
# 0 = invalid), then their payload words, so a lookup touches one 128-byte block (8 ways).
# Payload (IOTLB, device TLB): frame (bits 35:0) | perms (bits 47:36) | did (bits 63:48).
# IOTLB perms = PERM_* bits; device-TLB perms = PERM_* | SRE << 7 | WPE << 8 | EAFE << 9
# (the PASID entry flags the translation was made under). PASID cache payload =
# did | pe_flags << 16, with flptr / slptr in the side array ``aux``.
# Replacement: tree-PLRU per set, as in hotpath._pure._Cache. The (ways - 1 <= 7) PLRU bits
# of a set live in bits 62:56 of its way-0 tag word (keys are at most 56 bits wide), so a
# lookup and its PLRU update touch only the set's own block. A tag word is valid when bit
# 63 is set; invalidation clears bit 63 and the key but keeps the PLRU bits.
ctypedef struct Aux:
    uint64_t flptr
    uint64_t slptr

ctypedef struct Cache:
    uint64_t *blk
    Aux *aux
    uint32_t sets
    uint32_t ways
    uint32_t mask
    uint32_t lg

ctypedef struct Dev:
    int attached
    int ats
    uint64_t dir_hpa
    Cache tlb
    uint8_t *defunct  # per-device PASID bitmap or NULL

ctypedef struct State:
    unsigned char *mem
    uint64_t mem_size
    int32_t *owners
    uint64_t nframes
    int atomic_ok
    Cache iotlb
    Cache pc
    uint8_t *gdefunct  # global PASID bitmap (VS_PASID_MAX / 8 bytes)
    Dev devs[VS_MAX_DEVICES]
    uint64_t cnt[VS_NCOUNTERS]
    uint64_t group_adw  # cnt[VS_C_AD_WRITES] when the batch loop last ran a group walk
    uint64_t reasons[VS_N_FAULT_REASONS]
