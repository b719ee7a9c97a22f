"""I/O page fault (F6) round trips with real processes, next to a raw ZeroMQ round trip.

A page fault crosses host -> vmm (page_request, one-way), vmm -> guest (injection into the
virtual PRQ), the guest's handler (allocates and maps the page), guest -> vmm -> host
(page_response, a request/reply each hop): the host measures each one from queuing the
request to the wake-up that retries the descriptor. The workload (`fault_loop`) maps
`--pages` untouched pages per round and fills them by DMA: one page request per page,
data checked, pages given back and flushed after each round.

Printed: median and p99 of the host-measured round trip, the raw DEALER/ROUTER round trip of
a page_request-sized frame (bench_bind.raw_rtt), and the faults per second sustained by one VM
and by four VMs at once (faults / time inside the descriptors, and over the whole loop).

    python benchmarks/bench_page_faults.py [--rounds 200] [--pages 8] [--json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # bench_bind beside us, the packages above

from bench_bind import pct, print_figures, raw_rtt  # noqa: E402

from vsva.actors.catalogue import PageRequest  # noqa: E402
from vsva.actors.messages import Envelope, encode  # noqa: E402
from vsva.ops.control import Controller  # noqa: E402
from vsva.ops.launcher import Launcher  # noqa: E402
from vsva.ops.topology import default_topology  # noqa: E402


def request_frame_size() -> int:
    msg = PageRequest(dev="pf1", hpasid=5, grpid=17, addr=0x1_0000_3000, perm=2, last=True)
    return len(
        encode(
            Envelope(
                src="host",
                dst="vm1.vmm",
                kind=msg.KIND,
                id=77,
                clock=1234,
                flow="F6:vm1.123",
                body=msg.body(),
            )
        )
    )


def run(vms: int, rounds: int, pages: int) -> dict:
    topology = default_topology(vms, workload="fault_loop", iterations=rounds)
    for name in topology.names("guest"):
        topology.spec(name).config["fault_pages"] = pages
    with Launcher(topology) as launcher:
        ctl = Controller(topology)
        launcher.run_actor(ctl, timeout=600)
    result = ctl.result or {}
    if result.get("violations"):
        sys.exit(f"audit violations: {result['violations'][:3]}")
    per_vm = []
    for name, work in result.get("workloads", {}).items():
        step = next((s for s in work.get("steps", []) if s.get("what") == "page fault rounds"), None)
        failed = [s for s in work.get("steps", []) if not s["ok"]]
        if step is None or failed:
            sys.exit(f"{name}: fault loop did not complete: {failed[:2]}")
        per_vm.append(step)
    host = result["snapshots"]["host"]
    faults = sum(s["faults"] for s in per_vm)
    in_desc = max(sum(s["rounds"]) for s in per_vm)
    whole = max(s["elapsed"] for s in per_vm)
    return {
        "vms": vms,
        "faults": faults,
        "host_latencies": host["prq_latencies"],
        "prq_stats": host["prq_stats"],
        "faults_per_s_in_descriptors": round(faults / in_desc),
        "faults_per_s_whole_loop": round(faults / whole),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--pages", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    size = request_frame_size()
    rtt = raw_rtt(size)
    one = run(1, args.rounds, args.pages)
    four = run(4, args.rounds, args.pages)
    lat = one["host_latencies"]
    lat4 = four["host_latencies"]
    figures = {
        "frame_bytes": size,
        "raw_rtt_median_us": round(statistics.median(rtt) * 1e6, 1),
        "fault_rtt_median_us": round(statistics.median(lat) * 1e6, 1),
        "fault_rtt_p99_us": round(pct(lat, 0.99) * 1e6, 1),
        "ratio_fault_median_to_raw_rtt": round(statistics.median(lat) / statistics.median(rtt), 2),
        "faults_1vm": one["faults"],
        "faults_per_s_1vm": one["faults_per_s_in_descriptors"],
        "faults_per_s_1vm_whole_loop": one["faults_per_s_whole_loop"],
        "faults_4vm": four["faults"],
        "faults_per_s_4vm": four["faults_per_s_in_descriptors"],
        "faults_per_s_4vm_whole_loop": four["faults_per_s_whole_loop"],
        "fault_rtt_median_us_4vm": round(statistics.median(lat4) * 1e6, 1),
        "fault_rtt_p99_us_4vm": round(pct(lat4, 0.99) * 1e6, 1),
        "prq_stats_4vm": four["prq_stats"],
    }
    print_figures(figures, args.json)


if __name__ == "__main__":
    main()
