"""Frames between the runtime and libzmq, per message: `recv_batch`, `send_frame` and
`socket_events`, compiled or pure.

The runtime's loop (vsva.runtime.loop) takes in everything ready on its ROUTER at each
wake-up, and hands each frame it sends to a DEALER. With pyzmq, the drain costs two receives
per message and one more that raises zmq.Again at the end; at low load, about one message per
wake-up, building that exception cost more than the message's two receives together. A send
goes through pyzmq's checks and releases and takes back the GIL. Reading a socket's
ZMQ_EVENTS, which the loop does for each socket whose fd fired before it waits again, builds
a SocketOption enum in pyzmq's getsockopt each time. The compiled functions
(vsva.runtime._frames) make the same calls to the same libzmq, in C: EAGAIN is a return value
there, no Frame object is made, the GIL stays held (nothing here waits). Like the hot path
(vsva.hotpath) they are optional: without a C compiler, with `VSVA_PUREPYTHON=1`, or when
pyzmq's libzmq cannot be found in this process, the pure twins below run; `IMPLEMENTATION`
says which ("compiled" | "python").

The pure twins are plain pyzmq (`recv`, `Frame.get`, `Frame.more`, `send`, `get`), so a test that
compares the two on the same traffic compares ours with pyzmq's, which nobody here wrote.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import zmq

# (routing id, payload frame, its "Peer-Address", its "User-Id", frames beyond the payload)
Inbound = tuple[bytes, bytes, str | None, str | None, int]
RecvBatch = Callable[[zmq.Socket[Any], int, bool, bool], tuple[list[Inbound], bool]]
SendFrame = Callable[[zmq.Socket[Any], bytes], int]
SocketEvents = Callable[[zmq.Socket[Any]], int]


class Frames(NamedTuple):
    """One implementation of the three calls."""

    recv_batch: RecvBatch
    send_frame: SendFrame
    socket_events: SocketEvents


_NOBLOCK = int(zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_send = zmq.backend.Socket.send  # the socket's own send, without pyzmq's Python wrapper
_get = zmq.backend.Socket.get  # and its own getsockopt


def _property(frame: zmq.Frame, name: str) -> str | None:
    """A message property, or None when libzmq has none of that name for it."""
    try:
        value = frame.get(name)
    except zmq.ZMQError:
        return None
    return value if isinstance(value, str) else None


def pure_recv_batch(
    sock: zmq.Socket[Any], limit: int, peer_address: bool, user_id: bool
) -> tuple[list[Inbound], bool]:
    """Up to `limit` messages from the ROUTER `sock`, without waiting: the list, and whether
    the socket is drained (a receive found nothing: its commands are processed then, so
    its ZMQ_FD has nothing pending that a poll would miss).

    Each message is (routing id, payload, Peer-Address when `peer_address`, User-Id when
    `user_id`, how many frames came after the payload: a well-formed message has none).
    A property libzmq does not have for the message is None."""
    recv = sock.recv
    batch: list[Inbound] = []
    while len(batch) < limit:
        try:
            rid = recv(_NOBLOCK)
        except zmq.Again:
            return batch, True
        part = recv(_NOBLOCK, copy=False)
        frame = part.bytes
        address = _property(part, "Peer-Address") if peer_address else None
        user = _property(part, "User-Id") if user_id else None
        extra = 0
        while part.more:
            part = recv(_NOBLOCK, copy=False)
            extra += 1
        batch.append((rid, frame, address, user, extra))
    return batch, False


def pure_send_frame(sock: zmq.Socket[Any], frame: bytes) -> int:
    """Send `frame` as a one-frame message without waiting: 0, or the errno (EAGAIN: no
    connection yet, IMMEDIATE, or its queue is full)."""
    try:
        _send(sock, frame, _NOBLOCK)
    except zmq.ZMQError as exc:
        return exc.errno or -1
    return 0


def pure_socket_events(sock: zmq.Socket[Any]) -> int:
    """The socket's ZMQ_EVENTS: which of POLLIN / POLLOUT it is ready for now."""
    ready: int = _get(sock, _EVENTS)  # type: ignore[assignment]  # an int option: an int
    return ready


PURE = Frames(pure_recv_batch, pure_send_frame, pure_socket_events)


def libzmq_path() -> str | None:
    """The file of the libzmq pyzmq loaded into this process (bundled in its wheel, or the
    system's), from /proc/self/maps; None when none is mapped. Importing zmq has loaded it:
    pyzmq's backend extension links it."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if os.path.basename(path).startswith("libzmq"):
                    return path
    except OSError:
        pass
    return None


def _compiled() -> Frames | None:
    """The compiled functions bound to pyzmq's libzmq, or None (not built, or libzmq not
    found or older than 4.1, whose zmq_msg_t was smaller than the 64 bytes they assume)."""
    try:
        import vsva.runtime._frames as _frames
    except ImportError:
        return None
    path = libzmq_path()
    if path is None or zmq.zmq_version_info() < (4, 1):
        return None
    try:
        lib = ctypes.CDLL(path)  # already loaded: the same copy, not a second one
        _frames.bind(
            *(ctypes.cast(getattr(lib, name), ctypes.c_void_p).value or 0 for name in _frames.SYMBOLS)
        )
    except (OSError, AttributeError, ValueError):
        return None
    return Frames(_frames.recv_batch, _frames.send_frame, _frames.socket_events)


COMPILED = _compiled()
if COMPILED is None or os.environ.get("VSVA_PUREPYTHON", "") not in ("", "0"):
    recv_batch, send_frame, socket_events = PURE
    IMPLEMENTATION = "python"
else:
    recv_batch, send_frame, socket_events = COMPILED
    IMPLEMENTATION = "compiled"
