"""What the process experiments read off a live or finished run: the guests' recorded steps,
per-process CPU time and PSS from /proc, messages in the trace, percentiles."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], p: float) -> float | None:
    """The nearest-rank p-quantile (0 < p <= 1), or None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(p * len(ordered))) - 1))]


def last_phase(marks: dict[str, float]) -> str:
    """The phase of a run that ended last (Orchestrator.marks), 'launch' before any."""
    return max(marks, key=lambda phase: marks[phase], default="launch")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (/proc/PID/stat utime, stime)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def pss_mb(pid: int) -> float | None:
    """Proportional set size in MiB (/proc/PID/smaps_rollup): shared pages split among sharers."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def mean(values: Iterable[float | None]) -> float | None:
    nums = [v for v in values if v is not None]
    return sum(nums) / len(nums) if nums else None


def bench_steps(workloads: dict[str, dict[str, Any]], what: str) -> dict[str, list[dict[str, Any]]]:
    """Each guest's recorded bench steps named `what` (e.g. "phase", "bind latencies")."""
    return {
        g: [s for s in w.get("steps", []) if s.get("flow") == "bench" and s.get("what") == what]
        for g, w in workloads.items()
    }


def epoch_offset(steps: list[dict[str, Any]]) -> float | None:
    """epoch - guest clock for one guest (from its first phase record), or None."""
    first = next((s for s in steps if s.get("what") == "phase" and "wall0" in s), None)
    return None if first is None else first["wall0"] - first["t0"]


def phase_window(workloads: dict[str, dict[str, Any]], phase: str) -> tuple[float, float] | None:
    """(first start, last end) of `phase` over every guest, in epoch seconds."""
    spans = []
    for work in workloads.values():
        steps = work.get("steps", [])
        off = epoch_offset(steps)
        spans += [
            (s["t0"] + off, s["t1"] + off)
            for s in steps
            if s.get("what") == "phase" and s.get("phase") == phase and off is not None
        ]
    if not spans:
        return None
    return min(a for a, _ in spans), max(b for _, b in spans)


def workload_failures(result: dict[str, Any]) -> list[str]:
    """One line per VM that did not boot or whose workload failed."""
    out = []
    for vmm, reply in result.get("vm_start", {}).items():
        if reply.get("ret"):
            out.append(f"{vmm}: vm_start ret {reply.get('ret')} {reply.get('error', '')}".rstrip())
    for guest, work in result.get("workloads", {}).items():
        if work.get("ret"):
            bad = next((s for s in work.get("steps", []) if not s.get("ok")), None)
            out.append(
                f"{guest}: workload ret {work.get('ret')}"
                + (f" (first failed step: {bad['flow']} {bad['what']} ret {bad.get('ret')})" if bad else "")
            )
    return out


def messages_between(trace: list[dict[str, Any]], actor: str, window: tuple[float, float], t0: float) -> int:
    """Messages sent or received by `actor` with send time in `window` (epoch seconds; the
    trace's times count from the run's start epoch t0)."""
    lo, hi = window[0] - t0, window[1] - t0
    return sum(1 for r in trace if lo <= r["t"] <= hi and (r["src"] == actor or r["dst"] == actor))
