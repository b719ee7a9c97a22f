"""The supervisor's control socket: a ROUTER at `<run_dir>/ctl.sock` (ipc, in the 0700 run
directory). A client sends one msgpack map {"op": "ps" | "kill" | "audit" | "down" |
"status", ...} and gets one map back; a request is checked like a message body before it is
acted on, since any local process may send one. Any local process may also send many: a step
of the supervisor's loop answers CTL_BATCH at most (the rest wait for the next step, after
the orchestrator's actor has had its turn), and `audit` requests share live audits, one
running at a time (AuditQueue)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgpack
import zmq

if TYPE_CHECKING:
    from vsva.actors.base import Steps
    from vsva.ops.supervisor.loop import Supervisor

CONTROL_OPS: dict[str, dict[str, type]] = {
    "ps": {},
    "status": {},
    "kill": {"name": str},
    "audit": {},
    "down": {},
}  # op -> its fields and their types

# Requests answered per step of the supervisor's loop at most. The dearest is `ps` (~7.5 us a
# process row: 0.05 ms at 1 VM, 0.5 ms at 32 VMs), so 32 of them cost about one loop slice
# (50 ms) at the largest topologies and a few ms at the usual ones; each CLI command sends one
# request, so 32 at once is far beyond people and scripts, and only a flood waits a step.
CTL_BATCH = 32
# `audit` requests waiting for the next live audit at most (each keeps its routing id). A handful
# of `vsva audit` at once is usual; more than 16 behind one audit is a flood, told so at once
# rather than waiting up to two audits.
AUDIT_WAITERS = 16


def control_request(payload: bytes) -> tuple[dict[str, Any], str | None]:
    """Decode one control request and check it like a message body: a map whose "op" is a
    CONTROL_OPS key and whose other fields are exactly that op's, of their types. Returns
    (request, None) or ({}, why it is refused)."""
    try:
        req = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception:
        return {}, "malformed request: not msgpack"
    if not isinstance(req, dict) or not isinstance(req.get("op"), str):
        return {}, "malformed request: not a map with a string 'op'"
    fields = CONTROL_OPS.get(req["op"])
    if fields is None:
        return {}, f"unknown op {req['op'][:32]!r}; valid: {', '.join(CONTROL_OPS)}"
    for key in req:
        if key != "op" and key not in fields:
            return {}, f"{req['op']}: unknown field {str(key)[:32]!r}"
    for key, typ in fields.items():
        if not isinstance(req.get(key), typ):
            return {}, f"{req['op']}: field {key!r} missing or not {typ.__name__}"
    return req, None


class AuditQueue:
    """The control socket's live audits, one at a time (each asks every actor for a snapshot:
    N at once would be N cuts on every actor). A request finds none running: an audit starts
    for it. One is running: the request waits for the next one (AUDIT_WAITERS at most, beyond
    that it is refused at once), not for the running one, whose cut predates it. The next
    audit starts when the running one ends and answers all its waiters with its one result."""

    def __init__(self, sup: Supervisor, reply: Callable[[bytes, dict[str, Any]], None]):
        self.sup = sup
        self.reply = reply
        self.running = False
        self.waiting: list[bytes] = []  # routing ids of the requests for the next audit

    def request(self, rid: bytes) -> None:
        if not self.running:
            self.running = True
            self.sup.spawn(lambda: self._run([rid]))
        elif len(self.waiting) >= AUDIT_WAITERS:
            self.reply(
                rid,
                {
                    "ok": False,
                    "error": f"audit: busy: one is running and {len(self.waiting)} requests wait "
                    f"for the next (at most {AUDIT_WAITERS}); ask again once it has answered",
                },
            )
        else:
            self.waiting.append(rid)

    def _run(self, rids: list[bytes]) -> Steps[None]:
        """Audit, answer `rids`, then the requests that came meanwhile, until none waits."""
        while rids:
            body = yield from self._audit()
            for rid in rids:
                self.reply(rid, body)
            rids, self.waiting = self.waiting, []
        self.running = False

    def _audit(self) -> Steps[dict[str, Any]]:
        """One live audit as its reply; an audit that raised is an error reply (one line), so
        that no later audit waits for it for good."""
        try:
            res = yield from self.sup.audit_task()
        except Exception as exc:
            why = f"audit failed: {exc!r}"[:200]  # repr: one line
            self.sup.event("audit failed", error=why)
            return {"ok": False, "error": why}
        return {"ok": True, "audit": {k: res.get(k, []) for k in ("ok", "violations", "incomplete", "cut")}}


class ControlServer:
    """Serves the control socket from the supervisor's main loop, CTL_BATCH requests a step."""

    def __init__(self, sup: Supervisor, endpoint: str):
        self.sup = sup
        self.ctl: zmq.Socket[bytes] | None = sup.runtime.ctx.socket(zmq.ROUTER)
        self.ctl.setsockopt(zmq.LINGER, 0)
        self.ctl.setsockopt(zmq.MAXMSGSIZE, 65536)
        self.ctl.bind(endpoint)
        self.audits = AuditQueue(sup, self.reply)
        self.actor_first = False  # the last serve stopped at CTL_BATCH: the actor's turn first

    def readable(self) -> bool:
        """Whether a request waits (the main loop wakes for it: Supervisor._wake). Once after
        a serve that stopped at CTL_BATCH it says no: run_actor asks before its first round,
        so a step woken at once would give the orchestrator's actor no round at all, and a
        steady flood would hold back every reply it waits for (recovery, audits, heartbeat)."""
        if self.ctl is None:
            return False
        if self.actor_first:
            self.actor_first = False
            return False
        events = self.ctl.getsockopt(zmq.EVENTS)
        return isinstance(events, int) and bool(events & zmq.POLLIN)

    def close(self) -> None:
        if self.ctl is not None:
            self.ctl.close(0)
            self.ctl = None

    def serve(self) -> None:
        """Answer the requests waiting, CTL_BATCH at most (malformed frames count too)."""
        for _ in range(CTL_BATCH):
            if self.ctl is None:
                return
            try:
                frames = self.ctl.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) >= 2:
                self._answer(frames[0], frames[1])
        self.actor_first = True

    def _answer(self, rid: bytes, payload: bytes) -> None:
        req, why = control_request(payload)
        if why is not None:
            self.reply(rid, {"ok": False, "error": why})
            return
        op = req["op"]
        if op in ("ps", "status"):
            self.reply(rid, {"ok": True, **self.sup.status()})
        elif op == "kill":
            self._kill(rid, req["name"])
        elif op == "audit":
            self.audits.request(rid)
        else:  # down
            self.sup.stop_requested = True
            self.reply(rid, {"ok": True, "pid": os.getpid()})

    def _kill(self, rid: bytes, name: str) -> None:
        launcher = self.sup.launcher
        if name not in launcher.procs:
            self.reply(
                rid,
                {"ok": False, "error": f"no actor {name!r}; actors: " + ", ".join(launcher.procs)},
            )
        elif not launcher.alive(name):
            self.reply(rid, {"ok": False, "error": f"{name} is not running"})
        else:
            pid = launcher.pid(name)
            launcher.kill(name)
            self.sup.event("killed by request", name, pid=pid)
            self.reply(rid, {"ok": True, "name": name, "pid": pid})

    def reply(self, rid: bytes, body: dict[str, Any]) -> None:
        if self.ctl is None:
            return
        try:
            self.ctl.send_multipart([rid, msgpack.packb(body, default=repr)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
