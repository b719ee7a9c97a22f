"""`vsva scale`: list, run, show and plot scale experiments (registered on the main CLI)."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, NoReturn

import typer

from vsva.cli.options import SEEDS, number_option

if TYPE_CHECKING:
    from vsva.scale.results import ResultsDir
    from vsva.scale.sweep import Sweep

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Scale experiments: sweeps of VMs, PASIDs, policies, noise and IOTLB geometry, "
    "with results, plots and progress.",
)


def _fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"vsva scale: {message}", err=True)
    raise typer.Exit(code)


def _opened(directory: str) -> tuple[ResultsDir, Sweep]:
    """A results directory and its sweep (or a ResultsError/SweepError); rows recording the
    same run twice are counted once, and one line says so."""
    from vsva.scale import runner
    from vsva.scale.results import ResultsDir

    rd = ResultsDir.open(directory)
    sweep = runner.sweep_of(rd)
    if n := rd.duplicates():
        typer.echo(
            f"vsva scale: {rd.path}/points.jsonl: {n} row(s) record a run that a later row records "
            "again; each run counts once (its last row)",
            err=True,
        )
    return rd, sweep


@app.command("list")
def list_() -> None:
    """The built-in experiments, one line each (their TOML files ship with the package)."""
    from vsva.scale.experiments import runner
    from vsva.scale.sweep import builtin, builtin_names

    for name in builtin_names():
        sweep = builtin(name)
        grid = " x ".join(f"{k}[{len(v)}]" for k, v in sweep.vary.items())
        typer.echo(
            f"{name:<16} {sweep.description or runner(sweep.runner).DOC}  ({grid}, repeat {sweep.repeat})"
        )


@app.command()
def run(
    experiment: str | None = typer.Argument(
        None, help="A built-in experiment (`vsva scale list`) or a sweep file SWEEP.toml."
    ),
    points: str | None = typer.Option(
        None, "--points", help="Values of the experiment's main parameter, e.g. 1,2,4."
    ),
    settings: list[str] | None = typer.Option(
        None, "--set", help="KEY=VALUE: fix a parameter for every point (repeatable)."
    ),
    repeat: int | None = number_option(None, "--repeat", int, 1, 1000, "Runs of every point."),
    seed: int | None = number_option(
        None, "--seed", int, *SEEDS, "Base seed (each run's seed derives from it)."
    ),
    out: str = typer.Option("results", "--out", help="Results go to OUT/<experiment>/<UTC time>/."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (paths, summary) at the end."),
    resume: str | None = typer.Option(None, "--resume", help="Finish an interrupted run in DIR."),
    cluster: str | None = typer.Option(
        None,
        "--cluster",
        help="Run the points on this Ray cluster (ADDRESS as for ray.init; needs the [cluster] extra).",
    ),
) -> None:
    """Run an experiment: every point and repeat from a clean state to its audit."""
    from vsva.cli.exits import StopSignals
    from vsva.scale import runner
    from vsva.scale.cluster import ClusterError, connect
    from vsva.scale.results import ResultsError
    from vsva.scale.sweep import SweepError, fix, narrow, resolve

    for option, value, what in (("--resume", resume, "path"), ("--cluster", cluster, "address")):
        if value == "":  # else taken for no option at all: a whole new run, or one on this machine
            _fail(f"{option} '': an empty {what}")
    argv = [
        "run",
        experiment or "",
        *(["--points", points] if points else []),
        *[a for item in settings or [] for a in ("--set", item)],
        *(["--repeat", str(repeat)] if repeat else []),
        *(["--seed", str(seed)] if seed is not None else []),
        *(["--cluster", cluster] if cluster else []),
    ]
    try:
        if resume:
            rd, sweep = _opened(resume)
            if experiment and experiment not in (sweep.name, sweep.source):
                _fail(
                    f"--resume {resume}: that directory holds experiment {sweep.name!r}, not {experiment!r}"
                )
            if points is not None or repeat is not None or seed is not None or settings:
                _fail(
                    "--resume takes the options the run started with; give no --points/--set/--repeat/--seed"
                )
            rd.repair()
        else:
            if not experiment:
                _fail(
                    "which experiment? give a name from `vsva scale list` or a SWEEP.toml (or --resume DIR)"
                )
            sweep = fix(narrow(resolve(experiment), points), settings)
            if repeat is not None:
                sweep.repeat = repeat
            if seed is not None:
                sweep.seed = seed
            if cluster:
                connect(cluster)  # before anything is written: a bad address leaves no results directory
            rd = runner.start(
                sweep,
                out,
                argv,
                {
                    "points": points,
                    "set": settings or [],
                    "repeat": sweep.repeat,
                    "seed": sweep.seed,
                    "cluster": cluster,
                },
            )
        summary = runner.execute(sweep, rd, cluster=cluster, stop=StopSignals())
    except (SweepError, ResultsError) as exc:
        _fail(str(exc))
    except runner.Interrupted as exc:
        typer.echo(f"vsva scale: {exc}", err=True)
        exc.stop.ignore()
        raise typer.Exit(128 + (exc.stop.signum or 0)) from None
    except ClusterError as exc:
        _fail(str(exc), 1)
    if summary.get("plots_note"):
        typer.echo(f"vsva scale: {summary['plots_note']}", err=True)
    if as_json:
        typer.echo(json.dumps({k: v for k, v in summary.items()}, indent=1))
    else:
        typer.echo(summary["summary"])
        typer.echo(
            f"results: {summary['dir']}"
            + (
                f"; plots: {', '.join(os.path.basename(p) for p in summary['plots'])}"
                if summary["plots"]
                else ""
            )
        )
    bad = sum(n for s, n in summary["statuses"].items() if s != "ok")
    raise typer.Exit(1 if bad else 0)


def _open(directory: str) -> tuple[ResultsDir, Sweep]:
    from vsva.scale.results import ResultsError
    from vsva.scale.sweep import SweepError

    try:
        return _opened(directory)
    except (ResultsError, SweepError) as exc:
        _fail(str(exc))


@app.command()
def show(
    directory: str = typer.Argument(..., help="A results directory (or its `latest` link)."),
    as_json: bool = typer.Option(False, "--json", help="The rows of points.jsonl as one JSON list."),
) -> None:
    """Print a results directory's summary table (rebuilt from points.jsonl)."""
    from vsva.scale.runner import columns

    rd, sweep = _open(directory)
    if as_json:
        typer.echo(json.dumps(rd.rows(), indent=1))
        return
    with open(rd.write_summary(*columns(sweep))) as f:
        typer.echo(f.read())


@app.command()
def plot(directory: str = typer.Argument(..., help="A results directory (or its `latest` link).")) -> None:
    """Redraw a results directory's PNG plots from its data."""
    from vsva.scale import plots

    rd, sweep = _open(directory)
    drawn = plots.draw_all(rd, sweep)
    if drawn.get("note"):
        _fail(drawn["note"], 1)
    for path in drawn["plots"]:
        typer.echo(path)
