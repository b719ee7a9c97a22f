"""The runtime's own cost per message, compiled frames against pure, next to a bare pyzmq echo
measured in the same run.

A server process runs one actor on the process runtime (vsva.runtime.loop.ZmqRuntime) that
answers ping and does nothing else, so what it spends per message is the runtime's: the
drain, the checks, decode and encode, the dispatch, the send, the trace. It runs with the
compiled per-message socket calls (vsva.runtime.frames) and with their pure twins, in turn;
between them the bare pyzmq echo of bench_bind (a ROUTER that sends each frame back) is the
floor. A client keeps `outstanding` pings in flight (1: every message is a wake-up of its
own; 8: the batching of as many VMs binding at once). The figure is the server's
main-thread CPU per message (/proc/PID/task/TID/schedstat); the rounds run A B C A B C ...,
and each is the median over `--repeats` with the min-max.

    python benchmarks/bench_frames.py [--outstanding 1,8] [--messages 2000] [--repeats 5] [--json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Any

from vsva.actors.base import Actor, ActorEnv, Call, Gather
from vsva.actors.catalogue import Ping, Shutdown
from vsva.runtime import frames
from vsva.runtime.loop import ZmqRuntime

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_bind import print_figures, thread_cpu_s
from echo_floor import python_echo, server_cpu_per_msg

WARMUP = 200  # pings before the measured ones
WAIT_S = 60.0  # a round that has not ended by then is an error, not a wait


def serve(run_dir: str, root: int, implementation: str) -> None:
    """The server: one actor answering ping until shutdown, on the frames asked for."""
    import vsva.runtime.loop as loop
    import vsva.runtime.peers as peers

    chosen = frames.PURE if implementation == "python" else frames.COMPILED
    if chosen is not None:  # (compiled and not built: whatever VSVA_PUREPYTHON says)
        loop.recv_batch, loop.send_frame, loop.events = chosen
        peers.events = chosen.socket_events
    runtime = ZmqRuntime("srv", run_dir, run_root=root)
    print("ready", flush=True)
    try:
        runtime.run_actor(Actor("srv", ActorEnv()), timeout=600.0)
    finally:
        runtime.close()


def runtime_cpu_per_msg(implementation: str, outstanding: int, messages: int) -> float:
    """The server's main-thread CPU (us) per ping answered, with `outstanding` in flight."""
    with tempfile.TemporaryDirectory(prefix="vsva-frames-") as run_dir:
        os.chmod(run_dir, 0o700)
        client = ZmqRuntime("orch", run_dir, run_root=os.getpid(), trace=False)
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", run_dir, str(os.getpid()), implementation],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            if server.stdout is None or server.stdout.readline().strip() != "ready":
                raise RuntimeError("the server did not start")
            actor = Actor("orch", ActorEnv())
            done: list[int] = []

            def pings(rounds: int) -> Any:
                for _ in range(rounds):
                    replies = yield Gather([Call("srv", Ping()) for _ in range(outstanding)])
                    if any(r.get("ret") for r in replies):
                        raise RuntimeError(f"ping answered {replies}")
                done.append(rounds)

            def run(work: Any) -> None:
                done.clear()
                client.send(actor.run_task(work, client.now()))
                if not client.run_actor(actor, timeout=WAIT_S, until=lambda _: bool(done)):
                    raise RuntimeError("the server stopped answering")

            run(lambda: pings(max(1, WARMUP // outstanding)))
            rounds = max(1, messages // outstanding)
            start = thread_cpu_s(server.pid)[0]
            run(lambda: pings(rounds))
            used = thread_cpu_s(server.pid)[0] - start

            def shutdown() -> Any:
                yield Call("srv", Shutdown())
                done.append(0)

            run(shutdown)
            server.wait(timeout=10)
            return 1e6 * used / (rounds * outstanding)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait(timeout=5)
            client.close()


def measure(outstanding: int, messages: int, repeats: int) -> dict[str, Any]:
    """compiled, pure and the bare echo, in turn, `repeats` times; medians and ranges."""
    runs: dict[str, list[float]] = {"compiled": [], "python": [], "pyzmq_echo": []}
    for _ in range(repeats):
        if frames.COMPILED is not None:
            runs["compiled"].append(runtime_cpu_per_msg("compiled", outstanding, messages))
        runs["python"].append(runtime_cpu_per_msg("python", outstanding, messages))
        runs["pyzmq_echo"].append(server_cpu_per_msg(python_echo(), outstanding, messages)["main"])
    figures: dict[str, Any] = {}
    for name, values in runs.items():
        if values:
            figures[f"{outstanding} out: {name} us/msg"] = round(statistics.median(values), 1)
            figures[f"{outstanding} out: {name} min-max"] = f"{min(values):.1f}-{max(values):.1f}"
    if runs["compiled"]:
        ratios = [c / p for c, p in zip(runs["compiled"], runs["python"], strict=True)]
        figures[f"{outstanding} out: compiled / python"] = round(statistics.median(ratios), 3)
        figures[f"{outstanding} out: compiled / python min-max"] = f"{min(ratios):.3f}-{max(ratios):.3f}"
    return figures


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--serve":
        serve(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outstanding", default="1,8", help="pings in flight, comma-separated")
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    figures: dict[str, Any] = {"compiled frames": "built" if frames.COMPILED else "not built: python only"}
    for outstanding in (int(x) for x in args.outstanding.split(",")):
        figures |= measure(outstanding, args.messages, args.repeats)
    figures["load_average_1min"] = f"{os.getloadavg()[0]:.1f}"
    print_figures(figures, args.json)


if __name__ == "__main__":
    main()
