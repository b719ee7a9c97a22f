"""Where a bind's time goes, hop by hop, next to the same hops made by bare pyzmq relays.

A bind is three round trips in sequence: guest -> vmm (qi_submit), vmm -> host (bind_gpasid),
host -> kvm and vdcm at once (ioasid_notify), and back. Every message goes from a DEALER of
the sender to the ROUTER of the receiver, as in vsva's runtime. This script measures, in one
run:

- `raw`: one DEALER/ROUTER round trip between two processes (benchmarks/bench_bind.py);
- `relay`: the bind's exact shape made by four bare pyzmq processes (vmm, host, kvm, vdcm)
  that only forward a frame of the same size, each one writing down the wall time just
  before every send; the benchmark process is the guest. This is the floor of any design
  that keeps these five processes and ZeroMQ: transport, wake-ups and the least Python that
  can move a frame;
- `vsva`: one VM's `bind_latency` workload, its trace (whose send times are taken just before
  each frame goes to ZeroMQ, as the relays' are) and every process's main-thread CPU.

For both chains it splits the median bind into its hops (median over binds of each interval
between two consecutive sends on the critical path; `guest ends` is the rest of the
guest's own latency: its work before the first send, the last hop and reading the reply),
and says what 4x the raw round trip leaves to vsva's code per hop. Each process's CPU per
message shows how much of a hop is work and how much is waiting for a core.

`--awake` keeps every CPU busy with SCHED_IDLE spinners meanwhile (benchmarks/awake.py).

    python benchmarks/bench_bind_path.py [--iterations 300] [--awake] [--json]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import zmq

from vsva.ops.launcher import Launcher
from vsva.ops.topology import HOST, KVM, VDCM, default_topology, guest_name, vmm_name

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from awake import cpus_awake
from bench_bind import bind_frame_size, iterations_args, print_figures, raw_rtt, thread_cpu_s
from bench_scale_bind import BindRun

GUEST, VMM = guest_name(1), vmm_name(1)
WARMUP = 20  # binds left out at the start of each chain

# The critical path's sends, in order; kvm and vdcm answer in either order.
HOPS = [
    ("guest -> vmm, vmm's qi_submit", (GUEST, VMM), (VMM, HOST)),
    ("vmm -> host, host's bind_gpasid", (VMM, HOST), "first_notify"),
    ("host: second notify", "first_notify", "second_notify"),
    ("host -> kvm/vdcm and back to the host's last ack", "second_notify", "last_ack"),
    ("host's reply after the last ack", "last_ack", (HOST, VMM)),
    ("host -> vmm, vmm's reply", (HOST, VMM), (VMM, GUEST)),
]

_RELAY = """
import json, sys, time, zmq
name, tmp, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
routes = {"vm1.vmm": {"vm1.guest": ["host"], "host": ["vm1.guest"]},
          "host": {"vm1.vmm": ["kvm", "vdcm"]}, "kvm": {"host": ["host"]}, "vdcm": {"host": ["host"]}}[name]
ctx = zmq.Context()
router = ctx.socket(zmq.ROUTER)
router.bind(f"ipc://{tmp}/{name}")
out = {}
for dst in {d for ds in routes.values() for d in ds} | ({"vm1.vmm"} if name == "host" else set()):
    s = out[dst] = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.ROUTING_ID, name.encode())
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"ipc://{tmp}/{dst}")
print("ready", flush=True)
sends, acks = [], 0
while True:
    src, payload = router.recv_multipart()
    src = src.decode()
    if payload == b"stop":
        break
    if name == "host" and src in ("kvm", "vdcm"):
        acks += 1
        targets = ["vm1.vmm"] if acks == 2 else []
        acks %= 2
    else:
        targets = routes[src]
    for dst in targets:
        sends.append((time.time(), name, dst))
        out[dst].send(payload)
print(json.dumps(sends), flush=True)
"""


def main_thread(pid: int) -> tuple[float, int]:
    """Main-thread CPU seconds and voluntary context switches (each one a sleep: a wake-up
    follows) of process `pid`."""
    with open(f"/proc/{pid}/task/{pid}/status") as f:
        switches = next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))
    return thread_cpu_s(pid)[0], switches


def relay_chain(
    size: int, binds: int
) -> tuple[list[float], list[dict[str, Any]], dict[str, tuple[float, float]]]:
    """Bind latencies of the bare relay chain, its send records ({"t", "src", "dst", "bind"})
    and each process's main-thread CPU per message it received (us)."""
    names = [VMM, HOST, KVM, VDCM]
    with tempfile.TemporaryDirectory(prefix="vsva-bench-") as tmp:
        ctx = zmq.Context.instance()
        router = ctx.socket(zmq.ROUTER)
        router.bind(f"ipc://{tmp}/{GUEST}")
        relays = {
            n: subprocess.Popen(
                [sys.executable, "-c", _RELAY, n, tmp, str(size)], stdout=subprocess.PIPE, text=True
            )
            for n in names
        }
        dealers: dict[str, zmq.Socket[bytes]] = {}
        try:
            for proc in relays.values():
                proc.stdout.readline()
            for n in names:
                d = dealers[n] = ctx.socket(zmq.DEALER)
                d.setsockopt(zmq.ROUTING_ID, GUEST.encode())
                d.setsockopt(zmq.LINGER, 1000)
                d.connect(f"ipc://{tmp}/{n}")
            payload = os.urandom(size)
            latencies, sends = [], []
            for _ in range(WARMUP):
                dealers[VMM].send(payload)
                router.recv_multipart()
            cpu0 = {n: main_thread(p.pid) for n, p in relays.items()} | {GUEST: main_thread(os.getpid())}
            for i in range(binds):
                t0 = time.perf_counter()
                sends.append({"t": time.time(), "src": GUEST, "dst": VMM, "bind": i})
                dealers[VMM].send(payload)
                router.recv_multipart()
                latencies.append(time.perf_counter() - t0)
            cpu1 = {n: main_thread(p.pid) for n, p in relays.items()} | {GUEST: main_thread(os.getpid())}
            for d in dealers.values():
                d.send(b"stop")
            records = [json.loads(proc.stdout.readline()) for proc in relays.values()]
            for proc in relays.values():
                proc.wait(timeout=10)
        finally:
            for proc in relays.values():
                proc.kill()
            router.close(linger=0)
            for d in dealers.values():
                d.close(linger=0)
    sent = {VMM: 2, HOST: 3, KVM: 1, VDCM: 1}  # sends per bind of each relay
    for name, rs in zip(names, records):
        for j, (t, src, dst) in enumerate(rs[WARMUP * sent[name] :]):
            sends.append({"t": t, "src": src, "dst": dst, "bind": j // sent[name]})
    received = {GUEST: 1, VMM: 2, HOST: 3, KVM: 1, VDCM: 1}  # frames per bind
    return latencies, sends, per_message(cpu0, cpu1, {n: received[n] * binds for n in received})


def vsva_chain(binds: int) -> tuple[list[float], list[dict[str, Any]], dict[str, tuple[float, float]]]:
    """One VM's bind latencies, the trace's sends of each bind ({"t", "src", "dst", "bind"})
    and each process's main-thread CPU per message received in the window (us); the first
    WARMUP binds are left out of the latencies and sends."""
    topology = default_topology(1, workload="bind_latency", iterations=WARMUP + binds)
    names = [GUEST, VMM, HOST, KVM, VDCM]
    marks: dict[str, tuple[float, dict[str, float]]] = {}
    with Launcher(topology) as launcher:

        def mark(label: str) -> None:
            marks[label] = (time.time() - launcher.t0, {n: main_thread(launcher.pid(n)) for n in names})

        run = BindRun(topology, mark)
        launcher.run_actor(run, timeout=600)
        launcher.close()
        trace = launcher.trace()
    steps = (run.result or {}).get(1, {}).get("steps", [])
    latencies = next((s["latencies"] for s in steps if s.get("what") == "bind latencies"), [])
    (w0, c0), (w1, c1) = marks["start"], marks["end"]
    window = sorted((r for r in trace if w0 <= r["t"] <= w1), key=lambda r: r["t"])
    cpu = per_message(c0, c1, {n: sum(1 for r in window if r["dst"] == n) for n in names})
    flows: dict[str, int] = {}
    sends = []
    for r in window:
        flow = r.get("flow") or ""
        if flow.startswith("F2:") and r["kind"] in ("qi_submit", "bind_gpasid", "ioasid_notify"):
            bind = flows.setdefault(flow, len(flows)) - WARMUP
            if bind >= 0:
                sends.append({"t": r["t"], "src": r["src"], "dst": r["dst"], "bind": bind})
    return latencies[WARMUP:], sends, cpu


def per_message(
    before: dict[str, tuple[float, int]], after: dict[str, tuple[float, int]], received: dict[str, int]
) -> dict[str, tuple[float, float]]:
    """Per process: main-thread CPU (us) and wake-ups per message received."""
    out = {}
    for name, count in received.items():
        (c0, s0), (c1, s1) = before[name], after[name]
        out[name] = (1e6 * (c1 - c0) / max(1, count), (s1 - s0) / max(1, count))
    return out


def hop_medians(sends: list[dict[str, Any]]) -> dict[str, float]:
    """Median (us) over binds of each hop of HOPS."""
    per_bind: dict[int, dict[Any, float]] = {}
    for s in sends:
        marks = per_bind.setdefault(s["bind"], {})
        key = (s["src"], s["dst"])
        marks.setdefault(key, s["t"])  # a bind's first send on a pair (the vmm's reply is later)
        if s["src"] == HOST and s["dst"] in (KVM, VDCM):
            marks.setdefault("first_notify", s["t"])
            marks["second_notify"] = max(marks.get("second_notify", 0.0), s["t"])
        if s["dst"] == HOST and s["src"] in (KVM, VDCM):
            marks["last_ack"] = max(marks.get("last_ack", 0.0), s["t"])
    samples: dict[str, list[float]] = {label: [] for label, _, _ in HOPS}
    samples["chain"] = []
    for marks in per_bind.values():
        if len(marks) < 9:
            continue
        for label, a, b in HOPS:
            samples[label].append(marks[b] - marks[a])
        samples["chain"].append(marks[(VMM, GUEST)] - marks[(GUEST, VMM)])
    return {k: 1e6 * statistics.median(v) for k, v in samples.items() if v}


def main() -> None:
    args = iterations_args(__doc__)
    size = bind_frame_size()
    load0 = os.getloadavg()[0]
    with cpus_awake(args.awake):  # the baselines before and after vsva's run, pooled
        rtts = raw_rtt(size)
        relay_lat, relay_sends, relay_cpu = relay_chain(size, args.iterations)
        vsva_lat, vsva_sends, vsva_cpu = vsva_chain(args.iterations)
        lat2, sends2, cpu2 = relay_chain(size, args.iterations)
        rtts += raw_rtt(size)
    rtt = 1e6 * statistics.median(rtts)
    relay_lat += lat2
    relay_sends += [{**s, "bind": s["bind"] + args.iterations} for s in sends2]
    relay_cpu = {
        n: ((relay_cpu[n][0] + cpu2[n][0]) / 2, (relay_cpu[n][1] + cpu2[n][1]) / 2) for n in relay_cpu
    }
    if not vsva_lat:
        sys.exit("the bind_latency workload reported too few binds")
    relay_hops, vsva_hops = hop_medians(relay_sends), hop_medians(vsva_sends)
    relay_bind = 1e6 * statistics.median(relay_lat)
    vsva_bind = 1e6 * statistics.median(vsva_lat)
    relay_hops["guest ends"] = relay_bind - relay_hops["chain"]
    vsva_hops["guest ends"] = vsva_bind - vsva_hops["chain"]
    figures: dict[str, Any] = {
        "load_average_1min": f"{load0:.2f} -> {os.getloadavg()[0]:.2f}",
        "cpus_kept_awake": args.awake,
        "raw_rtt_us": round(rtt, 1),
        "relay_bind_us": round(relay_bind, 1),
        "relay_over_raw_rtt": round(relay_bind / rtt, 2),
        "vsva_bind_us": round(vsva_bind, 1),
        "vsva_over_raw_rtt": round(vsva_bind / rtt, 2),
    }
    for label in [h[0] for h in HOPS] + ["guest ends"]:
        extra = vsva_hops[label] - relay_hops[label]
        figures[f"hop {label}"] = (
            f"vsva {vsva_hops[label]:.0f} us, relay {relay_hops[label]:.0f} us, +{extra:.0f} us"
        )
    for name, (us, wakes) in vsva_cpu.items():
        relay_us, relay_wakes = relay_cpu[name]
        figures[f"per msg {name}"] = (
            f"CPU vsva {us:.1f} us, relay {relay_us:.1f} us; wake-ups vsva {wakes:.2f}, relay {relay_wakes:.2f}"
        )
    hops = len(HOPS) + 1
    budget = 4 * rtt - relay_bind
    figures["4x budget left for vsva code, us"] = round(budget, 1)
    figures["4x budget per hop, us"] = round(budget / hops, 1)
    figures["vsva code per hop today, us"] = round((vsva_bind - relay_bind) / hops, 1)
    print_figures(figures, args.json)


if __name__ == "__main__":
    main()
