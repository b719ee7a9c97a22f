"""Where an actor of a run is found: names, endpoints, endpoint files, presence paths.

An actor named N is found from (run_dir, N): with transport "ipc" (the default) its ROUTER
is bound at `ipc://<run_dir>/N.sock`, and the socket file says it exists.

Transport "tcp" (`[run] transport = "tcp"`): loopback only, never another address. Ports are
chosen without a race: each runtime binds `tcp://127.0.0.1:*` (the kernel picks a free port
and nothing can take it between choice and bind), reads the actual endpoint back
(ZMQ_LAST_ENDPOINT) and publishes it in `<run_dir>/N.ep` (mode 0600, written to a temporary
name and renamed, so a reader never sees half a file) *before* it reports ready. The
endpoint file plays the part of the ipc socket file: a peer exists when its file does, and
the file's identity (inode, ctime) tells incarnations apart. A peer's DEALER connects to the
endpoint read from the file; when the peer goes down the DEALER is disconnected from that
port at once (so it never reconnects to a port another process may have been given since),
and a restarted incarnation, which binds a new port and renames a new file into place, is
reconnected when it is noticed: by the launcher's `peer_restarted` / `expect`, and in every
other actor on the first send to the peer that is down (`_rebound`, as for ipc). Monitor
events are matched to the endpoint they are about, so an old port's last events cannot
change the new connection's state. The readiness message carries the endpoint too (the
launcher keeps the name -> endpoint map: `Launcher.endpoints`). The orchestrator's own
data ROUTER ("orch") follows the topology's transport like every actor; the launcher's
control socket (readiness handshake) and the supervisor's control socket stay ipc in the
private run directory: they are not part of the modelled topology. With tcp, every local
user can connect to the loopback ports: the routing id is then a claim, not a credential
(ipc's 0700 run directory is what makes it one).
"""

from __future__ import annotations

import os
import re
from enum import StrEnum

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


def valid_name(name: str) -> bool:
    """Actor names double as file names in the run directory: keep them boring."""
    return isinstance(name, str) and bool(_NAME.match(name)) and ".." not in name


def socket_path(run_dir: str, name: str) -> str:
    return os.path.join(run_dir, f"{name}.sock")


def endpoint(run_dir: str, name: str) -> str:
    """The ipc ROUTER endpoint of actor `name` (in the private run directory)."""
    return f"ipc://{socket_path(run_dir, name)}"


class Transport(StrEnum):
    """How actors of a run reach each other."""

    IPC = "ipc"  # socket files in the private 0700 run directory (the default)
    TCP = "tcp"  # 127.0.0.1 ports only, published in endpoint files


TRANSPORTS = tuple(t.value for t in Transport)
LOOPBACK = "127.0.0.1"
TCP_PREFIX = f"tcp://{LOOPBACK}:"


def endpoint_file(run_dir: str, name: str) -> str:
    """tcp: the file in which actor `name` publishes its ROUTER's endpoint."""
    return os.path.join(run_dir, f"{name}.ep")


def presence_path(run_dir: str, name: str, transport: str = "ipc") -> str:
    """The file whose existence (and identity) says actor `name` is bound: its ipc socket
    file, or (tcp) its endpoint file."""
    return endpoint_file(run_dir, name) if transport == "tcp" else socket_path(run_dir, name)


def incarnation(run_dir: str, name: str, transport: str = "ipc") -> str | None:
    """The identity of `name`'s current incarnation: its presence file's (inode, ctime), as
    "<inode>.<ctime_ns>"; None when it has none. A restarted actor binds a new file."""
    try:
        st = os.stat(presence_path(run_dir, name, transport))
    except OSError:
        return None
    return f"{st.st_ino}.{st.st_ctime_ns}"


def routing_id(name: str, token: str) -> bytes:
    """The routing id of incarnation `token` of actor `name`: "<name>/<token>" (see
    vsva.runtime.loop: how a receiver checks it)."""
    return f"{name}/{token}".encode()


def read_endpoint_file(run_dir: str, name: str) -> tuple[str, tuple[int, int]] | None:
    """tcp: (endpoint, (inode, ctime_ns)) of `name`'s endpoint file, read and identified
    through one open file (so the identity is the file the endpoint came from); None when
    there is none or it does not hold a loopback tcp endpoint."""
    try:
        fd = os.open(endpoint_file(run_dir, name), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        text = os.read(fd, 256).decode("ascii", "replace").strip()
    except OSError:
        return None
    finally:
        os.close(fd)
    port = text[len(TCP_PREFIX) :]
    if not text.startswith(TCP_PREFIX) or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return text, (st.st_ino, st.st_ctime_ns)


def publish_endpoint(run_dir: str, name: str, ep: str) -> tuple[int, int]:
    """tcp: write `ep` to `<run_dir>/<name>.ep` atomically (a new file, renamed over any old
    incarnation's); returns the file's identity."""
    path = endpoint_file(run_dir, name)
    tmp = os.path.join(run_dir, f".{name}.ep.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, (ep + "\n").encode("ascii"))
        st = os.fstat(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return st.st_ino, st.st_ctime_ns


def control_endpoint(run_dir: str) -> str:
    """The launcher's control ROUTER (readiness handshake), separate from the data path."""
    return f"ipc://{os.path.join(run_dir, 'orch-ctl.sock')}"


def control_id(name: str, pid: int) -> bytes:
    """The routing id of one incarnation's readiness handshake: "N/<pid>". Per incarnation,
    like the data path's: the control ROUTER (handover off) keeps a dead incarnation's id
    until it has processed that connection's teardown, which it does only when it next runs,
    and it ignores a new connection that claims an id still held: a restarted child with
    the same id as its predecessor would have its ready dropped and wait for a go that
    never comes."""
    return f"{name}/{pid}".encode()
