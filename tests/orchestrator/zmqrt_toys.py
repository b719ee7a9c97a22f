"""Toy actors for the ZeroMQ runtime and launcher tests.

They run in real actor processes: a topology names them by kind "zmqrt_toys:Class" and the
launcher puts this directory on the children's PYTHONPATH (`extra_path`). They speak the
catalogue's control messages plus three toy requests, `toy_relay`, `toy_ping` (a ping
between toys: `ping` itself only the orchestrator may send) and `toy_downs` (a Watcher's
reports, answered when one comes), registered in the catalogue here like any message (the
receiving actor checks bodies against them).
"""

from __future__ import annotations

import os
import statistics
import time

from vsva.actors.base import Actor, Call, Gather, Wait
from vsva.actors.catalogue import U32, U64, Message, f, message


@message("toy_relay", flows=("control",), hop="orch -> proxy", kernel="(none: a runtime test's toy)")
class Relay(Message):
    """Ask a Proxy to ping its target with `x` (an optional raw `timeout` bounds the ping)."""

    x: int = f(int, U64)


@message("toy_ping", flows=("control",), hop="toy -> toy", kernel="(none: a runtime test's toy)")
class ToyPing(Message):
    """What a Proxy sends its targets (any toy may); Echo answers it as it answers ping."""


@message("toy_downs", flows=("control",), hop="orch -> watcher", kernel="(none: a runtime test's toy)")
class Downs(Message):
    """Ask a Watcher for its reports once it has more than `seen`, waiting `wait` s at most."""

    seen: int = f(int, U32)
    wait: float = f((float, int), (0, 60))


TOYS = os.path.dirname(os.path.abspath(__file__))


class Echo(Actor):
    """ping -> {"ret": 0, "echo": body.x, "pid": its pid}; ioasid_alloc counts (state)."""

    def __init__(self, name, env):
        super().__init__(name, env)
        self.count = 0

    def on_ping(self, msg, req):
        return {"ret": 0, "echo": msg.body.get("x"), "pid": os.getpid(), "count": self.count}

    on_toy_ping = on_ping

    def on_ioasid_alloc(self, msg, req):
        self.count += 1
        return {"ret": 0, "hpasid": self.count, "count": self.count}

    def on_ioasid_free(self, msg, req):  # catalogue {"hpasid": int 1..}: a body check target
        return {"ret": 0, "count": self.count}

    def snapshot(self):
        return {**super().snapshot(), "count": self.count}


class Hoarder(Echo):
    """An Echo whose process writes its trace only when made to (a trace_sync, or its exit):
    its loop's idle write, its records' age limit and its loop's safety-net wake-up are put
    `hold` s away (default 60), as module settings of its own process, set as it is built.
    A reader that waits for a child's idle write instead of asking for it misses what this
    one sent."""

    def __init__(self, name, env):
        super().__init__(name, env)
        from vsva.runtime import loop, trace_buffer

        hold = float(self.config.get("hold", 60.0))
        loop.TRACE_IDLE = loop.MAX_POLL = trace_buffer.TRACE_MAX_AGE = hold


class Mute(Actor):
    """Swallows everything: requests to it can only time out (or fail when it dies)."""

    def deliver(self, msg, now):
        self.now = now
        return []


class Proxy(Actor):
    """Forwards: toy_relay -> one ping to config["target"]; vcmd_alloc -> Gather over
    config["targets"]; start_workload -> `n` sequential pings to config["target"], timed.
    The pings carry `x` beyond ToyPing's (empty) fields: a raw body, which receivers accept."""

    def on_toy_relay(self, msg, req: Relay):
        reply = yield Call(self.config["target"], ToyPing.KIND, {"x": req.x}, timeout=msg.body.get("timeout"))
        return {**reply, "via": self.name}

    def on_vcmd_alloc(self, msg, req):
        replies = yield Gather([Call(t, ToyPing.KIND, {"x": t}) for t in self.config["targets"]])
        return {"ret": 0, "gpasid": 1, "hpasid": 1, "replies": replies}  # VcmdAlloc's reply fields

    def on_start_workload(self, msg, req):
        rtts = []
        for i in range(int(msg.body.get("n", 100))):
            t = time.perf_counter()
            reply = yield Call(self.config["target"], ToyPing.KIND, {"x": i})
            rtts.append(time.perf_counter() - t)
            if reply.get("ret") != 0 or reply.get("echo") != i:
                return {"ret": -5, "bad": reply}
        return {
            "ret": 0,
            "ok": True,
            "steps": [],
            "median_us": statistics.median(rtts) * 1e6,
            "p90_us": sorted(rtts)[int(len(rtts) * 0.9)] * 1e6,
            "n": len(rtts),
        }


class Script(Actor):
    """The test's controller ("orch"): runs a list of Calls in order, or one Gather, and
    stores the replies in `result`. `steps` items: Call, Gather, or a callable(actor)."""

    def __init__(self, name="orch", env=None, steps=()):
        from vsva.actors.base import ActorEnv

        super().__init__(name, env or ActorEnv())
        self.steps = list(steps)
        self.result = None
        self.replies = []
        self.downs = []

    def on_start(self):
        for step in self.steps:
            self.replies.append((yield step))
        self.result = self.replies

    def on_peer_down(self, peer):
        self.downs.append(peer)


class Watcher(Proxy):
    """A Proxy that records every `peer_down` it hears as [peer, time.monotonic()] (the
    monotonic clock is system-wide on Linux: a test compares it with when it killed the
    peer); `toy_downs` returns them."""

    def __init__(self, name, env):
        super().__init__(name, env)
        self.downs = []
        self.waiting = set()  # the Wait keys of the toy_downs requests not answered yet

    def on_peer_down(self, peer):
        self.downs.append([peer, time.monotonic()])
        for key in list(self.waiting):
            self.wake(key, {"ret": 0})

    def on_toy_downs(self, msg, req: Downs):
        """{"ret": 0, "downs": ...} as soon as there are more than `seen` reports: a test awaits
        a report by this reply instead of asking again and again; with none in `wait` s, the
        Wait's -ETIMEDOUT (and the reports so far): a bounded check that no more came."""
        key, end = (msg.src, msg.id), self.now + req.wait
        while len(self.downs) <= req.seen:
            self.waiting.add(key)
            woke = yield Wait(key, max(0.0, end - self.now))
            self.waiting.discard(key)
            if woke.get("ret") != 0:
                return {**woke, "downs": self.downs}
        return {"ret": 0, "downs": self.downs}


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (a zombie still answers kill(0))."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
