"""How `vsva up` knows its supervisor is ready: the line the supervisor writes on its readiness
pipe (`--ready-fd`) once its state file is complete, awaited with the stop signals and the
supervisor's exit, bounded by --ready-timeout.

The CLI's side is driven with stand-in supervisors (a few lines of Python started by the CLI's
own `_spawn_supervisor`, so through the same pipe and descriptors) that do one thing each: say
ready, exit, never say it, signal `up`. The real supervisor's side: what it accepts as
`--ready-fd`, and that it still runs without one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import typer
from streams import read_until

from vsva.cli import lifecycle
from vsva.cli.exits import StopSignals

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# What every stand-in can do: write its state file (the path is its first argument), say
# ready on its pipe (the descriptor after --ready-fd), and stay until SIGTERM (sigtimedwait:
# bounded, so that one outliving a killed test run, in a session of its own, still ends).
STAND_IN = """
import json, os, signal, sys
PATH, FD = sys.argv[1], int(sys.argv[sys.argv.index("--ready-fd") + 1])
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
def state(pid):
    with open(PATH, "w") as f:
        json.dump({"pid": pid, "run_dir": "/nonexistent", "ctl": "ipc:///nonexistent", "actors": {}}, f)
def ready():
    os.write(FD, b"ready\\n")
def hold():
    signal.sigtimedwait({signal.SIGTERM}, 300)
"""


@pytest.fixture
def stop():
    """`up`'s StopSignals in this process; the handlers and wakeup descriptor it replaced are
    put back after the test."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    old_wakeup = signal.set_wakeup_fd(-1)
    stop = StopSignals()
    yield stop
    os.close(signal.set_wakeup_fd(old_wakeup))
    os.close(stop.fd)
    for sig, handler in before.items():
        signal.signal(sig, handler)


@pytest.fixture
def spawn(tmp_path, monkeypatch):
    """Start a stand-in supervisor running `body` as `up` starts the real one; returns it,
    the read end of its readiness pipe and its state file's path. Whatever runs is killed
    after the test. The sweep of a stopped supervisor looks in this test's own directory."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    path, log_path = str(tmp_path / "current.json"), str(tmp_path / "supervisor.log")
    lock = os.open(tmp_path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
    started: list[tuple[subprocess.Popen, int]] = []

    def start(body: str) -> tuple[subprocess.Popen, int, str]:
        proc, ready = lifecycle._spawn_supervisor(
            [sys.executable, "-c", STAND_IN + body, path], log_path, lock
        )
        started.append((proc, ready))
        return proc, ready, path

    start.log_path = log_path
    yield start
    for proc, ready in started:
        os.close(ready)
        proc.kill()
        proc.wait(10)
    os.close(lock)


def test_up_returns_the_state_once_the_supervisor_says_ready(spawn, stop):
    proc, ready, path = spawn("state(os.getpid()); ready(); hold()")
    state = lifecycle._await_state(proc, path, 60, spawn.log_path, stop, ready)
    assert state["pid"] == proc.pid and proc.poll() is None


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "body, why",
    [
        ("ready(); hold()", "there is no state file"),
        ("state(os.getppid()); ready(); hold()", f"the state file names pid {os.getpid()}"),
        ("open(PATH, 'w').write('{'); ready(); hold()", "the state file is corrupt"),
    ],
    ids=["no-state-file", "another-pid", "corrupt"],
)
def test_ready_line_without_its_state_file_fails_at_once(spawn, stop, capsys, body, why):
    """The line is acted on when it comes: a supervisor that says ready without a state file
    of its own is stopped and said so, long before --ready-timeout (20 s here; waiting on the
    state file alone, `up` ran until then and reported a timeout)."""
    proc, ready, path = spawn(body)
    t = time.monotonic()
    with pytest.raises(typer.Exit) as exc:
        lifecycle._await_state(proc, path, 20, spawn.log_path, stop, ready)
    err = capsys.readouterr().err
    assert exc.value.exit_code == 1 and time.monotonic() - t < 15, err
    assert f"the supervisor said it was ready but {why}" in err, err
    assert f"supervisor pid {proc.pid} stopped" in err and proc.returncode is not None, err


@pytest.mark.timeout(30)
def test_supervisor_exiting_before_ready_is_reported_with_its_code(spawn, stop, capsys):
    """Its exit closes the pipe: `up` reports the exit code and the log's tail at once, not at
    --ready-timeout (60 s, past this test's own timeout)."""
    proc, ready, path = spawn("print('the launch failed here', flush=True); sys.exit(7)")
    with pytest.raises(typer.Exit) as exc:
        lifecycle._await_state(proc, path, 60, spawn.log_path, stop, ready)
    err = capsys.readouterr().err
    assert exc.value.exit_code == 1, err
    assert "vsva up: the supervisor exited with 7\nthe launch failed here" in err, err


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "body",
    ["state(os.getpid()); hold()", "os.close(FD); hold()"],
    ids=["state-file-without-the-line", "pipe-closed-still-running"],
)
def test_supervisor_never_ready_is_stopped_at_the_ready_timeout(spawn, stop, capsys, body):
    """A state file is not readiness, the line is (waiting on the file, `up` took this one as
    ready); nor is a pipe closed by a supervisor that keeps running. At --ready-timeout the
    supervisor is stopped and its state file removed."""
    proc, ready, path = spawn(body)
    with pytest.raises(typer.Exit) as exc:
        lifecycle._await_state(proc, path, 0.5, spawn.log_path, stop, ready)
    err = capsys.readouterr().err
    assert exc.value.exit_code == 1, err
    assert f"vsva: not ready within 0.5 s: supervisor pid {proc.pid} stopped" in err, err
    assert proc.returncode is not None and not os.path.exists(path)


@pytest.mark.timeout(30)
def test_stop_signal_during_the_wait_ends_it(spawn, stop):
    """A SIGTERM to `up` while its supervisor starts ends the wait at once (--ready-timeout is
    60 s), the supervisor still running for `up` to stop it."""
    proc, ready, path = spawn("os.kill(os.getppid(), signal.SIGTERM); hold()")
    assert lifecycle._await_state(proc, path, 60, spawn.log_path, stop, ready) is None
    assert stop.signum == signal.SIGTERM and proc.poll() is None
    lifecycle._stop_supervisor(proc, path)
    assert proc.returncode is not None


def supervisor(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vsva.ops.supervisor", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
        **kw,
    )


@pytest.mark.parametrize(
    "value, what",
    [
        ("x", "not a descriptor number"),
        ("", "not a descriptor number"),
        ("-1", "not an open descriptor"),
        ("1000", "not an open descriptor"),
        ("99999999999999999999", "not an open descriptor"),
        ("0", "not the write end of a pipe"),  # /dev/null
        ("read-end", "not the write end of a pipe"),
    ],
)
def test_supervisor_refuses_a_bad_ready_fd(tmp_path, value, what):
    """One line, usage's exit code, before anything starts: no state file."""
    state = tmp_path / "current.json"
    r, w = os.pipe()
    try:
        fd = str(r) if value == "read-end" else value
        done = supervisor("--state-file", str(state), "--ready-fd", fd, pass_fds=(r,))
    finally:
        os.close(r)
        os.close(w)
    assert done.returncode == 2, done
    [line] = done.stderr.splitlines()
    assert line.startswith("vsva up: --ready-fd ") and line.endswith(what), line
    assert not state.exists()


@pytest.mark.timeout(120)
def test_supervisor_without_ready_fd_still_runs(tmp_path):
    """--ready-fd is optional: without it the supervisor starts, writes its state file, answers
    `vsva ps` and runs until SIGTERM, which it answers by taking the topology down."""
    topo, state = tmp_path / "one.toml", tmp_path / "current.json"
    topo.write_text('[[vms]]\nworkload = "bind_many"\niterations = 4\n')
    short_tmp = tempfile.mkdtemp(prefix="vt", dir="/tmp")  # socket paths stay under ~107 bytes
    env = {**os.environ, "TMPDIR": short_tmp, "VSVA_STATE_DIR": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vsva.ops.supervisor", "--state-file", str(state), str(topo)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env=env,
    )
    try:
        read_until(proc, f"supervisor {proc.pid} running", timeout=90)
        ps = subprocess.run(
            [sys.executable, "-m", "vsva", "ps", "--json"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert ps.returncode == 0 and len(json.loads(ps.stdout)) == 5, ps  # its loop serves
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
        left = os.listdir(short_tmp)
        shutil.rmtree(short_tmp, ignore_errors=True)
    assert proc.returncode == 0 and not state.exists() and left == []
