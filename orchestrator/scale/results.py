"""A results directory: `<out>/<experiment>/<UTC time>/`, with `<out>/<experiment>/latest` beside it.

    run.json      the experiment, its options (points, repeat, seed, cluster), start and end
                  time, state (running | interrupted | done), the environment, the argv
    sweep.toml    the sweep file exactly as it was read (a resumed run reads it back)
    command.txt   the command line that reruns the experiment
    points.jsonl  one row per point and repeat, appended as each finishes (ROW_KEYS)
    series.jsonl  the time series of each run that recorded any: {point_id, repeat, series}
    points.csv    the rows flattened (csv_columns): parameters and metrics as columns
    summary.md    one table row per point: median [min-max] over repeats, and the statuses
    <plot>.png    one per [[plots]] entry of the sweep (with matplotlib)

A row's status: ok (audit clean, every workload ok), failed (audit violations, a failed
workload or an error; `reason` says which), timeout (the point's time ran out), leaked (the
point left processes, sockets, shared memory or run directories behind, which the runner
then removed), refused (the point exceeds what this machine or runtime allows; not run).
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

ROW_KEYS = (
    "experiment",
    "runner",
    "point",
    "point_id",
    "repeat",
    "seed",
    "params",
    "metrics",
    "status",
    "reason",
    "audit",
    "hosts",
    "per_host",
    "elapsed_s",
    "started",
    "env",
)
AUDIT_KEYS = ("ran", "ok", "violations", "invariants", "first")
ENV_KEYS = (
    "cpu",
    "cores",
    "python",
    "pyzmq",
    "libzmq",
    "msgpack",
    "hotpath",
    "frames",
    "git",
    "node",
    "load1",
)
STATUSES = ("ok", "failed", "timeout", "leaked", "refused")
FIXED_COLUMNS = ("experiment", "point", "point_id", "repeat", "seed")
TAIL_COLUMNS = (
    "status",
    "reason",
    "audit_ran",
    "audit_ok",
    "audit_violations",
    "audit_invariants",
    "hosts",
    "elapsed_s",
    "started",
) + tuple(f"env_{k}" for k in ENV_KEYS)


class ResultsError(ValueError):
    """A directory that is not (or no longer) a readable results directory."""


def utc_stamp(t: float | None = None) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(t))


def utc_iso(t: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def rerun_command(argv: list[str]) -> str:
    """The shell line that runs the same experiment again (`argv`: what follows `vsva scale`)."""
    return shlex.join(["vsva", "scale", *argv])


@dataclass
class ResultsDir:
    path: str

    # ---- create / open ------------------------------------------------------------------------
    @classmethod
    def create(cls, out: str, experiment: str, meta: dict[str, Any], sweep_text: str) -> ResultsDir:
        base = os.path.join(out, experiment)
        os.makedirs(base, exist_ok=True)
        stamp = utc_stamp()
        path, n = os.path.join(base, stamp), 1
        while True:
            try:
                os.mkdir(path)
                break
            except FileExistsError:
                n += 1
                path = os.path.join(base, f"{stamp}-{n}")
        rd = cls(path)
        rd.write_meta({**meta, "state": "running", "started": utc_iso()})
        with open(os.path.join(path, "sweep.toml"), "w", encoding="utf-8") as f:
            f.write(sweep_text)
        with open(os.path.join(path, "command.txt"), "w") as f:
            f.write(meta.get("command", "") + "\n")
        for name in ("points.jsonl", "series.jsonl"):
            open(os.path.join(path, name), "a").close()
        link = os.path.join(base, "latest")
        tmp = f"{link}.{os.getpid()}.tmp"
        os.symlink(os.path.basename(path), tmp)
        os.replace(tmp, link)
        return rd

    @classmethod
    def open(cls, path: str) -> ResultsDir:
        rd = cls(path)
        if not os.path.isfile(os.path.join(path, "run.json")):
            raise ResultsError(f"{path}: not a results directory (no run.json)")
        rd.meta()  # parses, or raises
        return rd

    def repair(self) -> None:
        """Drop a last row cut short by a kill, so that rows appended next start on a line."""
        for name in ("points.jsonl", "series.jsonl"):
            path = os.path.join(self.path, name)
            try:
                with open(path, "rb+") as f:
                    data = f.read()
                    if data and not data.endswith(b"\n"):
                        f.truncate(data.rfind(b"\n") + 1)
            except FileNotFoundError:
                pass

    def meta(self) -> dict[str, Any]:
        try:
            with open(os.path.join(self.path, "run.json")) as f:
                meta = json.load(f)
        except (OSError, ValueError) as exc:
            raise ResultsError(f"{self.path}/run.json: unreadable: {exc}") from None
        if not isinstance(meta, dict) or "experiment" not in meta:
            raise ResultsError(f"{self.path}/run.json: not a run description")
        return meta

    def write_meta(self, meta: dict[str, Any]) -> None:
        tmp = os.path.join(self.path, f"run.json.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(tmp, os.path.join(self.path, "run.json"))

    def update_meta(self, **changes: Any) -> None:
        self.write_meta({**self.meta(), **changes})

    def sweep_text(self) -> str:
        with open(os.path.join(self.path, "sweep.toml"), encoding="utf-8") as f:
            return f.read()

    # ---- rows ---------------------------------------------------------------------------------
    def append(self, row: dict[str, Any], series: dict[str, Any] | None = None) -> None:
        """Add one finished run (flushed and fsynced: a kill right after loses nothing)."""
        self._append("points.jsonl", row)
        if series:
            self._append(
                "series.jsonl", {"point_id": row["point_id"], "repeat": row["repeat"], "series": series}
            )

    def _append(self, name: str, obj: dict[str, Any]) -> None:
        with open(os.path.join(self.path, name), "a") as f:
            f.write(json.dumps(obj, default=repr) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _read_jsonl(self, name: str) -> list[dict[str, Any]]:
        rows = []
        try:
            with open(os.path.join(self.path, name)) as f:
                lines = f.readlines()
        except FileNotFoundError:
            return []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError:
                if n == len(lines):  # a row cut short by a kill: the run is not finished
                    continue
                raise ResultsError(f"{self.path}/{name}:{n}: not a JSON row") from None
        return rows

    def rows(self) -> list[dict[str, Any]]:
        return self._read_jsonl("points.jsonl")

    def series(self) -> list[dict[str, Any]]:
        return self._read_jsonl("series.jsonl")

    def done(self) -> set[tuple[str, int]]:
        """(point_id, repeat) of every run already recorded (any status: it was measured)."""
        return {(r["point_id"], r["repeat"]) for r in self.rows()}

    # ---- derived files ------------------------------------------------------------------------
    def write_csv(self, params: list[str], metrics: list[str]) -> str:
        path = os.path.join(self.path, "points.csv")
        cols = csv_columns(params, metrics)
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            for row in self.rows():
                w.writerow(flatten(row, params, metrics))
        return path

    def write_summary(self, params: list[str], metrics: list[str], units: dict[str, str]) -> str:
        path = os.path.join(self.path, "summary.md")
        with open(path, "w") as f:
            f.write(summary_markdown(self.meta(), self.rows(), params, metrics, units))
        return path


def csv_columns(params: list[str], metrics: list[str]) -> list[str]:
    return [*FIXED_COLUMNS, *params, *metrics, *TAIL_COLUMNS]


def flatten(row: dict[str, Any], params: list[str], metrics: list[str]) -> dict[str, Any]:
    audit, env = row.get("audit", {}), row.get("env", {})
    out = {k: row.get(k) for k in FIXED_COLUMNS}
    out.update({p: row["params"].get(p) for p in params})
    out.update({m: row["metrics"].get(m) for m in metrics})
    out.update(
        status=row["status"],
        reason=row.get("reason", ""),
        audit_ran=audit.get("ran"),
        audit_ok=audit.get("ok"),
        audit_violations=audit.get("violations"),
        audit_invariants=" ".join(audit.get("invariants", [])),
        hosts=row.get("hosts"),
        elapsed_s=row.get("elapsed_s"),
        started=row.get("started"),
    )
    out.update({f"env_{k}": env.get(k) for k in ENV_KEYS})
    return out


def fmt(value: Any) -> str:
    """Three significant digits, no exponent for everyday magnitudes."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def spread(values: Iterable[Any]) -> tuple[float, float, float] | None:
    """(median, min, max) of the numbers among `values`, or None when there are none."""
    nums = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not nums:
        return None
    return statistics.median(nums), min(nums), max(nums)


def group(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows by point, in the order the points were first seen."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(rows, key=lambda r: (r["point"], r["repeat"])):
        out.setdefault(r["point_id"], []).append(r)
    return out


def status_text(rows: list[dict[str, Any]]) -> str:
    counts = {s: sum(1 for r in rows if r["status"] == s) for s in STATUSES}
    return ", ".join(f"{s} {n}" for s, n in counts.items() if n)


def summary_markdown(
    meta: dict[str, Any],
    rows: list[dict[str, Any]],
    params: list[str],
    metrics: list[str],
    units: dict[str, str],
) -> str:
    env = meta.get("env", {})
    lines = [
        f"# {meta['experiment']}: {meta.get('description', '')}".rstrip(": "),
        "",
        f"- command: `{meta.get('command', '')}`",
        f"- started {meta.get('started', '?')}, finished {meta.get('finished', '-')}, "
        f"state {meta.get('state', '?')}; {len(rows)} runs ({status_text(rows) or 'none'})",
        f"- {env.get('cpu', '?')}, {env.get('cores', '?')} cores; Python {env.get('python', '?')}, "
        f"pyzmq {env.get('pyzmq', '?')} (libzmq {env.get('libzmq', '?')}), msgpack "
        f"{env.get('msgpack', '?')}; hot path {env.get('hotpath', '?')}, frames {env.get('frames', '?')}; commit {env.get('git', '?')}",
        "- cells: median [min-max] over the repeats",
        "",
    ]
    head = [*params, "runs", *[f"{m} ({units[m]})" if units.get(m) else m for m in metrics]]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    failures = []
    for pid, runs in group(rows).items():
        cells = [fmt(runs[0]["params"].get(p)) for p in params] + [status_text(runs)]
        for m in metrics:
            s = spread(r["metrics"].get(m) for r in runs)
            cells.append(
                "-" if s is None else fmt(s[0]) if s[1] == s[2] else f"{fmt(s[0])} [{fmt(s[1])}-{fmt(s[2])}]"
            )
        lines.append("| " + " | ".join(cells) + " |")
        failures += [
            f"- {pid} repeat {r['repeat']}: {r['status']}: {r.get('reason', '')}"
            for r in runs
            if r["status"] != "ok"
        ]
    if failures:
        lines += ["", "Runs that were not ok:", *failures]
    return "\n".join(lines) + "\n"


def print_err(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
