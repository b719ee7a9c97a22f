"""How a `vsva` command ends: the exit codes, the one-line error, and the signals that
stop a run as Ctrl-C does."""

from __future__ import annotations

import os
import signal
from types import FrameType
from typing import NoReturn

import typer

EXIT_CODES = {
    0: "success (every step and the audit passed)",
    1: "the run or command failed (a FAIL verdict, audit violations, an actor that could not be killed)",
    2: "bad input: an option, a topology or scenario file, an unwritable --trace-out, an unusable --state-dir",
    3: "no topology to talk to: none running, its supervisor dead or not answering, a corrupt state file",
    4: "the host was lost: every VM of the topology is gone",
    130: "interrupted by SIGINT (Ctrl-C); 143 by SIGTERM, 129 by SIGHUP (128 + the signal's number); "
    "the run was taken down",
}
EXIT_FAIL, EXIT_USAGE, EXIT_NO_TOPOLOGY, EXIT_HOST_LOST, EXIT_INTERRUPTED = 1, 2, 3, 4, 130
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def shown(text: str, limit: int = 40) -> str:
    """A value the user typed, as an error line quotes it: repr (a newline or an escape cannot
    break the line) and no longer than `limit` characters, with the length of a longer one."""
    return repr(text[:limit]) + (f"... ({len(text)} characters)" if len(text) > limit else "")


def fail(code: int, message: str, quiet: bool = False) -> NoReturn:
    """One line on stderr (unless `quiet`) and the exit code."""
    if not quiet:
        typer.echo(f"vsva: {message}", err=True)
    raise typer.Exit(code)


class StopSignals:
    """SIGINT, SIGTERM and SIGHUP (a closed terminal) stop a run, Ctrl-C and the others alike.

    The first one is the request to stop: the handler only records it (`signum`); nothing is
    raised. The code that waits checks `requested` (or `check`) and stops the run itself;
    `fd` (the signal wakeup descriptor) turns readable on a signal, so that a poll on it
    returns at once. Later signals are already handled: they are ignored, so a second one
    cannot cut the stop short. An exception raised wherever a signal lands could land inside
    code the interpreter runs from a string (the methods a dataclass generates while a module
    is imported), and then `python -m` ends by SIGINT after the cleanup instead of with its
    exit code."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._announced = False
        self.fd, wake = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake, warn_on_full_buffer=False)
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "no signal"

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum

    def check(self) -> bool:
        """Whether a stop is requested, emptying `fd` (a level-triggered poll on it would
        return at once again). Called where a run acts on the request, so the first time it
        is true it says on stderr that the run is stopping (not from the handler: a write
        there could interrupt another write to the same stream)."""
        try:
            while os.read(self.fd, 512):
                pass
        except BlockingIOError:
            pass
        if self.requested and not self._announced:
            self._announced = True
            typer.echo(f"vsva: {self.name}: stopping ...", err=True)
        return self.requested

    def exit(self) -> NoReturn:
        """End the command as the signal asked: one line naming it, and the shell's code for
        it, 128 + its number (130 for SIGINT)."""
        assert self.signum is not None, "no stop was requested"
        typer.echo(f"vsva: interrupted by {self.name}; the run was taken down", err=True)
        self.ignore()
        raise typer.Exit(128 + self.signum)

    def ignore(self) -> None:
        """The stop is done: from now on the signals are ignored outright. The interpreter
        gives a handled signal its default action back as it exits, so one arriving then
        would still end the process by that signal instead of with its exit code."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
