"""The detached supervisor process of `vsva up`: `python -m vsva.ops.supervisor`."""

from __future__ import annotations

import os
import signal
import stat
import sys
from types import FrameType

from vsva.ops.supervisor.loop import Supervisor

EXIT_USAGE, EXIT_HOST_LOST = 2, 4  # vsva.cli.exits.EXIT_CODES


class LaunchSignals:
    """The SIGTERM/SIGINT handler for the supervisor's whole life, so that no moment is left
    in which a signal escapes both the launch's unwinding and the loop's stop.

    While the topology starts (`unwind`), a signal raises KeyboardInterrupt once, which
    unwinds the launch (the caller closes what started). The caller clears `unwind` in a
    `finally` after `Supervisor.start`, so a signal that lands between start's return and
    that line still unwinds. From then on a signal only sets `stop_requested`, which
    `Supervisor.serve` reads before its first step: one that arrives while the ready line
    is written, or while the loop's own handlers are not yet installed, stops the topology
    cleanly instead of raising through code that does not expect it (and leaving it run).
    A second signal while the launch unwinds does not cut its cleanup short either.
    `exit_code` is the CLI's for the first signal: 128 + its number (vsva.cli.exits)."""

    def __init__(self) -> None:
        self.sup: Supervisor | None = None
        self.unwind = True
        self.exit_code = 128 + signal.SIGINT

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.sup is not None:
            self.sup.stop_requested = True
        if self.unwind:
            self.unwind = False
            self.exit_code = 128 + signum
            raise KeyboardInterrupt


class BadReadyFd(ValueError):
    """A --ready-fd that does not name the write end of an open pipe."""


def ready_pipe(value: str) -> int:
    """The descriptor `--ready-fd` names, checked before anything starts: the write end of a
    pipe (`vsva up` waits on the other end). Anything else (a log, /dev/null, a read end, a
    closed or made-up number) would take the ready line elsewhere, or fail only once the
    topology runs."""
    import fcntl

    try:
        fd = int(value)
    except ValueError:
        raise BadReadyFd(f"--ready-fd {value!r}: not a descriptor number") from None
    try:
        mode, flags = os.fstat(fd).st_mode, fcntl.fcntl(fd, fcntl.F_GETFL)
    except (OSError, OverflowError):  # EBADF; a number beyond any descriptor's
        raise BadReadyFd(f"--ready-fd {value}: not an open descriptor") from None
    if not stat.S_ISFIFO(mode) or flags & os.O_ACCMODE == os.O_RDONLY:
        raise BadReadyFd(f"--ready-fd {value}: not the write end of a pipe")
    os.set_inheritable(fd, False)  # held until this process exits (say), never by what it starts
    return fd


def say(fd: int | None, line: str) -> None:
    """One line on the readiness pipe (`--ready-fd`), if there is one: "ready" once the state
    file is complete; at the exit, why the trace could not be written, which a foreground `vsva
    up` (it holds the other end for this process's whole life) says as `vsva down` does. The
    pipe's EOF without "ready" (this process's exit) tells `vsva up` the start failed. A reader
    that is gone (a detached `vsva up`, or one that was killed) is no reason to stop."""
    if fd is None:
        return
    try:
        os.write(fd, line.encode() + b"\n")
    except BrokenPipeError:
        pass


def detach_main(argv: list[str] | None = None) -> int:
    """Run one topology until `vsva down`.

    It holds the state directory's lock (the descriptor `vsva up` passed down) until it exits.
    A SIGTERM while it is still starting unwinds the launch and removes its files (exit 143,
    130 for SIGINT); one after the start stops the topology as `vsva down` does (exit 0). When the
    host is lost it stops, leaves a state file that records when and why (`vsva ps` shows it
    until `vsva down`) and exits with EXIT_HOST_LOST. With `--ready-fd N` (what `vsva up`
    passes) it writes a line on that pipe once its state file is complete (say), and one as
    it exits if its trace could not be written. It returns with SIGTERM and SIGINT ignored,
    so that its exit code is the one its caller sees."""
    signals = LaunchSignals()
    signal.signal(signal.SIGTERM, signals)
    signal.signal(signal.SIGINT, signals)
    try:
        return _detached(signals, argv)
    except KeyboardInterrupt:  # before the supervisor existed: nothing to unwind
        return signals.exit_code
    finally:
        # Done: the interpreter's exit gives a handled signal its default action back, so one
        # arriving then would end the process by that signal instead of with this exit code.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)


def _detached(signals: LaunchSignals, argv: list[str] | None) -> int:
    import argparse

    from vsva.ops.topology_file import TopologyError, default_run, load

    p = argparse.ArgumentParser(prog="vsva.ops.supervisor")
    p.add_argument("topology", nargs="?")
    p.add_argument("--state-file", required=True)
    p.add_argument("--trace-out")
    p.add_argument("--ready-fd", help="the write end of a pipe: a line there once the state file is complete")
    args = p.parse_args(argv)
    try:
        ready = None if args.ready_fd is None else ready_pipe(args.ready_fd)
    except BadReadyFd as exc:
        print(f"vsva up: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    try:
        run = load(args.topology) if args.topology else default_run()
    except TopologyError as exc:
        print(f"vsva up: {exc}", file=sys.stderr, flush=True)
        return 2
    sup = Supervisor(
        run,
        log=lambda line: print(line, file=sys.stderr, flush=True),
        launcher_kw={"trace_out": args.trace_out},
    )
    signals.sup = sup
    try:
        try:
            sup.start(state_file=args.state_file)
        finally:
            signals.unwind = False  # from here a signal asks the loop to stop (LaunchSignals)
    except KeyboardInterrupt:
        sup.close()
        return signals.exit_code
    except Exception as exc:
        print(f"vsva up: launch failed: {exc}", file=sys.stderr, flush=True)
        sup.close()
        return 1
    say(ready, "ready")
    print(
        f"vsva: supervisor {os.getpid()} running {len(run.topology.actors)} actors in {sup.launcher.run_dir}",
        file=sys.stderr,
        flush=True,
    )
    try:
        sup.serve()
    finally:
        sup.close()
    lost, trace_error = sup.host_lost_info, sup.launcher.trace_error
    if lost is not None or trace_error:
        sup.write_state(host_lost=lost, trace_error=trace_error)
    if trace_error:
        print(f"vsva up: {trace_error}", file=sys.stderr, flush=True)
        say(ready, trace_error)
    if lost is not None:
        print(f"vsva up: the host was lost: {lost['why']}", file=sys.stderr, flush=True)
        return EXIT_HOST_LOST
    return EXIT_USAGE if trace_error else 0


if __name__ == "__main__":
    sys.exit(detach_main())
