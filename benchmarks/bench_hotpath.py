"""Hot-path benchmark: compiled IOTLB hits, cold nested walks, a 90 % hit mix, the pure
twin, and bare compiled baselines, on 65,536 mapped pages (see orchestrator/bench.py).

    python benchmarks/bench_hotpath.py [--batches 1,64,1024,65536] [--json] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# numpy's OpenBLAS threads spin on the second core after start-up; the bench needs none.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from vsva.cli.bench import ALL_BATCHES, run_bench  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default=",".join(map(str, ALL_BATCHES)))
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ap.add_argument("--out", help="also write the JSON result to this file")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b]
    res = run_bench(batches, args.json, repeats=args.repeats)
    if args.json:
        print(json.dumps(res, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
