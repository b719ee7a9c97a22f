"""Recovery and start-up figures of the supervised topology (real processes).

    python benchmarks/bench_recovery.py [--kills 20] [--vms 2] [--json]

- vmm detection: SIGKILL of a VM's vmm -> the host starts that VM's teardown (its first
  FREE_SET notifier message in the trace; both times on the run's wall clock);
- kvm recovery: SIGKILL of kvm -> restarted, resynchronised from the host (`pasid_bindings`)
  and answering (the supervisor's snapshot shows `synced`);
- start time for 1, 8 and 32 VMs: Launcher start (spawn -> every actor ready) and then every
  VM powered on (vm_start through VFIO).
Medians over --kills runs, each on a fresh topology: VMs 1 and 2 run DMA loops, and with
`--vms N` VMs 3..N are powered on too and run a short bind workload (the detection figure
with 128 VMs running: `--vms 128`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vsva.ops.supervisor import Supervisor
from vsva.ops.topology_file import default_run, loads


def one_kill(target: str, seed: int, vms: int = 2) -> float | None:
    run = loads(
        f"[run]\nseed = {seed}\n"
        + "".join(f'[[vms]]\nid = {i}\nworkload = "dma_loop"\niterations = 400\n' for i in (1, 2))
        + "".join(f'[[vms]]\nid = {i}\nworkload = "bind_many"\niterations = 4\n' for i in range(3, vms + 1))
        + f'[[faults]]\nkill = "{target}"\nat_flow = "F7"\nvm = 1\nnth = 30\n'
    )
    sup = Supervisor(run, launcher_kw={"ready_timeout": 120})
    try:
        sup.start()
        end = time.monotonic() + 20 + 0.2 * vms
        while time.monotonic() < end:
            sup.step(0.005)
            recs = [r for r in sup.recovery.records if r["actor"] == target and "t_recovered" in r]
            if recs:
                break
        plan = sup.faults.plans[0]
        if target == "kvm":
            return recs[0]["t_recovered"] - plan["t"] if recs else None
        sup.close()
        notes = [
            r
            for r in sup.launcher.trace()
            if r["src"] == "host"
            and r["kind"] == "ioasid_notify"
            and (r.get("body") or {}).get("event") == "free_set"
            and (r.get("body") or {}).get("vm") == 1
            and r["rr"]
        ]
        return (min(r["t"] for r in notes) - plan["t"]) if notes else None
    finally:
        sup.close()


def start_time(vms: int) -> dict[str, float]:
    run = default_run(vms, workload="bind_many", iterations=1)
    sup = Supervisor(run, workloads=False, launcher_kw={"ready_timeout": 120})
    t = time.monotonic()
    try:
        sup.start()
        ready = time.monotonic() - t
        while not sup.actor.booted and time.monotonic() - t < 120:
            sup.step(0.005)
        booted = time.monotonic() - t
        running = sum(1 for v in sup.vms.values() if v.state == "running")
    finally:
        sup.close()
    return {
        "vms": vms,
        "processes": 3 + 2 * vms,
        "ready_s": round(ready, 3),
        "booted_s": round(booted, 3),
        "running": running,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--vms", type=int, default=2)
    ap.add_argument("--starts", default="1,8,32")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out: dict = {"cpus": os.cpu_count()}
    for target in ("vm1.vmm", "kvm"):
        samples = [
            s for s in (one_kill(target, 100 + i, args.vms) for i in range(args.kills)) if s is not None
        ]
        out[target] = {
            "n": len(samples),
            "median_ms": round(statistics.median(samples) * 1000, 1),
            "min_ms": round(min(samples) * 1000, 1),
            "max_ms": round(max(samples) * 1000, 1),
        }
    out["vms"] = args.vms
    out["start"] = [start_time(int(n)) for n in args.starts.split(",") if n]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
