"""CurveZMQ for the tcp transport: over loopback tcp a name must be proven by a key.

Over ipc the private 0700 run directory is what makes a routing id a credential: only the
run's user can connect at all. Loopback tcp ports are open to every local user, so there
every actor's ROUTER is a CURVE server and every DEALER a CURVE client:

- at launch the launcher creates one key pair per actor (and one for the orchestrator) in
  `<run_dir>/keys/<name>.key` (mode 0600, in the 0700 run directory: "<public>\\n<secret>\\n",
  Z85): `create_keys`. A restarted actor keeps its pair.
- a DEALER to peer P authenticates P by P's public key (CURVE's server key), and presents
  its own key pair;
- each runtime answers ZAP (RFC 27) with pyzmq's ThreadAuthenticator: a client is let in
  only with the public key of an actor of the run, and its connection's User-Id is that
  actor's name (`Authenticator.curve_user_id`);
- the runtime accepts a frame only when the name its routing id claims is that User-Id
  (`vsva.runtime.loop`, `_drain_router`): a key proves one name, its own, and nothing else.

A client without a key of the run fails the handshake and never reaches the runtime.
What it costs per round trip: benchmarks/bench_curve.py.
"""

from __future__ import annotations

import os

import zmq
from zmq.auth.thread import ThreadAuthenticator

KEYS_DIR = "keys"


def key_path(run_dir: str, name: str) -> str:
    return os.path.join(run_dir, KEYS_DIR, f"{name}.key")


def create_keys(run_dir: str, names: list[str]) -> None:
    """One CURVE key pair per name, written 0600 under `<run_dir>/keys` (0700)."""
    os.makedirs(os.path.join(run_dir, KEYS_DIR), mode=0o700, exist_ok=True)
    for name in names:
        public, secret = zmq.curve_keypair()
        fd = os.open(key_path(run_dir, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, public + b"\n" + secret + b"\n")
        finally:
            os.close(fd)


def load_keys(run_dir: str) -> dict[str, tuple[bytes, bytes]]:
    """name -> (public, secret), Z85, for every actor of the run."""
    keys = {}
    directory = os.path.join(run_dir, KEYS_DIR)
    for entry in os.listdir(directory):
        if entry.endswith(".key"):
            with open(os.path.join(directory, entry), "rb") as f:
                public, secret = f.read().split()[:2]
            keys[entry[: -len(".key")]] = (public, secret)
    return keys


class ActorKeys(ThreadAuthenticator):
    """The ZAP handler of one runtime: known public key -> its actor's name as User-Id."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], keys: dict[str, tuple[bytes, bytes]]):
        super().__init__(ctx)
        self.keys = keys
        self.names = {public: name for name, (public, _) in keys.items()}
        self.start()
        self.configure_curve_callback("*", credentials_provider=self)

    def callback(self, domain: str, z85_key: bytes) -> bool:
        return z85_key in self.names

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.names[zmq.utils.z85.encode(client_public_key)]

    def serve(self, sock: zmq.Socket[bytes], name: str) -> None:
        """Make `sock` (a ROUTER, before bind) the CURVE server of actor `name`."""
        sock.curve_publickey, sock.curve_secretkey = self.keys[name]
        sock.curve_server = True

    def client(self, sock: zmq.Socket[bytes], name: str, peer: str) -> bool:
        """Make `sock` (a DEALER, before connect) actor `name`'s CURVE client of `peer`;
        False when `peer` has no key (it is not an actor of this run)."""
        if peer not in self.keys:
            return False
        sock.curve_publickey, sock.curve_secretkey = self.keys[name]
        sock.curve_serverkey = self.keys[peer][0]
        return True
