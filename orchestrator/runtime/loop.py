"""The ZeroMQ runtime: one actor, one process loop, direct sockets to its peers.

The same `ZmqRuntime` runs every child actor (`python -m vsva.runtime.actor_process`) and the
orchestrator's own controller inside the launcher process; there is no other copy of the loop.

Sockets of one actor named N (endpoints are found from (run_dir, name), see `endpoint`):

- one ROUTER bound at `ipc://<run_dir>/N.sock` (transport "ipc", the default) or at
  `tcp://127.0.0.1:<port>` (transport "tcp", see below): *all* inbound traffic (requests,
  one-way messages, replies) arrives there as `[routing_id, payload]`;
- one DEALER per peer, created on first use, `routing_id = N/<incarnation>` (below),
  `IMMEDIATE=1` (a message is only
  queued on a live connection), short `LINGER`, connected to the peer's ROUTER. Replies go
  the same way as requests: through the replier's DEALER to the requester's ROUTER.

Where N's endpoint is and how the tcp transport publishes it: `vsva.runtime.endpoints`. How
a peer's connection is tracked, reported down and reconnected: `vsva.runtime.peers`. The
trace each runtime keeps: `vsva.runtime.trace_buffer`.

Inbound checks, in order, before anything reaches the actor (docs/design.md §9):
  frame shape / `decode` (-EBADMSG, -EPROTONOSUPPORT, -EMSGSIZE),
  `src` == the ZeroMQ routing id of the connection (-EPERM), `dst` == this actor (-EINVAL).
A refused message is answered by the *runtime* (not the actor, whose state is untouched)
with an error envelope sent back over the ROUTER to the routing id of the offending
connection, so it lands on the sender's DEALER: kind = the request's kind (or "error"),
corr = the request's id when it had one, body {"ret": -errno, "error": why}, id negative
(runtime-originated ids never collide with the actor's own positive ids). Messages that are
themselves replies (corr set) are never answered, so two runtimes cannot ping-pong errors.
Anything arriving on a DEALER (only such error answers) is checked the same way, with the
peer's name as identity, and then delivered to the actor like any reply.

The routing id is set by the runtime from the actor's name and the actor API cannot change
it, so `src` is authenticated the way a file descriptor authenticates a caller: by the
channel, not by a claim in the message. It names the incarnation too: "N/<inode>.<ctime>"
of N's presence file (its ipc socket, or tcp endpoint file: `endpoints.incarnation`), and
a frame is accepted only when that is N's *current* file. A second connection that claims
the routing id of a live one is never handed it (ROUTER_HANDOVER off: libzmq leaves it
unidentified and delivers nothing from it), so a stray or hostile DEALER cannot cut a real
peer's channel; a restarted peer has bound a new file, so its routing id is a new one and
it is accepted at once, even while its old connection is still being torn down. (With ipc, only processes that can open the private
0700 run directory can connect at all; see the tcp caveat in `vsva.runtime.endpoints`.)
The run's user can read a routing id there and claim it before its owner connects; so over
ipc a frame counts only from a process of the run: the connecting pid the kernel recorded
(SO_PEERCRED, libzmq's "Peer-Address" property) must be the launcher's or a descendant's
(`_of_run`; over tcp the CURVE key proves the name instead).

Time: `now` given to the actor is `time.monotonic()` minus the runtime's creation time; the
trace time is wall time since the run's start epoch `t0`.

Every wait is bounded: the poll timeout is the time to the actor's next deadline, the next
send-queue expiry, the next trace write, or the run's end, capped at `MAX_POLL`. zmq_poll
returns as soon as any polled socket or fd is readable (no sleep, no polling interval).

Cost per message (the hot path): sends and receives use plain-int flags (pyzmq's enum
flags cost an enum construction per operation); the ROUTER is drained of every ready frame
per wake-up with two receives per frame and one that fails at the end (no EVENTS read and
no RCVMORE getsockopt per frame), all in one call that is compiled where it was built
(`vsva.runtime.frames`, see `_drain_router`); a send goes straight to the DEALER
(a peer not connected yet answers EAGAIN, IMMEDIATE=1, and the frame waits in its queue),
its state being what the last poll round learnt from the monitor: a peer that died within
the current round is seen in the next (its requests then fail as indefinite, as for any
frame lost with a dying connection). A socket used in a round has its EVENTS read once
before the next wait (see `_poll`).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, cast

import zmq

from vsva.actors import errno as E
from vsva.actors.base import Actor
from vsva.actors.catalogue import TraceSync
from vsva.actors.messages import MAX_FRAME, Envelope, ProtocolError, decode, encode
from vsva.runtime.endpoints import (
    TCP_PREFIX,
    TRANSPORTS,
    endpoint,
    endpoint_file,
    incarnation,
    publish_endpoint,
    routing_id,
    socket_path,
    valid_name,
)
from vsva.runtime.frames import recv_batch, send_frame
from vsva.runtime.peers import (
    DOWN,
    LINGER_MS,
    MAX_WIRE,
    SETTLE_TICK,
    Peer,
    PeerLinks,
    events,
    monitor_events,
)
from vsva.runtime.peers import NOBLOCK as _NOBLOCK
from vsva.runtime.peers import POLLIN as _POLLIN
from vsva.runtime.peers import POLLOUT as _POLLOUT
from vsva.runtime.trace_buffer import TRACE_IDLE, TraceBuffer

if TYPE_CHECKING:
    from vsva.runtime.curve import ActorKeys

# seconds: the longest a loop iteration sleeps. Every event that matters wakes the loop by
# itself (a socket's fd, a watched fd, the signal wake-up fd, a deadline), so this is only
# the safety net of `_poll`: an idle actor wakes once a second. At 0.1 s the 259 idle actors
# of 128 VMs took 0.73 of a core between them (0.11 at 1 s), mostly in the wake-ups.
MAX_POLL = 1.0
SEND_GRACE = 0.5  # seconds a message may wait for a fresh / congested connection
MAX_BATCH = 256  # frames taken from one socket per poll round (fairness)
MAX_HELD = 16  # sends held back during a drain before they go (bounds the first one's delay)
DEALER_SWEEP = 0.1  # s: how often the DEALERs sent to have their EVENTS read (_poll)
_TRACE_SYNC = TraceSync.KIND  # its answer leaves once the trace is written (_write_ahead)

_EAGAIN = zmq.EAGAIN

# What the ROUTER's monitor reports: the connections it accepted and how their handshakes
# ended (see _inbound_closed)
_HANDSHAKE_ENDED = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)
_ROUTER_EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | _HANDSHAKE_ENDED
MAX_SOCKETS = 8192  # libzmq's default (1023) is 340 peers: a DEALER, its monitor and its pair each


def new_context() -> zmq.Context[zmq.Socket[bytes]]:
    """A ZeroMQ context that can hold a socket set for every actor of a 256-VM topology."""
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, MAX_SOCKETS)
    return ctx


class ZmqRuntime(PeerLinks):
    """Runs one actor over ZeroMQ: binds its ROUTER at creation, drives it in `run_actor`."""

    def __init__(
        self,
        name: str,
        run_dir: str,
        *,
        t0: float | None = None,
        ctx: zmq.Context[zmq.Socket[bytes]] | None = None,
        log: Callable[[str], None] | None = None,
        trace: bool = True,
        send_grace: float = SEND_GRACE,
        endpoint_of: Callable[[str], str | None] | None = None,
        transport: str = "ipc",
        run_root: int | None = None,
    ):
        if not valid_name(name):
            raise ValueError(f"invalid actor name {name!r}")
        if transport not in TRANSPORTS:
            raise ValueError(f"unknown transport {transport!r}; valid: {', '.join(TRANSPORTS)}")
        self.transport = transport
        self._tcp = transport == "tcp"
        self.name = name
        self.run_dir = run_dir
        self.t0 = time.time() if t0 is None else t0
        self.mono0 = time.monotonic()
        self._own_ctx = ctx is None
        self.ctx = new_context() if ctx is None else ctx
        self._log = log or (lambda line: None)
        self.send_grace = send_grace
        self._endpoint_of = endpoint_of or self._default_endpoint
        self._own_eps = endpoint_of is None  # endpoints from the run directory's files
        self.endpoint = f"{TCP_PREFIX}*" if self._tcp else endpoint(run_dir, name)
        self._ep_id: tuple[int, int] | None = None  # tcp: our endpoint file
        self.router = self.ctx.socket(zmq.ROUTER)
        for opt, val in (
            (zmq.LINGER, LINGER_MS),
            (zmq.ROUTER_MANDATORY, 1),
            (zmq.ROUTER_HANDOVER, 0),
            (zmq.MAXMSGSIZE, MAX_WIRE),
        ):
            self.router.setsockopt(opt, val)
        self.curve: ActorKeys | None = None  # tcp: see vsva.runtime.curve
        try:
            if self._tcp:  # imported here: its ZAP thread brings asyncio, ~0.1 s (ipc needs none)
                from vsva.runtime.curve import ActorKeys, load_keys

                self.curve = ActorKeys(self.ctx, load_keys(run_dir))
                self.curve.serve(self.router, name)
            self.router.bind(self.endpoint)
            if self._tcp:  # the kernel chose a free port: publish it (see the docstring)
                self.endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
                self._ep_id = publish_endpoint(run_dir, name, self.endpoint)
            token = incarnation(run_dir, name, transport)
            if token is None:
                raise OSError(f"{name}: no presence file after bind")
            self.rid = routing_id(name, token)
        except (zmq.ZMQError, OSError, KeyError):
            self.router.close(0)
            if self.curve is not None:
                self.curve.stop()
            if self._own_ctx:
                self.ctx.term()
            raise
        # The poll: epoll over every socket's ZMQ_FD and the watched fds (see _poll)
        self._os_poll = select.epoll()
        self._fd_owner: dict[int, Any] = {}  # fd -> its zmq socket, or the fd (an OS fd)
        self._interest: dict[Any, int] = {}  # zmq socket -> the events wanted from it
        self._dirty: set[Any] = set()  # zmq sockets whose EVENTS must be read before a wait
        self._sent_to: set[Any] = set()  # DEALERs sent to since their last EVENTS read (_poll)
        self._sweep_at = 0.0  # when `_sent_to` is read next (runtime clock)
        self._poll_socket(self.router, _POLLIN)
        # accepted connections (their fds) and how many are still in their handshake
        self._router_monitor = self.router.get_monitor_socket(_ROUTER_EVENTS)
        self._poll_socket(self._router_monitor, _POLLIN)
        self._accepted: set[int] = set()
        self._handshaking = 0
        self.peers: dict[str, Peer] = {}
        self._by_sock: dict[Any, Peer] = {}
        self._watch: dict[int, Callable[[], Iterable[str]]] = {}
        self._down_reported: set[str] = set()
        self._dying: list[tuple[float, str, list[bytes]]] = []  # see _peer_gone
        self._trace = TraceBuffer(run_dir, name) if trace else None
        self._queued: set[str] = set()  # peers with a non-empty send queue
        self._pinned: set[str] = set()  # peers named by `expect`: never evicted
        self._verified: dict[bytes, str] = {}  # routing id -> actor: see _claimed
        # ipc: the launcher's pid; a frame counts only from it or a process it started (_of_run)
        self._run_root = None if self._tcp else run_root
        self._members: dict[tuple[bytes, str], bool] = {}  # (routing id, Peer-Address) -> verdict
        self.run_pids: set[int] = set()  # the launcher's: the pids it started (see _of_run)
        self._runtime_id = 0
        self._held: list[tuple[Peer, Envelope, bytes]] | None = None  # see _drain_router
        self._written_ahead: bytes | None = None  # the last trace_sync answer recorded (_write_ahead)
        self._stop = False
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self.actor: Actor | None = None
        self._started: Actor | None = None
        self.closed = False
        self.stats = {"sent": 0, "received": 0, "send_failed": 0, "rejected": 0, "peer_down": 0}

    # ---- clocks --------------------------------------------------------------------------
    def now(self) -> float:
        return time.monotonic() - self.mono0

    def wall(self) -> float:
        return time.time() - self.t0

    # ---- hooks ---------------------------------------------------------------------------
    def watch(self, fd: int, on_ready: Callable[[], Iterable[str]]) -> None:
        """Poll `fd` too; when readable, `on_ready()` returns the names of peers now dead."""
        if fd in self._watch:
            self._os_poll.modify(fd, select.EPOLLIN)
        else:
            self._os_poll.register(fd, select.EPOLLIN)
        self._watch[fd] = on_ready
        self._fd_owner[fd] = fd

    def unwatch(self, fd: int) -> None:
        if self._watch.pop(fd, None) is not None:
            self._os_unpoll(fd)
            self._fd_owner.pop(fd, None)

    def request_stop(self) -> None:
        """Ask the loop to return soon (safe from a signal handler)."""
        self._stop = True

    def install_signal_wakeup(self) -> None:
        """Wake the poll at once when a signal arrives (main thread only)."""
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        self._os_poll.register(self._wake_r.fileno(), select.EPOLLIN)
        self._fd_owner[self._wake_r.fileno()] = self._wake_r.fileno()

    def log(self, line: str) -> None:
        self._log(f"{self.name}: {line}")

    # ---- the loop ------------------------------------------------------------------------
    def run_actor(
        self, actor: Actor, timeout: float | None = None, until: Callable[[Actor], bool] | None = None
    ) -> bool:
        """Drive `actor` until `until(actor)` holds (default: it is stopping, or has a true
        `done`, or a non-None `result` and nothing pending), a stop is requested, or
        `timeout` passes.

        The actor's `start` runs once, on the first call with that actor. Returns True when
        the condition held, False on timeout or stop request. Outgoing messages are flushed
        before returning, and the trace is written; sockets stay open (call `close`).
        """
        if actor.name != self.name:
            raise ValueError(f"actor {actor.name!r} cannot run on {self.name!r}'s sockets")
        self.actor = actor
        cond = until or _default_until
        end = None if timeout is None else time.monotonic() + timeout
        try:
            self._sync()
            if self._started is not actor:
                self._started = actor
                self._send_all(actor.start(self.now()))
            while True:
                if cond(actor):
                    self.flush(self.send_grace)
                    return True
                if self._stop:
                    self.flush(self.send_grace)
                    return False
                mono = time.monotonic()
                if end is not None and mono >= end:
                    return False
                self._round(MAX_POLL if end is None else min(MAX_POLL, end - mono))
        finally:
            self.write_trace()

    def write_trace(self) -> None:
        """Write every trace record kept in memory to the trace file now."""
        if self._trace is not None:
            self._trace.write()

    # ---- the poll --------------------------------------------------------------------------
    def _poll_socket(self, sock: zmq.Socket[bytes], events: int) -> None:
        """Poll `sock` for `events` (register, or change what is wanted)."""
        if sock not in self._interest:
            fd = cast(int, sock.getsockopt(zmq.FD))
            self._fd_owner[fd] = sock
            self._os_poll.register(fd, select.EPOLLIN)
        self._interest[sock] = events
        self._dirty.add(sock)

    def _unpoll_socket(self, sock: zmq.Socket[bytes]) -> None:
        """Stop polling `sock` (it is about to be closed)."""
        if self._interest.pop(sock, None) is not None:
            fd = cast(int, sock.getsockopt(zmq.FD))
            self._os_unpoll(fd)
            self._fd_owner.pop(fd, None)
        self._dirty.discard(sock)
        self._sent_to.discard(sock)

    def _os_unpoll(self, fd: int) -> None:
        """Take `fd` out of the epoll set (one closed already has left it: EBADF / ENOENT;
        after `close` the set is gone)."""
        try:
            self._os_poll.unregister(fd)
        except (OSError, ValueError):
            pass

    def _poll(self, timeout_ms: int) -> tuple[list[tuple[Any, int]], list[int]]:
        """Wait (at most `timeout_ms`) until a socket has a wanted event or a watched fd is
        readable: ([(socket, events)], [ready OS fds]), in no particular order.

        The same contract as zmq_poll, at a fraction of its cost: zmq_poll reads the EVENTS
        of *every* socket before and after the wait (each read a poll(2) and a getpid(2) in
        libzmq: ~30 syscalls per message with a peer socket and a monitor per actor). Here
        epoll waits on the sockets' ZMQ_FDs (the kernel keeps the set: a wait costs what is
        ready, where poll(2) queued itself on the two fds of every peer on every call, ~10 us
        a round at 8 VMs and growing with the peers), which become readable whenever a command
        reaches a socket; a socket's EVENTS are read only when its fd fired, or when it is
        *dirty*: the loop used it since its last read (a send, recv or EVENTS read consumes
        the fd's signal, so an event it made available would not fire the fd again). A wait
        that times out marks every socket dirty, so even a missed edge costs one `MAX_POLL`
        at most, never a hang.

        A send is such a use too (libzmq's send takes in the socket's commands, at most once
        a millisecond), but what it may hide on a DEALER is only a refusal answered by the
        peer's runtime (our DEALERs receive nothing else) or, with a send queue, POLLOUT
        (then the DEALER is polled for it anyway). So the DEALERs sent to are read together
        once every `DEALER_SWEEP` (`_round` wakes for it), not before every wait: at 8 VMs
        binding that was an EVENTS read (a poll(2) and a getpid(2) in libzmq) for most
        messages the host sent, and over 5 ms the host sends to nearly all of its ~17 peers.
        A refusal waits `DEALER_SWEEP` at most; an idle loop that has sent wakes once for it.
        """
        interest = self._interest
        found: dict[Any, int] = {}
        if self._dirty:
            for sock in self._dirty:
                ev = events(sock) & interest.get(sock, 0)
                if ev:
                    found[sock] = ev
            self._dirty.clear()
        fds = self._os_poll.poll(0 if found else timeout_ms / 1000)
        ready_fds = []
        for fd, _ in fds:
            owner = self._fd_owner.get(fd)
            if owner is None:
                continue
            if isinstance(owner, int):
                ready_fds.append(owner)
            elif owner not in found:
                ev = events(owner) & interest.get(owner, 0)
                if ev:
                    found[owner] = ev
        if not found and not fds and timeout_ms > 0:
            self._dirty.update(interest)  # timed out: read every socket next time (safety)
        return list(found.items()), ready_fds

    def _sync(self) -> None:
        """Take in what happened while no loop ran: connection events, process deaths."""
        self._dirty.update(self._interest)
        self._on_router_monitor()
        for peer in list(self.peers.values()):
            if events(peer.monitor) & _POLLIN:
                self._on_monitor(peer)
        for fd in [fd for fd in self._watch if fd >= 0]:
            if select.select([fd], [], [], 0)[0]:
                self._on_fd(fd)

    def _round(self, cap: float) -> None:
        """One poll round: wait (bounded), then handle everything that is ready, inbound
        messages first (before deaths and connection events, and before the deaths due to
        be reported: what a dead peer sent that is here already is delivered first); then
        the trace's upkeep."""
        actor = self.actor
        now = self.now()
        deadline = actor.next_deadline() if actor is not None else None
        if actor is not None and deadline is not None and deadline <= now:
            self._send_all(actor.expire(now))
            return
        wait = cap
        if deadline is not None and deadline - now < wait:
            wait = deadline - now
        if self._dying:  # look for the proof again soon (the last step may not wake us)
            wait = min(wait, self._dying[0][0] - now, SETTLE_TICK)
        if self._sent_to:  # the DEALERs sent to are read once every DEALER_SWEEP (see _poll)
            if now >= self._sweep_at:
                self._dirty.update(self._sent_to)
                self._sent_to.clear()
                self._sweep_at = now + DEALER_SWEEP
            else:
                wait = min(wait, self._sweep_at - now)
        for name in self._queued:
            wait = min(wait, self.peers[name].queue[0][2] - now)
        trace = self._trace
        if trace is not None and trace.pending and wait > TRACE_IDLE:
            wait = TRACE_IDLE
        events, fds = self._poll(max(0, int(wait * 1000 + 0.999)))
        if events:
            monitors = None
            by_sock = self._by_sock
            dirty = self._dirty
            router = self.router
            for sock, _ in events:
                if sock is router:  # inbound messages first
                    if not self._drain_router():
                        dirty.add(router)
                    break
            for sock, flags in events:
                if sock is router:
                    continue
                dirty.add(sock)
                peer = by_sock.get(sock)
                if peer is not None and sock is peer.sock:
                    if flags & _POLLIN:
                        self._drain_dealer(peer)
                    if flags & _POLLOUT:
                        self._flush_queue(peer)
                elif peer is not None:
                    if monitors is None:
                        monitors = []
                    monitors.append(peer)
                elif sock is self._router_monitor:
                    self._on_router_monitor()
            if monitors is not None:  # then connection events
                for peer in monitors:
                    self._on_monitor(peer)
        if self._dying:
            self._report_exits()
        for fd in fds:  # then process deaths and signals
            self._on_fd(fd)
        if self._queued:
            self._expire_queues()
        if trace is not None and trace.pending and ((not events and not fds) or trace.due()):
            trace.write()  # idle for the whole wait, or records waited long enough

    def flush(self, timeout: float) -> None:
        """Give queued outgoing messages up to `timeout` seconds to leave (bounded); any
        still queued then fail loudly (send_failed)."""
        end = time.monotonic() + timeout
        while self._queued and time.monotonic() < end:
            self._round(min(MAX_POLL, end - time.monotonic()))
        for peer in list(self.peers.values()):
            self._fail_queue(peer, f"not sent to {peer.name} within {timeout:.3f} s")

    # ---- inbound -------------------------------------------------------------------------
    def _drain_router(self) -> bool:
        """Take in up to MAX_BATCH frames; True when the ROUTER is drained (a receive found
        nothing: its commands are processed then, so it is not dirty).

        Every ready frame is taken in one wake-up, by one call (`recv_batch`, compiled where
        it was built: vsva.runtime.frames), then checked and delivered in order. The
        only ZeroMQ calls are the receives: the end of the batch is the receive that finds
        nothing (no EVENTS read per frame, no RCVMORE getsockopt).

        What the actor sends while the batch is handled is held (`_held`, at most MAX_HELD)
        and handed to ZeroMQ in one burst, in the order it was made: ZeroMQ's I/O thread
        is then woken once per burst rather than once per message, and does not compete
        with the handlers for the CPU meanwhile. Per peer and overall the order is the one
        of the sends; anything that changes a peer's state (a new peer, a death or restart
        reported by the launcher) sends what is held first."""
        curve = self.curve is not None
        verified = self._verified
        members = self._members if self._run_root is not None else None
        actor = self.actor
        mono0 = self.mono0
        batch, drained = recv_batch(self.router, MAX_BATCH, members is not None, curve)
        self.stats["received"] += len(batch)
        self._held = []
        try:
            for rid, frame, address, user, extra in batch:
                sender = verified.get(rid) or self._claimed(rid)
                if curve and sender != user:  # the key's name (vsva.runtime.curve)
                    sender = None
                if sender is not None and members is not None:  # ipc: from a process of the run?
                    # (no address: a ZMTP 1.0 / 2.0 peer, whose frames carry no metadata: no)
                    if not (address and (members.get((rid, address)) or self._of_run(rid, address))):
                        sender = None
                if extra:  # a malformed message
                    err = ProtocolError(-E.EBADMSG, f"{extra + 1} payload frames, want 1")
                    self._reject(rid, sender, err, frame)
                    continue
                try:
                    env = decode(frame)
                except ProtocolError as err:
                    self._reject(rid, sender, err, frame)
                    continue
                why = self._check_route(env, sender)
                if why is not None:
                    self._reject(rid, sender, ProtocolError(why[0], why[1], env.to_wire()), b"")
                elif actor is not None:
                    self._send_all(actor.deliver(env, time.monotonic() - mono0))
            return drained
        finally:
            self._send_held(holding=False)

    def _send_held(self, holding: bool = True) -> None:
        """Hand the sends held back during a drain to ZeroMQ, in the order they were made
        (one after the other: ZeroMQ's I/O thread is woken once for a burst, not once per
        message); `holding`: the drain goes on, what is sent from now on is held again."""
        held = self._held
        if held is None:
            return
        self._held = [] if holding else None
        for peer, env, frame in held:
            if peer.queue:  # an earlier one found no room (EAGAIN): wait behind it
                self._enqueue(peer, env, frame)
                continue
            more = self._transmit(peer, env, frame)
            if more:
                self._send_all(more)

    def _drain_dealer(self, peer: Peer) -> None:
        sock = peer.sock
        for _ in range(MAX_BATCH):
            try:
                frames = sock.recv_multipart(_NOBLOCK)
            except zmq.Again:
                return
            self.stats["received"] += 1
            try:
                if len(frames) != 1:
                    raise ProtocolError(-E.EBADMSG, "multi-part frame")
                env = decode(frames[0])
                why = self._check_route(env, peer.name)
                if why is not None:
                    raise ProtocolError(why[0], why[1])
            except ProtocolError as err:
                self.stats["rejected"] += 1
                self._ratelog(
                    "dealer-in", f"dropped bad frame from {peer.name}: {err.why} ({E.name(err.ret)})"
                )
            else:
                self._deliver(env)
            if peer.sock is not sock or not events(sock) & _POLLIN:
                return

    def _claimed(self, rid: bytes) -> str | None:
        """The actor whose current incarnation `rid` names (see the module docstring). Once
        checked (or seen when our DEALER connected to it), a routing id is remembered until
        another incarnation of its actor is seen or the launcher restarts it (`_forget_rids`)."""
        name = self._verified.get(rid)
        if name is not None:
            return name
        try:
            name, _, token = rid.decode("utf-8").partition("/")
        except UnicodeDecodeError:
            return None
        if not valid_name(name) or token != incarnation(self.run_dir, name, self.transport):
            return None
        self._forget_rids(name)
        self._verified[rid] = name
        return name

    def _of_run(self, rid: bytes, peer: str) -> bool:
        """ipc: whether the process that connected (its pid, which the kernel recorded at
        connect: SO_PEERCRED, libzmq's "Peer-Address" `host:uid:gid:pid`) is the launcher or
        one of its descendants. A same-user process outside the run can read a name's routing
        id from the run directory, and claim it before its owner connects; it cannot be a
        process the launcher started. Cached per connection (routing id, address). A process
        the launcher started (`run_pids`) counts without the walk: its last frame (a reply to
        shutdown) may be read after it exited and was reaped, when /proc has no trace of it."""
        key = (rid, peer)
        verdict = self._members.get(key)
        if verdict is None:
            if len(self._members) >= 4096:
                self._members.clear()
            pid = peer.rpartition(":")[2]
            verdict = self._members[key] = pid.isdigit() and (
                int(pid) in self.run_pids or descends_from(int(pid), self._run_root)
            )
        return verdict

    def _inbound_closed(self, rids: list[bytes]) -> bool:
        """Whether our ROUTER holds no pipe for any of `rids` (a dead peer's routing ids):
        libzmq's ROUTER drops a connection's pipe only after the reader has taken every frame
        it carried (up to its delimiter: the drain delivered them all), and refuses a send
        to a routing id without a pipe (ROUTER_MANDATORY: EHOSTUNREACH). The probe is an
        empty frame: a pipe still there belongs to the dead connection (dropped with it), or,
        past the proof, to whoever took the id (it gets an empty frame, refused there).
        The ROUTER first takes in its pending commands (the EVENTS read): a connection made
        while it was not looked at is attached only then (unattached, its routing id would
        be unknown to it too), and frames it holds are read first (next round's drain).

        Frames behind a handshake our I/O thread has not read yet have no pipe to probe:
        libzmq makes an accepted connection's pipe only once it has read the peer's READY
        (libzmq 4.3.5 src/session_base.cpp `engine_ready`, from src/stream_engine_base.cpp
        `mechanism_ready`), while the peer may send as soon as it has read ours, which
        src/null_mechanism.cpp `next_handshake_command` sends without waiting for the
        peer's. So a peer that connected (first use, a reconnection), sent and died just then
        would pass for drained. The proof therefore also wants no accepted connection still
        in its handshake (`_on_router_monitor`: src/stream_listener_base.cpp `create_engine`
        posts ACCEPTED before the engine sends anything, so before such a peer can send)."""
        if self._handshakes_open():
            return False
        self._dirty.add(self.router)  # the EVENTS read and the probe take in its commands
        if events(self.router) & _POLLIN:
            return False
        for rid in rids:
            try:
                self.router.send_multipart([rid, b""], _NOBLOCK)
            except zmq.ZMQError as exc:
                if exc.errno == zmq.EHOSTUNREACH:
                    continue
            return False
        return True

    def _handshakes_open(self) -> int:
        """How many accepted connections may still be in their handshake (events read now:
        the monitor's fd may not have fired yet)."""
        self._on_router_monitor()
        return min(self._handshaking, len(self._accepted))

    def _on_router_monitor(self) -> None:
        """Count what the ROUTER's monitor reports: ACCEPTED opens a handshake (and names the
        connection's fd), a handshake's success or failure ends one (libzmq gives no fd
        for those), DISCONNECTED drops the fd. A handshake cannot outlive its connection, so
        none is open once no accepted connection is left: a ZMTP 1.0/2.0 peer ends its
        handshake without an event (src/stream_engine_base.cpp `in_event_internal`), and
        only while such a connection is open does the proof wait its full bound (SETTLE)."""
        for event, fd, _ in monitor_events(self._router_monitor):
            if event == zmq.EVENT_ACCEPTED:
                self._accepted.add(fd)
                self._handshaking += 1
            elif event == zmq.EVENT_DISCONNECTED:
                self._accepted.discard(fd)
                if not self._accepted:
                    self._handshaking = 0
            elif event & _HANDSHAKE_ENDED and self._handshaking:
                self._handshaking -= 1

    def _remember_incarnation(self, name: str) -> None:
        """Our DEALER reached `name`: remember its incarnation's routing id now, while its
        presence file surely exists (its last reply may come after it removed the file)."""
        token = incarnation(self.run_dir, name, self.transport)
        if token is not None and routing_id(name, token) not in self._verified:
            self._forget_rids(name)
            self._verified[routing_id(name, token)] = name

    def _forget_rids(self, name: str) -> None:
        for rid in [r for r, n in self._verified.items() if n == name]:
            del self._verified[rid]
            for key in [k for k in self._members if k[0] == rid]:
                del self._members[key]

    def _check_route(self, env: Envelope, sender: str | None) -> tuple[int, str] | None:
        if sender is None or env.src != sender:
            return -E.EPERM, f"src {env.src!r} is not the sender {sender!r}"
        if env.dst != self.name:
            return -E.EINVAL, f"dst {env.dst!r} is not {self.name!r}"
        return None

    def _deliver(self, env: Envelope) -> None:
        if self.actor is None:
            return
        self._send_all(self.actor.deliver(env, self.now()))

    def _reject(self, rid: bytes, sender: str | None, err: ProtocolError, frame: bytes) -> None:
        """Answer a refused frame to the connection it came on, unless it was a reply."""
        self.stats["rejected"] += 1
        partial = err.partial if isinstance(err.partial, dict) else {}
        who = sender if sender is not None else rid.hex()
        self._ratelog(
            f"reject:{err.ret}", f"refused frame from {who!r} ({len(frame)} B): {err.why} ({E.name(err.ret)})"
        )
        if partial.get("corr") is not None:
            return  # never answer a reply
        kind = partial.get("kind")
        req_id = partial.get("id")
        flow = partial.get("flow")
        self._runtime_id -= 1
        answer = Envelope(
            src=self.name,
            dst=sender if sender is not None else "?",
            kind=kind if isinstance(kind, str) and len(kind) <= 64 else "error",
            body={"ret": err.ret, "error": err.why},
            id=self._runtime_id,
            corr=req_id if isinstance(req_id, int) and not isinstance(req_id, bool) else None,
            rr=False,
            clock=self.actor.clock if self.actor is not None else 0,
            flow=flow if isinstance(flow, str) and len(flow) <= 64 else "",
        )
        self._dirty.add(self.router)
        t = self.wall()
        try:
            frame = encode(answer)
            self.router.send_multipart([rid, frame], _NOBLOCK)
        except Exception:  # EHOSTUNREACH (gone), EAGAIN (queue full), unencodable: give up
            self.stats["send_failed"] += 1
            return
        if self._trace is not None:
            self._trace.add(t, frame)

    # ---- outbound ------------------------------------------------------------------------
    def send(self, envs: Iterable[Envelope]) -> None:
        """Send envelopes produced outside the loop (e.g. by a test harness)."""
        self._send_all(envs)

    def _send_all(self, envs: Iterable[Envelope]) -> None:
        """Send each envelope; what a failed send makes the actor produce goes after the
        rest (breadth first). Most sends produce nothing: no work queue is built for them."""
        pending = iter(envs)
        for env in pending:
            more = self._send_one(env)
            if more:
                work = deque(pending)
                work.extend(more)
                while work:
                    work.extend(self._send_one(work.popleft()))
                return

    def _send_one(self, env: Envelope) -> list[Envelope]:
        try:
            frame = encode(env)
        except Exception as exc:  # an unencodable body is the sender's bug: fail loudly
            return self._failed(env, f"cannot encode: {exc!r}")
        if len(frame) > MAX_FRAME:
            return self._failed(env, f"frame of {len(frame)} bytes exceeds {MAX_FRAME}")
        try:
            peer = self.peers.get(env.dst)
            if peer is None:
                self._send_held()  # a new peer may close an idle one (_make_room): theirs first
                peer = self._peer(env.dst)
                if peer is None:
                    return self._failed(env, f"no endpoint for {env.dst!r}")
            peer.used = time.monotonic()
            if peer.state == DOWN and not self._rebound(peer):
                return self._failed(env, f"{env.dst} is down")
            self._sent_to.add(peer.sock)  # the send may take in its commands: see _poll
            if peer.queue:
                self._enqueue(peer, env, frame)
                return []
            held = self._held
            if held is not None:  # during a drain: sent at its end (see _drain_router)
                held.append((peer, env, frame))
                if len(held) >= MAX_HELD:
                    self._send_held()
                return []
            return self._transmit(peer, env, frame) or []  # None: queued (not connected yet)
        except (zmq.ZMQError, OSError) as exc:  # e.g. EMFILE: counted and logged, never fatal
            return self._failed(env, f"send error {exc}")

    def _enqueue(self, peer: Peer, env: Envelope, frame: bytes, first: bool = False) -> None:
        item = (env, frame, self.now() + self.send_grace)
        if first:
            peer.queue.appendleft(item)
        else:
            peer.queue.append(item)
        if peer.name not in self._queued:
            self._queued.add(peer.name)
            self._poll_socket(peer.sock, _POLLIN | _POLLOUT)

    def _dequeued(self, peer: Peer) -> None:
        """`peer`'s queue is empty now: stop polling its DEALER for POLLOUT."""
        if peer.name in self._queued:
            self._queued.discard(peer.name)
            if not self.closed:
                self._poll_socket(peer.sock, _POLLIN)

    def _transmit(self, peer: Peer, env: Envelope, frame: bytes) -> list[Envelope] | None:
        """Hand one frame to ZeroMQ and trace it. None: it must wait (queue full again)."""
        t = time.time() - self.t0  # before the send: the peer may answer before it returns
        trace = self._trace
        if trace is not None and env.kind == _TRACE_SYNC and env.corr is not None:
            self._write_ahead(trace, t, frame)
            trace = None  # recorded already
        err = send_frame(peer.sock, frame)
        if err == _EAGAIN:  # no connection yet (IMMEDIATE), or its queue is full: wait
            self._enqueue(peer, env, frame, first=True)
            return None
        if err:
            return self._failed(env, f"send error {zmq.strerror(err)}")
        if trace is not None:
            trace.add(t, frame)
        self.stats["sent"] += 1
        return []

    def _write_ahead(self, trace: TraceBuffer, t: float, frame: bytes) -> None:
        """An answer to trace_sync: record it and write every record kept, before it leaves,
        so the orchestrator that has it reads them all (vsva.ops.launcher `Launcher.trace`).
        Recorded at its first try only: one that must wait in the queue (EAGAIN) is not
        recorded again when it goes. (One that then never leaves stays recorded; the read
        that asked gives up on us at its bound.)"""
        if frame is not self._written_ahead:
            trace.add(t, frame)
            trace.write()
            self._written_ahead = frame

    def _failed(self, env: Envelope, why: str) -> list[Envelope]:
        self.stats["send_failed"] += 1
        self._ratelog(f"sendfail:{env.dst}", f"send {env.kind} #{env.id} to {env.dst} failed: {why}")
        if self.actor is None:
            return []
        return self.actor.send_failed(env, self.now())

    def _flush_queue(self, peer: Peer) -> None:
        while peer.queue and events(peer.sock) & _POLLOUT:
            env, frame, _ = peer.queue.popleft()
            more = self._transmit(peer, env, frame)
            if more is None:
                return
            self._send_all(more)
        if not peer.queue:
            self._dequeued(peer)

    def _expire_queues(self) -> None:
        now = self.now()
        for name in list(self._queued):
            peer = self.peers[name]
            while peer.queue and peer.queue[0][2] <= now:
                env, _, _ = peer.queue.popleft()
                self._send_all(
                    self._failed(env, f"no connection to {peer.name} within {self.send_grace:.3f} s")
                )
            if not peer.queue:
                self._dequeued(peer)

    def _fail_queue(self, peer: Peer, why: str) -> None:
        while peer.queue:
            env, _, _ = peer.queue.popleft()
            self._send_all(self._failed(env, why))
        self._dequeued(peer)

    # ---- peers ---------------------------------------------------------------------------
    def _on_fd(self, fd: int) -> None:
        if self._wake_r is not None and fd == self._wake_r.fileno():
            try:
                while self._wake_r.recv(512):
                    pass
            except (BlockingIOError, InterruptedError):
                pass
            return
        on_ready = self._watch.get(fd)
        if on_ready is None:
            return
        for name in on_ready():
            self.peer_exited(name)

    def _ratelog(self, key: str, line: str) -> None:
        if self.actor is not None:
            self.actor.log(key, line)
        else:
            self.log(line)

    # ---- teardown ------------------------------------------------------------------------
    def close(self) -> None:
        """Close every socket with a short linger (idempotent); remove our socket file."""
        if self.closed:
            return
        for peer in list(self.peers.values()):
            self._fail_queue(peer, "runtime closing")
        self.closed = True
        for peer in self.peers.values():
            try:
                peer.sock.disable_monitor()
            except zmq.ZMQError:
                pass
            peer.monitor.close(0)
            peer.sock.close(LINGER_MS)
        self.peers.clear()
        self._by_sock.clear()
        self._interest.clear()
        self._dirty.clear()
        self._sent_to.clear()
        self._fd_owner.clear()
        self._os_poll.close()
        self.router.disable_monitor()
        self._router_monitor.close(0)
        self.router.close(LINGER_MS)
        if self.curve is not None:
            self.curve.stop()
        if self._wake_r is not None and self._wake_w is not None:
            try:
                signal.set_wakeup_fd(-1)
            except ValueError:
                pass
            self._wake_r.close()
            self._wake_w.close()
        if self._trace is not None:
            try:
                self._trace.close()
            except OSError as exc:
                self.log(f"trace not written: {exc}")
        if self._own_ctx:
            self.ctx.destroy(linger=LINGER_MS)  # closes anything left too: bounded
        if self._tcp:  # our endpoint file, unless a new incarnation has replaced it
            path = endpoint_file(self.run_dir, self.name)
            try:
                st = os.stat(path)
                if (st.st_ino, st.st_ctime_ns) == self._ep_id:
                    os.unlink(path)
            except FileNotFoundError:
                pass
            return
        try:
            os.unlink(socket_path(self.run_dir, self.name))
        except FileNotFoundError:
            pass


def _default_until(actor: Actor) -> bool:
    """Stopping, or done: a true `done`, or a `result` set and no request still pending (so
    a controller's closing requests, e.g. shutdown, get their replies)."""
    return bool(
        actor.stopping
        or getattr(actor, "done", False)
        or (getattr(actor, "result", None) is not None and not actor.busy)
    )


def descends_from(pid: int, root: int | None) -> bool:
    """Whether process `pid` is `root` or one of its descendants (walking /proc's parent
    links; a process that is gone, or an orphan re-parented to init, is not)."""
    for _ in range(64):
        if pid == root:
            return True
        if pid <= 1:
            return False
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            return False
        pid = int(stat.rpartition(b")")[2].split()[1])  # after "pid (comm) state": ppid
    return False
