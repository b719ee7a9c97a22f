"""How a `vsva` command ends: the exit codes, the one-line error, and the signals that
interrupt a run as Ctrl-C does."""

from __future__ import annotations

import os
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


class StopSignals:
    """SIGINT, SIGTERM and SIGHUP (a closed terminal) stop a run, Ctrl-C and the others alike.

    The first one is the request to stop: `signum` records it and, with `interrupt`, a
    KeyboardInterrupt unwinds the run (an in-process launcher takes its processes and files
    down as it unwinds). Later ones are already handled: they are ignored, so a second signal
    cannot cut the cleanup short. Without `interrupt` nothing is raised at all; the caller
    checks `requested` where it waits, and `fd` (the signal wakeup descriptor) turns readable
    on a signal so that a select() on it returns at once. That is the safer form: an exception
    raised wherever a signal lands may land inside code the interpreter runs from a string
    (the methods a dataclass generates while a module is imported), and then `python -m`
    ends by SIGINT after the cleanup instead of with its exit code."""

    def __init__(self, interrupt: bool) -> None:
        import signal

        self.interrupt = interrupt
        self.signum: int | None = None
        self.fd = -1
        if not interrupt:
            self.fd, wake = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            signal.set_wakeup_fd(wake, warn_on_full_buffer=False)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            return
        self.signum = signum
        if self.interrupt:
            raise KeyboardInterrupt


def interrupt_on_signals() -> StopSignals:
    """The first of SIGINT, SIGTERM and SIGHUP raises KeyboardInterrupt; later ones are
    ignored while the run unwinds."""
    return StopSignals(interrupt=True)
