"""The `vsva` command line.

Errors are one line on stderr (`vsva COMMAND: what went wrong`) and an exit code from
EXIT_CODES; nothing is started or changed by a refused command.
"""

from __future__ import annotations

import json
import os
import sys
from enum import StrEnum

import typer

try:  # recent typer releases carry their own copy of click; its exceptions are the ones raised
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # pragma: no cover - older typer on the real click
    from click.exceptions import ClickException, NoArgsIsHelpError  # type: ignore[no-redef]

import vsva
from vsva.actors.guest import WORKLOADS
from vsva.actors.policy import Policy
from vsva.actors.semantics import Kernel
from vsva.ops.config import DEMO_ITERATIONS, RUN, VM, Runtime
from vsva.runtime.endpoints import Transport

EXIT_CODES = {
    0: "success (every step and the audit passed)",
    1: "the run or command failed (a FAIL verdict, audit violations, an actor that could not be killed)",
    2: "bad input: an option, a topology or scenario file, an unwritable --trace-out or --state-dir",
    3: "no topology to talk to: none running, its supervisor dead or not answering, a corrupt state file",
    4: "the host was lost: every VM of the topology is gone",
    130: "interrupted (SIGINT, SIGTERM or SIGHUP); the run was cleaned up",
}
EXIT_FAIL, EXIT_USAGE, EXIT_NO_TOPOLOGY, EXIT_HOST_LOST, EXIT_INTERRUPTED = 1, 2, 3, 4, 130

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Intel VT-d virtual SVA as a multi-process actor system: run, measure and break it.",
    epilog="Exit codes: " + "; ".join(f"{c} {w}" for c, w in EXIT_CODES.items()) + ".",
)


def _scale() -> typer.Typer:
    from vsva.scale.cli import app as scale

    return scale


app.add_typer(_scale(), name="scale")


Workload = StrEnum("Workload", {name: name for name in sorted(WORKLOADS)})  # type: ignore[misc]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"vsva {vsva.__version__}")
        raise typer.Exit(0)


SWEPT: list[str] = []  # leftovers of dead runs this command removed (`vsva down` reports them)


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Intel VT-d virtual SVA as a multi-process actor system: run, measure and break it."""
    from vsva.ops.runfiles import sweep

    SWEPT.extend(sweep())


def _interrupt_on_signals() -> None:
    """SIGTERM and SIGHUP (a closed terminal) stop a run as Ctrl-C does: the KeyboardInterrupt
    unwinds through the launcher, which takes the processes and files of the run down."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)


def _writable_dir(value: str | None) -> str | None:
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
    return value


@app.command()
def demo(
    vms: int = typer.Option(
        2,
        "--vms",
        min=1,
        max=256,
        help="How many VMs (guest + vmm each); "
        "refused when this machine cannot hold them (the limit is named).",
    ),
    seed: int = typer.Option(
        RUN.seed, "--seed", help="The run's seed (workload, frame placement, interleaving)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the timeline."),
    runtime: Runtime = typer.Option(
        Runtime.PROCESSES,
        "--runtime",
        help="processes: one OS process per actor over ZeroMQ; sim: deterministic, in-process.",
    ),
    trace_out: str | None = typer.Option(
        None,
        "--trace-out",
        callback=_writable_dir,
        help="Also write trace.jsonl, trace.perfetto.json and the sequence diagrams into this directory.",
    ),
    policy: Policy = typer.Option(RUN.policy, "--policy", help="Free-before-unbind cleanup policy."),
    transport: Transport = typer.Option(
        RUN.transport,
        "--transport",
        help="processes runtime: ipc (sockets in the private run directory) or tcp (127.0.0.1 ports only).",
    ),
    workload: Workload = typer.Option(
        VM.workload, "--workload", help="Guest workload (demo runs every flow; others replay explore's runs)."
    ),
    iterations: int = typer.Option(
        DEMO_ITERATIONS, "--iterations", min=1, max=10_000_000, help="Rounds of looping workloads."
    ),
    kernel: Kernel = typer.Option(
        RUN.kernel, "--kernel", help="Whose bind/unbind/invalidate answers: v11 (the seed) or v5.9 (merged)."
    ),
) -> None:
    """Run every flow end to end on one host and VMS VMs, check the DMA data, audit, print a timeline."""
    from vsva.ops.capacity import CapacityError
    from vsva.ops.demo import demo as run_demo
    from vsva.ops.demo import render

    _interrupt_on_signals()
    try:
        session, rep = run_demo(
            vms, seed, runtime, policy, transport, workload, iterations, trace_out, kernel
        )
    except CapacityError as exc:
        _fail(EXIT_USAGE, f"--vms {vms}: {exc}")
    if as_json:
        typer.echo(json.dumps(rep, indent=2))
    else:
        render(session, rep, typer.echo)
    raise typer.Exit(0 if rep["ok"] else 1)


def _batch_sizes(value: str) -> list[int]:
    from vsva.cli.bench import ALL_BATCHES

    top = max(ALL_BATCHES)
    sizes = []
    for item in value.split(","):
        item = item.strip()
        if not item.isdigit() or not 1 <= int(item) <= top:
            raise typer.BadParameter(
                f"{item!r} is not a batch size in [1, {top}] (comma-separated, e.g. 1,64,1024)",
                param_hint="'--batches'",
            )
        sizes.append(int(item))
    return sizes


@app.command()
def bench(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    batches: str = typer.Option(
        "1,64,1024,65536", "--batches", help="Comma-separated batch sizes, each in [1, 65536]."
    ),
) -> None:
    """Throughput of the compiled hot path against the pure-Python twin and bare baselines."""
    from vsva.cli.bench import run_bench

    sizes = _batch_sizes(batches)
    result = run_bench(sizes, as_json)
    if as_json:
        typer.echo(json.dumps(result, indent=2))


@app.command()
def explore(
    seeds: int = typer.Option(50, "--seeds", min=1, max=1_000_000, help="How many seeds to try."),
    first: int = typer.Option(1, "--first", help="The first seed."),
    vms: int = typer.Option(2, "--vms", min=1, max=8),
    policy: Policy = typer.Option(RUN.policy, "--policy", help="Cleanup policy."),
    workload: Workload = typer.Option(
        VM.workload, "--workload", help="Guest workload; 'churn' frees bound PASIDs over and over."
    ),
    iterations: int = typer.Option(
        DEMO_ITERATIONS, "--iterations", min=1, max=10_000_000, help="Rounds of looping workloads."
    ),
    kernel: Kernel = typer.Option(
        RUN.kernel, "--kernel", help="Whose bind/unbind/invalidate answers: v11 (the seed) or v5.9 (merged)."
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Seeded interleavings in the deterministic runtime; prints the seed of every failing run.

    `vsva explore --policy naive --workload churn` finds the free-before-unbind hazard;
    the same seeds pass under ordered and reclaim."""
    from vsva.ops.demo import hazards, report, run_session
    from vsva.ops.topology import default_topology

    failing = []
    for seed in range(first, first + seeds):
        topology = default_topology(
            vms, seed=seed, policy=policy, kernel=kernel, workload=workload, iterations=iterations
        )
        rep = report(run_session(topology, "sim"), topology, "sim")
        if not rep["ok"]:
            failing.append(
                {
                    "seed": seed,
                    "violations": rep["audit"]["violations"],
                    "failed_steps": rep["steps"]["failed"],
                    "hazards": hazards(rep),
                }
            )
            if not as_json:
                typer.echo(
                    f"seed {seed}: FAIL ({len(rep['audit']['violations'])} violations, "
                    f"{len(rep['steps']['failed'])} failed steps); replay: vsva demo --runtime sim "
                    f"--seed {seed} --vms {vms} --policy {policy} --kernel {kernel} --workload {workload} "
                    f"--iterations {iterations}"
                )
                for line in hazards(rep):
                    typer.echo(f"  found: {line}")
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "seeds": seeds,
                    "first": first,
                    "policy": policy,
                    "kernel": kernel,
                    "workload": workload,
                    "failing": failing,
                    "hazards": sorted({h for f in failing for h in f["hazards"]}),
                },
                indent=2,
            )
        )
    else:
        typer.echo(f"{seeds - len(failing)}/{seeds} seeds passed (policy {policy}, kernel {kernel})")
        found = sorted({h for f in failing for h in f["hazards"]})
        typer.echo("hazards found:" if found else "no hazard found")
        for line in found:
            typer.echo(f"  {line}")
    raise typer.Exit(1 if failing else 0)


# ---- live topologies: up / ps / kill / audit / down, and scripted fault runs -----------------


def _fail(code: int, message: str, quiet: bool = False) -> None:
    """One line on stderr (unless `quiet`) and the exit code."""
    if not quiet:
        typer.echo(f"vsva: {message}", err=True)
    raise typer.Exit(code)


def _state_dir_option(value: str | None) -> str | None:
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
    callback=_state_dir_option,
    help="Where the state file lives (default $XDG_RUNTIME_DIR/vsva or /tmp/vsva-UID).",
)


def _state_file(state_dir: str | None) -> str:
    from vsva.ops.supervisor import state_path

    try:
        return state_path(state_dir)
    except OSError as exc:  # the default state directory cannot be made
        _fail(EXIT_USAGE, f"state directory: {exc}")
        raise


class CorruptState(ValueError):
    """A state file that is not what a supervisor writes."""


def _parse_state(path: str) -> dict:
    """The state file's content; FileNotFoundError if none, CorruptState if unreadable."""
    try:
        with open(path, "rb") as f:
            state = json.loads(f.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptState(f"{exc}".splitlines()[0]) from None
    if (
        not isinstance(state, dict)
        or not isinstance(state.get("pid"), int)
        or not all(isinstance(state.get(k), str) for k in ("run_dir", "ctl"))
    ):
        raise CorruptState("not a supervisor's state (pid, run_dir, ctl)")
    return state


def _read_state(state_dir: str | None) -> dict:
    path = _state_file(state_dir)
    try:
        return _parse_state(path)
    except FileNotFoundError:
        _fail(EXIT_NO_TOPOLOGY, f"no topology is running (no state file {path}); start one with `vsva up`")
    except CorruptState as exc:
        _fail(EXIT_NO_TOPOLOGY, f"corrupt state file {path} ({exc}); `vsva down` removes it")
    raise AssertionError("unreachable")


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _supervisor_alive(state: dict) -> bool:
    """The state's supervisor still runs (its pid and start time, so a reused pid is not it)."""
    from vsva.ops.runfiles import owner_tag

    if not _pid_alive(state["pid"]):
        return False
    return state.get("owner") in (None, owner_tag(state["pid"]))


def _check_supervisor(state: dict, quiet: bool = False) -> None:
    """Answer at once when there is nobody to ask: a lost host's record, a dead supervisor."""
    if state.get("host_lost"):
        _fail(EXIT_HOST_LOST, _host_lost_line(state), quiet)
    if not _supervisor_alive(state):
        _fail(
            EXIT_NO_TOPOLOGY,
            f"the supervisor (pid {state['pid']}) is not running (it died without "
            "cleaning up); `vsva down` removes what it left",
            quiet,
        )


def _ctl(state: dict, op: str, timeout: float = 20.0, quiet: bool = False, **body) -> dict:
    """One request to the supervisor's control socket; exits with a message on no answer, and
    within a fraction of a second when the supervisor is (or becomes) dead."""
    import time

    import msgpack
    import zmq

    _check_supervisor(state, quiet)
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(state["ctl"])
        sock.send(msgpack.packb({"op": op, **body}))
        end = time.monotonic() + timeout
        while not sock.poll(200, zmq.POLLIN):
            _check_supervisor(state, quiet)
            if time.monotonic() >= end:
                _fail(
                    EXIT_NO_TOPOLOGY,
                    f"the supervisor (pid {state['pid']}) did not answer {op!r} within {timeout:.0f} s",
                    quiet,
                )
        return msgpack.unpackb(sock.recv(), raw=False)
    finally:
        sock.close(0)


def _load_run(topology: str | None):
    from vsva.ops.topology_file import TopologyError, default_run, load

    try:
        return load(topology) if topology else default_run()
    except TopologyError as exc:
        typer.echo(f"vsva: {exc}", err=True)
        raise typer.Exit(2) from None


def _ps_table(status: dict):
    from rich.table import Table

    table = Table(title=f"vsva: {status.get('run_dir')}")
    for col in ("actor", "kind", "pid", "state", "uptime", "restarts"):
        table.add_column(col)
    for p in status["processes"]:
        up = "-" if p.get("uptime_s") is None else f"{p['uptime_s']:.1f} s"
        style = {"running": "green", "unresponsive": "yellow"}.get(p["state"], "red")
        table.add_row(
            p["name"], p["kind"], str(p["pid"]), f"[{style}]{p['state']}[/{style}]", up, str(p["restarts"])
        )
    vms = ", ".join(
        f"vm{vm} {v['state']}"
        + (
            ""
            if not v["workload"]
            else f" (workload {'ok' if v['workload']['ok'] else 'ret ' + str(v['workload']['ret'])})"
        )
        for vm, v in status.get("vms", {}).items()
    )
    table.caption = vms + ("  HOST LOST" if status.get("host_lost") else "")
    return table


@app.command()
def up(
    topology: str | None = typer.Argument(
        None, help="Topology TOML file (default: the two-VM demo topology)."
    ),
    detach: bool = typer.Option(False, "--detach", "-d", help="Start in the background and return."),
    state_dir: str | None = STATE_DIR,
    ready_timeout: float = typer.Option(
        30.0, "--ready-timeout", min=0.01, max=3600, help="Seconds to wait for the topology to start."
    ),
    trace_out: str | None = typer.Option(
        None,
        "--trace-out",
        callback=_writable_dir,
        help="When the topology stops (down, a lost host, even a killed "
        "supervisor: the next vsva command), write its trace files here.",
    ),
) -> None:
    """Start a topology and keep it running: a live status table, or --detach.

    One topology per state directory (a lock). In the foreground, Ctrl-C, SIGTERM and SIGHUP
    (the terminal closed) stop it; detached, it runs until `vsva down`."""
    _load_run(topology)  # validate here: errors go to this terminal
    path = _state_file(state_dir)
    lock = _take_lock(path)
    _clear_old_state(path)
    log_path = os.path.join(os.path.dirname(path), "supervisor.log")
    from rich.live import Live
    from rich.text import Text

    _interrupt_on_signals()
    proc = _spawn_supervisor(path, topology, trace_out, log_path, lock)
    try:
        state = _await_state(proc, path, ready_timeout, log_path)
        if detach:
            typer.echo(
                f"vsva: {len(state['actors'])} actors running, supervisor pid {proc.pid}, run dir "
                f"{state['run_dir']}; `vsva ps`, `vsva down`"
            )
            return
        with Live(Text("starting ..."), refresh_per_second=4) as live:
            while proc.poll() is None:
                try:
                    live.update(_ps_table(_ctl(state, "ps", timeout=5.0, quiet=True)))
                except typer.Exit:
                    pass
                _wait_exit(proc.pid, 0.5)
    except KeyboardInterrupt:
        typer.echo("vsva: stopping ...", err=True)
        _stop_supervisor(proc, path)
        raise
    if proc.returncode == EXIT_HOST_LOST:
        _fail(EXIT_HOST_LOST, _host_lost_line(_parse_state(path)))
    if proc.returncode != 0:
        _fail(EXIT_FAIL, f"the supervisor exited with {proc.returncode} (log: {log_path})")


def _take_lock(state_path: str) -> int:
    """The state directory's lock (flock on `lock`, exclusive): held by the supervisor for its
    whole life, so a second `vsva up` on the same directory is refused, never invisible."""
    import fcntl

    fd = os.open(
        os.path.join(os.path.dirname(state_path), "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
    )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        try:
            who = f" (supervisor pid {_parse_state(state_path)['pid']})"
        except (OSError, CorruptState):
            who = ""
        _fail(
            EXIT_FAIL,
            f"a topology is already running (or starting) in {os.path.dirname(state_path)}{who}; "
            "`vsva down` first, or another --state-dir",
        )
    return fd


def _clear_old_state(path: str) -> None:
    """With the lock held, a state file left is a dead supervisor's (or a lost host's record)."""
    try:
        old = _parse_state(path)
    except FileNotFoundError:
        return
    except CorruptState as exc:
        typer.echo(f"vsva up: removed a corrupt state file {path} ({exc})", err=True)
        os.unlink(path)
        return
    if old.get("host_lost"):
        typer.echo(f"vsva up: replacing the record of the earlier run: {_host_lost_line(old)}", err=True)
    _cleanup_stale(old, path)


def _spawn_supervisor(path: str, topology: str | None, trace_out: str | None, log_path: str, lock: int):
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cmd = [sys.executable, "-m", "vsva.ops.supervisor", "--state-file", path]
    if trace_out:
        cmd += ["--trace-out", os.path.abspath(trace_out)]
    if topology:
        cmd.append(os.path.abspath(topology))
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
            pass_fds=(lock,),
        )


def _await_state(proc, path: str, ready_timeout: float, log_path: str) -> dict:
    """Wait (bounded) for the supervisor's state file. On a timeout the supervisor is stopped
    (SIGTERM, then SIGKILL) and whatever it left is swept."""
    import time

    end = time.monotonic() + ready_timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            with open(log_path, errors="replace") as f:
                tail = f.read().splitlines()[-15:]
            typer.echo(f"vsva up: the supervisor exited with {proc.returncode}\n" + "\n".join(tail), err=True)
            raise typer.Exit(EXIT_FAIL)
        try:
            state = _parse_state(path)
            if state["pid"] == proc.pid:
                return state
        except (FileNotFoundError, CorruptState):
            pass
        time.sleep(0.02)
    left = _stop_supervisor(proc, path)
    _fail(
        EXIT_FAIL,
        f"not ready within {ready_timeout:g} s: supervisor pid {proc.pid} stopped"
        + (f", its leftovers removed ({len(left)})" if left else "")
        + f" (log: {log_path})",
    )
    raise AssertionError("unreachable")


def _stop_supervisor(proc, path: str) -> list[str]:
    """Stop our supervisor, starting or running (SIGTERM: it unwinds its launch or shuts the
    topology down; SIGKILL if it does not exit) and sweep what it left; returns what the
    sweep removed."""
    import signal
    import subprocess

    from vsva.ops.runfiles import sweep

    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    try:
        if _parse_state(path)["pid"] == proc.pid:
            os.unlink(path)
    except (FileNotFoundError, CorruptState):
        pass
    return sweep()


def _host_lost_line(state: dict) -> str:
    import time

    lost = state["host_lost"]
    return (
        f"the host was lost at {time.strftime('%H:%M:%S', time.localtime(lost['at']))} "
        f"({lost['why']}, {lost['after_s']:.1f} s after the start); every VM is gone; "
        "`vsva down` clears this record"
    )


def _cleanup_stale(state: dict, path: str) -> list[str]:
    """A supervisor that died without cleaning up: its children died with it (PDEATHSIG);
    remove its shared memory and run directory (its trace exported first, if it was asked
    for), then the state file."""
    from vsva.ops.runfiles import PREFIX, SHM_DIR, remove_run_dir

    removed = []
    shm = state.get("shm")
    if (
        isinstance(shm, str)
        and os.path.dirname(shm) == SHM_DIR
        and os.path.basename(shm).startswith(PREFIX)
        and os.path.exists(shm)
    ):
        os.unlink(shm)
        removed.append(shm)
    run_dir = state.get("run_dir")
    if run_dir and os.path.isdir(run_dir) and os.path.basename(run_dir).startswith(PREFIX):
        remove_run_dir(run_dir)
        removed.append(run_dir)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return removed


@app.command()
def ps(
    as_json: bool = typer.Option(False, "--json", help="A JSON list of {name, pid, state, ...}."),
    state_dir: str | None = STATE_DIR,
) -> None:
    """List every actor of the running topology with its PID, state and uptime."""
    state = _read_state(state_dir)
    if as_json and state.get("host_lost"):
        typer.echo(json.dumps({"host_lost": state["host_lost"], "processes": []}, indent=1))
        raise typer.Exit(EXIT_HOST_LOST)
    status = _ctl(state, "ps")
    if as_json:
        typer.echo(json.dumps(status["processes"], indent=1))
        return
    from rich.console import Console

    Console().print(_ps_table(status))


@app.command()
def kill(
    actor: str = typer.Argument(..., help="Actor name, e.g. vm1.vmm, kvm, host."),
    state_dir: str | None = STATE_DIR,
) -> None:
    """SIGKILL one actor; the supervisor then recovers as that actor's contract says."""
    reply = _ctl(_read_state(state_dir), "kill", name=actor)
    if not reply.get("ok"):
        typer.echo(f"vsva kill: {reply.get('error')}", err=True)
        raise typer.Exit(2)
    typer.echo(f"killed {reply['name']} (pid {reply['pid']})")


@app.command()
def audit(
    as_json: bool = typer.Option(False, "--json", help="One JSON object {ok, violations, incomplete}."),
    state_dir: str | None = STATE_DIR,
) -> None:
    """Snapshot every live actor and run the full audit (I1, I3-I7) on the live topology."""
    reply = _ctl(_read_state(state_dir), "audit", timeout=30.0)
    result = reply.get(
        "audit", {"ok": False, "violations": [{"invariant": "run", "what": reply.get("error")}]}
    )
    if as_json:
        typer.echo(json.dumps(result, indent=1))
    else:
        silent = result.get("incomplete", [])
        typer.echo(
            "audit: clean"
            if result["ok"]
            else f"audit: {len(result['violations'])} violation(s)" + (", incomplete" if silent else "")
        )
        for line in silent:
            typer.echo(f"  incomplete: {line}")
        for v in result["violations"]:
            typer.echo(
                f"  {v['invariant']}: {v['what']} (actors {v.get('actors')}, vm {v.get('vm')}, "
                f"pasid {v.get('pasid')})"
            )
    raise typer.Exit(0 if result["ok"] else 1)


@app.command()
def down(
    state_dir: str | None = STATE_DIR,
    timeout: float = typer.Option(
        30.0, "--timeout", min=0, max=3600, help="Seconds to wait for the supervisor to finish."
    ),
) -> None:
    """Stop the running topology (VMs stopped through F8, then every process) and clean up;
    says what it removed, leftovers of dead runs included."""
    import signal

    path = _state_file(state_dir)
    swept = f"; removed leftovers of dead runs: {', '.join(SWEPT)}" if SWEPT else ""
    try:
        state = _parse_state(path)
    except CorruptState as exc:
        os.unlink(path)
        typer.echo(f"vsva: removed the corrupt state file {path} ({exc}){swept}")
        return
    except FileNotFoundError:
        if not SWEPT:
            _fail(EXIT_NO_TOPOLOGY, f"no topology is running (no state file {path})")
        typer.echo(f"vsva: no topology was running{swept}")
        return
    pid = state["pid"]
    if state.get("host_lost"):
        what = f"cleared the record of the lost topology ({state['host_lost']['why']})"
    elif _supervisor_alive(state):
        try:
            _ctl(state, "down", timeout=5.0)
        except typer.Exit:
            os.kill(pid, signal.SIGTERM)
        if not _wait_exit(pid, timeout):
            os.kill(pid, signal.SIGKILL)
            _wait_exit(pid, 2.0)
        what = f"stopped (supervisor pid {pid})"
    else:
        what = f"the supervisor (pid {pid}) was dead"
    from vsva.ops.runfiles import sweep

    left = _cleanup_stale(state, path) + [p for p in sweep() if p not in SWEPT]
    typer.echo(f"vsva: {what}" + (f"; removed leftovers {left}" if left else "") + swept)


@app.command()
def run(
    scenario: str = typer.Argument(..., help="Scenario TOML: a topology plus [[faults]]."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
    trace_out: str | None = typer.Option(
        None,
        "--trace-out",
        callback=_writable_dir,
        help="Write the run's trace files here when it ends, however it ends.",
    ),
    kernel: Kernel | None = typer.Option(
        None, "--kernel", help="Override the file's run.kernel: v11 (the seed) or v5.9 (merged)."
    ),
) -> None:
    """Run a scenario to completion: workloads, scheduled kills, recovery, audit; print a report."""
    from vsva.ops.scenario import render, run_scenario

    run_file = _load_run(scenario)
    for spec in run_file.topology.actors if kernel is not None else ():
        if spec.kind == "host":
            spec.config["kernel"] = kernel
    _interrupt_on_signals()
    rep = run_scenario(run_file, trace_out=trace_out)
    if as_json:
        typer.echo(json.dumps(rep, indent=1, default=str))
    else:
        render(rep, typer.echo)
    raise typer.Exit(0 if rep["ok"] else 1)


def _wait_exit(pid: int, timeout: float) -> bool:
    """Wait (bounded) for any process to exit, through a pidfd: True once it is gone."""
    import select

    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def main() -> int:
    """The console script: every error a readable line and an exit code (EXIT_CODES)."""
    command = typer.main.get_command(app)
    try:
        code = command.main(args=sys.argv[1:], prog_name="vsva", standalone_mode=False) or 0
    except NoArgsIsHelpError as exc:
        typer.echo(exc.format_message())
        return 0
    except ClickException as exc:
        ctx = getattr(exc, "ctx", None)
        message = " ".join(exc.format_message().split())
        typer.echo(f"{ctx.command_path if ctx else 'vsva'}: {message}", err=True)
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        code = EXIT_INTERRUPTED
    if code == EXIT_INTERRUPTED:
        typer.echo("vsva: interrupted; the run was taken down", err=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
