"""The ZeroMQ runtime over real processes and sockets: request/reply, Gather, timeouts, bad
input on the wire, the RTT through the runtime, and the trace written before a trace_sync's
answer leaves (two runtimes in this process)."""

from __future__ import annotations

import os
import time

import msgpack
import pytest
import zmq
from zmqrt_toys import TOYS, Script

from vsva.actors import errno as E
from vsva.actors.base import Actor, ActorEnv, Call, Gather
from vsva.actors.messages import MAX_FRAME, PROTOCOL_VERSION, Envelope, decode
from vsva.analysis.trace import read_frames
from vsva.ops.launcher import Launcher
from vsva.ops.topology import ActorSpec, Topology
from vsva.runtime import loop
from vsva.runtime.endpoints import endpoint
from vsva.runtime.loop import ZmqRuntime
from vsva.runtime.trace_buffer import trace_path


def toy(name, cls, **config):
    return ActorSpec(name, f"zmqrt_toys:{cls}", config)


@pytest.fixture(scope="module")
def run():
    topo = Topology(
        actors=[
            toy("echo", "Echo"),
            toy("echo2", "Echo"),
            toy("mute", "Mute"),
            toy("proxy", "Proxy", target="echo", targets=["echo", "echo2"]),
            toy("proxy_m", "Proxy", target="mute", targets=[]),
        ],
        mem_frames=16,
        request_timeout=1.0,  # how long a live trace read waits for mute, which never answers
    )
    with Launcher(topo, extra_path=[TOYS]) as launcher:
        yield launcher


def script(run, *steps, timeout=10.0):
    actor = Script(steps=steps)
    assert run.run_actor(actor, timeout=timeout), "controller did not finish in time"
    return actor.result


def test_request_reply_and_gather_across_processes(run):
    pids = {p["name"]: p["pid"] for p in run.processes()}
    direct, forwarded, gathered, both = script(
        run,
        Call("echo", "ping", {"x": 7}),
        Call("proxy", "toy_relay", {"x": 5}),
        Call("proxy", "vcmd_alloc", {"dev": "d0"}),  # a Gather inside the proxy's process
        Gather([Call("echo2", "ping", {"x": 2}), Call("echo", "ping", {"x": 1})]),
    )
    assert direct == {"ret": 0, "echo": 7, "pid": pids["echo"], "count": 0}
    assert forwarded["ret"] == 0 and forwarded["echo"] == 5 and forwarded["via"] == "proxy"
    assert forwarded["pid"] == pids["echo"] != os.getpid()
    assert gathered["ret"] == 0
    assert [(r["echo"], r["pid"]) for r in gathered["replies"]] == [
        ("echo", pids["echo"]),
        ("echo2", pids["echo2"]),
    ]
    assert [(r["echo"], r["pid"]) for r in both] == [(2, pids["echo2"]), (1, pids["echo"])]
    # every hop was traced by its sender, in its own process
    hops = {(r["src"], r["dst"], r["kind"], r["corr"] is not None) for r in run.trace()}
    assert {
        ("orch", "proxy", "vcmd_alloc", False),
        ("proxy", "echo", "toy_ping", False),
        ("proxy", "echo2", "toy_ping", False),
        ("echo2", "proxy", "toy_ping", True),
        ("proxy", "orch", "vcmd_alloc", True),
    } <= hops


def test_timeout_becomes_indefinite_etimedout(run):
    t = time.monotonic()
    direct, forwarded = script(
        run,
        Call("mute", "ping", {}, timeout=0.3),
        # the proxy's own deadline (in its process) expires first
        Call("proxy_m", "toy_relay", {"x": 1, "timeout": 0.3}, timeout=3.0),
    )
    elapsed = time.monotonic() - t
    assert direct["ret"] == -E.ETIMEDOUT and direct["indefinite"] is True
    assert direct["timed_out"]["kind"] == "ping" and direct["timed_out"]["peer"] == "mute"
    assert direct["timed_out"]["elapsed_s"] >= 0.3
    assert forwarded["ret"] == -E.ETIMEDOUT and forwarded["indefinite"] is True
    assert forwarded["via"] == "proxy_m"  # the proxy's deadline, not ours (3 s), gave the answer
    assert elapsed >= 0.55  # neither deadline fired early


def test_send_to_unknown_peer_fails_loudly_and_at_once(run):
    [reply] = script(run, Call("nobody", "ping", {}, timeout=5.0))
    assert reply == {"ret": -E.EHOSTDOWN}  # definite, at once: not the -ETIMEDOUT of its 5 s deadline


class Mallory:
    """A raw ZeroMQ client with its own ROUTER (for ordinary replies) and a DEALER (routing id
    `name`) to the target, on which the target's runtime answers refused frames."""

    def __init__(self, run_dir, target, name="mallory", routing_id=None):
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.bind(endpoint(run_dir, name))
        self.dealer = self.ctx.socket(zmq.DEALER)
        if routing_id is not False:  # an actor's: "<name>/<incarnation>" (its socket file)
            st = os.stat(os.path.join(run_dir, f"{routing_id or name}.sock"))
            self.dealer.setsockopt(
                zmq.ROUTING_ID, f"{routing_id or name}/{st.st_ino}.{st.st_ctime_ns}".encode()
            )
        self.dealer.connect(endpoint(run_dir, target))
        self.name, self.target, self.next_id = name, target, 100

    def envelope(self, kind, body=None, **over):
        self.next_id += 1
        env = {
            "v": PROTOCOL_VERSION,
            "id": self.next_id,
            "src": self.name,
            "dst": self.target,
            "kind": kind,
            "corr": None,
            "rr": True,
            "clock": 1,
            "flow": "",
            "body": body or {},
        }
        env.update(over)
        return env

    def send(self, frame):
        if isinstance(frame, dict):
            frame = msgpack.packb(frame)
        self.dealer.send_multipart(frame if isinstance(frame, list) else [frame])

    def answer(self, timeout=3.0):
        """The next message on either socket: ("runtime"|"actor", decoded envelope)."""
        poller = zmq.Poller()
        poller.register(self.dealer, zmq.POLLIN)
        poller.register(self.router, zmq.POLLIN)
        events = dict(poller.poll(int(timeout * 1000)))
        if self.dealer in events:
            return "runtime", msgpack.unpackb(self.dealer.recv())
        if self.router in events:
            rid, payload = self.router.recv_multipart()
            assert rid.startswith(self.target.encode() + b"/")  # "<name>/<incarnation>"
            return "actor", msgpack.unpackb(payload)
        raise AssertionError("no answer within the timeout")

    def close(self):
        self.router.close(0)
        self.dealer.close(0)
        self.ctx.term()


def test_bad_input_on_the_wire_is_answered_and_changes_nothing(run):
    m = Mallory(run.run_dir, "echo")
    try:
        # a good request first: the counter moves to 1
        m.send(m.envelope("ioasid_alloc"))
        assert m.answer()[1]["body"] == {"ret": 0, "hpasid": 1, "count": 1}
        cases = [
            ("garbage", b"\xc1\x00\xff", "runtime", -E.EBADMSG, None),
            ("not a map", msgpack.packb([1, 2, 3]), "runtime", -E.EBADMSG, None),
            ("two parts", [msgpack.packb(m.envelope("ioasid_alloc")), b"x"], "runtime", -E.EBADMSG, None),
            ("missing field", m.envelope("ioasid_alloc", src=None), "runtime", -E.EBADMSG, 0),
            ("version", m.envelope("ioasid_alloc", v=PROTOCOL_VERSION + 1), "runtime", -E.EPROTONOSUPPORT, 0),
            (
                "oversize",
                m.envelope("ioasid_alloc", {"pad": "x" * (MAX_FRAME + 1)}),
                "runtime",
                -E.EMSGSIZE,
                None,
            ),
            ("spoofed src", m.envelope("ioasid_alloc", src="proxy"), "runtime", -E.EPERM, 0),
            ("wrong dst", m.envelope("ioasid_alloc", dst="echo2"), "runtime", -E.EINVAL, 0),
            ("unknown kind", m.envelope("frobnicate"), "actor", -E.EOPNOTSUPP, 0),
            ("bad body", m.envelope("ioasid_free", {"hpasid": "7"}), "actor", -E.EINVAL, 0),
        ]
        for label, frame, via, ret, corr in cases:
            sent_id = frame["id"] if isinstance(frame, dict) else None
            m.send(frame)
            who, env = m.answer()
            assert (who, env["body"]["ret"]) == (via, ret), label
            assert (
                env["src"] == "echo"
                and env["dst"] == "mallory"
                and env["corr"] == (sent_id if corr is not None else None)
            ), label
            assert env["body"].get("error"), label
        # a request with the ZeroMQ-generated routing id of an anonymous DEALER: -EPERM
        anon = Mallory(run.run_dir, "echo", name="anon", routing_id=False)
        try:
            anon.send(anon.envelope("ioasid_alloc"))
            who, env = anon.answer()
            assert (who, env["body"]["ret"]) == ("runtime", -E.EPERM)
        finally:
            anon.close()
        # a flood of garbage: every frame answered, the log line rate-limited
        for _ in range(60):
            m.send(b"\xc1")
        assert all(m.answer()[1]["body"]["ret"] == -E.EBADMSG for _ in range(60))
        # state unchanged by all of it (the spoofed / misrouted allocs did not count) and
        # the actor still serves
        m.send(m.envelope("ioasid_alloc"))
        who, env = m.answer()
        assert (who, env["body"]) == ("actor", {"ret": 0, "hpasid": 2, "count": 2})
        assert run.alive("echo")
        refused = [line for line in run.logs()["echo"].splitlines() if "refused" in line]
        assert 5 <= len(refused) < 40  # 70 refusals, logged at most 5/s per errno
    finally:
        m.close()


def test_rtt_between_two_actor_processes(run, capsys):
    [reply] = script(run, Call("proxy", "start_workload", {"n": 1000}, timeout=60.0), timeout=60.0)
    assert reply["ret"] == 0 and reply["n"] == 1000
    with capsys.disabled():
        print(
            f"\n  proxy->echo request/reply RTT through ZmqRuntime: median "
            f"{reply['median_us']:.0f} us, p90 {reply['p90_us']:.0f} us (n=1000)"
        )
    assert reply["median_us"] < 20_000


class Inbox(Actor):
    """The orchestrator's side: keeps every envelope that reaches it."""

    def __init__(self) -> None:
        super().__init__("orch", ActorEnv())
        self.seen: list[Envelope] = []

    def deliver(self, msg: Envelope, now: float) -> list[Envelope]:
        self.seen.append(msg)
        return []


def test_trace_sync_answer_leaves_after_its_record_is_written_once(tmp_path, monkeypatch):
    """The answer to trace_sync is handed to ZeroMQ only once the child's trace file holds
    it: each try finds its record there, exactly once, also the try after one that found
    the queue full (EAGAIN: it waits in the peer's queue and goes later, not recorded again)."""
    os.chmod(tmp_path, 0o700)
    orch = ZmqRuntime("orch", str(tmp_path), trace=False, run_root=os.getpid())
    kid = ZmqRuntime("kid", str(tmp_path), run_root=os.getpid())
    orch.actor, kid.actor = Inbox(), Actor("kid", ActorEnv())
    send, tries = loop.send_frame, []

    def spy(sock, frame):
        env = decode(frame)
        if env.kind == "trace_sync" and env.corr is not None:
            tries.append([r["kind"] for r in read_frames(trace_path(str(tmp_path), "kid"))])
            if len(tries) == 1:
                return zmq.EAGAIN  # the queue is full: the answer waits in the peer's queue
        return send(sock, frame)

    monkeypatch.setattr(loop, "send_frame", spy)
    try:
        orch.send([Envelope("orch", "kid", "trace_sync", {}, id=1, rr=True)])
        end = time.monotonic() + 10.0
        while not orch.actor.seen:
            assert time.monotonic() < end, f"no answer to trace_sync within 10 s (tries: {tries})"
            kid._round(0.01)
            orch._round(0.01)
        assert [(e.kind, e.corr, e.body) for e in orch.actor.seen] == [("trace_sync", 1, {"ret": 0})]
        assert tries == [["trace_sync"], ["trace_sync"]]
    finally:
        kid.close()
        orch.close()
    assert [r["kind"] for r in read_frames(trace_path(str(tmp_path), "kid"))] == ["trace_sync"]
