"""VM death under each cleanup policy, with real processes.

For each policy and each size (bound PASIDs held by the dying VM): VM 1 binds N PASIDs, VM 2
runs a bind/unbind loop; VM 1's VMM is SIGKILLed. Printed: the time from the SIGKILL until
the host has torn VM 1 down and every one of its PASIDs is allocatable again (the host
notices the death on its own, through the VMM's connection), and VM 2's bind latency (median,
p99, max) over the whole loop, next to a run of the same loop with no kill.

    python benchmarks/bench_teardown.py [--sizes 16,256,1024] [--policies naive,ordered,reclaim]
        [--vms 2] [--json]

With `--vms N`, VMs 3..N are powered on too (idle): the host then serves N VMs while VM 1
is torn down.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

from vsva.actors.base import Call
from vsva.actors.catalogue import PoolStatus, StartWorkload, VmStart
from vsva.ops.control import Controller
from vsva.ops.launcher import Launcher
from vsva.ops.pacing import gather_bounded
from vsva.ops.topology import POLICIES, default_topology

POLL_S = 0.002


class TeardownProbe(Controller):
    """Powers both VMs on, lets VM 1 bind, then (once killed) polls the host until VM 1 is gone."""

    def __init__(self, topology, kill: bool):
        super().__init__(topology, shutdown=False, stop_vms=False)
        self.kill = kill
        self.phase = "starting"
        self.killed_at: float | None = None
        self.reclaimed_at: float | None = None
        self.vm2_latencies: list[float] = []

    def on_start(self):
        yield from gather_bounded([Call(v, VmStart()) for v in self.topology.names("vmm")])
        bound = yield Call("vm1.guest", StartWorkload(), timeout=300.0)
        self.pasids = sum(1 for s in bound.get("steps", []) if s["flow"] == "F2" and s["ok"])
        self.spawn(self._vm2_loop)
        self.phase = "bound"
        if not self.kill:
            return
        while self.killed_at is None:  # the launcher kills VM 1 from outside and sets killed_at
            yield Call("host", PoolStatus(), timeout=POLL_S)  # times out: a bounded tick
        while True:
            status = yield Call("host", PoolStatus())
            done = [t for t in status.get("teardowns", []) if t["vm"] == 1 and "finished" in t]
            if done and status["reclaiming"] == 0:
                self.reclaimed_at = time.monotonic()
                return

    def _vm2_loop(self):
        reply = yield Call("vm2.guest", StartWorkload(), timeout=300.0)
        steps = reply.get("steps", [])
        self.vm2_latencies = next((s["latencies"] for s in steps if s.get("what") == "bind latencies"), [])
        self.phase = "done"


def one_run(policy: str, pasids: int, kill: bool, binds: int, vms: int = 2) -> dict[str, Any]:
    topology = default_topology(
        max(2, vms), policy=policy, workload="bind_many", iterations=pasids, quota=pasids + 16
    )
    guest2 = topology.spec("vm2.guest").config
    guest2.update(workload="bind_latency", iterations=binds)
    probe = TeardownProbe(topology, kill)
    with Launcher(topology, ready_timeout=120) as launcher:
        launcher.run_actor(probe, timeout=300, until=lambda a: a.phase != "starting")
        if kill:
            probe.killed_at = time.monotonic()
            launcher.kill("vm1.vmm")
            launcher.kill("vm1.guest")
            launcher.run_actor(probe, timeout=120, until=lambda a: a.reclaimed_at is not None)
        launcher.run_actor(probe, timeout=300, until=lambda a: a.phase == "done")
    lat = sorted(probe.vm2_latencies) or [float("nan")]
    return {
        "policy": policy,
        "pasids": probe.pasids,
        "kill": kill,
        "reclaim_ms": round((probe.reclaimed_at - probe.killed_at) * 1e3, 1)
        if kill and probe.reclaimed_at
        else None,
        "vm2_bind_median_us": round(statistics.median(lat) * 1e6, 1),
        "vm2_bind_p99_us": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e6, 1),
        "vm2_bind_max_us": round(lat[-1] * 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16,256,1024")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--binds", type=int, default=150, help="VM 2's bind/unbind iterations")
    parser.add_argument("--vms", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    for policy in args.policies.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            rows.append(one_run(policy, size, kill=False, binds=args.binds, vms=args.vms))
            rows.append(one_run(policy, size, kill=True, binds=args.binds, vms=args.vms))
            if not args.json:
                base, killed = rows[-2], rows[-1]
                print(
                    f"{policy:>8} {killed['pasids']:>5} PASIDs: reclaimed {killed['reclaim_ms']} ms after "
                    f"SIGKILL; VM 2 bind p50/p99/max {killed['vm2_bind_median_us']}/{killed['vm2_bind_p99_us']}/"
                    f"{killed['vm2_bind_max_us']} us (no kill: {base['vm2_bind_median_us']}/"
                    f"{base['vm2_bind_p99_us']}/{base['vm2_bind_max_us']} us)",
                    flush=True,
                )
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
