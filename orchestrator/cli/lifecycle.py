"""Starting and stopping a live topology: `vsva up` (the detached supervisor process, the
state directory's lock, the bounded wait for it to be ready) and `vsva down`."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import typer

from vsva.cli.client import ctl, wait_exit
from vsva.cli.exits import (
    EXIT_FAIL,
    EXIT_HOST_LOST,
    EXIT_NO_TOPOLOGY,
    EXIT_USAGE,
    StopSignals,
    fail,
)
from vsva.cli.live import ps_table
from vsva.cli.options import SECONDS, STATE_DIR, load_run, number_option, writable_dir
from vsva.cli.replies import PS, checked
from vsva.cli.state import (
    SWEPT,
    CorruptState,
    cleanup_stale,
    host_lost_line,
    parse_state,
    remove_corrupt,
    state_file,
    supervisor_alive,
    unnamed_supervisor,
)


def up(
    topology: str | None = typer.Argument(
        None, help="Topology TOML file (default: the two-VM demo topology)."
    ),
    detach: bool = typer.Option(False, "--detach", "-d", help="Start in the background and return."),
    state_dir: str | None = STATE_DIR,
    ready_timeout: float = number_option(
        30.0, "--ready-timeout", float, 0.01, 3600, "Seconds to wait for the topology to start.", SECONDS
    ),
    trace_out: str | None = typer.Option(
        None,
        "--trace-out",
        callback=writable_dir,
        help="When the topology stops (down, a lost host, even a killed "
        "supervisor: the next vsva command), write its trace files here.",
    ),
) -> None:
    """Start a topology and keep it running: a live status table, or --detach.

    One topology per state directory (a lock). In the foreground, Ctrl-C, SIGTERM and SIGHUP
    (the terminal closed) stop it; detached, it runs until `vsva down`."""
    stop = StopSignals()
    load_run(topology)  # validate here: errors go to this terminal
    path = state_file(state_dir)
    lock = _take_lock(path)
    _clear_old_state(path)
    log_path = os.path.join(os.path.dirname(path), "supervisor.log")
    if stop.check():
        stop.exit()  # nothing was started
    proc, ready = _spawn_supervisor(_supervisor_cmd(path, topology, trace_out), log_path, lock)
    try:
        state = _await_state(proc, path, ready_timeout, log_path, stop, ready)
        if state is not None:  # the line a script (or a test) waits on, in the foreground too
            typer.echo(
                f"vsva: {len(state['actors'])} actors running, supervisor pid {proc.pid}, run dir "
                f"{state['run_dir']}; " + ("`vsva ps`, `vsva down`" if detach else "Ctrl-C stops it")
            )
            if detach:
                return
            _watch(proc, state, stop)
        _ended(proc, path, log_path, stop, ready)
    finally:
        os.close(ready)


def _ended(
    proc: subprocess.Popen[bytes], path: str, log_path: str, stop: StopSignals, ready: int
) -> NoReturn:
    """End a foreground `vsva up` once its supervisor exited (or was stopped here, on a
    signal), saying what `vsva down` would: a trace it could not write is one line and exit 2
    (its last line on the readiness pipe `ready`: the state file that records it too may be
    gone already, removed by a `vsva down` elsewhere); a lost host, exit 4; any other failure
    names the log."""
    if stop.check():
        _stop_supervisor(proc, path)
    trace_error = _last_word(ready)
    if stop.requested:
        if trace_error:
            typer.echo(f"vsva: {trace_error}", err=True)
        stop.exit()
    if proc.returncode == EXIT_HOST_LOST:
        fail(EXIT_HOST_LOST, host_lost_line(parse_state(path)))
    if trace_error:
        _remove_state(proc, path)
        fail(EXIT_USAGE, trace_error)
    if proc.returncode != 0:
        fail(EXIT_FAIL, f"the supervisor exited with {proc.returncode} (log: {log_path})")
    raise typer.Exit(0)


def _last_word(ready: int) -> str | None:
    """What an exited supervisor wrote on its readiness pipe after "ready": why its trace
    could not be written (vsva.ops.supervisor's `say`), or None. Read without waiting: its
    writer is gone (and no process it started ever held it)."""
    os.set_blocking(ready, False)
    data = b""
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(ready, 4096):
            data += chunk
    lines = [line for line in data.decode("utf-8", "replace").splitlines() if line and line != "ready"]
    return lines[-1] if lines else None


def _watch(proc: subprocess.Popen[bytes], state: dict[str, Any], stop: StopSignals) -> None:
    """The live status table, until the supervisor exits or a signal asks us to stop."""
    from rich.live import Live
    from rich.text import Text

    with Live(Text("starting ..."), refresh_per_second=4) as live:
        while proc.poll() is None and not stop.requested:
            try:
                status = ctl(state, "ps", timeout=5.0, quiet=True)
                live.update(ps_table(checked(state, "ps", status, PS, quiet=True)))
            except typer.Exit:
                pass
            wait_exit(proc.pid, 0.5, stop.fd)


def _take_lock(state_path: str) -> int:
    """The state directory's lock (flock on `lock`, exclusive): held by the supervisor for its
    whole life, so a second `vsva up` on the same directory is refused, never invisible."""
    import fcntl

    lock = os.path.join(os.path.dirname(state_path), "lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:  # a directory, say: the state directory is unusable as it is
        fail(EXIT_USAGE, f"state directory: cannot open its lock {lock}: {exc.strerror}")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        try:
            who = f" (supervisor pid {parse_state(state_path)['pid']})"
        except (OSError, CorruptState):
            who = ""
        fail(
            EXIT_FAIL,
            f"a topology is already running (or starting) in {os.path.dirname(state_path)}{who}; "
            "`vsva down` first, or another --state-dir",
        )
    return fd


def _clear_old_state(path: str) -> None:
    """With the lock held, a state file left is a dead supervisor's (or a lost host's record)."""
    try:
        old = parse_state(path)
    except FileNotFoundError:
        return
    except CorruptState as exc:
        remove_corrupt(path)
        typer.echo(f"vsva up: removed a corrupt state file {path} ({exc})", err=True)
        return
    if old.get("host_lost"):
        typer.echo(f"vsva up: replacing the record of the earlier run: {host_lost_line(old)}", err=True)
    cleanup_stale(old, path)


def _supervisor_cmd(path: str, topology: str | None, trace_out: str | None) -> list[str]:
    """The supervisor's command line; `--ready-fd` is added by _spawn_supervisor, which makes
    the pipe."""
    cmd = [sys.executable, "-m", "vsva.ops.supervisor", "--state-file", path]
    if trace_out:
        cmd += ["--trace-out", os.path.abspath(trace_out)]
    if topology:
        cmd.append(os.path.abspath(topology))
    return cmd


def _spawn_supervisor(cmd: list[str], log_path: str, lock: int) -> tuple[subprocess.Popen[bytes], int]:
    """Start the supervisor in a session of its own, holding the lock; returns it and the read
    end of its readiness pipe (`--ready-fd`: it writes a line there once its state file is
    complete). Our copy of the write end is closed here, so that the pipe's EOF means the
    supervisor exited (or closed it) without being ready."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    ready, theirs = os.pipe2(os.O_CLOEXEC)
    try:
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                cmd + ["--ready-fd", str(theirs)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
                pass_fds=(lock, theirs),
            )
    except BaseException:
        os.close(ready)
        raise
    finally:
        os.close(theirs)
    return proc, ready


def _await_state(
    proc: subprocess.Popen[bytes],
    path: str,
    ready_timeout: float,
    log_path: str,
    stop: StopSignals,
    ready: int,
) -> dict[str, Any] | None:
    """Wait (bounded) for the supervisor's line on its readiness pipe `ready`, then check its
    state file; None when a signal asks us to stop first. Nothing is polled: the wait wakes on
    the pipe and on the signals' descriptor (StopSignals.fd); the pipe's EOF before the line
    means the supervisor is exiting unready, and its exit is then awaited on its pidfd. On a
    timeout the supervisor is stopped (SIGTERM, then SIGKILL) and whatever it left is swept."""
    import select
    import time

    end = time.monotonic() + ready_timeout
    pipe_open = True
    while (left := end - time.monotonic()) > 0 and not stop.check():
        if proc.poll() is not None:
            _report_exit(proc, log_path)
        if not pipe_open:
            wait_exit(proc.pid, left, stop.fd)
        elif ready in select.select([ready, stop.fd], [], [], left)[0]:
            if os.read(ready, 64):
                return _ready_state(proc, path, log_path)
            pipe_open = False
    if stop.requested:
        return None
    fail(EXIT_FAIL, f"not ready within {ready_timeout:g} s: " + _stopped(proc, path, log_path))


def _report_exit(proc: subprocess.Popen[bytes], log_path: str) -> NoReturn:
    """A supervisor that exited before it was ready: its exit code and the end of its log."""
    with open(log_path, errors="replace") as f:
        tail = f.read().splitlines()[-15:]
    typer.echo(f"vsva up: the supervisor exited with {proc.returncode}\n" + "\n".join(tail), err=True)
    raise typer.Exit(EXIT_FAIL)


def _ready_state(proc: subprocess.Popen[bytes], path: str, log_path: str) -> dict[str, Any]:
    """The state file of a supervisor that said it is ready. One that is missing, corrupt or
    names another pid is not a topology the other commands could reach: it is stopped."""
    try:
        state = parse_state(path)
    except FileNotFoundError:
        why = "there is no state file"
    except CorruptState as exc:
        why = f"the state file is corrupt ({exc})"
    else:
        if state["pid"] == proc.pid:
            return state
        why = f"the state file names pid {state['pid']}"
    fail(EXIT_FAIL, f"the supervisor said it was ready but {why} ({path}): " + _stopped(proc, path, log_path))


def _stopped(proc: subprocess.Popen[bytes], path: str, log_path: str) -> str:
    """Stop a supervisor that is not ready (_stop_supervisor); what was done, for the error line."""
    left = _stop_supervisor(proc, path)
    return (
        f"supervisor pid {proc.pid} stopped"
        + (f", its leftovers removed ({len(left)})" if left else "")
        + f" (log: {log_path})"
    )


def _stop_supervisor(proc: subprocess.Popen[bytes], path: str) -> list[str]:
    """Stop our supervisor, starting or running (SIGTERM: it unwinds its launch or shuts the
    topology down; SIGKILL if it does not exit) and sweep what it left; returns what the
    sweep removed."""
    import signal

    from vsva.ops.runfiles import sweep

    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    _remove_state(proc, path)
    return sweep()


def _remove_state(proc: subprocess.Popen[bytes], path: str) -> None:
    """Remove the state file if it is still our exited supervisor's (a corrupt one, or one
    naming another pid, is not ours to judge here)."""
    try:
        if parse_state(path)["pid"] == proc.pid:
            os.unlink(path)
    except (FileNotFoundError, CorruptState):
        pass


def _ask_down(state: dict[str, Any]) -> None:
    """Ask the supervisor to stop over its control socket; SIGTERM when it does not answer."""
    import signal

    try:
        ctl(state, "down", timeout=5.0)
    except typer.Exit:
        os.kill(state["pid"], signal.SIGTERM)


def _end_supervisor(pid: int, timeout: float, ask: Callable[[], None]) -> None:
    """`ask` the supervisor `pid` to stop, wait `timeout` for it, then SIGKILL it (bounded)."""
    import signal

    ask()
    if not wait_exit(pid, timeout):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_exit(pid, 2.0)


def _trace_error(path: str) -> str | None:
    """Why the stopped supervisor could not write its trace, as it recorded in its state file
    on the way out (vsva.ops.supervisor's detach_main); None if it wrote it or was not asked."""
    try:
        why = parse_state(path).get("trace_error")
    except (OSError, CorruptState):
        return None
    return why if isinstance(why, str) else None


def down(
    state_dir: str | None = STATE_DIR,
    timeout: float = number_option(
        30.0, "--timeout", float, 0, 3600, "Seconds to wait for the supervisor to finish.", SECONDS
    ),
) -> None:
    """Stop the running topology (VMs stopped through F8, then every process) and clean up;
    says what it removed, leftovers of dead runs included."""
    import signal

    path = state_file(state_dir)
    swept = f"; removed leftovers of dead runs: {', '.join(SWEPT)}" if SWEPT else ""
    try:
        state = parse_state(path)
    except (CorruptState, FileNotFoundError) as exc:
        unnamed = unnamed_supervisor(path)
        if unnamed is not None:  # SIGTERM: it stops its topology as `vsva down` asks it to
            _end_supervisor(unnamed, timeout, lambda: os.kill(unnamed, signal.SIGTERM))
        if isinstance(exc, CorruptState):
            remove_corrupt(path)
        stopped = f"stopped the supervisor (pid {unnamed}) its state file did not name" if unnamed else ""
        if isinstance(exc, CorruptState):
            typer.echo(
                f"vsva: removed the corrupt state file {path} ({exc})"
                + (f"; {stopped}" if stopped else "")
                + swept
            )
        elif stopped or SWEPT:
            typer.echo(f"vsva: {stopped or 'no topology was running'}{swept}")
        else:
            fail(EXIT_NO_TOPOLOGY, f"no topology is running (no state file {path})")
        return
    pid = state["pid"]
    if state.get("host_lost"):
        what = f"cleared the record of the lost topology ({state['host_lost']['why']})"
    elif supervisor_alive(state):
        _end_supervisor(pid, timeout, lambda: _ask_down(state))
        what = f"stopped (supervisor pid {pid})"
    else:
        what = f"the supervisor (pid {pid}) was dead"
    from vsva.ops.runfiles import sweep

    trace_error = _trace_error(path)
    left = cleanup_stale(state, path) + [p for p in sweep() if p not in SWEPT]
    typer.echo(f"vsva: {what}" + (f"; removed leftovers {left}" if left else "") + swept)
    if trace_error:
        fail(EXIT_USAGE, trace_error)
