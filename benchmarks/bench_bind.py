"""Bind latency with real processes, next to a raw ZeroMQ round trip measured in the same run.

A bind crosses guest -> vmm (qi_submit), vmm -> host (bind_gpasid), host -> kvm and vdcm
(notifier, in parallel) and back: at least three round trips in sequence. This prints the
median and p99 of the guest-observed bind latency, the median raw DEALER/ROUTER round trip
of a message of the same size between two processes, their ratio, and the time from launch
to all processes ready for the default two-VM topology.

    python benchmarks/bench_bind.py [--iterations 300] [--awake] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import zmq

from vsva.actors.catalogue import BindGpasid
from vsva.actors.messages import Envelope, encode
from vsva.ops.control import Controller
from vsva.ops.launcher import Launcher
from vsva.ops.topology import default_topology

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from awake import cpus_awake

_ECHO = """
import sys, zmq
ctx = zmq.Context(); s = ctx.socket(zmq.ROUTER); s.bind(sys.argv[1])
print("ready", flush=True)
while True:
    ident, payload = s.recv_multipart()
    if payload == b"stop":
        break
    s.send_multipart([ident, payload])
"""


def bind_frame_size() -> int:
    """Bytes of a typical bind_gpasid request on the wire."""
    data = {
        "argsz": 64,
        "version": 1,
        "format": 1,
        "flags": 1,
        "gpgd": 0x81000,
        "hpasid": 1234,
        "gpasid": 256,
        "addr_width": 48,
        "vtd_flags": 2,
    }
    msg = BindGpasid(dev="pf1", data=data)
    return len(
        encode(
            Envelope(
                src="vm1.vmm",
                dst="host",
                kind=msg.KIND,
                id=77,
                rr=True,
                clock=1234,
                flow="F2:vm1.12",
                body=msg.body(),
            )
        )
    )


def thread_cpu_s(pid: int) -> tuple[float, float]:
    """CPU seconds of process `pid` (/proc/PID/task/TID/schedstat: time on a CPU, in ns):
    its main thread (where all of its Python runs) and its other threads (libzmq's I/O
    thread and reaper)."""
    main = other = 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                used = int(f.read().split()[0]) / 1e9
        except FileNotFoundError:  # a thread that just ended
            continue
        if int(tid) == pid:
            main += used
        else:
            other += used
    return main, other


def raw_rtt(
    size: int, rounds: int = 2000, server_cpu: list[tuple[float, float]] | None = None
) -> list[float]:
    """Round trips of `size` bytes, DEALER -> ROUTER echo in another process, one outstanding.
    With `server_cpu`, the echo process's `thread_cpu_s` before and after the timed rounds is
    appended to it."""
    with tempfile.TemporaryDirectory(prefix="vsva-bench-") as tmp:
        endpoint = f"ipc://{tmp}/echo.sock"
        server = subprocess.Popen([sys.executable, "-c", _ECHO, endpoint], stdout=subprocess.PIPE, text=True)
        try:
            server.stdout.readline()
            ctx = zmq.Context.instance()
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 100)
            sock.connect(endpoint)
            payload = os.urandom(size)
            samples = []
            for i in range(rounds + 200):
                if i == 200 and server_cpu is not None:
                    server_cpu.append(thread_cpu_s(server.pid))
                t0 = time.perf_counter()
                sock.send(payload)
                sock.recv()
                if i >= 200:  # warm-up
                    samples.append(time.perf_counter() - t0)
            if server_cpu is not None:
                server_cpu.append(thread_cpu_s(server.pid))
            sock.send(b"stop")
            sock.close()
            return samples
        finally:
            server.wait(timeout=5)


def bind_latencies(iterations: int) -> tuple[list[float], float]:
    """The guest's measured bind latencies (one VM), and launch-to-ready of the demo topology."""
    topology = default_topology(1, workload="bind_latency", iterations=iterations)
    with Launcher(topology) as launcher:
        ctl = Controller(topology)
        launcher.run_actor(ctl, timeout=300)
    result = ctl.result or {}
    steps = result.get("workloads", {}).get("vm1.guest", {}).get("steps", [])
    latencies = next((s["latencies"] for s in steps if s.get("what") == "bind latencies"), [])
    started = time.monotonic()
    with Launcher(default_topology(2)):
        ready = time.monotonic() - started
    return latencies, ready


def pct(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def print_figures(figures: dict[str, Any], as_json: bool) -> None:
    """One JSON object, or one aligned `name: value` line per figure."""
    if as_json:
        print(json.dumps(figures, indent=2))
    else:
        for key, value in figures.items():
            print(f"{key:>32}: {value}")


def iterations_args(doc: str) -> argparse.Namespace:
    """`--iterations N` (binds, default 300), `--awake` (benchmarks/awake.py) and `--json`,
    for the bind benchmarks."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--awake", action="store_true", help="keep every CPU busy with SCHED_IDLE spinners")
    parser.add_argument("--json", action="store_true")
    return parser.parse_args()


def main() -> None:
    args = iterations_args(__doc__)
    size = bind_frame_size()
    with cpus_awake(args.awake):
        rtt = raw_rtt(size)
        latencies, ready = bind_latencies(args.iterations)
    if not latencies:
        sys.exit("no bind latencies were reported")
    figures = {
        "frame_bytes": size,
        "raw_rtt_median_us": round(statistics.median(rtt) * 1e6, 1),
        "bind_median_us": round(statistics.median(latencies) * 1e6, 1),
        "bind_p99_us": round(pct(latencies, 0.99) * 1e6, 1),
        "binds": len(latencies),
        "ratio_bind_median_to_raw_rtt": round(statistics.median(latencies) / statistics.median(rtt), 2),
        "demo_ready_s": round(ready, 3),
        "cpus_kept_awake": args.awake,
    }
    print_figures(figures, args.json)


if __name__ == "__main__":
    main()
