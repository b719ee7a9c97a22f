# cython: language_level=3
"""The runtime's per-message socket calls in C: vsva.runtime.frames's compiled
`recv_batch` (the ROUTER's drain), `send_frame` (a DEALER's send) and `socket_events` (a
socket's ZMQ_EVENTS, read before each wait for the sockets that fired).

They call the libzmq that pyzmq loaded, on the socket's own handle, through function pointers
that vsva.runtime.frames looks up in that library (`bind`): linking a second copy of libzmq
would hand pyzmq's socket to code that does not own it. The only difference from the pure
twins is cost: no Python exception ends a drain (libzmq's EAGAIN is a return value here, where
pyzmq raises zmq.Again, whose construction cost more than the two receives of a message
together), no Frame object is made per message, no option enum is built per EVENTS read
(pyzmq's getsockopt makes a SocketOption for each), and the GIL is kept (no call here waits).
"""

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.errno cimport EAGAIN, EINTR
from libc.stdint cimport uintptr_t

import zmq

cdef extern from *:
    """
    /* zmq_msg_t as zmq.h declares it since libzmq 4.1: 64 opaque bytes, pointer-aligned */
    typedef struct { void *_[64 / sizeof (void *)]; } vsva_zmq_msg_t;
    """
    ctypedef struct vsva_zmq_msg_t:
        pass

ctypedef int (*msg_init_t)(vsva_zmq_msg_t *) noexcept nogil
ctypedef int (*msg_recv_t)(vsva_zmq_msg_t *, void *, int) noexcept nogil
ctypedef int (*msg_close_t)(vsva_zmq_msg_t *) noexcept nogil
ctypedef void *(*msg_data_t)(vsva_zmq_msg_t *) noexcept nogil
ctypedef size_t (*msg_size_t)(vsva_zmq_msg_t *) noexcept nogil
ctypedef int (*msg_more_t)(vsva_zmq_msg_t *) noexcept nogil
ctypedef const char *(*msg_gets_t)(vsva_zmq_msg_t *, const char *) noexcept nogil
ctypedef int (*errno_t)() noexcept nogil
ctypedef int (*send_t)(void *, const void *, size_t, int) noexcept nogil
ctypedef int (*getsockopt_t)(void *, int, void *, size_t *) noexcept nogil

cdef msg_init_t _init = NULL
cdef msg_recv_t _recv = NULL
cdef msg_close_t _close = NULL
cdef msg_data_t _data = NULL
cdef msg_size_t _size = NULL
cdef msg_more_t _more = NULL
cdef msg_gets_t _gets = NULL
cdef errno_t _errno = NULL
cdef send_t _send = NULL
cdef getsockopt_t _getsockopt = NULL

cdef int DONTWAIT = zmq.DONTWAIT
cdef int EVENTS = zmq.EVENTS

# The functions `bind` wants, in its arguments' order
SYMBOLS = (
    "zmq_msg_init", "zmq_msg_recv", "zmq_msg_close", "zmq_msg_data", "zmq_msg_size",
    "zmq_msg_more", "zmq_msg_gets", "zmq_errno", "zmq_send", "zmq_getsockopt",
)


def bind(uintptr_t init, uintptr_t recv, uintptr_t close, uintptr_t data, uintptr_t size,
         uintptr_t more, uintptr_t gets, uintptr_t errno, uintptr_t send, uintptr_t getsockopt):
    """Take the addresses of SYMBOLS in pyzmq's libzmq (none may be 0)."""
    global _init, _recv, _close, _data, _size, _more, _gets, _errno, _send, _getsockopt
    if not (init and recv and close and data and size and more and gets and errno and send
            and getsockopt):
        raise ValueError("a libzmq function address is 0")
    _init = <msg_init_t>init
    _recv = <msg_recv_t>recv
    _close = <msg_close_t>close
    _data = <msg_data_t>data
    _size = <msg_size_t>size
    _more = <msg_more_t>more
    _gets = <msg_gets_t>gets
    _errno = <errno_t>errno
    _send = <send_t>send
    _getsockopt = <getsockopt_t>getsockopt


def send_frame(sock, bytes frame):
    """Send `frame` as a one-frame message without waiting: 0, or libzmq's errno (EAGAIN:
    no connection yet or the queue is full). zmq_send copies the bytes."""
    if sock.closed:
        return zmq.ENOTSOCK
    cdef void *handle = <void *><uintptr_t>sock.underlying
    cdef int err
    while True:
        if _send(handle, <const char *>frame, len(frame), DONTWAIT) >= 0:
            return 0
        err = _errno()
        if err != EINTR:
            return err


def socket_events(sock):
    """The socket's ZMQ_EVENTS (POLLIN | POLLOUT as it is ready now); a failure raises
    zmq.ZMQError with libzmq's errno, as pyzmq's getsockopt does."""
    if sock.closed:
        raise zmq.ZMQError(zmq.ENOTSOCK)
    cdef void *handle = <void *><uintptr_t>sock.underlying
    cdef int ready = 0, err
    cdef size_t size = sizeof(int)
    while _getsockopt(handle, EVENTS, &ready, &size) != 0:
        err = _errno()
        if err != EINTR:
            raise zmq.ZMQError(err)
        size = sizeof(int)
    return ready


cdef int _take(vsva_zmq_msg_t *msg, void *sock) noexcept:
    """One frame into `msg` (initialised here); 0, or the errno (EINTR retried)."""
    cdef int err
    while True:
        _init(msg)
        if _recv(msg, sock, DONTWAIT) >= 0:
            return 0
        err = _errno()
        _close(msg)
        if err != EINTR:
            return err


cdef inline bytes _bytes(vsva_zmq_msg_t *msg):
    return PyBytes_FromStringAndSize(<char *>_data(msg), _size(msg))


cdef inline object _property(vsva_zmq_msg_t *msg, const char *name):
    cdef const char *value = _gets(msg, name)
    if value == NULL:
        return None
    return (<bytes>value).decode("utf-8", "replace")


def recv_batch(sock, int limit, bint peer_address, bint user_id):
    """See vsva.runtime.frames.recv_batch (the same contract)."""
    if _recv == NULL:
        raise RuntimeError("vsva.runtime._frames: bind() was not called")
    if sock.closed:
        raise zmq.ZMQError(zmq.ENOTSOCK)
    cdef void *handle = <void *><uintptr_t>sock.underlying
    cdef vsva_zmq_msg_t msg
    cdef list batch = []
    cdef int taken = 0, extra, err
    cdef bytes rid, frame
    while taken < limit:
        err = _take(&msg, handle)
        if err == EAGAIN:
            return batch, True
        if err:
            raise zmq.ZMQError(err)
        rid = _bytes(&msg)
        if not _more(&msg):  # a ROUTER always has a payload after the routing id
            _close(&msg)
            raise zmq.ZMQError(zmq.EPROTO, "a ROUTER message with no payload frame")
        _close(&msg)
        err = _take(&msg, handle)
        if err:  # libzmq hands over a message's frames together: never EAGAIN here
            raise zmq.ZMQError(err)
        frame = _bytes(&msg)
        address = _property(&msg, b"Peer-Address") if peer_address else None
        user = _property(&msg, b"User-Id") if user_id else None
        extra = 0
        while _more(&msg):  # a malformed message: take in the rest of it
            _close(&msg)
            err = _take(&msg, handle)
            if err:
                raise zmq.ZMQError(err)
            extra += 1
        _close(&msg)
        batch.append((rid, frame, address, user, extra))
        taken += 1
    return batch, False
