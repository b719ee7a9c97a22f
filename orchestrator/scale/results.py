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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from vsva.ops.userfiles import UserFileError, read_limited
from vsva.scale.sweep import MAX_REPEAT

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
# What a row must hold (and may hold) for the summary, the CSV, the plots and a resume to read it.
ROW_TYPES: dict[str, type] = {
    "point": int,
    "point_id": str,
    "repeat": int,
    "status": str,
    "params": dict,
    "metrics": dict,
}
ROW_OPTIONAL: dict[str, type] = {"reason": str, "audit": dict, "env": dict}
SERIES_TYPES: dict[str, type] = {"point_id": str, "repeat": int, "series": dict}
OPTION_TYPES: dict[str, type] = {"points": str, "set": list, "repeat": int, "seed": int, "cluster": str}
JSON_TYPES = {int: "an integer", str: "a string", dict: "an object", list: "an array"}
# Far above what a run writes (10,000 runs of a few KiB): a bound on what is read into memory.
MAX_FILE_BYTES = 256 << 20
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


def read_file(path: str, missing_ok: bool = False) -> bytes:
    """A results file's bytes (b"" for a missing one if `missing_ok`). The directory is its
    user's to edit: a FIFO would block, a device (a link to /dev/zero) never ends, a file past
    MAX_FILE_BYTES would fill the memory; each is refused (vsva.ops.userfiles), as a
    ResultsError naming it."""
    try:
        return read_limited(path, MAX_FILE_BYTES)
    except FileNotFoundError:
        if missing_ok:
            return b""
        raise ResultsError(f"{path}: missing") from None
    except UserFileError as exc:
        raise ResultsError(f"{path}: {exc}") from None
    except OSError as exc:
        raise ResultsError(f"{path}: unreadable: {exc.strerror}") from None


def shape_error(obj: Any, required: dict[str, type], optional: dict[str, type]) -> str | None:
    """What keeps `obj` from being a JSON object with the `required` keys, and the `optional`
    ones if present, of these types (a boolean is no integer here); None if nothing does."""
    if not isinstance(obj, dict):
        return f"expected an object, got {json.dumps(obj)[:40]}"
    for key, want in {**required, **optional}.items():
        if key not in obj:
            if key in required:
                return f"no {key!r}"
        elif not isinstance(obj[key], want) or isinstance(obj[key], bool):
            return f"{key}: expected {JSON_TYPES[want]}, got {json.dumps(obj[key])[:40]}"
    return None


def row_error(row: Any) -> str | None:
    """What keeps `row` from being a points.jsonl row; None if nothing does."""
    what = shape_error(row, ROW_TYPES, ROW_OPTIONAL)
    if what is None and row["status"] not in STATUSES:
        what = f"status: {row['status']!r} is not one of {', '.join(STATUSES)}"
    return what


def series_error(row: Any) -> str | None:
    """What keeps `row` from being a series.jsonl row; None if nothing does."""
    return shape_error(row, SERIES_TYPES, {})


def run_key(row: dict[str, Any]) -> tuple[str, int]:
    """The run a row records: its point and repeat."""
    return row["point_id"], row["repeat"]


def check_out(out: str, base: str) -> None:
    """Refuse an --out that cannot take a run's results, before it runs: an empty path (it
    would write into the current directory), a file where a directory goes, and a `latest`
    that is not a link (a directory of someone's; replacing it would fail after the run)."""
    if not out:
        raise ResultsError("--out: an empty path; give a directory (the default is results)")
    for path in (out, base):
        if os.path.exists(path) and not os.path.isdir(path):
            raise ResultsError(f"--out {out}: {path} is not a directory")
    latest = os.path.join(base, "latest")
    if os.path.lexists(latest) and not os.path.islink(latest):
        raise ResultsError(
            f"--out {out}: {latest} is not a symbolic link; a run points it at its results, so move it away"
        )


def point_latest(base: str, path: str) -> None:
    """Point base/latest at `path` atomically (a link beside it renamed over it); the link is
    removed if the rename fails."""
    link = os.path.join(base, "latest")
    tmp = f"{link}.{os.getpid()}.tmp"
    os.symlink(os.path.basename(path), tmp)
    try:
        os.replace(tmp, link)
    except OSError:
        os.unlink(tmp)
        raise


def rerun_command(argv: list[str]) -> str:
    """The shell line that runs the same experiment again (`argv`: what follows `vsva scale`)."""
    return shlex.join(["vsva", "scale", *argv])


@dataclass
class ResultsDir:
    path: str

    # ---- create / open ------------------------------------------------------------------------
    @classmethod
    def create(cls, out: str, experiment: str, meta: dict[str, Any], sweep_text: str) -> ResultsDir:
        """A new results directory under OUT/<experiment>/, and `latest` pointing at it; an OUT
        that cannot hold one is a ResultsError before anything is run."""
        base = os.path.join(out, experiment)
        check_out(out, base)
        try:
            path = cls._mkdir(base)
        except OSError as exc:
            raise ResultsError(
                f"--out {out}: cannot make a results directory there: {exc.strerror}"
            ) from None
        rd = cls(path)
        rd.write_meta({**meta, "state": "running", "started": utc_iso()})
        with open(os.path.join(path, "sweep.toml"), "w", encoding="utf-8") as f:
            f.write(sweep_text)
        with open(os.path.join(path, "command.txt"), "w") as f:
            f.write(meta.get("command", "") + "\n")
        for name in ("points.jsonl", "series.jsonl"):
            open(os.path.join(path, name), "a").close()
        point_latest(base, path)
        return rd

    @staticmethod
    def _mkdir(base: str) -> str:
        """base/<UTC time>, made (with a -N suffix when two runs start in the same second)."""
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
        return path

    @classmethod
    def open(cls, path: str) -> ResultsDir:
        """A results directory whose run.json and rows all read (or a ResultsError naming the
        file, and the line, that does not): checked before anything is shown or run again."""
        rd = cls(path)
        if not os.path.lexists(os.path.join(path, "run.json")):
            raise ResultsError(f"{path}: not a results directory (no run.json)")
        rd.meta()
        rd.series()
        rd.rows()
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
        path = os.path.join(self.path, "run.json")
        try:
            meta = json.loads(read_file(path).decode("utf-8"))
        except ValueError as exc:
            raise ResultsError(f"{path}: unreadable: {exc}") from None
        what = shape_error(meta, {"experiment": str}, {"options": dict, "env": dict})
        if what:
            raise ResultsError(f"{path}: not a run description: {what}")
        return meta  # type: ignore[no-any-return]

    def options(self) -> dict[str, Any]:
        """The options the run started with (run.json's `options`, those not None), checked:
        a resume applies them again."""
        opts = self.meta().get("options", {})
        given = {k: v for k, v in opts.items() if v is not None}
        what = shape_error(given, {}, OPTION_TYPES)
        if what is None and not all(isinstance(item, str) for item in given.get("set", [])):
            what = "set: expected an array of KEY=VALUE strings"
        if what is None and not 1 <= given.get("repeat", 1) <= MAX_REPEAT:
            what = f"repeat: {given['repeat']} out of range [1, {MAX_REPEAT}]"
        if what:
            raise ResultsError(f"{self.path}/run.json: options.{what}")
        return given

    def write_meta(self, meta: dict[str, Any]) -> None:
        tmp = os.path.join(self.path, f"run.json.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(tmp, os.path.join(self.path, "run.json"))

    def update_meta(self, **changes: Any) -> None:
        self.write_meta({**self.meta(), **changes})

    def sweep_text(self) -> str:
        """The sweep file the run read (a resume and `show` need it to know the grid)."""
        path = os.path.join(self.path, "sweep.toml")
        try:
            return read_file(path).decode("utf-8")
        except UnicodeDecodeError:
            raise ResultsError(f"{path}: not UTF-8 text") from None

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

    def _read_jsonl(self, name: str, error: Callable[[Any], str | None]) -> list[dict[str, Any]]:
        """The rows of a JSON-lines file. A line that is not a row (not JSON, not UTF-8, or
        `error` finds it of another shape) refuses the directory, naming the line: the rows
        are the results, and one skipped would be run again on resume or missing from the
        summary. Only an unterminated last line is dropped: a row cut short by a kill."""
        path = os.path.join(self.path, name)
        lines = read_file(path, missing_ok=True).split(b"\n")
        rows = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8"))
            except ValueError:
                if n == len(lines):
                    continue
                raise ResultsError(f"{path}:{n}: not a JSON row") from None
            what = error(row)
            if what:
                raise ResultsError(f"{path}:{n}: not a row of this file: {what}")
            rows.append(row)
        return rows

    def _points(self) -> list[dict[str, Any]]:
        return self._read_jsonl("points.jsonl", row_error)

    def rows(self) -> list[dict[str, Any]]:
        """One row per run: of rows recording the same point and repeat (a line copied by
        hand), the last one counts (`duplicates` says how many were set aside)."""
        return list({run_key(r): r for r in self._points()}.values())

    def duplicates(self) -> int:
        """Rows of points.jsonl that record a run that another row records too."""
        rows = self._points()
        return len(rows) - len({run_key(r) for r in rows})

    def series(self) -> list[dict[str, Any]]:
        return self._read_jsonl("series.jsonl", series_error)

    def done(self) -> set[tuple[str, int]]:
        """(point_id, repeat) of every run already recorded (any status: it was measured)."""
        return {run_key(r) for r in self.rows()}

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
