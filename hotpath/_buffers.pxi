# Buffer handling and argument helpers of the Python-facing methods (included by
# _translate.pyx).

cdef bint _fmt_ok(Py_buffer *b, Py_ssize_t itemsize, bint signed):
    cdef const char *f = b.format
    cdef char c
    if b.ndim != 1 or b.itemsize != itemsize:
        return False
    if f == NULL:
        return itemsize == 1 and not signed
    while f[0] == b'<' or f[0] == b'=' or f[0] == b'@':
        f += 1
    c = f[0]
    if c == 0 or f[1] != 0:
        return False
    if signed:
        return c == b'b' or c == b'h' or c == b'i' or c == b'l' or c == b'q' or c == b'n'
    return c == b'B' or c == b'H' or c == b'I' or c == b'L' or c == b'Q' or c == b'N'


cdef int _acquire(object obj, Py_buffer *b, Py_ssize_t itemsize, bint signed,
                  bint writable) except -1:
    """0 with the buffer held, or 1 (nothing held) if obj is no 1-d C-contiguous array of
    `itemsize`-byte (un)signed integers. Much cheaper than a typed memoryview."""
    cdef int flags = PyBUF_FORMAT | PyBUF_C_CONTIGUOUS
    if writable:
        flags |= PyBUF_WRITABLE
    try:
        PyObject_GetBuffer(obj, b, flags)
    except (BufferError, TypeError, ValueError):
        return 1
    if not _fmt_ok(b, itemsize, signed):
        PyBuffer_Release(b)
        return 1
    return 0


cdef int _acquire_in(object obj, Py_buffer *b, Py_ssize_t itemsize, object dtype) except -1:
    if _acquire(obj, b, itemsize, False, False) == 0:
        return 0
    obj = np.ascontiguousarray(obj, dtype=dtype)
    if obj.ndim != 1:
        raise ValueError("expected a 1-d array")
    if _acquire(obj, b, itemsize, False, False) == 0:
        return 0
    raise ValueError("unusable input array")


def _page_range(addr, size_order):
    # size_order beyond the 2^36 pages of a 48-bit space is clamped (over-invalidating is
    # always safe); a negative one is an error.
    size_order = int(size_order)
    if size_order < 0:
        raise ValueError("size_order must be >= 0")
    size_order = min(size_order, 36)
    count = 1 << size_order
    first = (int(addr) >> VS_PAGE_SHIFT) & ~(count - 1) & ((1 << 36) - 1)
    return first, count


def _pow2(name, n):
    n = int(n)
    if n < 1 or n & (n - 1):
        raise ValueError(f"{name} must be a power of two >= 1, got {n}")
    return n
