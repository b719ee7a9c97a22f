"""A hostile local process, written with pyzmq and msgpack only (no project code): it knows
the wire format from the protocol's documentation, the run directory's layout (ipc sockets
`<name>.sock`, tcp endpoints in `<name>.ep`) and nothing else.

`Raw(run_dir, target, name)` is a DEALER connected to `target`'s ROUTER, plus (unless
`listen=False`) a ROUTER bound as `name` so the target can answer it the ordinary way
(through a DEALER of its own). Its routing id is what an actor's is, "<name>/<inode>.<ctime
in ns>" of the presence file of `name` (its own socket when it listens, a live actor's when
it claims that actor's name), unless `routing_id` gives one; `curve=(public, secret,
server_public)` makes the DEALER a CurveZMQ client (tcp), and the ROUTER a CURVE server
with that key pair.
"""

from __future__ import annotations

import itertools
import os
import time

import msgpack
import zmq

_IDS = itertools.count(1000)


def presence(run_dir: str, name: str) -> str:
    ep_file = os.path.join(run_dir, f"{name}.ep")
    return ep_file if os.path.exists(ep_file) else os.path.join(run_dir, f"{name}.sock")


def incarnation_id(run_dir: str, name: str) -> bytes:
    st = os.stat(presence(run_dir, name))
    return f"{name}/{st.st_ino}.{st.st_ctime_ns}".encode()


def target_endpoint(run_dir: str, name: str) -> str:
    ep_file = os.path.join(run_dir, f"{name}.ep")
    if os.path.exists(ep_file):
        with open(ep_file) as f:
            return f.read().strip()
    return f"ipc://{os.path.join(run_dir, name + '.sock')}"


class Raw:
    def __init__(
        self,
        run_dir: str,
        target: str,
        name: str = "mallory",
        *,
        listen: bool = True,
        curve: tuple[bytes, bytes, bytes] | None = None,
        ctx: zmq.Context | None = None,
        routing_id: bytes | None = None,
    ):
        self.ctx = ctx or zmq.Context.instance()
        self.name, self.target, self.run_dir = name, target, run_dir
        self.router = None
        if listen:
            self.router = self.ctx.socket(zmq.ROUTER)
            self.router.setsockopt(zmq.LINGER, 0)
            if target_endpoint(run_dir, target).startswith("tcp://"):
                if curve is not None:  # a key of the run: the actors connect as CURVE clients
                    self.router.curve_publickey, self.router.curve_secretkey = curve[:2]
                    self.router.curve_server = True
                self.router.bind("tcp://127.0.0.1:*")
                with open(os.path.join(run_dir, f"{name}.ep"), "w") as f:
                    f.write(self.router.getsockopt(zmq.LAST_ENDPOINT).decode() + "\n")
            else:
                self.router.bind(f"ipc://{os.path.join(run_dir, name + '.sock')}")
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.ROUTING_ID, routing_id or incarnation_id(run_dir, name))
        self.dealer.setsockopt(zmq.LINGER, 500)
        # every send is bounded: over tcp without the run's key the CURVE handshake fails and
        # libzmq drops the pipe, after which a blocking send would wait for ever
        self.dealer.setsockopt(zmq.SNDTIMEO, 2000)
        if curve is not None:
            self.dealer.curve_publickey, self.dealer.curve_secretkey, self.dealer.curve_serverkey = curve
        self.dealer.connect(target_endpoint(run_dir, target))

    def envelope(self, kind: str, body: dict | None = None, **over) -> dict:
        env = {
            "v": 1,
            "id": next(_IDS),
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

    def send(self, frame) -> None:
        if isinstance(frame, dict):
            frame = msgpack.packb(frame)
        self.dealer.send_multipart(frame if isinstance(frame, list) else [frame])

    def request(self, kind: str, body: dict | None = None, timeout: float = 3.0, **over) -> dict | None:
        """Send one request; the answer's body (from the runtime or the actor), or None (also
        when no peer would take the frame at all)."""
        env = self.envelope(kind, body, **over)
        try:
            self.send(env)
        except zmq.Again:
            return None
        return self.answer(timeout, env["id"])

    def answer(self, timeout: float = 3.0, corr: int | None = None) -> dict | None:
        """The body of the next answer (to `corr`, when given) within `timeout` s in all: other
        frames do not restart the wait; None when none came."""
        poller = zmq.Poller()
        poller.register(self.dealer, zmq.POLLIN)
        if self.router is not None:
            poller.register(self.router, zmq.POLLIN)
        end = time.monotonic() + timeout
        while True:
            left_ms = int((end - time.monotonic()) * 1000)
            events = dict(poller.poll(left_ms)) if left_ms > 0 else {}
            if not events:
                return None
            for sock in events:
                payload = sock.recv_multipart()[-1]
                try:
                    env = msgpack.unpackb(payload, raw=False)
                except Exception:
                    continue
                if isinstance(env, dict) and (corr is None or env.get("corr") in (corr, None)):
                    return env.get("body")

    def close(self) -> None:
        for sock in (self.dealer, self.router):
            if sock is not None:
                sock.close(0)
