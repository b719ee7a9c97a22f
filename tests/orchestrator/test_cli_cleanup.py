"""Nothing is left behind after any way a run can end: a signal to `vsva demo` or to a
foreground `vsva up`, a SIGKILL that no process can handle (the next `vsva` command sweeps
the runs of dead owners), a start that times out, two starts at once, a lost host, a dead
supervisor. Driven as a user would: `python -m vsva` subprocesses, each test with its own
state directory and TMPDIR, so the run directories seen are this test's own; shared memory
is matched by the owner pid in its name (vsva.ops.runfiles)."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from streams import poll_until, read_until, wait_gone
from zmqrt_toys import pid_alive

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LONG_DEMO = ("demo", "--workload", "dma_loop", "--iterations", "1000000")


class Cli:
    def __init__(self, tmp_path):
        # a short TMPDIR: socket paths in the run directory must stay under ~107 bytes
        self.tmp = Path(tempfile.mkdtemp(prefix="vt", dir="/tmp"))
        self.state = tmp_path / "state"
        self.env = {**os.environ, "VSVA_STATE_DIR": str(self.state), "TMPDIR": str(self.tmp)}

    def __call__(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "vsva", *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=self.env,
            timeout=timeout,
            check=False,
        )

    def start(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "vsva", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=self.env,
        )

    def run_dirs(self) -> list[str]:
        return glob.glob(str(self.tmp / "vsva-*"))

    def state_file(self) -> dict | None:
        try:
            return json.loads((self.state / "current.json").read_text())
        except (FileNotFoundError, ValueError):
            return None


def shm_of(pid: int) -> list[str]:
    return glob.glob(f"/dev/shm/vsva-{pid}.*.mem")


def cli_session(tmp_path):
    """A Cli for one test; whatever it left running is taken down after it."""
    c = Cli(tmp_path)
    yield c
    if c.state_file() is not None:
        c("down")
    shutil.rmtree(c.tmp, ignore_errors=True)


@pytest.fixture
def cli(tmp_path):
    yield from cli_session(tmp_path)


def traced(cli: Cli) -> bool:
    """The run is under way: an actor has written trace records."""
    return any(
        os.path.getsize(p) > 0 for d in cli.run_dirs() for p in glob.glob(os.path.join(d, "trace-*.frames"))
    )


def running_demo(cli: Cli, *extra: str) -> subprocess.Popen:
    """A long `vsva demo` once it says its actors are running."""
    proc = cli.start(*LONG_DEMO, *extra)
    read_until(proc, "actors running", timeout=90)
    assert shm_of(proc.pid)
    return proc


def descendants(pid: int) -> set[int]:
    """Every process below `pid` now (the fork server and the actors it forked)."""
    children: dict[int, list[int]] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                ppid = int(f.read().rsplit(")", 1)[-1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children.setdefault(ppid, []).append(int(stat.split("/")[2]))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def assert_stopped(cli: Cli, proc: subprocess.Popen, sig: int, err: str, pids: set[int]) -> None:
    """The command exited by itself with the shell's code for `sig` (128 + its number), said
    in one line which signal stopped it, and left nothing: no process of the run (`pids`, and
    any started for it later), no run directory (its sockets), no shared memory."""
    assert proc.returncode == 128 + sig, err[-2000:]
    said = [line for line in err.splitlines() if "interrupted" in line]
    assert said == [f"vsva: interrupted by {signal.Signals(sig).name}; the run was taken down"], err[-2000:]
    assert not [p for p in pids if pid_alive(p)] and launched_by(proc.pid) == []
    assert cli.run_dirs() == [] and shm_of(proc.pid) == []


def stop_twice(proc: subprocess.Popen, first: int, second: int) -> str:
    """`first`, then `second` once the command says it is stopping; all it wrote on stderr."""
    proc.send_signal(first)
    seen = read_until(proc, "stopping", timeout=60)
    proc.send_signal(second)
    return seen + proc.communicate(timeout=60)[1]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_demo_signal_cleans_up(cli, sig):
    proc = running_demo(cli)
    pids = descendants(proc.pid)
    assert len(pids) >= 7  # the actors of two VMs and the host side
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert_stopped(cli, proc, sig, err, pids)


def launched_by(pid: int) -> list[int]:
    """Processes started for `pid`'s run, wherever they are now: the fork server and the
    actors it forks carry `--parent-pid PID` on their command line."""
    found = []
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(cmdline, "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if b"--parent-pid" in args and args[args.index(b"--parent-pid") + 1 :][:1] == [str(pid).encode()]:
            found.append(int(cmdline.split("/")[2]))
    return [p for p in found if pid_alive(p)]


@pytest.mark.timeout(120)
def test_demo_signal_during_the_launch_cleans_up(cli):
    """A signal while the actors are still starting (the run directory is there, the trace
    is not): the launch is abandoned and taken down like a running demo."""
    proc = cli.start("demo", "--vms", "8", "--workload", "dma_loop", "--iterations", "1000000")
    poll_until(cli.run_dirs, 90, "the demo's run directory")
    pids = descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert_stopped(cli, proc, signal.SIGTERM, err, pids)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGHUP])
def test_demo_second_signal_while_stopping_is_ignored(cli, second):
    """Ctrl-C again (or the closing terminal's SIGHUP) while the demo takes its run down does
    not cut the stop short: it ends as the first signal asked, with nothing left."""
    proc = running_demo(cli)
    pids = descendants(proc.pid)
    err = stop_twice(proc, signal.SIGTERM, second)
    assert_stopped(cli, proc, signal.SIGTERM, err, pids)


@pytest.mark.timeout(120)
def test_sigkilled_demo_is_swept_by_the_next_command(cli, tmp_path):
    trace_out = tmp_path / "report"
    proc = running_demo(cli, "--trace-out", str(trace_out))
    poll_until(lambda: traced(cli), 90, "trace records")  # written in batches: nothing says when
    run_dir = cli.run_dirs()[0]
    proc.kill()
    proc.wait(10)
    assert os.path.isdir(run_dir) and shm_of(proc.pid)  # nobody could clean up
    down = cli("down")  # nothing is running; it still sweeps, and says what it removed
    assert run_dir in down.stdout and shm_of(proc.pid) == [] and cli.run_dirs() == []
    # the killed run's trace was kept for the report
    records = [json.loads(line) for line in (trace_out / "trace.jsonl").read_text().splitlines()]
    assert records and (trace_out / "trace.perfetto.json").exists()


@pytest.mark.timeout(120)
def test_sweep_leaves_live_runs_alone(cli):
    proc = running_demo(cli)
    try:
        assert cli("ps").returncode == 3  # no topology; the sweep ran
        assert len(cli.run_dirs()) == 1 and shm_of(proc.pid)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)


@pytest.mark.timeout(120)
def test_up_ready_timeout_leaves_nothing(cli):
    done = cli("up", "-d", "--ready-timeout", "0.3")
    assert done.returncode == 1, done
    m = re.search(r"supervisor pid (\d+)", done.stderr)
    assert m, done.stderr
    sup = int(m.group(1))
    assert not pid_alive(sup)
    assert cli.run_dirs() == [] and shm_of(sup) == [] and cli.state_file() is None


@pytest.mark.timeout(180)
def test_two_ups_at_once_one_wins_the_other_says_so(cli):
    a, b = cli.start("up", "-d"), cli.start("up", "-d")
    results = [(p.wait(90), *p.communicate()) for p in (a, b)]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 1], results
    loser = next(r for r in results if r[0] == 1)
    assert "already running" in loser[2], loser
    state = cli.state_file()
    rows = json.loads(cli("ps", "--json").stdout)
    assert {r["pid"] for r in rows} == set(state["actors"].values())
    assert len(cli.run_dirs()) == 1  # no second, invisible topology
    assert cli("down").returncode == 0
    assert cli.run_dirs() == []


@pytest.mark.timeout(180)
@pytest.mark.parametrize("damage", ["corrupt", "removed"])
def test_down_stops_a_supervisor_its_state_file_no_longer_names(cli, damage):
    """The state file corrupt or gone while the topology runs: `vsva down` finds its
    supervisor by the command line naming that file, stops it and everything it started
    (before: the topology ran on, orphaned, and `vsva up` was refused: the lock is held)."""
    assert cli("up", "-d").returncode == 0
    state = cli.state_file()
    path = cli.state / "current.json"
    if damage == "corrupt":
        path.write_text('{"pid": "x"}')
    else:
        path.unlink()
    down = cli("down")
    assert down.returncode == 0 and f"stopped the supervisor (pid {state['pid']})" in down.stdout, down
    wait_gone([state["pid"], *state["actors"].values()], 30, "the topology to stop")
    assert cli.run_dirs() == [] and shm_of(state["pid"]) == [] and not path.exists()
    assert cli("up", "-d").returncode == 0  # the lock is free again
    assert cli("down").returncode == 0


@pytest.mark.timeout(180)
def test_host_lost_detached_ps_reports_it_until_down(cli):
    assert cli("up", "-d").returncode == 0
    state = cli.state_file()
    os.kill(state["actors"]["host"], signal.SIGKILL)
    wait_gone([state["pid"]], 30, "the supervisor to stop")
    for _ in range(2):  # it stays reported
        ps = cli("ps")
        assert ps.returncode == 4, ps
        assert "host" in ps.stderr and "lost" in ps.stderr and "SIGKILL" in ps.stderr, ps.stderr
    as_json = json.loads(cli("ps", "--json").stdout)
    assert as_json["host_lost"]["why"].startswith("host (pid")
    assert cli.run_dirs() == [] and shm_of(state["pid"]) == []
    down = cli("down")
    assert down.returncode == 0 and "host" in down.stdout
    assert cli("ps").returncode == 3


@pytest.mark.timeout(180)
def test_host_lost_foreground_up_exits_non_zero_with_a_line(cli):
    up, state = up_running(cli)
    os.kill(state["actors"]["host"], signal.SIGKILL)
    out, err = up.communicate(timeout=60)
    assert up.returncode == 4, (out[-1500:], err[-1500:])
    assert "host" in err and "lost" in err
    assert cli.run_dirs() == []
    assert cli("down").returncode == 0


def up_running(cli: Cli) -> tuple[subprocess.Popen, dict]:
    """A foreground `vsva up` once it says its actors are running; and its state file."""
    up = cli.start("up")
    read_until(up, "actors running", timeout=60, stream=up.stdout)
    return up, cli.state_file()


def assert_up_stopped(cli: Cli, up: subprocess.Popen, sig: int, state: dict, err: str) -> None:
    """`vsva up` exited with its documented code (not by a signal) and left nothing behind."""
    assert "stopping" in err, err[-2000:]
    assert not pid_alive(state["pid"]) and cli.state_file() is None and shm_of(state["pid"]) == []
    assert_stopped(cli, up, sig, err, set(state["actors"].values()))


@pytest.mark.timeout(180)
def test_foreground_up_stops_on_sighup(cli):
    up, state = up_running(cli)
    up.send_signal(signal.SIGHUP)
    _, err = up.communicate(timeout=60)
    assert_up_stopped(cli, up, signal.SIGHUP, state, err)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_foreground_up_second_signal_while_stopping_is_already_handled(cli, second):
    """An impatient second signal while `up` stops its topology (Ctrl-C again, the SIGHUP of
    the closing terminal after a SIGTERM) does not cut the stop short: the supervisor is
    waited for and the state file and run files are gone when `up` exits, with the code
    of the first signal (143)."""
    up, state = up_running(cli)
    err = stop_twice(up, signal.SIGTERM, second)
    assert_up_stopped(cli, up, signal.SIGTERM, state, err)


LANDING = """
import os, signal, sys
from vsva.cli.exits import StopSignals

def interrupt(signum, frame):
    raise KeyboardInterrupt

stop = StopSignals()
if sys.argv[1] == "raise":
    signal.signal(signal.SIGHUP, interrupt)
try:  # the signal is handled inside code run from a string, as a dataclass's methods are built
    exec("import os, signal; os.kill(os.getpid(), signal.SIGHUP)")
except KeyboardInterrupt:
    stop.signum = signal.SIGHUP
sys.exit(130 if stop.requested else 1)
"""


def test_a_signal_landing_in_string_code_keeps_the_exit_code(tmp_path):
    """Under `python -m`, once a KeyboardInterrupt has left code that the interpreter ran from a
    string (exec or eval of source text), the process ends by SIGINT after its cleanup, even
    when the exception was caught and an exit code was chosen. A signal to `vsva up` lands
    wherever it lands, inside an import building a dataclass too; the signals `up` installs
    (StopSignals) raise nothing, so its exit code stands."""
    (tmp_path / "landing.py").write_text(LANDING)

    def run(mode: str) -> int:
        return subprocess.run(
            [sys.executable, "-m", "landing", mode], cwd=tmp_path, timeout=60, check=False
        ).returncode

    assert run("record") == 130
    assert run("raise") == -signal.SIGINT  # a handler that raises: the exit code is lost


@pytest.mark.timeout(180)
def test_dead_supervisor_is_reported_at_once(cli):
    assert cli("up", "-d").returncode == 0
    state = cli.state_file()
    os.kill(state["pid"], signal.SIGKILL)
    wait_gone([state["pid"]], 10, "the supervisor to die")
    for command in ("ps", "audit", "kill"):
        args = (command, "vm1.vmm") if command == "kill" else (command,)
        done = cli(*args, timeout=10)  # the old wait on the socket was 20-30 s
        assert done.returncode == 3, done
        assert f"supervisor (pid {state['pid']}) is not running" in done.stderr, done.stderr
    down = cli("down")
    assert down.returncode == 0
    assert cli.state_file() is None and cli.run_dirs() == [] and shm_of(state["pid"]) == []
