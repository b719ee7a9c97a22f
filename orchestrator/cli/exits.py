"""How a `vsva` command ends: the exit codes, the one-line error, and the signals that
interrupt a run as Ctrl-C does."""

from __future__ import annotations

from types import FrameType
from typing import NoReturn

import typer

EXIT_CODES = {
    0: "success (every step and the audit passed)",
    1: "the run or command failed (a FAIL verdict, audit violations, an actor that could not be killed)",
    2: "bad input: an option, a topology or scenario file, an unwritable --trace-out or --state-dir",
    3: "no topology to talk to: none running, its supervisor dead or not answering, a corrupt state file",
    4: "the host was lost: every VM of the topology is gone",
    130: "interrupted (SIGINT, SIGTERM or SIGHUP); the run was cleaned up",
}
EXIT_FAIL, EXIT_USAGE, EXIT_NO_TOPOLOGY, EXIT_HOST_LOST, EXIT_INTERRUPTED = 1, 2, 3, 4, 130


def fail(code: int, message: str, quiet: bool = False) -> NoReturn:
    """One line on stderr (unless `quiet`) and the exit code."""
    if not quiet:
        typer.echo(f"vsva: {message}", err=True)
    raise typer.Exit(code)


def interrupt_on_signals() -> None:
    """SIGTERM and SIGHUP (a closed terminal) stop a run as Ctrl-C does: the KeyboardInterrupt
    unwinds through the launcher, which takes the processes and files of the run down."""
    import signal

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
