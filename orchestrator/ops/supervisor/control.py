"""The supervisor's control socket: a ROUTER at `<run_dir>/ctl.sock` (ipc, in the 0700 run
directory). A client sends one msgpack map {"op": "ps" | "kill" | "audit" | "down" |
"status", ...} and gets one map back; a request is checked like a message body before it is
acted on, since any local process may send one."""

from __future__ import annotations

import os
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


class ControlServer:
    """Serves the control socket from the supervisor's main loop, one request at a time."""

    def __init__(self, sup: Supervisor, endpoint: str):
        self.sup = sup
        self.ctl: zmq.Socket[bytes] | None = sup.runtime.ctx.socket(zmq.ROUTER)
        self.ctl.setsockopt(zmq.LINGER, 0)
        self.ctl.setsockopt(zmq.MAXMSGSIZE, 65536)
        self.ctl.bind(endpoint)

    def readable(self) -> bool:
        if self.ctl is None:
            return False
        events = self.ctl.getsockopt(zmq.EVENTS)
        return isinstance(events, int) and bool(events & zmq.POLLIN)

    def close(self) -> None:
        if self.ctl is not None:
            self.ctl.close(0)
            self.ctl = None

    def serve(self) -> None:
        sup = self.sup
        while self.ctl is not None:
            try:
                rid, payload = self.ctl.recv_multipart(zmq.NOBLOCK)[:2]
            except zmq.Again:
                return
            except ValueError:
                continue
            req, why = control_request(payload)
            if why is not None:
                self.reply(rid, {"ok": False, "error": why})
                continue
            op = req["op"]
            if op in ("ps", "status"):
                self.reply(rid, {"ok": True, **sup.status()})
            elif op == "kill":
                self._kill(rid, req["name"])
            elif op == "audit":

                def run_audit(rid: bytes = rid) -> Steps[None]:
                    res = yield from sup.audit_task()
                    self.reply(
                        rid,
                        {
                            "ok": True,
                            "audit": {k: res.get(k, []) for k in ("ok", "violations", "incomplete", "cut")},
                        },
                    )

                sup.spawn(run_audit)
            else:  # down
                sup.stop_requested = True
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
