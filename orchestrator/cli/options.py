"""Options more than one command takes, with the checks that run before anything starts."""

from __future__ import annotations

import os
from enum import StrEnum
from typing import TYPE_CHECKING

import typer

from vsva.actors.guest import WORKLOADS
from vsva.actors.semantics import Kernel
from vsva.ops.config import DEMO_ITERATIONS, RUN

if TYPE_CHECKING:
    from vsva.ops.topology_file import RunFile

Workload = StrEnum("Workload", {name: name for name in sorted(WORKLOADS)})  # type: ignore[misc]

ITERATIONS: int = typer.Option(
    DEMO_ITERATIONS, "--iterations", min=1, max=10_000_000, help="Rounds of looping workloads."
)
KERNEL: Kernel = typer.Option(
    RUN.kernel, "--kernel", help="Whose bind/unbind/invalidate answers: v11 (the seed) or v5.9 (merged)."
)


def writable_dir(value: str | None) -> str | None:
    """--trace-out: create the directory now and prove it takes a file, before any run."""
    import tempfile

    if value is None:
        return None
    try:
        os.makedirs(value, exist_ok=True)
        with tempfile.TemporaryFile(dir=value):
            pass
    except OSError as exc:
        raise typer.BadParameter(f"cannot write into {value!r}: {exc.strerror}") from None
    for name in ("trace.jsonl", "trace.perfetto.json"):  # what the export writes, whatever the run
        if os.path.isdir(os.path.join(value, name)):
            raise typer.BadParameter(f"cannot write {name} into {value!r}: a directory of that name is there")
    return value


def state_dir_option(value: str | None) -> str | None:
    """--state-dir (or $VSVA_STATE_DIR): a directory this user can write, created 0700."""
    if value is None:
        return None
    try:
        os.makedirs(value, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise typer.BadParameter(f"{value!r}: {exc.strerror}") from None
    if not os.access(value, os.W_OK | os.X_OK):
        raise typer.BadParameter(f"{value!r}: not writable")
    return value


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

    try:
        if topology:
            return load(topology, timed)
        run = default_run()
        check(run.topology)
        return run
    except (TopologyError, CapacityError) as exc:
        typer.echo(f"vsva: {exc}", err=True)
        raise typer.Exit(2) from None
