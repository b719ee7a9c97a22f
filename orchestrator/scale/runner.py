"""Running a sweep: every point and repeat from a clean state to its audit, into a results directory.

Points run one after another (locally) or as many at once as a Ray cluster has nodes
(`--cluster`); each finished run is appended to points.jsonl at once, so an interrupted or
killed sweep keeps what finished and `--resume DIR` runs only the rest. SIGINT (Ctrl-C),
SIGTERM and SIGHUP are a stop request (StopSignals, given by the command): the running point
stops, its stacks clean up (processes, sockets, shared memory), further signals are ignored,
and the derived files are written for the finished runs.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Set
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vsva.scale import plots as plotting
from vsva.scale.environment import environment, sample
from vsva.scale.experiments import PointStopped, StackResult, runner
from vsva.scale.progress import Progress
from vsva.scale.results import ResultsDir, ResultsError, utc_iso
from vsva.scale.stacks import residue, result_of, run_local
from vsva.scale.sweep import Sweep, SweepError, fix, loads, narrow, run_seed

if TYPE_CHECKING:
    from vsva.cli.exits import StopSignals
    from vsva.ops.launcher import StopRequest


@dataclass
class Run:
    """One run to do: a point (its index, id and parameters) and a repeat number."""

    index: int
    point_id: str
    params: dict[str, Any]
    repeat: int
    seed: int


class Interrupted(Exception):
    """The sweep stopped on a stop request (`stop`, which names the signal); `path` is the
    results directory to resume."""

    def __init__(self, path: str, done: int, total: int, stop: StopSignals):
        super().__init__(
            f"interrupted by {stop.name}: {done} of {total} runs recorded; "
            f"resume with `vsva scale run --resume {path}`"
        )
        self.path = path
        self.stop = stop


def plan(sweep: Sweep, done: Set[tuple[str, int]] = frozenset()) -> list[Run]:
    runs = []
    for index, params in enumerate(sweep.grid()):
        pid = sweep.point_id(params)
        for repeat in range(sweep.repeat):
            if (pid, repeat) not in done:
                runs.append(Run(index, pid, params, repeat, run_seed(sweep.seed, pid, repeat)))
    return runs


def stack_specs(sweep: Sweep, run: Run, base_dir: str | None) -> list[dict[str, Any]]:
    hosts = int(run.params.get("hosts", 1))
    return [
        {
            "runner": sweep.runner,
            "params": run.params,
            "seed": run.seed + h,
            "host": h,
            "timeout": sweep.timeout,
            "base_dir": os.path.join(base_dir, str(h)) if base_dir else None,
        }
        for h in range(hosts)
    ]


def short_tmp() -> str:
    """Where a run's directories go: ipc socket paths must stay under 107 bytes, so a long
    $TMPDIR gives way to /tmp."""
    tmp = tempfile.gettempdir()
    return tmp if len(tmp) <= 40 else "/tmp"


def aggregate(sweep: Sweep, results: list[StackResult]) -> dict[str, Any]:
    """A point's metrics over its hosts, each metric by its runner's rule (sum, max, min, mean)."""
    mod = runner(sweep.runner)
    out: dict[str, Any] = {}
    for m in sweep.metrics:
        vals = [r.metrics.get(m) for r in results]
        nums = [v for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if not nums:
            out[m] = None
            continue
        agg = mod.METRICS[m].agg
        out[m] = (
            nums[0]
            if len(nums) == 1
            else (
                sum(nums)
                if agg == "sum"
                else max(nums)
                if agg == "max"
                else min(nums)
                if agg == "min"
                else sum(nums) / len(nums)
            )
        )
    return out


def left_behind(left: list[str]) -> str:
    """The residue of a run in one line: what was found, and that it was removed."""
    return f"left behind (removed): {', '.join(left[:5])}" + (" ..." if len(left) > 5 else "")


def verdict(outcomes: list[dict[str, Any]], left: list[str]) -> tuple[str, str, dict[str, Any]]:
    """(status, reason, audit) of a run from its stacks' outcomes and its residue."""
    results = [result_of(o) for o in outcomes]
    violations = [v for r in results if r for v in r.violations]
    invariants = sorted({v.get("invariant", "?") for v in violations})
    audit = {
        "ran": bool(results) and all(r is not None and r.audit_ran for r in results),
        "violations": len(violations),
        "invariants": invariants,
        "first": violations[0].get("what", "") if violations else "",
    }
    audit["ok"] = audit["ran"] and not violations

    def on(h: int, what: str) -> str:
        return f"host {h}: {what}" if len(outcomes) > 1 else what

    timeouts = [on(h, o["timeout"]) for h, o in enumerate(outcomes) if "timeout" in o]
    errors = [on(h, o["error"]) for h, o in enumerate(outcomes) if "error" in o]
    failures = [on(h, f) for h, r in enumerate(results) if r for f in r.failures]
    if timeouts:
        return "timeout", "; ".join(timeouts), audit
    if left:
        return "leaked", left_behind(left), audit
    if errors or failures or violations or not audit["ran"]:
        parts = errors + failures[:3]
        if violations:
            parts.append(f"audit: {len(violations)} violation(s) ({', '.join(invariants)}): {audit['first']}")
        elif not audit["ran"] and not errors:
            parts.append("the audit did not run")
        return "failed", "; ".join(parts), audit
    return "ok", "", audit


def make_row(
    sweep: Sweep,
    run: Run,
    outcomes: list[dict[str, Any]],
    left: list[str],
    started: float,
    elapsed: float,
    env: dict[str, Any],
    nodes: list[str] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The points.jsonl row of a finished run, and its time series (host 0's, or each host's)."""
    status, reason, audit = verdict(outcomes, left)
    results = [result_of(o) for o in outcomes]
    good = [r for r in results if r is not None]
    per_host = [
        {
            "host": h,
            "status": "ok" if r is not None else "timeout" if "timeout" in o else "failed",
            "metrics": {m: r.metrics.get(m) for m in sweep.metrics} if r else {},
            **({"node": nodes[h]} if nodes else {}),
        }
        for h, (o, r) in enumerate(zip(outcomes, results))
    ]
    series: dict[str, Any] = {}
    for h, r in enumerate(good):
        for name, s in r.series.items():
            series[name if len(good) == 1 else f"{name}@host{h}"] = s
    row = {
        "experiment": sweep.name,
        "runner": sweep.runner,
        "point": run.index,
        "point_id": run.point_id,
        "repeat": run.repeat,
        "seed": run.seed,
        "params": run.params,
        "metrics": aggregate(sweep, good),
        "status": status,
        "reason": reason,
        "audit": audit,
        "hosts": len(outcomes),
        "per_host": per_host,
        "elapsed_s": round(elapsed, 3),
        "started": utc_iso(started),
        "env": env,
    }
    return row, series


def refused_row(sweep: Sweep, run: Run, why: str, env: dict[str, Any]) -> dict[str, Any]:
    return {
        "experiment": sweep.name,
        "runner": sweep.runner,
        "point": run.index,
        "point_id": run.point_id,
        "repeat": run.repeat,
        "seed": run.seed,
        "params": run.params,
        "metrics": {m: None for m in sweep.metrics},
        "status": "refused",
        "reason": why,
        "audit": {"ran": False, "ok": False, "violations": 0, "invariants": [], "first": ""},
        "hosts": int(run.params.get("hosts", 1)),
        "per_host": [],
        "elapsed_s": 0.0,
        "started": utc_iso(),
        "env": env,
    }


def run_one(
    sweep: Sweep,
    run: Run,
    env: dict[str, Any],
    on_phase: Callable[[str], None],
    stop: StopRequest | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One run on this machine, from a clean state; what it leaves behind is found and removed
    (and named: in its row, or in the PointStopped that a stop request ends it with)."""
    why = runner(sweep.runner).refuse(run.params)
    if why:
        return refused_row(sweep, run, why, env), {}
    base = tempfile.mkdtemp(prefix="vsva-s", dir=short_tmp())
    specs = stack_specs(sweep, run, base)
    for spec in specs:
        os.makedirs(spec["base_dir"])
    started, t0 = time.time(), time.monotonic()
    stopped: PointStopped | None = None
    try:
        outcomes = run_local(specs, on_phase, stop)
    except PointStopped as exc:
        stopped = exc
    finally:
        left = [x for spec in specs for x in residue(spec["base_dir"])]
        shutil.rmtree(base, ignore_errors=True)
    if stopped is not None:  # a stopped run is not recorded: what it left is said here
        raise PointStopped(f"{stopped}; {left_behind(left)}" if left else str(stopped))
    return make_row(sweep, run, outcomes, left, started, time.monotonic() - t0, {**env, **sample()})


def execute(
    sweep: Sweep,
    rd: ResultsDir,
    *,
    cluster: str | None = None,
    progress: Progress | None = None,
    stop: StopSignals | None = None,
) -> dict[str, Any]:
    """Run every run of `sweep` not yet in `rd`; write the derived files; return a summary.
    A `stop` request ends it after the running point has cleaned up (Interrupted, once the
    derived files of the finished runs are written)."""
    todo = plan(sweep, rd.done())
    total = len(plan(sweep))
    env = environment()
    progress = progress or Progress(total, total - len(todo))
    interrupted = False
    with progress:
        try:
            if cluster:
                from vsva.scale.cluster import run_on_cluster

                run_on_cluster(sweep, todo, cluster, rd, progress, stop)
            else:
                for run in todo:
                    if stop is not None and stop.check():  # it came between two runs
                        raise PointStopped("stopped between runs")
                    progress.start(run)
                    row, series = run_one(sweep, run, env, progress.phase, stop)
                    rd.append(row, series)
                    progress.finish(run, row)
        except PointStopped as exc:
            interrupted = True
            progress.note(str(exc))
    interrupted = interrupted or (stop is not None and stop.check())  # it came after the last one
    rd.update_meta(state="interrupted" if interrupted else "done", finished=utc_iso())
    summary = finish(rd, sweep)
    if interrupted:
        assert stop is not None  # only a stop request raises PointStopped
        raise Interrupted(rd.path, len(rd.rows()), total, stop)
    return summary


def columns(sweep: Sweep) -> tuple[list[str], list[str], dict[str, str]]:
    """The parameters shown beside the metrics (the varied ones, and `hosts`), the metrics,
    and each metric's unit."""
    mod = runner(sweep.runner)
    params = list(sweep.vary) + [p for p in ("hosts",) if p in mod.PARAMS and p not in sweep.vary]
    return params, list(sweep.metrics), {m: mod.METRICS[m].unit for m in sweep.metrics}


def finish(rd: ResultsDir, sweep: Sweep) -> dict[str, Any]:
    """Write points.csv, summary.md and the plots from points.jsonl; returns what was written."""
    params, metrics, units = columns(sweep)
    files = {
        "points": os.path.join(rd.path, "points.jsonl"),
        "csv": rd.write_csv(params, metrics),
        "summary": rd.write_summary(params, metrics, units),
    }
    drawn = plotting.draw_all(rd, sweep)
    rows = rd.rows()
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    return {
        "dir": rd.path,
        "experiment": sweep.name,
        "runs": len(rows),
        "statuses": statuses,
        "files": files,
        "plots": drawn["plots"],
        "plots_note": drawn.get("note", ""),
        "summary": open(files["summary"]).read(),
    }


def sweep_of(rd: ResultsDir) -> Sweep:
    """The sweep a results directory was run with (its sweep.toml and recorded options)."""
    opts = rd.options()
    sweep = loads(rd.sweep_text(), os.path.join(rd.path, "sweep.toml"))
    try:
        fix(narrow(sweep, opts.get("points")), opts.get("set"))
    except SweepError as exc:  # the recorded --points or --set no longer fit the sweep file
        raise ResultsError(f"{rd.path}/run.json: options: {exc}") from None
    sweep.repeat = opts.get("repeat", sweep.repeat)
    sweep.seed = opts.get("seed", sweep.seed)
    return sweep


def start(sweep: Sweep, out: str, argv: list[str], options: dict[str, Any]) -> ResultsDir:
    from vsva.scale.results import rerun_command

    meta = {
        "experiment": sweep.name,
        "runner": sweep.runner,
        "description": sweep.description,
        "source": sweep.source,
        "options": options,
        "argv": argv,
        "command": rerun_command(argv),
        "env": environment(),
        "total_runs": len(plan(sweep)),
        "python": sys.executable,
    }
    return ResultsDir.create(out, sweep.name, meta, sweep.text)
