"""The long run of the actor fuzzer (tests/orchestrator/fuzzing.py): hostile inputs against
a live topology (VM 1 booted, its workload run: PASIDs bound) over real sockets, ipc and tcp
with CURVE, every actor and the supervisor's control socket at once. Prints, per transport
and in total: inputs, answers (by who refused them and the errno), crashes, state changes
on refusals, unanswered or accepted inputs, fd leaks (every finding is one of those; all
must be 0), inputs/s and the load average.

    python benchmarks/fuzz_actors.py [--inputs 100000] [--seed 11] [--every 5000] [--json]

--inputs is the total, split evenly between the transports.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "orchestrator"))

from fuzzing import fuzz, keyed_strangers  # noqa: E402
from supervised import supervised  # noqa: E402

from vsva.ops.topology_file import default_run  # noqa: E402


def one_transport(transport: str, inputs: int, seed: int, every: int) -> dict:
    run = default_run(1, workload="bind_many", iterations=3, transport=transport)
    with keyed_strangers(), supervised(run) as sup:
        while not sup.workloads_done():
            sup.step(0.02)
        if sup.vms[1].workload is None or sup.vms[1].workload.get("ret") != 0:
            raise SystemExit(f"{transport}: the workload failed: {sup.vms[1].workload}")
        load0 = os.getloadavg()[0]
        stats = fuzz(sup, n=inputs, seed=seed, every=every)
    stats["transport"] = transport
    stats["inputs_per_s"] = round(stats["inputs"] / stats["elapsed_s"])
    stats["loadavg"] = (round(load0, 2), round(os.getloadavg()[0], 2))
    return stats


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--inputs", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--every", type=int, default=5000, help="inputs between state checkpoints")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    t = time.monotonic()
    runs = [one_transport(tr, args.inputs // 2, args.seed, args.every) for tr in ("ipc", "tcp")]
    total = {
        "inputs": sum(r["inputs"] for r in runs),
        "answered": sum(r["answered"] for r in runs),
        "findings": sum(len(r["findings"]) for r in runs),
        "fuzzing_s": round(sum(r["elapsed_s"] for r in runs), 1),
        "wall_s": round(time.monotonic() - t, 1),
    }
    total["inputs_per_s"] = round(total["inputs"] / total["fuzzing_s"])
    if args.json:
        print(json.dumps({"runs": runs, "total": total}, indent=1))
    else:
        for r in runs:
            print(
                f"{r['transport']}: inputs {r['inputs']}  answered {r['answered']}  checkpoints "
                f"{r['checkpoints']}  findings {len(r['findings'])}  {r['inputs_per_s']} inputs/s  "
                f"load {r['loadavg'][0]} -> {r['loadavg'][1]}"
            )
            print("  refusals:", ", ".join(f"{k} {v}" for k, v in r["refusals"].items()))
            for finding in r["findings"]:
                print("  FINDING:", finding)
        print(
            f"total: inputs {total['inputs']}  answered {total['answered']}  findings {total['findings']}  "
            f"(crashes, state changes on refusals, unanswered/accepted inputs, fd leaks)  "
            f"{total['inputs_per_s']} inputs/s over {total['fuzzing_s']} s of fuzzing, seed {args.seed}"
        )
    return 0 if total["findings"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
