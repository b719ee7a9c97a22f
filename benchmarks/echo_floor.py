"""What a ROUTER echo costs per message in its main thread, in C and in pyzmq: the floor
under the host's CPU per message (bench_scale_bind).

Both echo servers take [routing id, payload] and send it back. The C one
(benchmarks/zmq_echo.c) is built here against the very libzmq pyzmq loads, found in this
process's memory map, so it measures that library with no Python at all; the pyzmq one is
bench_bind's. One client process keeps `clients` DEALERs, each with one request
outstanding: the concurrency of as many VMs binding at once, so the server takes in as many
messages per wake-up as the host does.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tempfile

import zmq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_bind import _ECHO, bind_frame_size, thread_cpu_s

from vsva.runtime.frames import libzmq_path

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "zmq_echo.c")
WARMUP = 200
POLL_MS = 5000  # a reply lost for this long is an error, not a wait


def build_c_echo(directory: str) -> str:
    """Compile zmq_echo.c into `directory`; the executable's path. RuntimeError with the
    compiler's first line when it cannot be built."""
    lib = libzmq_path()
    if lib is None:
        raise RuntimeError("pyzmq's libzmq is not in /proc/self/maps")
    exe = os.path.join(directory, "zmq_echo")
    cc = (sysconfig.get_config_var("CC") or "cc").split()
    cmd = [*cc, "-O2", "-o", exe, SOURCE, lib, f"-Wl,-rpath,{os.path.dirname(lib)}"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"cannot build the C echo: {exc}") from None
    if done.returncode != 0:
        first = (done.stderr.strip().splitlines() or ["no message"])[0]
        raise RuntimeError(f"cannot build the C echo: {first}")
    return exe


def server_cpu_per_msg(server: list[str], clients: int, rounds: int) -> dict[str, float]:
    """Main-thread and I/O-thread CPU (us) per message of the echo `server` (argv without
    the endpoint), over `rounds` messages after a warm-up, with `clients` outstanding."""
    with tempfile.TemporaryDirectory(prefix="vsva-echo-") as tmp:
        endpoint = f"ipc://{tmp}/echo.sock"
        proc = subprocess.Popen([*server, endpoint], stdout=subprocess.PIPE, text=True)
        socks: list[zmq.Socket[bytes]] = []
        try:
            if proc.stdout is None or proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"echo server {server[0]} did not start")
            ctx = zmq.Context.instance()
            poller = zmq.Poller()
            for _ in range(clients):
                sock = ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 100)
                sock.connect(endpoint)
                poller.register(sock, zmq.POLLIN)
                socks.append(sock)
            payload = os.urandom(bind_frame_size())
            for sock in socks:
                sock.send(payload)
            answered, start = 0, thread_cpu_s(proc.pid)
            while answered < WARMUP + rounds:
                ready = poller.poll(POLL_MS)
                if not ready:
                    raise RuntimeError(f"echo server {server[0]} stopped answering")
                for sock, _ in ready:
                    sock.recv()
                    answered += 1
                    if answered == WARMUP:
                        start = thread_cpu_s(proc.pid)
                    sock.send(payload)
            end = thread_cpu_s(proc.pid)
            for sock in socks:  # the last requests' answers, so the stop is the only one left
                if not sock.poll(POLL_MS):
                    raise RuntimeError(f"echo server {server[0]} stopped answering")
                sock.recv()
            socks[0].send(b"stop")
            proc.wait(timeout=5)
        finally:
            for sock in socks:
                sock.close()
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)
    return {"main": 1e6 * (end[0] - start[0]) / rounds, "io": 1e6 * (end[1] - start[1]) / rounds}


def python_echo() -> list[str]:
    """The pyzmq echo server's argv (bench_bind's, without its endpoint)."""
    return [sys.executable, "-c", _ECHO]
