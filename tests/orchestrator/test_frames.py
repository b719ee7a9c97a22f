"""vsva.runtime.frames: the compiled drain, send and EVENTS read against their pure twins,
which are plain pyzmq (recv, Frame.get, Frame.more, send, get): the same traffic on real
sockets must give the same batches, the same readiness and the same errnos. Then the runtime's use of a missing property: a ZMTP 1.0 peer's
frames carry no metadata, so over ipc they cannot prove a process of the run (it once crashed
the loop: pyzmq's Frame.get raised)."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator

import msgpack
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from vsva.actors import errno as E
from vsva.actors.base import Actor, ActorEnv
from vsva.runtime import frames
from vsva.runtime.endpoints import incarnation, routing_id
from vsva.runtime.loop import ZmqRuntime

pytestmark = pytest.mark.skipif(frames.COMPILED is None, reason="the compiled frames were not built")
POLL_MS = 5000  # a frame that is not there by then is lost: a failure, not a wait


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[zmq.Socket, zmq.Socket, zmq.Socket, zmq.Socket]]:
    """Two ROUTERs over ipc, one DEALER connected to each (same routing id): what one is sent
    the other is sent too, so the compiled drain reads one and pyzmq the other."""
    ctx = zmq.Context()
    socks = []
    with tempfile.TemporaryDirectory(prefix="vsva-frames-") as tmp:
        for name in ("compiled", "pure"):
            router = ctx.socket(zmq.ROUTER)
            router.bind(f"ipc://{tmp}/{name}.sock")
            dealer = ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.ROUTING_ID, b"peer/1.2")
            dealer.connect(f"ipc://{tmp}/{name}.sock")
            socks += [router, dealer]
        yield tuple(socks)  # type: ignore[misc]
        for sock in socks:
            sock.close(0)
    ctx.term()


def _drain(recv_batch, router: zmq.Socket, expected: int, limit: int) -> list:
    """Every batch until `expected` messages came and the socket is drained (bounded)."""
    batches, got = [], 0
    for _ in range(expected + 2):
        if got < expected:
            assert router.poll(POLL_MS, zmq.POLLIN), "a message sent never arrived"
        batch, drained = recv_batch(router, limit, True, True)
        assert len(batch) <= limit
        assert drained == (len(batch) < limit), (len(batch), limit, drained)
        got += len(batch)
        batches.append(batch)
        if got >= expected and drained:
            return batches
    raise AssertionError(f"{got} of {expected} messages")


messages = st.lists(st.lists(st.binary(max_size=300), min_size=1, max_size=4), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(messages, st.integers(1, 16))
def test_the_compiled_drain_reads_what_pyzmq_reads(pair, sent, limit):
    compiled_router, compiled_dealer, pure_router, pure_dealer = pair
    for message in sent:
        compiled_dealer.send_multipart(message)
        pure_dealer.send_multipart(message)
    compiled_recv = frames.COMPILED.recv_batch
    ours = [m for b in _drain(compiled_recv, compiled_router, len(sent), limit) for m in b]
    theirs = [m for b in _drain(frames.pure_recv_batch, pure_router, len(sent), limit) for m in b]
    assert ours == theirs
    # and what it read is what was sent: routing id, first frame, no user id, the rest counted
    assert [(m[0], m[1], m[3], m[4]) for m in ours] == [(b"peer/1.2", s[0], None, len(s) - 1) for s in sent]
    assert all(m[2] for m in ours), "ipc gives every frame a Peer-Address"


def test_the_properties_asked_for_only(pair):
    compiled_router, compiled_dealer, _, _ = pair
    compiled_dealer.send(b"x")
    assert compiled_router.poll(POLL_MS, zmq.POLLIN)
    compiled_recv = frames.COMPILED.recv_batch
    batch, drained = compiled_recv(compiled_router, 4, False, False)
    assert batch == [(b"peer/1.2", b"x", None, None, 0)] and drained


def test_send_gives_the_errno_pyzmq_raises():
    compiled_send = frames.COMPILED.send_frame
    ctx = zmq.Context()
    try:
        with tempfile.TemporaryDirectory(prefix="vsva-frames-") as tmp:
            router = ctx.socket(zmq.ROUTER)
            router.bind(f"ipc://{tmp}/r.sock")
            for send in (compiled_send, frames.pure_send_frame):
                lonely = ctx.socket(zmq.DEALER)
                lonely.setsockopt(zmq.IMMEDIATE, 1)
                lonely.connect(f"ipc://{tmp}/nobody.sock")
                assert send(lonely, b"x") == zmq.EAGAIN  # no connection (IMMEDIATE)
                lonely.close(0)
                assert send(lonely, b"x") == zmq.ENOTSOCK
                dealer = ctx.socket(zmq.DEALER)
                dealer.connect(f"ipc://{tmp}/r.sock")
                assert send(dealer, b"frame") == 0
                assert router.poll(POLL_MS, zmq.POLLIN)
                assert router.recv_multipart()[1:] == [b"frame"]
                dealer.close(0)
            router.close(0)
    finally:
        ctx.term()


def test_events_read_what_pyzmq_reads():
    """ZMQ_EVENTS of a socket in each state the loop meets: nothing to read, a message to
    read, a DEALER with room and one with none (IMMEDIATE, no connection), a closed one."""
    events = frames.COMPILED.socket_events
    ctx = zmq.Context()
    try:
        with tempfile.TemporaryDirectory(prefix="vsva-frames-") as tmp:
            router = ctx.socket(zmq.ROUTER)  # a ROUTER always has room (it drops, never blocks)
            router.bind(f"ipc://{tmp}/r.sock")
            dealer = ctx.socket(zmq.DEALER)
            dealer.connect(f"ipc://{tmp}/r.sock")
            lonely = ctx.socket(zmq.DEALER)
            lonely.setsockopt(zmq.IMMEDIATE, 1)
            lonely.connect(f"ipc://{tmp}/nobody.sock")
            seen = [(events(s), frames.pure_socket_events(s)) for s in (router, dealer, lonely)]
            assert seen == [(zmq.POLLOUT, zmq.POLLOUT), (zmq.POLLOUT, zmq.POLLOUT), (0, 0)]
            dealer.send(b"x")
            assert router.poll(POLL_MS, zmq.POLLIN)
            assert events(router) == frames.pure_socket_events(router) == zmq.POLLIN | zmq.POLLOUT
            lonely.close(0)
            for read in (events, frames.pure_socket_events):
                with pytest.raises(zmq.ZMQError) as raised:
                    read(lonely)
                assert raised.value.errno == zmq.ENOTSOCK
    finally:
        ctx.destroy(0)


def _zmtp10(body: bytes) -> bytes:
    """One ZMTP 1.0 frame, no more flag (the short form: body under 255 bytes)."""
    return bytes([len(body) + 1, 0]) + body


def _read_zmtp10(sock: socket.socket, count: int) -> list[bytes]:
    """The bodies of the first `count` ZMTP 1.0 frames `sock` receives (its timeout bounds
    each read): a length (one byte, or 0xFF and eight), a flags byte, the body."""
    data, bodies = b"", []
    while len(bodies) < count:
        data += sock.recv(4096) or b""
        bodies, at = [], 0
        while at < len(data) and len(bodies) < count:
            size, head = (
                (data[at], 1) if data[at] != 0xFF else (int.from_bytes(data[at + 1 : at + 9], "big"), 9)
            )
            if at + head + size > len(data):
                break
            bodies.append(data[at + head + 1 : at + head + size])
            at += head + size
    return bodies


@pytest.mark.parametrize("implementation", ["compiled", "python"])
def test_a_zmtp10_peer_claiming_a_name_of_the_run_is_refused(monkeypatch, implementation):
    """The peer speaks ZMTP 1.0 (no handshake metadata: no Peer-Address) and claims the routing
    id of a live actor of the run, from the test process itself, which is the run's root: only
    the missing address can refuse it. The frame is answered -EPERM, reaches no handler, and
    the loop goes on."""
    import vsva.runtime.loop as loop

    recv = frames.COMPILED.recv_batch if implementation == "compiled" else frames.pure_recv_batch
    monkeypatch.setattr(loop, "recv_batch", recv)
    with tempfile.TemporaryDirectory(prefix="vsva-zmtp10-") as run_dir:
        os.chmod(run_dir, 0o700)
        claimed = ZmqRuntime("kvm", run_dir, run_root=os.getpid(), trace=False)
        host = ZmqRuntime("host", run_dir, run_root=os.getpid(), trace=False)
        actor = Actor("host", ActorEnv())
        raw = socket.socket(socket.AF_UNIX)
        try:
            raw.connect(os.path.join(run_dir, "host.sock"))
            rid = routing_id("kvm", incarnation(run_dir, "kvm", "ipc"))
            ping = {"v": 1, "id": 1, "src": "kvm", "dst": "host", "kind": "snapshot", "corr": None,
                    "rr": True, "clock": 1, "flow": "", "body": {}}  # fmt: skip
            raw.sendall(_zmtp10(rid) + _zmtp10(msgpack.packb(ping)))
            assert host.run_actor(actor, timeout=10.0, until=lambda a: host.stats["rejected"] >= 1)
            raw.settimeout(5.0)
            identity, answer = _read_zmtp10(raw, 2)  # the ROUTER's own (empty), then its answer
        finally:
            raw.close()
            host.close()
            claimed.close()
    assert host.stats["received"] == 1 and host.stats["rejected"] == 1
    assert actor.clock == 0, "a handler ran"
    reply = msgpack.unpackb(answer)
    assert identity == b"" and reply["body"]["ret"] == -E.EPERM and reply["corr"] == 1, reply
