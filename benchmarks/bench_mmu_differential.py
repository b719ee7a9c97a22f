"""Long run of the first-level walk against unicorn's x86-64 MMU (hotpath/mmu_differential.py).

    python benchmarks/bench_mmu_differential.py [--worlds 200] [--accesses 250] [--seed 1]
                                                [--impl compiled,python]

Prints, per implementation, the cases run, the documented differences (by name) and every
unexplained difference; exits 1 if there is one.
"""

from __future__ import annotations

import argparse
import sys
import time

from vsva import hotpath
from vsva.hotpath import mmu_differential as mmu


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", type=int, default=200)
    ap.add_argument("--accesses", type=int, default=250, help="per world and mode")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--impl", default="compiled,python")
    args = ap.parse_args(argv)
    classes = {"compiled": hotpath.CompiledIommu, "python": hotpath.PureIommu}
    reference = mmu.Reference()
    bad = 0
    for name in args.impl.split(","):
        cls = classes[name]
        if cls is None:
            print(f"{name}: not built")
            continue
        t0 = time.perf_counter()
        report = mmu.run(cls, seed=args.seed, worlds=args.worlds, accesses=args.accesses, reference=reference)
        ok = sum(n for k, n in report.by_outcome.items() if k.endswith(" ok"))
        print(
            f"{name}: {report.cases} cases on {report.worlds} worlds "
            f"({ok} translations, {report.cases - ok} faults) in "
            f"{time.perf_counter() - t0:.1f} s; documented differences {report.documented}; "
            f"unexplained differences {len(report.differences)}"
        )
        for d in report.differences[:50]:
            print("  ", d)
        bad += len(report.differences)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
