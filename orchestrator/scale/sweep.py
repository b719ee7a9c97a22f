"""Sweep files: what a scale experiment runs, read from TOML and checked before anything runs.

    [experiment]
    name = "vms"                 # results go to <out>/<name>/<UTC time>/
    runner = "vms"               # which point runner measures it (`vsva scale list`)
    description = "one line"
    repeat = 1                   # runs of every point
    seed = 1                     # each run's seed derives from it, the point and the repeat
    timeout = 600.0              # s per point; a point still running then is a `timeout`
    points = "vms"               # the parameter that `--points 1,2,4` sets
    metrics = ["binds_per_s"]    # optional: the runner's metrics to keep (default: all)

    [params]                     # fixed values; every other parameter has its runner default
    binds = 50

    [vary]                       # swept: the grid is the product of these lists, in file order
    vms = [1, 2, 4, 8]

    [[plots]]                    # one PNG per metric family
    name = "throughput"          # -> throughput.png
    kind = "lines"               # lines: medians with min-max bands, one line per combination
                                 # of the other varied parameters | timeline: time series
    x = "vms"                    # lines: the parameter on the x axis
    y = ["binds_per_s"]          # lines: metrics; timeline: series names
    where = { ways = 8 }         # optional: only the runs with these parameter values
    ylabel = "per second"
    logx = true
    logy = false

Every unknown key, wrong type, unknown parameter or metric, or value out of its runner's
range is a `SweepError` whose one-line message names the place (`vary.vms[3]: 0 out of
range [1, 256]`).
"""

from __future__ import annotations

import itertools
import os
import zlib
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from vsva.ops.userfiles import UserFileError, parse_toml, read_toml_text
from vsva.scale.experiments import RUNNERS, Param, runner

EXPERIMENT_KEYS = {
    "name": str,
    "runner": str,
    "description": str,
    "repeat": int,
    "seed": int,
    "timeout": (int, float),
    "points": str,
    "metrics": list,
}
PLOT_KEYS = {
    "name": str,
    "kind": str,
    "x": str,
    "y": list,
    "where": dict,
    "ylabel": str,
    "logx": bool,
    "logy": bool,
    "title": str,
}
PLOT_KINDS = ("lines", "timeline")
TOP_KEYS = {"experiment", "params", "vary", "plots"}
MAX_POINTS = 10_000
MAX_REPEAT = 1000


class SweepError(ValueError):
    """A sweep that cannot run; the message says where and why, on one line."""


@dataclass
class Plot:
    name: str
    kind: str = "lines"
    x: str = ""
    y: list[str] = field(default_factory=list)
    where: dict[str, Any] = field(default_factory=dict)
    ylabel: str = ""
    logx: bool = False
    logy: bool = False
    title: str = ""


@dataclass
class Sweep:
    name: str
    runner: str
    description: str = ""
    repeat: int = 1
    seed: int = 1
    timeout: float = 600.0
    points: str = ""
    metrics: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    vary: dict[str, list[Any]] = field(default_factory=dict)
    plots: list[Plot] = field(default_factory=list)
    source: str = "<text>"
    text: str = ""

    def grid(self) -> list[dict[str, Any]]:
        """Every point's full parameter set (runner defaults, [params], then the varied values)."""
        base = {name: p.default for name, p in runner(self.runner).PARAMS.items()}
        base.update(self.params)
        names = list(self.vary)
        return [
            {**base, **dict(zip(names, values))}
            for values in itertools.product(*(self.vary[n] for n in names))
        ]

    def point_id(self, params: dict[str, Any]) -> str:
        """A stable name of a point: its varied parameters, `vms=4` or `policy=naive,pasids=16`."""
        return ",".join(f"{n}={params[n]}" for n in self.vary) or "default"


def run_seed(base: int, point_id: str, repeat: int) -> int:
    """The seed of one run: fixed by the sweep's seed, the point's name and the repeat number,
    so a resumed or narrowed sweep (`--points`) gives every run the seed it had."""
    return zlib.crc32(f"{base}:{point_id}:{repeat}".encode()) & 0x7FFFFFFF


def _type_name(t: Any) -> str:
    if isinstance(t, tuple):
        return "number"
    return {int: "integer", str: "string", bool: "boolean", list: "array", float: "number"}[t]


def _is(value: Any, want: Any) -> bool:
    """isinstance, except that a boolean is not a number here (TOML keeps them apart)."""
    if want is object:
        return True
    wants = want if isinstance(want, tuple) else (want,)
    if isinstance(value, bool):
        return bool in wants
    return isinstance(value, wants)


def _table(where: str, table: Any, keys: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise SweepError(f"{where}: expected a table, got {type(table).__name__}")
    for key, value in table.items():
        if key not in keys:
            raise SweepError(f"{where}: unknown key {key!r}; valid: {', '.join(sorted(keys))}")
        if not _is(value, keys[key]):
            raise SweepError(f"{where}.{key}: expected {_type_name(keys[key])}, got {value!r}")
    return table


def check_value(where: str, param: Param, value: Any) -> Any:
    """A parameter value of the right type and range (ints are accepted where floats are)."""
    want = param.type
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not _is(value, want):
        raise SweepError(f"{where}: expected {_type_name(want)}, got {value!r}")
    if param.choices and value not in param.choices:
        raise SweepError(f"{where}: {value!r} not one of {', '.join(map(str, param.choices))}")
    if param.range and not param.range[0] <= value <= param.range[1]:
        raise SweepError(f"{where}: {value} out of range [{param.range[0]}, {param.range[1]}]")
    return value


def parse_value(param: Param, text: str, where: str = "--points") -> Any:
    """A value given on the command line (`--points 1,2,4`), as the parameter's type."""
    text = text.strip()
    try:
        if param.type is str:
            return text
        if param.type is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        return param.type(text)
    except ValueError:
        raise SweepError(
            f"{where}: {text!r} is not a{'n' if param.type is int else ''} {_type_name(param.type)}"
        ) from None


def parse(data: dict[str, Any], source: str = "<text>", text: str = "") -> Sweep:
    for key in data:
        if key not in TOP_KEYS:
            raise SweepError(f"unknown section {key!r}; valid: {', '.join(sorted(TOP_KEYS))}")
    exp = _table("experiment", data.get("experiment", {}), EXPERIMENT_KEYS)
    if "runner" not in exp:
        raise SweepError(f"experiment.runner: missing; valid: {', '.join(RUNNERS)}")
    if exp["runner"] not in RUNNERS:
        raise SweepError(f"experiment.runner: unknown runner {exp['runner']!r}; valid: {', '.join(RUNNERS)}")
    mod = runner(exp["runner"])
    name = exp.get("name", exp["runner"])
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise SweepError(f"experiment.name: {name!r} must be letters, digits, '-', '_' or '.'")
    sweep = Sweep(
        name=name,
        runner=exp["runner"],
        description=exp.get("description", ""),
        repeat=exp.get("repeat", 1),
        seed=exp.get("seed", 1),
        timeout=float(exp.get("timeout", 600.0)),
        source=source,
        text=text,
    )
    if not 1 <= sweep.repeat <= MAX_REPEAT:
        raise SweepError(f"experiment.repeat: {sweep.repeat} out of range [1, {MAX_REPEAT}]")
    if not 0.1 <= sweep.timeout <= 86400:
        raise SweepError(f"experiment.timeout: {sweep.timeout} out of range [0.1, 86400]")
    params = _table("params", data.get("params", {}), {k: object for k in mod.PARAMS})
    for key, value in params.items():
        sweep.params[key] = check_value(f"params.{key}", mod.PARAMS[key], value)
    vary = _table("vary", data.get("vary", {}), {k: list for k in mod.PARAMS})
    for key, values in vary.items():
        if key in sweep.params:
            raise SweepError(f"vary.{key}: also fixed in [params]; give it in one place")
        if not values:
            raise SweepError(f"vary.{key}: an empty list")
        sweep.vary[key] = _distinct(
            f"vary.{key}", [check_value(f"vary.{key}[{i}]", mod.PARAMS[key], v) for i, v in enumerate(values)]
        )
    sweep.points = exp.get("points", next(iter(sweep.vary), ""))
    if sweep.points and sweep.points not in sweep.vary:
        raise SweepError(f"experiment.points: {sweep.points!r} is not a parameter in [vary]")
    metrics = exp.get("metrics", list(mod.METRICS))
    for i, m in enumerate(metrics):
        if m not in mod.METRICS:
            raise SweepError(
                f"experiment.metrics[{i}]: runner {sweep.runner!r} has no metric {m!r}; "
                f"valid: {', '.join(mod.METRICS)}"
            )
    sweep.metrics = list(metrics)
    plots = data.get("plots", [])
    if not isinstance(plots, list):
        raise SweepError("plots: expected an array of tables ([[plots]])")
    for i, raw in enumerate(plots):
        sweep.plots.append(_plot(f"plots[{i}]", raw, sweep, mod))
    if len({p.name for p in sweep.plots}) != len(sweep.plots):
        raise SweepError("plots: two plots have the same name")
    _check_size(sweep)
    return sweep


def _distinct(where: str, values: list[Any]) -> list[Any]:
    """`values`, refused if one appears twice: that point would run twice and count as two
    (in [vary] and in `--points` alike)."""
    seen: set[str] = set()
    for value in values:
        if repr(value) in seen:
            raise SweepError(f"{where}: a value appears twice: {value!r}")
        seen.add(repr(value))
    return values


def _plot(where: str, raw: Any, sweep: Sweep, mod: Any) -> Plot:
    _table(where, raw, PLOT_KEYS)
    plot = Plot(**raw)
    if not plot.name or not all(c.isalnum() or c in "-_" for c in plot.name):
        raise SweepError(f"{where}.name: {plot.name!r} must be letters, digits, '-' or '_'")
    if plot.kind not in PLOT_KINDS:
        raise SweepError(f"{where}.kind: unknown kind {plot.kind!r}; valid: {', '.join(PLOT_KINDS)}")
    if not plot.y or not all(isinstance(y, str) for y in plot.y):
        raise SweepError(f"{where}.y: a non-empty array of names")
    if plot.kind == "lines":
        if plot.x not in sweep.vary:
            raise SweepError(f"{where}.x: {plot.x!r} is not a parameter in [vary]")
        for y in plot.y:
            if y not in sweep.metrics:
                raise SweepError(f"{where}.y: {y!r} is not a collected metric")
    elif any(y not in mod.SERIES for y in plot.y):
        bad = next(y for y in plot.y if y not in mod.SERIES)
        raise SweepError(
            f"{where}.y: runner {sweep.runner!r} records no series {bad!r}; "
            f"valid: {', '.join(mod.SERIES) or 'none'}"
        )
    for key, value in plot.where.items():
        if key not in sweep.vary:
            raise SweepError(f"{where}.where.{key}: not a parameter in [vary]")
        if value not in sweep.vary[key]:
            raise SweepError(f"{where}.where.{key}: {value!r} is not one of its values in [vary]")
    return plot


def _check_size(sweep: Sweep) -> None:
    n = 1
    for values in sweep.vary.values():
        n *= len(values)
    if n * sweep.repeat > MAX_POINTS:
        raise SweepError(f"vary: {n} points x {sweep.repeat} repeats exceed {MAX_POINTS} runs")


def loads(text: str, source: str = "<text>") -> Sweep:
    try:
        data = parse_toml(text)
    except UserFileError as exc:
        raise SweepError(f"{source}: {exc}") from None
    try:
        return parse(data, source, text)
    except SweepError as exc:
        raise SweepError(f"{source}: {exc}") from None


def load(path: str) -> Sweep:
    """Read and check a sweep file (a regular file of at most TOML_LIMIT)."""
    try:
        text = read_toml_text(path)
    except UserFileError as exc:
        raise SweepError(str(exc)) from None
    return loads(text, path)


def builtin_names() -> list[str]:
    """The experiments shipped with the package (orchestrator/scale/builtin/*.toml)."""
    files = resources.files("vsva.scale").joinpath("builtin")
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".toml"))


def builtin(name: str) -> Sweep:
    if name not in builtin_names():
        raise SweepError(f"no built-in experiment {name!r}; built-in: {', '.join(builtin_names())}")
    res = resources.files("vsva.scale").joinpath("builtin", f"{name}.toml")
    return loads(res.read_text(encoding="utf-8"), f"{name}.toml")


def resolve(name_or_path: str) -> Sweep:
    """A built-in experiment by name, or a sweep file by path (anything ending in .toml)."""
    if name_or_path.endswith(".toml") or os.sep in name_or_path:
        return load(name_or_path)
    return builtin(name_or_path)


def narrow(sweep: Sweep, points: str | None) -> Sweep:
    """Replace the values of the sweep's `points` parameter by a comma-separated list."""
    if points is None:
        return sweep
    if not sweep.points:
        raise SweepError(f"--points: experiment {sweep.name!r} varies no parameter")
    param = runner(sweep.runner).PARAMS[sweep.points]
    values = [parse_value(param, t) for t in points.split(",") if t.strip()]
    if not values:
        raise SweepError("--points: no values given")
    where = f"--points ({sweep.points})"
    sweep.vary[sweep.points] = _distinct(where, [check_value(where, param, v) for v in values])
    _check_size(sweep)
    return sweep


def fix(sweep: Sweep, settings: list[str] | None) -> Sweep:
    """Apply `--set KEY=VALUE` options: the parameter is fixed at VALUE for every point (a
    varied parameter stops varying)."""
    mod = runner(sweep.runner)
    for item in settings or []:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq:
            raise SweepError(f"--set {item!r}: expected KEY=VALUE")
        if key not in mod.PARAMS:
            raise SweepError(
                f"--set {key}: runner {sweep.runner!r} has no parameter {key!r}; "
                f"valid: {', '.join(mod.PARAMS)}"
            )
        value = parse_value(mod.PARAMS[key], text, f"--set {key}")
        sweep.params[key] = check_value(f"--set {key}", mod.PARAMS[key], value)
        sweep.vary.pop(key, None)
        if sweep.points == key:
            sweep.points = ""
    return sweep
