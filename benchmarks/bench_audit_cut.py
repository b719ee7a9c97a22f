"""What the live audit's consistent cut costs (vsva.analysis.cut), on churning VMs (real processes).

    python benchmarks/bench_audit_cut.py [--vms 2] [--seconds 3] [--rounds 3] [--every 0.1] [--json]

One supervised topology whose VMs run the churn workload (allocate, bind, DMA, free, over and
over). Phases alternate on it, --rounds times: churn alone, then churn audited every --every
seconds (0: back to back), each --seconds long. Reported:
- per audit: its latency (the request to its result, what `vsva audit` waits beyond its own
  start-up) and `held_s` (from the first quiesce to the last resume: how long no guest started
  new work), with its parts (drain, settle, snapshot): median, p90, max;
- the churn's throughput (flow instances per second, every guest) audited against alone, a
  same-run ratio; and whether every audit was clean (it must be).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vsva.actors.base import Call, Gather
from vsva.actors.catalogue import Snapshot
from vsva.ops.supervisor import Supervisor
from vsva.ops.topology_file import default_run


def flows_started(sup: Supervisor) -> int:
    """Flow instances every guest has started so far (their snapshots)."""
    guests = sup.run.topology.names("guest")

    def ask():
        replies = yield Gather([Call(g, Snapshot(), timeout=5.0) for g in guests])
        return sum(sum(r["state"]["flows"].values()) for r in replies)

    return sup.run_step(ask, timeout=10.0)


def phase(sup: Supervisor, seconds: float, every: float | None) -> dict:
    """Churn for `seconds`, audited every `every` seconds (None: not audited)."""
    first, t0, audits = flows_started(sup), time.monotonic(), []
    while time.monotonic() - t0 < seconds:
        if every is None:
            sup.step(0.02)
            continue
        t = time.monotonic()
        res = sup.run_step(sup.audit_task, timeout=30.0)
        audits.append(
            {"latency_s": time.monotonic() - t, "ok": bool(res and res["ok"]), **(res or {}).get("cut", {})}
        )
        while time.monotonic() < t + every:
            sup.step(min(0.02, max(0.0, t + every - time.monotonic())))
    elapsed = time.monotonic() - t0
    return {"flows_per_s": (flows_started(sup) - first) / elapsed, "audits": audits}


def stats(values: list[float]) -> dict:
    xs = sorted(values)
    return {
        "median_ms": round(1e3 * statistics.median(xs), 2),
        "p90_ms": round(1e3 * xs[int(0.9 * (len(xs) - 1))], 2),
        "max_ms": round(1e3 * xs[-1], 2),
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--vms", type=int, default=2)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--every", type=float, default=0.1, help="seconds between audit starts (0: back to back)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    sup = Supervisor(default_run(args.vms, workload="churn", iterations=1_000_000))
    alone, audited = [], []
    try:
        sup.start()
        while not sup.actor.booted:
            sup.step(0.01)
        for _ in range(args.rounds):
            alone.append(phase(sup, args.seconds, None))
            audited.append(phase(sup, args.seconds, args.every))
    finally:
        sup.close()
    audits = [a for ph in audited for a in ph["audits"]]
    base = statistics.median(ph["flows_per_s"] for ph in alone)
    with_audits = statistics.median(ph["flows_per_s"] for ph in audited)
    out = {
        "vms": args.vms,
        "every_s": args.every,
        "audits": len(audits),
        "clean": sum(a["ok"] for a in audits),
        "latency": stats([a["latency_s"] for a in audits]),
        **{
            part: stats([a[part] for a in audits]) for part in ("held_s", "drain_s", "settle_s", "snapshot_s")
        },
        "churn_flows_per_s_alone": round(base, 1),
        "churn_flows_per_s_audited": round(with_audits, 1),
        "throughput_ratio": round(with_audits / base, 3),
        "loadavg": os.getloadavg(),
    }
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        for key, value in out.items():
            print(f"{key:28} {value}")
    return 0 if out["clean"] == out["audits"] else 1


if __name__ == "__main__":
    sys.exit(main())
