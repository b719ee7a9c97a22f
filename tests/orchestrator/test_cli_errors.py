"""Bad input to the `vsva` command line: one readable line on stderr, a documented non-zero
exit code, no traceback, nothing started and no state changed. Driven as a user would:
subprocesses of `python -m vsva` with a private state directory."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys

import pytest
from streams import read_until

import vsva

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def cli(tmp_path):
    env = {**os.environ, "VSVA_STATE_DIR": str(tmp_path / "state")}

    def run(
        *args: str,
        timeout: float = 60,
        memory: int | None = None,
        environ: dict[str, str | None] | None = None,
    ) -> subprocess.CompletedProcess:
        """`memory`: the command's address-space limit (RLIMIT_AS), so that one reading a file
        without bound fails (MemoryError) before the machine's OOM killer steps in. `environ`:
        variables set for this command (None: unset)."""
        changed = {**env, **(environ or {})}
        return subprocess.run(
            [sys.executable, "-m", "vsva", *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={k: v for k, v in changed.items() if v is not None},
            timeout=timeout,
            preexec_fn=None
            if memory is None
            else lambda: resource.setrlimit(resource.RLIMIT_AS, (memory, memory)),
        )

    run.tmp = tmp_path
    run.state_dir = tmp_path / "state"
    yield run
    if (run.state_dir / "current.json").exists():  # a refusal that started a topology after all
        run("down")


def one_line_error(done: subprocess.CompletedProcess, code: int, *words: str) -> str:
    """The command failed with exit `code` and said why in one line on stderr."""
    err = done.stderr.strip()
    assert done.returncode == code, (done.returncode, done.stdout[-1500:], err[-1500:])
    assert "Traceback" not in err and "Traceback" not in done.stdout, err[-1500:]
    assert len(err.splitlines()) == 1, err
    assert err.startswith("vsva"), err
    for w in words:
        assert w.lower() in err.lower(), (w, err)
    return err


def test_run_on_a_directory(cli):
    one_line_error(cli("run", str(cli.tmp)), 2, "directory")


@pytest.mark.parametrize(
    "args",
    [
        ["run", ""],
        ["up", "-d", ""],
        ["up", ""],
        ["scale", "run", "vms", "--resume", ""],
        ["scale", "run", "vms", "--cluster", ""],
    ],
)
def test_an_empty_path_is_no_default(cli, args):
    """An empty file or directory named on purpose was taken for none: `vsva run ''` and `vsva
    up ''` ran the default topology, --resume '' and --cluster '' a whole new sweep here."""
    out = cli.tmp / "results"
    done = cli(*args, *(["--out", str(out)] if args[0] == "scale" else []), timeout=30)
    one_line_error(done, 2, "'': an empty")
    assert not (cli.state_dir / "current.json").exists() and not out.exists()


def test_topology_file_not_utf8(cli):
    bad = cli.tmp / "latin1.toml"
    bad.write_bytes(b"[run]\nseed = 3\n# caf\xe9\n")
    one_line_error(cli("run", str(bad)), 2, "UTF-8")
    one_line_error(cli("up", "-d", str(bad)), 2, "UTF-8")


@pytest.mark.parametrize("command", [["run"], ["scale", "run"]])
def test_a_file_that_cannot_be_read_is_the_same_line_for_every_loader(cli, command):
    """Topology, scenario and sweep files share one reader (userfiles.read_toml_text): before,
    a sweep file said "cannot read: [Errno 5] Input/output error: '/proc/self/mem'" and "cannot
    read: 'utf-8' codec can't decode byte ..." where a topology file says what is below."""
    err = one_line_error(
        cli(*command, "/proc/self/mem"), 2, "/proc/self/mem: cannot read: Input/output error"
    )
    assert "Errno" not in err, err
    latin1 = cli.tmp / "latin1.toml"
    latin1.write_bytes(b"# caf\xe9\n")
    one_line_error(cli(*command, str(latin1)), 2, "not UTF-8 text (byte 0xe9 at offset 5)")


GIB = 1 << 30


def no_regular_file(path, kind: str, limit: int, text: str = "") -> None:
    """`path` made a file of `kind` that no command reads whole: a FIFO (nobody writes to it),
    a link to /dev/zero (endless), or a regular file of `text` padded past `limit` bytes."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        os.symlink("/dev/zero", path)
    else:
        path.write_text(text + " " * limit + "\n")


@pytest.mark.parametrize(
    "kind,words",
    [
        ("fifo", ["not a regular file", "FIFO"]),
        ("dev-zero", ["not a regular file"]),
        ("too-large", ["16 MiB limit"]),
    ],
)
@pytest.mark.parametrize("command", [["run"], ["up", "-d"], ["scale", "run"]])
def test_a_named_file_is_read_only_if_regular_and_small_enough(cli, command, kind, words):
    bad = cli.tmp / "bad.toml"
    no_regular_file(bad, kind, 16 << 20, "[bogus]\n")  # too large, else an unknown section
    one_line_error(cli(*command, str(bad), timeout=20, memory=2 * GIB), 2, str(bad), *words)
    assert not (cli.state_dir / "current.json").exists()


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "too-large"])
def test_a_state_file_is_read_only_if_regular_and_small_enough(cli, kind):
    cli.state_dir.mkdir(mode=0o700)
    state = cli.state_dir / "current.json"
    no_regular_file(state, kind, 1 << 20, json.dumps({"pid": 1, "run_dir": "/nowhere", "ctl": "ipc:///nope"}))
    one_line_error(
        cli("ps", timeout=20, memory=2 * GIB),
        3,
        "corrupt state file",
        "1 MiB limit" if kind == "too-large" else "not a regular file",
    )


@pytest.mark.parametrize("command", [["run"], ["up", "-d"], ["scale", "run"]])
def test_a_file_nested_too_deeply_is_one_line(cli, command):
    deep = cli.tmp / "deep.toml"
    deep.write_text("[[vms]]\nid = 1\nx = " + "[" * 500 + "]" * 500 + "\n")
    one_line_error(cli(*command, str(deep)), 2, str(deep), "nested too deeply")


def test_a_state_file_nested_too_deeply_is_corrupt(cli):
    cli.state_dir.mkdir(mode=0o700)
    (cli.state_dir / "current.json").write_text("[" * 100_000)
    one_line_error(cli("ps"), 3, "corrupt state file", "recursion")


@pytest.mark.parametrize("timeout", ["-1", "0"])
def test_scenario_timeout_out_of_range(cli, timeout):
    bad = cli.tmp / "neg.toml"
    bad.write_text(f"[scenario]\ntimeout = {timeout}\n")
    one_line_error(cli("run", str(bad)), 2, "scenario.timeout")


@pytest.mark.parametrize("batches", ["a", "0", "-5", "1,,x", ""])
def test_bench_bad_batches(cli, batches):
    one_line_error(cli("bench", f"--batches={batches}"), 2, "--batches")


def test_trace_out_unwritable_is_refused_before_the_run(cli):
    afile = cli.tmp / "afile"
    afile.write_text("")
    err = one_line_error(cli("demo", "--runtime", "sim", "--trace-out", str(afile / "x")), 2, "--trace-out")
    assert (
        "vsva demo:" not in cli("demo", "--runtime", "sim", "--trace-out", str(afile / "x")).stdout
    )  # the run did not start
    assert err


@pytest.mark.parametrize("command", ["ps", "audit", "down", "up"])
def test_bad_state_dir(cli, command):
    afile = cli.tmp / "afile"
    afile.write_text("")
    one_line_error(cli(command, "--state-dir", str(afile)), 2, "--state-dir")


def _unusable_dir(tmp, kind: str) -> str:
    """A --state-dir or --trace-out of `kind` that no command can use as it is."""
    path = tmp / kind
    if kind == "loop":
        path.symlink_to(path)
    elif kind == "dangling":
        path.symlink_to(tmp / "nowhere")
    elif kind == "file":
        path.write_text("")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "mode-0777":
        path.mkdir()
        path.chmod(0o777)
    elif kind == "another-user":
        if os.getuid() != 0:
            return "/"  # root's
        path.mkdir(mode=0o700)
        os.chown(path, 65534, 65534)
    elif kind == "too-long":
        return str(tmp / ("x" * 300))
    return str(path)


UNUSABLE_STATE_DIRS = {
    "loop": ["too many levels of symbolic links"],
    "dangling": ["a symbolic link to", "which does not exist"],
    "file": ["not a directory (a regular file)"],
    "fifo": ["not a directory (a FIFO)"],
    "mode-0777": ["other users can write in it", "mode 0777"],
    "another-user": ["owned by uid", "not by this user"],
    "too-long": ["file name too long", "characters)"],
}


@pytest.mark.parametrize("kind", sorted(UNUSABLE_STATE_DIRS))
@pytest.mark.parametrize("command", [["ps"], ["up", "-d"], ["down"]])
def test_an_unusable_state_dir_says_why(cli, command, kind):
    """Before, a loop of links, a link to nothing, a file, a FIFO were all "File exists", and
    a directory another user owns or can write was used as it was."""
    path = _unusable_dir(cli.tmp, kind)
    before = os.lstat(path) if os.path.lexists(path) else None
    done = cli(*command, "--state-dir", path)
    if done.returncode == 0 and command[0] == "up":  # a regression started a topology: stop it
        from vsva.cli.client import wait_exit

        pid = int(done.stdout.split("supervisor pid ")[1].split(",")[0])
        os.kill(pid, signal.SIGTERM)
        wait_exit(pid, 30)
    err = one_line_error(done, 2, "--state-dir", *UNUSABLE_STATE_DIRS[kind])
    assert len(err) < 400, err
    after = os.lstat(path) if os.path.lexists(path) else None
    assert (before and (before.st_mode, before.st_uid, before.st_ino)) == (
        after and (after.st_mode, after.st_uid, after.st_ino)
    )
    assert not os.path.lexists(os.path.join(path, "current.json"))


def test_an_unusable_default_state_dir_says_why(cli):
    """$XDG_RUNTIME_DIR/vsva, the default without --state-dir, is held to the same checks."""
    default = cli.tmp / "vsva"
    default.symlink_to(default)
    for args in (["ps"], ["up", "-d"], ["down"]):
        done = cli(*args, environ={"VSVA_STATE_DIR": None, "XDG_RUNTIME_DIR": str(cli.tmp)})
        one_line_error(done, 2, f"state directory '{default}'", "too many levels of symbolic links")
    assert default.is_symlink()


def test_corrupt_state_file_is_reported_and_does_not_block_up(cli):
    cli.state_dir.mkdir(mode=0o700)
    state = cli.state_dir / "current.json"
    state.write_text("{bad")
    for command in ("ps", "audit", "kill"):
        args = (command, "host") if command == "kill" else (command,)
        one_line_error(cli(*args), 3, "corrupt")
    assert state.read_text() == "{bad"  # reported, not silently removed by a read-only command
    # `down` removes it and says so; `up` afterwards is not blocked
    down = cli("down")
    assert down.returncode == 0 and "corrupt" in down.stdout + down.stderr, down
    assert not state.exists()


def test_a_state_file_naming_another_live_process_is_no_supervisor(cli):
    """Without the start time every supervisor writes (`owner`), a live pid in a state file
    is some other process: `vsva down` must not signal it, nor ps ask it anything."""
    cli.state_dir.mkdir(mode=0o700)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        state = {"pid": bystander.pid, "run_dir": str(cli.tmp / "nowhere"), "ctl": "ipc:///nope"}
        (cli.state_dir / "current.json").write_text(json.dumps(state))
        one_line_error(cli("ps"), 3, "not running")
        down = cli("down")
        assert down.returncode == 0 and f"pid {bystander.pid}) was dead" in down.stdout, down
        assert bystander.poll() is None, "vsva down signalled a process that is no supervisor"
    finally:
        bystander.kill()
        bystander.wait(10)


@pytest.mark.parametrize(
    "edit,words",
    [
        ({"ctl": "garbage://x"}, "ctl is not ipc://"),
        ({"ctl": "ipc:///" + "x" * 107}, "ctl is not ipc://"),
        ({"host_lost": "yes"}, "host_lost"),
        ({"host_lost": {"at": 1e300, "after_s": 1, "why": "x"}}, "host_lost"),
    ],
)
def test_a_hand_edited_state_file_is_corrupt(cli, edit, words):
    """A state file naming a live process as its supervisor (pid and owner), with a field no
    supervisor writes: before, zmq's connect raised ZMQError and host_lost_line TypeError."""
    from vsva.ops.runfiles import owner_tag

    cli.state_dir.mkdir(mode=0o700)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        state = {"pid": bystander.pid, "owner": owner_tag(bystander.pid), "run_dir": str(cli.tmp)}
        (cli.state_dir / "current.json").write_text(json.dumps({**state, "ctl": "ipc:///nope", **edit}))
        for args in (["ps"], ["audit"], ["kill", "host"]):
            one_line_error(cli(*args), 3, "corrupt state file", words)
        down = cli("down")
        assert down.returncode == 0 and "removed the corrupt state file" in down.stdout, down
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait(10)


def test_a_state_file_that_is_a_directory_is_corrupt_and_left_alone(cli):
    state = cli.state_dir / "current.json"
    state.mkdir(parents=True)
    one_line_error(cli("ps"), 3, "corrupt state file", "not a regular file (a directory)")
    one_line_error(cli("down"), 3, "cannot be removed", "remove it yourself")
    one_line_error(cli("up", "-d"), 3, "cannot be removed")
    assert state.is_dir()


def test_a_lock_that_is_a_directory_is_a_bad_state_directory(cli):
    (cli.state_dir / "lock").mkdir(parents=True)
    one_line_error(cli("up", "-d"), 2, "state directory", "lock", "is a directory")
    assert not (cli.state_dir / "current.json").exists()


def test_corrupt_state_file_does_not_block_up(cli):
    cli.state_dir.mkdir(mode=0o700)
    state = cli.state_dir / "current.json"
    state.write_text("\x00garbage")
    up = cli("up", "-d", "--ready-timeout", "60", timeout=90)
    try:
        assert up.returncode == 0, (up.stdout, up.stderr)
        assert json.loads(state.read_text())["pid"] > 0
    finally:
        cli("down")


def test_version(cli):
    done = cli("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"vsva {vsva.__version__}"


@pytest.mark.parametrize(
    "args,listed",
    [
        (["demo", "--help"], ["processes", "sim", "naive", "ordered", "reclaim", "ipc", "tcp", "churn"]),
        (["explore", "--help"], ["naive", "ordered", "reclaim", "churn"]),
        (["--help"], ["exit", "0", "1", "2", "3"]),
    ],
)
def test_help_lists_choices_and_exit_codes(cli, args, listed):
    done = cli(*args)
    assert done.returncode == 0
    for word in listed:
        assert word in done.stdout, (word, done.stdout)


@pytest.mark.parametrize(
    "args,option",
    [
        (["demo", "--policy", "nope"], "--policy"),
        (["demo", "--runtime", "nope"], "--runtime"),
        (["demo", "--vms", "0"], "--vms"),
        (["up", "--ready-timeout", "-1"], "--ready-timeout"),
        (["down", "--timeout", "-1"], "--timeout"),
    ],
)
def test_bad_option_values(cli, args, option):
    one_line_error(cli(*args), 2, option)


SEED_RANGE = "from -9223372036854775808 to 9223372036854775807"


@pytest.mark.parametrize(
    "args,value,range_",
    [
        *[
            (["up", "-d", "--ready-timeout"], v, "from 0.01 to 3600")
            for v in ("nan", "inf", "-inf", "0", "1e400", "")
        ],
        (["down", "--timeout"], "nan", "from 0 to 3600"),
        (["down", "--timeout"], "-1e-9", "from 0 to 3600"),
        (["demo", "--vms"], "1e3", "from 1 to 256"),
        (["demo", "--vms"], "9" * 5000, "from 1 to 256"),
        (["demo", "--seed"], str(1 << 64), SEED_RANGE),
        (["demo", "--iterations"], "inf", "from 1 to 10000000"),
        (["explore", "--vms"], "9", "from 1 to 8"),
        (["explore", "--seeds"], "nan", "from 1 to 1000000"),
        (["explore", "--first"], "1.5", SEED_RANGE),
        (["scale", "run", "vms", "--repeat"], "inf", "from 1 to 1000"),
        (["scale", "run", "vms", "--seed"], "x", SEED_RANGE),
        (["bench", "--batches"], "1,\u00b2", "from 1 to 65536"),
    ],
)
def test_a_number_out_of_range_names_the_option_and_its_range(cli, args, value, range_):
    """Every numeric option, one check (options.in_range): nan and inf were "less than or equal
    to 3600", a superscript digit in --batches a traceback; nothing starts."""
    out = cli.tmp / "results"
    extra = ["--out", str(out)] if args[0] == "scale" else []
    err = one_line_error(cli(*args, value, *extra), 2, args[-1], range_)
    assert len(err) < 250, err  # a 5000-digit value is not echoed whole
    assert not (cli.state_dir / "current.json").exists() and not out.exists()


@pytest.mark.parametrize("name", ["a" * 100_000, "a" * 65, "vm1/../host", ""])
def test_kill_refuses_a_name_no_actor_can_have(cli, name):
    """Refused before any topology is asked (a long name never reached the supervisor)."""
    one_line_error(cli("kill", name), 2, "cannot be an actor name")


@pytest.mark.parametrize(
    "args", [("demo", "--vms", "1"), ("run", "examples/two-vms.toml"), ("up", "-d"), ("up",)]
)
def test_tmpdir_too_long_for_ipc_socket_paths(tmp_path, args):
    """The run directory (and its ipc sockets) is made under TMPDIR: one whose socket paths
    cannot be bound is refused before anything starts, naming the limit and TMPDIR."""
    long_tmp = tmp_path / ("d" * 80)
    long_tmp.mkdir()
    env = {**os.environ, "VSVA_STATE_DIR": str(tmp_path / "state"), "TMPDIR": str(long_tmp)}
    done = subprocess.run(
        [sys.executable, "-m", "vsva", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60
    )
    one_line_error(done, 2, "TMPDIR", "107")
    assert os.listdir(long_tmp) == []  # no run directory was made


def _full_trace_dir(cli):
    """A --trace-out whose trace.jsonl cannot be written once the run ends (a full disk)."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    out = cli.tmp / "tr"
    out.mkdir()
    (out / "trace.jsonl").symlink_to("/dev/full")
    return out


@pytest.mark.parametrize(
    "args", [("demo", "--runtime", "sim", "--vms", "1"), ("run", "examples/two-vms.toml", "--json")]
)
def test_trace_unwritable_at_the_end_keeps_the_report(cli, args):
    """The report is printed, the trace's failure is one line naming the file, exit 2, and the
    other trace files are still written."""
    out = _full_trace_dir(cli)
    done = cli(*args, "--trace-out", str(out))
    assert "verdict: PASS" in done.stdout or '"ok": true' in done.stdout, done.stdout[-500:]
    err = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-1500:]
    assert err.startswith("vsva: --trace-out: cannot write") and "trace.jsonl" in err and "space" in err, err
    assert (out / "trace.perfetto.json").stat().st_size > 0


def test_trace_unwritable_when_a_detached_topology_stops_is_said_by_down(cli):
    out = _full_trace_dir(cli)
    assert cli("up", "-d", "--trace-out", str(out)).returncode == 0
    done = cli("down")
    assert "stopped" in done.stdout, done.stdout
    one_line_error(done, 2, "trace.jsonl", "space")
    assert not (cli.state_dir / "current.json").exists()


@pytest.mark.parametrize("stop", ["down", "SIGINT"])
def test_trace_unwritable_when_a_foreground_topology_stops_is_said_by_up(cli, stop):
    """A foreground `vsva up` says why as `vsva down` does (before: "the supervisor exited with
    2", exit 1; nothing on Ctrl-C): stopped by a `vsva down` elsewhere, exit 2; by Ctrl-C, the
    line before the interrupt's, exit 130. Its state file is gone either way."""
    out = _full_trace_dir(cli)
    up = subprocess.Popen(
        [sys.executable, "-m", "vsva", "up", "--trace-out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "VSVA_STATE_DIR": str(cli.state_dir)},
    )
    try:
        read_until(up, "Ctrl-C stops it", timeout=60, stream=up.stdout)
        if stop == "down":
            one_line_error(cli("down"), 2, "trace.jsonl", "space")
        else:
            up.send_signal(signal.SIGINT)
        err = up.communicate(timeout=60)[1].decode()
    finally:
        up.kill()
        up.wait(10)
        cli("down")
    reason = f"vsva: --trace-out: cannot write {out / 'trace.jsonl'}: No space left on device"
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    if stop == "down":
        assert (up.returncode, lines) == (2, [reason]), (up.returncode, err)
    else:
        assert up.returncode == 130 and lines[-2:] == [reason, lines[-1]], (up.returncode, err)
        assert lines[-1].startswith("vsva: interrupted by SIGINT"), err
    assert not (cli.state_dir / "current.json").exists()


@pytest.mark.parametrize(
    "kind,words",
    [
        ("loop", ["too many levels of symbolic links"]),
        ("fifo", ["not a directory (a FIFO)"]),
        ("dangling", ["a symbolic link to", "which does not exist"]),
        ("empty", ["'': an empty path"]),
    ],
)
@pytest.mark.parametrize(
    "command", [["demo", "--runtime", "sim"], ["run", "examples/two-vms.toml"], ["up", "-d"]]
)
def test_trace_out_in_the_way_says_what_is_there(cli, command, kind, words):
    """Before: "File exists" for each but the empty path ("No such file or directory")."""
    path = "" if kind == "empty" else _unusable_dir(cli.tmp, kind)
    before = os.lstat(path) if path else None
    done = cli(*command, "--trace-out", path)
    one_line_error(done, 2, "--trace-out", *words)
    assert done.stdout == "" and not (cli.state_dir / "current.json").exists()
    assert not path or os.lstat(path).st_ino == before.st_ino


def test_trace_out_with_a_directory_in_a_trace_file_place_is_refused_before_the_run(cli):
    (cli.tmp / "tr" / "trace.jsonl").mkdir(parents=True)
    done = cli("demo", "--runtime", "sim", "--trace-out", str(cli.tmp / "tr"))
    one_line_error(done, 2, "trace.jsonl", "directory")
    assert done.stdout == ""
