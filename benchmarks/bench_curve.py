"""What CurveZMQ costs per round trip: the same two-process ping-pong over loopback tcp,
plain and with the tcp transport's security (vsva.runtime.curve: a key pair per side, ZAP
through the runtime's ThreadAuthenticator, the User-Id read from every inbound frame), in
the same run, alternating, as a ratio against plain tcp (and ipc for reference).

The sockets are the runtime's: each side sends on a DEALER to the other's ROUTER (a reply
travels back the same way), one request outstanding, a ~100-byte msgpack body each way.

    python benchmarks/bench_curve.py [--seconds 1.0] [--repeats 5]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import tempfile
import time

import msgpack
import zmq

from vsva.runtime.curve import ActorKeys, create_keys, load_keys

BODY = {
    "v": 1,
    "id": 1,
    "src": "a",
    "dst": "b",
    "kind": "ping",
    "corr": None,
    "rr": True,
    "clock": 1,
    "flow": "",
    "body": {"x": 12345},
}


def _sockets(ctx, me: str, peer: str, mode: str, run_dir: str, ports: dict) -> tuple:
    """(router, dealer, authenticator) of side `me`: ROUTER bound, DEALER to `peer`."""
    auth = ActorKeys(ctx, load_keys(run_dir)) if mode == "curve" else None
    router = ctx.socket(zmq.ROUTER)
    if auth is not None:
        auth.serve(router, me)
    if mode == "ipc":
        router.bind(f"ipc://{run_dir}/{me}.sock")
    else:
        router.bind("tcp://127.0.0.1:*")
    ports[me] = router.getsockopt(zmq.LAST_ENDPOINT).decode()
    return router, auth


def _connect(ctx, me: str, peer_ep: str, peer: str, auth) -> zmq.Socket:
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.ROUTING_ID, me.encode())
    if auth is not None:
        auth.client(dealer, me, peer)
    dealer.connect(peer_ep)
    return dealer


def _recv(router: zmq.Socket, curve: bool) -> dict:
    router.recv()
    part = router.recv(copy=not curve)
    if curve:
        assert part.get("User-Id")  # what the runtime reads per frame
        part = part.bytes
    return msgpack.unpackb(part)


def _server(mode: str, run_dir: str, ports, ready, client_bound) -> None:
    ctx = zmq.Context()
    router, auth = _sockets(ctx, "b", "a", mode, run_dir, ports)
    ready.set()
    if not client_bound.wait(10):
        raise SystemExit("bench_curve: the client's ROUTER was not bound within 10 s")
    dealer = _connect(ctx, "b", ports["a"], "a", auth)
    while True:
        msg = _recv(router, mode == "curve")
        if msg.get("stop"):
            break
        msg["corr"] = msg["id"]
        dealer.send(msgpack.packb(msg))
    dealer.close(0)
    router.close(0)
    if auth is not None:
        auth.stop()
    ctx.term()


def measure(mode: str, seconds: float) -> float:
    """Median-free figure: microseconds per round trip over `seconds` (after a warm-up)."""
    with tempfile.TemporaryDirectory(prefix="vsva-bench-curve-") as run_dir:
        os.chmod(run_dir, 0o700)
        if mode == "curve":
            create_keys(run_dir, ["a", "b"])
        mgr = mp.Manager()
        ports, ready, client_bound = mgr.dict(), mgr.Event(), mgr.Event()
        proc = mp.get_context("fork").Process(
            target=_server, args=(mode, run_dir, ports, ready, client_bound)
        )
        proc.start()
        if not ready.wait(10):
            raise SystemExit("bench_curve: the server's ROUTER was not bound within 10 s")
        ctx = zmq.Context()
        router, auth = _sockets(ctx, "a", "b", mode, run_dir, ports)
        client_bound.set()
        dealer = _connect(ctx, "a", ports["b"], "b", auth)
        frame = msgpack.packb(BODY)
        for _ in range(500):  # warm-up (and the handshakes)
            dealer.send(frame)
            _recv(router, mode == "curve")
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            dealer.send(frame)
            _recv(router, mode == "curve")
            n += 1
        elapsed = time.perf_counter() - t0
        dealer.send(msgpack.packb({"stop": True}))
        proc.join(10)
        dealer.close(0)
        router.close(0)
        if auth is not None:
            auth.stop()
        ctx.term()
        mgr.shutdown()
        return elapsed / n * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    runs: dict[str, list[float]] = {"tcp": [], "curve": [], "ipc": []}
    for _ in range(args.repeats):  # alternating: the machine's load hits all modes alike
        for mode in runs:
            runs[mode].append(measure(mode, args.seconds))
    med = {m: statistics.median(v) for m, v in runs.items()}
    for mode, values in runs.items():
        print(
            f"{mode:6} median {med[mode]:8.1f} us/round trip  (runs: "
            + ", ".join(f"{v:.0f}" for v in values)
            + ")"
        )
    ratios = [c / t for c, t in zip(runs["curve"], runs["tcp"])]
    print(
        f"curve / plain tcp: {med['curve'] / med['tcp']:.2f}x (per-repeat ratios "
        + ", ".join(f"{r:.2f}" for r in ratios)
        + f"); extra {med['curve'] - med['tcp']:.1f} us per round trip"
    )
    print(f"tcp / ipc: {med['tcp'] / med['ipc']:.2f}x")


if __name__ == "__main__":
    main()
