# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled DMA translation hot path: PASID cache, IOTLB, device TLBs, nested walker, DMA engine.

Same semantics as the pure-Python twin (hotpath/_pure.py), bit for bit; the docstrings there
describe the model. This file only assembles the parts, one concern each:

* _layout.pxi / _layout.h  the constants, generated from hotpath/layout.py (gen_layout.py)
* _state.pxi               the C structures of the state
* _cache.pxi / _cache.h    set-associative caches: set blocks, lookup, tree-PLRU, removal
* _walk.pxi / _walk.h      the nested walk and the checks of every translation
* _lookup.pxi              one translation, its fast path and the batch loop (no GIL)
* _dma.pxi                 the DMA engine: one loop for copy, fill and compare
* _stats.pxi               counters and the cache dump
* _buffers.pxi             buffer handling of the Python-facing methods
* _iommu.pxi               the Iommu class

The object is not thread-safe: do not call its methods concurrently. Host byte order must be
little-endian (x86). First-level A/D updates use a locked compare-and-exchange, as hardware.
The bench's bare baselines live in a module of their own (hotpath/_baselines.pyx).
"""

cimport cython
from libc.stdint cimport uint64_t, uint32_t, uint16_t, uint8_t, int32_t, int64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memset, memcpy, memmove, memcmp
from cpython.buffer cimport (PyBUF_C_CONTIGUOUS, PyBUF_FORMAT, PyBUF_WRITABLE, PyBuffer_Release,
                             PyObject_GetBuffer)

import numpy as np

from vsva.hotpath.layout import COUNTER_NAMES, FAULT_NAMES, inv_granularity

include "_layout.pxi"
include "_state.pxi"
include "_cache.pxi"
include "_walk.pxi"
include "_lookup.pxi"
include "_dma.pxi"
include "_stats.pxi"
include "_buffers.pxi"
include "_iommu.pxi"
