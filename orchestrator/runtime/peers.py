"""The runtime's peers: one DEALER per peer, its connection state, its reconnection.

Sending never blocks and never loses a message silently. A peer's connection is tracked with
a socket monitor: *connecting* (fresh DEALER) -> *up* (ZMTP handshake done) -> *down*
(disconnected, or connect refused). A send to an *up* peer goes straight out; when it cannot
(connecting, or the send queue is full) it waits in a per-peer queue for at most
`send_grace` seconds (POLLOUT flushes it); a send to a *down* peer, an unknown name, or a
queued message whose grace expired goes to `actor.send_failed(env, now)` at once. When a
connection that was up drops, the queued messages fail (definite: never sent) and the actor
gets `peer_down(peer, now, sent=True)` (requests already handed over become indefinite)
once what the peer sent before dying has been delivered: when none of its connections to our
ROUTER is left (see `_peer_gone`), at the latest `SETTLE` s later. The launcher
also feeds process deaths (pidfds: `peer_exited`); a peer reported down by both sources is
reported once until it connects again (or the launcher restarts it: `peer_restarted`).

`PeerLinks` holds this logic; `vsva.runtime.loop.ZmqRuntime` inherits it and owns the state
it works on (declared below), the poll and the send queues.
"""

from __future__ import annotations

import os
import struct
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import zmq

from vsva.actors.base import Actor
from vsva.actors.messages import MAX_FRAME, Envelope
from vsva.runtime.endpoints import (
    endpoint,
    incarnation,
    presence_path,
    read_endpoint_file,
    routing_id,
    socket_path,
    valid_name,
)
from vsva.runtime.frames import socket_events

LINGER_MS = 100
RECONNECT_IVL_MS = 20  # a restarted peer is reconnected within this
SETTLE = 2.0  # seconds: the longest a death waits for the proof that its frames are in
SETTLE_TICK = 0.002  # seconds: how often a pending death's proof is looked for (see _round)
MAX_WIRE = 4 * MAX_FRAME  # larger frames make libzmq drop the connection (memory bound)
MAX_UNPINNED = 32  # peers beyond those `expect`ed (3 sockets each): the least recently used
# idle one is closed to make room, so senders with ever new names cannot exhaust the fds

# pyzmq's enum flags cost an enum construction per use: the hot path uses plain ints
POLLIN = int(zmq.POLLIN)
POLLOUT = int(zmq.POLLOUT)
NOBLOCK = int(zmq.NOBLOCK)
events = socket_events  # a socket's ZMQ_EVENTS, compiled where it was built (vsva.runtime.frames)


_MONITOR_EVENTS = (
    zmq.EVENT_CONNECTED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_CONNECT_RETRIED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


def monitor_events(monitor: zmq.Socket[bytes]) -> Iterator[tuple[int, int, bytes]]:
    """Every event `monitor` holds now: (event id, value, endpoint); the value is a file
    descriptor for ACCEPTED and DISCONNECTED. A message is a 16-bit id and a 32-bit value,
    then the endpoint; parsed here, as zmq.utils.monitor imports asyncio (~20 ms per process
    start). A malformed message is skipped."""
    while True:
        try:
            frames = monitor.recv_multipart(NOBLOCK)
        except zmq.ZMQError:  # Again: no more events
            return
        if len(frames) == 2 and len(frames[0]) == 6:
            event, value = struct.unpack("=Hi", frames[0])
            yield event, value, frames[1]


UP, CONNECTING, DOWN = "up", "connecting", "down"


@dataclass
class Peer:
    name: str
    sock: zmq.Socket[bytes]
    monitor: zmq.Socket[bytes]
    state: str = CONNECTING
    hold_until: float = 0.0  # restarted: connect failures before this do not mean down
    dead_inode: tuple[int, int] | None = None  # ipc: the socket file when the peer died
    up_inode: tuple[int, int] | None = None  # ipc: the socket file its connection reached
    exited: bool = False  # its process died (`peer_exited`): only a new incarnation is back
    endpoint: str = ""  # where the DEALER connects ("" when disconnected: tcp, peer down)
    ep_id: tuple[int, int] | None = None  # tcp: the endpoint file `endpoint` was read from
    queue: deque[tuple[Envelope, bytes, float]] = field(
        default_factory=deque
    )  # (env, frame, deadline): not yet sent
    used: float = 0.0  # last send (time.monotonic()): eviction picks the oldest idle peer


class PeerLinks:
    """Connection tracking for `ZmqRuntime` (see the module docstring)."""

    name: str
    rid: bytes
    curve: Any
    run_dir: str
    transport: str
    ctx: zmq.Context[zmq.Socket[bytes]]
    send_grace: float
    actor: Actor | None
    peers: dict[str, Peer]
    stats: dict[str, int]
    _tcp: bool
    _own_eps: bool
    _endpoint_of: Callable[[str], str | None]
    _by_sock: dict[Any, Peer]
    _dirty: set[Any]
    _down_reported: set[str]
    _dying: list[tuple[float, str, list[bytes]]]
    _verified: dict[bytes, str]
    _pinned: set[str]
    _queued: set[str]

    if TYPE_CHECKING:  # provided by ZmqRuntime

        def now(self) -> float: ...
        def log(self, line: str) -> None: ...
        def _poll_socket(self, sock: zmq.Socket[bytes], events: int) -> None: ...
        def _unpoll_socket(self, sock: zmq.Socket[bytes]) -> None: ...
        def _ratelog(self, key: str, line: str) -> None: ...
        def _forget_rids(self, name: str) -> None: ...
        def _remember_incarnation(self, name: str) -> None: ...
        def _send_all(self, envs: Any) -> None: ...
        def _fail_queue(self, peer: Peer, why: str) -> None: ...
        def _send_held(self, holding: bool = True) -> None: ...
        def _inbound_closed(self, rids: list[bytes]) -> bool: ...

    # ---- what the launcher tells us ------------------------------------------------------
    def peer_exited(self, name: str) -> None:
        """The launcher saw process `name` die: its connection is down now, and the actor
        hears `peer_down` once (even if the socket says so too), after its last frames."""
        self._send_held()
        self._peer_gone(name, f"{name} exited")
        peer = self.peers.get(name)
        if peer is not None:
            peer.exited = True

    def peer_restarted(self, name: str) -> None:
        """Process `name` runs again (bound and ready): a later death is news again, and
        sends wait for the reconnection (up to `send_grace`) instead of failing."""
        self._send_held()
        self._forget_rids(name)
        peer = self.peers.get(name)
        if peer is not None:
            self._on_monitor(peer)  # the old connection's last events first
            if self._tcp:
                self._reconnect(peer)  # its new port, if it has published it yet
        self._report_now(name)  # the old incarnation's death, before anything reaches the new
        if peer is not None:
            peer.exited, peer.up_inode = False, None
            if peer.state != UP:
                peer.state = CONNECTING
                peer.hold_until = self.now() + self.send_grace
        self._down_reported.discard(name)

    def expect(self, names: Iterable[str]) -> None:
        """Connect to these peers now (before the first message needs it) and, for
        `send_grace`, treat a refused connection as "not there yet" rather than "down"."""
        self._send_held()
        now = self.now()
        for name in names:
            if name == self.name:
                continue
            self._pinned.add(name)
            peer = self._peer(name)
            if peer is None:
                continue
            self._on_monitor(peer)
            if self._tcp and self._reconnect(peer):
                self._report_now(name)
            if peer.state != UP:
                peer.state = CONNECTING
                peer.hold_until = now + self.send_grace

    # ---- deaths, reported once -------------------------------------------------------------
    def _peer_gone(self, name: str, why: str) -> None:
        """Peer `name` died or dropped its connection: new sends fail from now on, queued
        ones fail now (never sent: definite), and the actor hears `peer_down` once the
        messages the peer sent before dying are delivered: a reply that made it is not
        turned into an indefinite outcome. They travel on another connection than the one
        that dropped (the peer's DEALER to our ROUTER), whose end libzmq may see later: the
        proof is that the ROUTER holds no pipe for the peer's routing ids any more, which
        libzmq's ROUTER only drops once every frame the pipe carried has been read
        (`_inbound_closed`). `SETTLE` bounds the wait (e.g. a live process that dropped one
        connection, or a squatter that took the routing id once the pipe was gone)."""
        peer = self.peers.get(name)
        if peer is not None:
            peer.state = DOWN
            # the incarnation that died is the one the connection reached: the file there now
            # may already be its restarted successor's (read late, the drop comes after it)
            peer.dead_inode = peer.up_inode or self._inode(name)
            self._fail_queue(peer, why)
            self._disconnect(peer)
        rids = [rid for rid, n in self._verified.items() if n == name]
        token = incarnation(self.run_dir, name, self.transport)  # a SIGKILL leaves the file
        if token is not None and routing_id(name, token) not in rids:
            rids.append(routing_id(name, token))
        self._dying.append((self.now() + SETTLE, name, rids))

    def _report_now(self, name: str) -> None:
        """Report a pending death of `name` at once (it is back: what is sent from now on
        goes to a new incarnation and must not be failed by the old one's death)."""
        if any(d[1] == name for d in self._dying):
            self._dying = [d for d in self._dying if d[1] != name]
            self._report_down(name)

    def _report_exits(self) -> None:
        """Report the deaths whose frames are all in (`_peer_gone`) or that waited `SETTLE`."""
        now = self.now()
        due = [d for d in self._dying if d[0] <= now or self._inbound_closed(d[2])]
        if due:
            self._dying = [d for d in self._dying if d not in due]
            for _, name, _ in due:  # taken out first: a report's sends may change _dying
                self._report_down(name)

    def _report_down(self, name: str) -> None:
        if name in self._down_reported:
            return
        self._down_reported.add(name)
        self.stats["peer_down"] += 1
        self.log(f"peer {name} is down")
        if self.actor is not None:
            self._send_all(self.actor.peer_down(name, self.now(), sent=True))

    # ---- connecting ------------------------------------------------------------------------
    def _default_endpoint(self, name: str) -> str | None:
        """ipc peers exist when their socket file does (a name of this run); tcp peers when
        their endpoint file does (it holds their loopback port)."""
        if not valid_name(name):
            return None
        if self._tcp:
            found = read_endpoint_file(self.run_dir, name)
            return None if found is None else found[0]
        if not os.path.exists(socket_path(self.run_dir, name)):
            return None
        return endpoint(self.run_dir, name)

    def _peer(self, name: str) -> Peer | None:
        peer = self.peers.get(name)
        if peer is not None:
            return peer
        ep_id = None
        if self._tcp and self._own_eps:
            found = read_endpoint_file(self.run_dir, name) if valid_name(name) else None
            ep, ep_id = found if found is not None else (None, None)
        else:
            ep = self._endpoint_of(name) if valid_name(name) else None
        if ep is None:
            return None
        if name not in self._pinned and not self._make_room():
            self._ratelog("peers:full", f"no room for peer {name}: {MAX_UNPINNED} others are busy")
            return None
        sock = self.ctx.socket(zmq.DEALER)
        try:
            if self.curve is not None and not self.curve.client(sock, self.name, name):
                sock.close(0)
                return None  # tcp: a name without a key of this run is no actor of it
            for opt, val in (
                (zmq.ROUTING_ID, self.rid),
                (zmq.IMMEDIATE, 1),
                (zmq.LINGER, LINGER_MS),
                (zmq.SNDTIMEO, 0),
                (zmq.RECONNECT_IVL, RECONNECT_IVL_MS),
                (zmq.MAXMSGSIZE, MAX_WIRE),
            ):
                sock.setsockopt(opt, val)
            monitor = sock.get_monitor_socket(_MONITOR_EVENTS)
        except zmq.ZMQError:
            sock.close(0)
            raise
        sock.connect(ep)
        self._remember_incarnation(name)  # now: its last reply may come after its file is gone
        peer = Peer(name, sock, monitor, endpoint=ep, ep_id=ep_id)
        self.peers[name] = peer
        self._by_sock[sock] = peer
        self._by_sock[monitor] = peer
        self._poll_socket(sock, POLLIN)
        self._poll_socket(monitor, POLLIN)
        return peer

    def _make_room(self) -> bool:
        """Below MAX_UNPINNED unpinned peers, or one closed: the least recently used with
        nothing queued and no request of the actor waiting on it (its reply would still
        arrive, on our ROUTER, but its death would go unnoticed)."""
        unpinned = [p for n, p in self.peers.items() if n not in self._pinned]
        if len(unpinned) < MAX_UNPINNED:
            return True
        waited_on = set(self.actor._dst_of.values()) if self.actor is not None else set()
        idle = [p for p in unpinned if not p.queue and p.name not in waited_on]
        if not idle:
            return False
        self._forget(min(idle, key=lambda p: p.used))
        return True

    def _forget(self, peer: Peer) -> None:
        """Close `peer`'s DEALER and monitor and drop it from the table (a later send to it
        connects afresh)."""
        for sock in (peer.sock, peer.monitor):
            self._unpoll_socket(sock)
            self._by_sock.pop(sock, None)
        try:
            peer.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        peer.monitor.close(0)
        peer.sock.close(0)
        self._queued.discard(peer.name)
        del self.peers[peer.name]

    def _inode(self, name: str) -> tuple[int, int] | None:
        """Which file `name`'s ipc socket (tcp: endpoint file) is (inode numbers alone are
        reused at once)."""
        try:
            st = os.stat(presence_path(self.run_dir, name, self.transport))
        except OSError:
            return None
        return st.st_ino, st.st_ctime_ns

    def _rebound(self, peer: Peer) -> bool:
        """A DOWN peer whose ipc socket file is a new one (a restarted incarnation bound it)
        is connecting again: libzmq reconnects within RECONNECT_IVL_MS, so a send waits for
        that (up to `send_grace`) instead of failing. The old incarnation's death is reported
        first, so it cannot fail what goes to the new one."""
        if not self._own_eps:
            return False
        if self._tcp:
            self._on_monitor(peer)  # the old connection's last events first
            if not self._reconnect(peer):
                return False
        elif not self._bound_anew(peer):
            return False
        peer.dead_inode = peer.up_inode = None
        peer.exited = False
        self._report_now(peer.name)
        self._down_reported.discard(peer.name)
        peer.state = CONNECTING
        peer.hold_until = self.now() + self.send_grace
        return True

    def _bound_anew(self, peer: Peer) -> bool:
        """Whether `peer`'s presence file is another one than when it died (a dead process
        binds nothing: a new incarnation did)."""
        inode = self._inode(peer.name)
        return inode is not None and inode != peer.dead_inode

    def _reconnect(self, peer: Peer) -> bool:
        """tcp: if `peer` has published a new endpoint file (a restarted incarnation, most
        likely on another port), point the DEALER at it; True when it did."""
        if not self._own_eps:
            return False
        found = read_endpoint_file(self.run_dir, peer.name)
        if found is None or found[1] == peer.ep_id:
            return False
        self._disconnect(peer)
        peer.endpoint, peer.ep_id = found
        peer.sock.connect(peer.endpoint)
        self._dirty.add(peer.sock)
        self._dirty.add(peer.monitor)
        return True

    def _disconnect(self, peer: Peer) -> None:
        """tcp: stop reconnecting to a dead peer's port (another process may get it); the
        endpoint file of a restarted incarnation reconnects (`_reconnect`)."""
        if not self._tcp or not peer.endpoint or not self._own_eps:
            return
        try:
            peer.sock.disconnect(peer.endpoint)
        except zmq.ZMQError:
            pass
        peer.endpoint = ""

    def _on_monitor(self, peer: Peer) -> None:
        tcp = self._tcp and self._own_eps
        for event, _, where in monitor_events(peer.monitor):
            if tcp and where != peer.endpoint.encode():
                continue  # an old endpoint's connection (before a restart): not this one
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                if peer.exited and not self._bound_anew(peer):
                    # the dead process's own connection, its handshake read only now (libzmq
                    # attaches the pipe, which a send may use at once, before it posts this):
                    # it is not back, and its death waits for its frames (`_peer_gone`)
                    continue
                peer.exited = False
                peer.state = UP
                peer.up_inode = self._inode(peer.name)
                self._remember_incarnation(peer.name)
                self._report_now(peer.name)
                self._down_reported.discard(peer.name)
                if peer.queue:
                    self._poll_socket(peer.sock, POLLIN | POLLOUT)
            elif event == zmq.EVENT_DISCONNECTED:
                if peer.state == UP:
                    self._peer_gone(peer.name, f"{peer.name} disconnected")
                else:
                    self._set_down(peer)
                    self._fail_queue(peer, f"{peer.name} disconnected")
            elif event != zmq.EVENT_CONNECTED and peer.state != UP:
                # connect refused / retried, or a failed handshake: nobody is serving there
                if self.now() < peer.hold_until:
                    continue
                self._set_down(peer)
                self._fail_queue(peer, f"{peer.name} is not accepting connections")

    def _set_down(self, peer: Peer) -> None:
        if peer.state != DOWN:
            peer.state = DOWN
            peer.dead_inode = self._inode(peer.name)
            self._disconnect(peer)
