# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Bare compiled baselines for `vsva bench` only (the production module does not import it).

BareHash is the cost floor of a hit (one hashed lookup per address, no checks); bare_walk the
cost floor of a cold nested walk (24 dependent reads, no checks, 4 KiB pages only). The bench
compares the IOTLB hit and the checked nested walk of hotpath._translate with them.
"""

from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport calloc, free

import numpy as np

include "_layout.pxi"

cdef extern from "_cache.h" nogil:
    uint64_t vs_load64(const unsigned char *p) noexcept


cdef class BareHash:
    """Bare open-addressing hash (linear probing, load <= 0.5, Fibonacci hash) mapping
    key = pasid << 36 | vpn to a frame; interleaved [key + 1, frame] u64 pairs."""

    cdef uint64_t *slots
    cdef uint64_t mask
    cdef int shift

    def __cinit__(self):
        self.slots = NULL

    def __init__(self, pasids, vpns, frames):
        cdef const uint32_t[::1] p = np.ascontiguousarray(pasids, dtype=np.uint32)
        cdef const uint64_t[::1] v = np.ascontiguousarray(vpns, dtype=np.uint64)
        cdef const uint64_t[::1] fr = np.ascontiguousarray(frames, dtype=np.uint64)
        cdef uint64_t size = 2, n = v.shape[0], i, key, h
        cdef int bits = 1
        while size < 2 * n:
            size <<= 1
            bits += 1
        self.mask = size - 1
        self.shift = 64 - bits
        self.slots = <uint64_t *>calloc(size * 2, sizeof(uint64_t))
        if self.slots == NULL:
            raise MemoryError()
        for i in range(n):
            key = ((<uint64_t>p[i]) << 36) | v[i]
            h = (key * VS_HASH_MULT) >> self.shift
            while self.slots[2 * h] != 0 and self.slots[2 * h] != key + 1:
                h = (h + 1) & self.mask
            self.slots[2 * h] = key + 1
            self.slots[2 * h + 1] = fr[i]

    def __dealloc__(self):
        free(self.slots)

    def lookup(self, const uint32_t[::1] pasids, const uint64_t[::1] vas, uint64_t[::1] out):
        """out[k] = pa of (pasids[k], vas[k]) or 0 if absent; returns the misses."""
        cdef Py_ssize_t k, n = vas.shape[0]
        cdef uint64_t key, h, miss = 0, va
        with nogil:
            for k in range(n):
                va = vas[k]
                key = ((<uint64_t>pasids[k]) << 36) | (va >> VS_PAGE_SHIFT)
                h = (key * VS_HASH_MULT) >> self.shift
                while True:
                    if self.slots[2 * h] == key + 1:
                        out[k] = (self.slots[2 * h + 1] << VS_PAGE_SHIFT) | (va & (VS_PAGE_SIZE - 1))
                        break
                    if self.slots[2 * h] == 0:
                        out[k] = 0
                        miss += 1
                        break
                    h = (h + 1) & self.mask
        return miss


cdef inline uint64_t bare_sl(const unsigned char *mem, uint64_t slptr, uint64_t gpa) noexcept nogil:
    cdef uint64_t t = slptr
    cdef int level
    for level in range(4, 0, -1):
        t = vs_load64(mem + (t & VS_ADDR_MASK) + ((gpa >> (VS_PAGE_SHIFT + 9 * (level - 1))) & 511) * 8)
    return (t & VS_ADDR_MASK) | (gpa & (VS_PAGE_SIZE - 1))


def bare_walk(mem, const uint64_t[::1] flptrs, const uint64_t[::1] slptrs,
              const uint32_t[::1] pasids, const uint64_t[::1] vas, uint64_t[::1] out):
    """Bare nested 4x4 walk (24 reads, no checks, 4 KiB pages only): flptrs/slptrs are
    indexed by PASID. For the benchmark baseline only."""
    cdef const unsigned char[::1] mv = memoryview(mem).cast("B")
    cdef const unsigned char *m = &mv[0]
    cdef Py_ssize_t k, n = vas.shape[0]
    cdef uint64_t va, gpa, sl, e
    cdef uint32_t p
    cdef int level
    with nogil:
        for k in range(n):
            va = vas[k]
            p = pasids[k]
            sl = slptrs[p]
            gpa = flptrs[p]
            for level in range(4, 0, -1):
                e = vs_load64(m + bare_sl(m, sl, gpa & VS_ADDR_MASK) +
                              ((va >> (VS_PAGE_SHIFT + 9 * (level - 1))) & 511) * 8)
                gpa = e & VS_ADDR_MASK
            out[k] = bare_sl(m, sl, gpa | (va & (VS_PAGE_SIZE - 1)))
    return None
