"""Entry point of one actor process: `python -m vsva.runtime.actor_process --run-dir D --name N`.

Start-up, in order:
1. tie our life to the launcher's: `prctl(PR_SET_PDEATHSIG, SIGKILL)`, then exit at once if
   the launcher (`--parent-pid`) is already gone (it died before the prctl);
2. read `D/run.json` (run start epoch `t0`, shared-memory path) and `D/topology.json`;
3. bind our ROUTER (`ZmqRuntime`), map the shared memory, build the actor
   `actor_class(spec.kind)(N, ActorEnv(config=spec.config, mem=..., seed=topology.seed, log=...))`;
4. readiness handshake on the launcher's control socket (`orch-ctl.sock`, not the data path):
   a DEALER with routing id "N/<pid>" (`endpoints.control_id`: one per incarnation) sends msgpack {"ready": N, "pid": pid, "endpoint": its ROUTER's
   endpoint (tcp: the port the kernel chose)} and waits (bounded,
   `--go-timeout`) for {"go": true}, which the launcher sends once *every* actor of the run is
   bound, so no actor's `start` sends to a peer that has no socket yet;
5. `actor.start(now)` and the loop (`ZmqRuntime.run_actor`) until the actor sets `stopping`
   (e.g. after a "shutdown" request) or SIGTERM / SIGINT arrives;
6. flush, close sockets with a short linger, unmap, exit 0.

Exit codes: 0 clean, 1 unexpected error (traceback in the log), 2 bad arguments / unknown
actor, 3 no "go" from the launcher in time. stdout/stderr are the launcher's per-actor log
file; log lines are "<seconds since run start> <text>".
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

import msgpack
import zmq

if TYPE_CHECKING:
    from vsva.ops.topology import Topology

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int | None) -> None:
    """Have the kernel SIGKILL us when the launcher dies (Linux); exit if it already has."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


def load_run(run_dir: str) -> tuple[dict[str, Any], Topology]:
    from vsva.ops.topology import ActorSpec, Topology

    with open(os.path.join(run_dir, "run.json")) as f:
        run = json.load(f)
    with open(os.path.join(run_dir, "topology.json")) as f:
        raw = json.load(f)
    raw["actors"] = [ActorSpec(**a) for a in raw["actors"]]
    return run, Topology(**raw)


def handshake(
    ctx: zmq.Context[zmq.Socket[bytes]],
    run_dir: str,
    name: str,
    timeout: float,
    stopped: Callable[[], bool],
    endpoint: str = "",
) -> bool:
    """Tell the launcher we are bound (and where); wait (bounded) for its go."""
    from vsva.runtime.endpoints import control_endpoint, control_id

    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, control_id(name, os.getpid()))
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(control_endpoint(run_dir))
        sock.send(msgpack.packb({"ready": name, "pid": os.getpid(), "endpoint": endpoint}))
        end = time.monotonic() + timeout
        while time.monotonic() < end and not stopped():
            if sock.poll(100, zmq.POLLIN):
                msg = msgpack.unpackb(sock.recv(), raw=False)
                if isinstance(msg, dict) and msg.get("go") is True:
                    return True
        return False
    finally:
        sock.close(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vsva.runtime.actor_process")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--go-timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    return run_actor_process(args.run_dir, args.name, parent_pid=args.parent_pid, go_timeout=args.go_timeout)


def run_actor_process(
    run_dir: str,
    name: str,
    *,
    parent_pid: int | None = None,
    run_root: int | None = None,
    go_timeout: float = 30.0,
    loaded: tuple[dict[str, Any], Topology] | None = None,
) -> int:
    """Steps 1-6 of the module docstring for actor `name`; `loaded` is (run, topology) when
    the caller (the fork server) has read the run directory already; `run_root` is the
    launcher's pid (default `parent_pid`: it started us itself). Returns the exit code."""
    die_with_parent(parent_pid)

    from vsva.actors import actor_class
    from vsva.actors.base import ActorEnv
    from vsva.actors.memory import PhysMem
    from vsva.ops.topology import ORCH
    from vsva.runtime.loop import ZmqRuntime

    run, topology = loaded if loaded is not None else load_run(run_dir)
    t0 = float(run["t0"])

    def log(line: str) -> None:
        print(f"{time.time() - t0:9.3f} {line}", file=sys.stderr, flush=True)

    try:
        spec = topology.spec(name)
    except StopIteration:
        log(f"{name}: not in the topology")
        return 2

    runtime = ZmqRuntime(
        name,
        run_dir,
        t0=t0,
        log=log,
        transport=getattr(topology, "transport", "ipc"),
        run_root=parent_pid if run_root is None else run_root,
    )
    stop = {"now": False}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop["now"] = True
        runtime.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    runtime.install_signal_wakeup()
    mem = None
    try:
        mem = PhysMem.open(run["shm"]) if run.get("shm") else None
        actor = actor_class(spec.kind)(
            name, ActorEnv(config=spec.config, mem=mem, seed=topology.seed, log=log)
        )
        peers = [ORCH, *topology.peers_of(name)]
        runtime.expect(peers)  # connect to our peers early: first messages need no wait
        log(f"{name}: pid {os.getpid()} bound at {runtime.endpoint}, reporting ready")
        if not handshake(runtime.ctx, run_dir, name, go_timeout, lambda: stop["now"], runtime.endpoint):
            log(f"{name}: no go from the launcher" if not stop["now"] else f"{name}: stopped before start")
            return 0 if stop["now"] else 3
        runtime.expect(peers)  # all are bound now: a refusal from here on means down
        runtime.run_actor(actor)
        log(f"{name}: exiting ({'stopping' if actor.stopping else 'signal'}), stats {runtime.stats}")
        return 0
    except Exception:
        log(f"{name}: fatal error\n{traceback.format_exc()}")
        return 1
    finally:
        runtime.close()
        if mem is not None:
            try:
                mem.close()
            except Exception:
                pass


if __name__ == "__main__":
    code = main()
    # Leave without interpreter finalization: it restores SIGTERM's default action, so a
    # SIGTERM from the launcher arriving then would turn a clean exit into "killed".
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
