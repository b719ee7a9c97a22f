"""Options more than one command takes, with the checks that run before anything starts."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from enum import StrEnum
from typing import TYPE_CHECKING, Any, TypeVar

import typer

from vsva.actors.guest import WORKLOADS
from vsva.actors.semantics import Kernel
from vsva.cli.exits import EXIT_USAGE, fail, shown
from vsva.ops.config import DEMO_ITERATIONS, RUN

if TYPE_CHECKING:
    from vsva.ops.topology_file import RunFile

Workload = StrEnum("Workload", {name: name for name in sorted(WORKLOADS)})  # type: ignore[misc]

Number = TypeVar("Number", int, float)
SEEDS = (-(1 << 63), (1 << 63) - 1)  # a seed a topology, scenario or sweep file can hold (TOML)
SECONDS = "a number of seconds"


def in_range(kind: type[Number], lo: Number, hi: Number, what: str = "") -> Callable[[str], Number]:
    """The parser of a numeric option (typer's `parser=`), the one check of every number the
    command line takes: what is not a number of `kind`, not finite (float() takes nan and inf,
    which typer's own min/max then called "less than or equal to" the maximum) or outside
    [lo, hi] is one line, the option's name (click adds it) and the range."""
    noun = what or ("an integer" if kind is int else "a number")

    def parse(text: str) -> Number:
        try:
            value = kind(text)
        except (ValueError, OverflowError):  # int() of more than 4300 digits is a ValueError
            value = None
        if value is None or not (math.isfinite(value) and lo <= value <= hi):
            raise typer.BadParameter(f"{shown(text)} is not {noun} from {_range(lo, hi)}")
        return value

    return parse


def number_option(
    default: Number | None, name: str, kind: type[Number], lo: Number, hi: Number, help: str, what: str = ""
) -> Any:
    """A numeric option checked by in_range, its range at the end of its help."""
    return typer.Option(
        default,
        name,
        parser=in_range(kind, lo, hi, what),
        metavar="INTEGER" if kind is int else "NUMBER",
        help=f"{help} [{_range(lo, hi)}]",
    )


def _range(lo: float, hi: float) -> str:
    """`lo to hi` as typed: 0.01, 3600, every digit of a seed's bound (never 9.22e+18)."""
    return " to ".join(str(x) if isinstance(x, int) else f"{x:g}" for x in (lo, hi))


ITERATIONS: int = number_option(
    DEMO_ITERATIONS, "--iterations", int, 1, 10_000_000, "Rounds of looping workloads."
)
KERNEL: Kernel = typer.Option(
    RUN.kernel, "--kernel", help="Whose bind/unbind/invalidate answers: v11 (the seed) or v5.9 (merged)."
)


def writable_dir(value: str | None) -> str | None:
    """--trace-out: create the directory now and prove it takes a file, before any run."""
    import tempfile

    from vsva.ops.userfiles import in_the_way

    if value is None:
        return None
    if not value:
        raise typer.BadParameter("'': an empty path")
    try:
        os.makedirs(value, exist_ok=True)
        with tempfile.TemporaryFile(dir=value):
            pass
    except FileExistsError:
        raise typer.BadParameter(f"cannot write into {value!r}: {in_the_way(value)}") from None
    except OSError as exc:
        raise typer.BadParameter(f"cannot write into {value!r}: {exc.strerror}") from None
    for name in ("trace.jsonl", "trace.perfetto.json"):  # what the export writes, whatever the run
        if os.path.isdir(os.path.join(value, name)):
            raise typer.BadParameter(f"cannot write {name} into {value!r}: a directory of that name is there")
    return value


def state_dir_option(value: str | None) -> str | None:
    """--state-dir (or $VSVA_STATE_DIR): a directory of this user's only (usable_state_dir),
    created 0700."""
    from vsva.cli.state import BadStateDir, usable_state_dir

    try:
        return None if value is None else usable_state_dir(value)
    except BadStateDir as exc:
        raise typer.BadParameter(str(exc)) from None


STATE_DIR = typer.Option(
    None,
    "--state-dir",
    envvar="VSVA_STATE_DIR",
    callback=state_dir_option,
    help="Where the state file lives (default $XDG_RUNTIME_DIR/vsva or /tmp/vsva-UID).",
)


def load_run(topology: str | None, timed: bool = False) -> RunFile:
    """The topology or scenario file (default: the two-VM demo topology), or exit 2 with its
    error: the default topology is held to this machine's capacity here, as a file's is when
    it loads, so that `vsva up` refuses it in this terminal rather than in the supervisor's log.
    `timed`: the run ends at the file's scenario.timeout (`vsva run`; topology_file.parse)."""
    from vsva.ops.capacity import CapacityError, check
    from vsva.ops.topology_file import TopologyError, default_run, load

    if topology == "":  # else taken for no file at all: the default topology would run
        fail(EXIT_USAGE, "'': an empty path (name a topology or scenario file)")
    try:
        if topology:
            return load(topology, timed)
        run = default_run()
        check(run.topology)
        return run
    except (TopologyError, CapacityError) as exc:
        typer.echo(f"vsva: {exc}", err=True)
        raise typer.Exit(2) from None
