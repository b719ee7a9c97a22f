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


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Intel VT-d virtual SVA as a multi-process actor system: run, measure and break it."""


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
) -> None:
    """Run every flow end to end on one host and VMS VMs, check the DMA data, audit, print a timeline."""
    from vsva.analysis.export import write_all
    from vsva.ops.capacity import CapacityError
    from vsva.ops.demo import demo as run_demo
    from vsva.ops.demo import render

    try:
        session, rep = run_demo(vms, seed, runtime, policy, transport, workload, iterations)
    except CapacityError as exc:
        _fail(EXIT_USAGE, f"--vms {vms}: {exc}")
    if trace_out:
        rep["trace_files"] = write_all(session["trace"], trace_out)
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
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Seeded interleavings in the deterministic runtime; prints the seed of every failing run.

    `vsva explore --policy naive --workload churn` finds the free-before-unbind hazard;
    the same seeds pass under ordered and reclaim."""
    from vsva.ops.demo import report, run_session
    from vsva.ops.topology import default_topology

    failing = []
    for seed in range(first, first + seeds):
        topology = default_topology(vms, seed=seed, policy=policy, workload=workload, iterations=iterations)
        rep = report(run_session(topology, "sim"), topology, "sim")
        if not rep["ok"]:
            failing.append(
                {
                    "seed": seed,
                    "violations": rep["audit"]["violations"],
                    "failed_steps": rep["steps"]["failed"],
                }
            )
            if not as_json:
                typer.echo(
                    f"seed {seed}: FAIL ({len(rep['audit']['violations'])} violations, "
                    f"{len(rep['steps']['failed'])} failed steps); replay: vsva demo --runtime sim "
                    f"--seed {seed} --vms {vms} --policy {policy} --workload {workload} "
                    f"--iterations {iterations}"
                )
    if as_json:
        typer.echo(
            json.dumps(
                {"seeds": seeds, "first": first, "policy": policy, "workload": workload, "failing": failing},
                indent=2,
            )
        )
    else:
        typer.echo(f"{seeds - len(failing)}/{seeds} seeds passed")
    raise typer.Exit(1 if failing else 0)


# ---- live topologies: up / ps / kill / audit / down, and scripted fault runs -----------------


def _fail(code: int, message: str) -> None:
    """One line on stderr and the exit code."""
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


def _ctl(state: dict, op: str, timeout: float = 20.0, **body) -> dict:
    """One request to the supervisor's control socket; exits with a message on no answer."""
    import msgpack
    import zmq

    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(state["ctl"])
        sock.send(msgpack.packb({"op": op, **body}))
        if not sock.poll(int(timeout * 1000), zmq.POLLIN):
            alive = _pid_alive(state["pid"])
            typer.echo(
                f"vsva: the supervisor (pid {state['pid']}) did not answer {op!r} within "
                f"{timeout:.0f} s" + ("" if alive else " (it is not running: `vsva down` cleans up)"),
                err=True,
            )
            raise typer.Exit(3)
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
) -> None:
    """Start a topology and keep it running: live status table, or --detach."""
    import subprocess
    import time

    _load_run(topology)  # validate here: errors go to this terminal
    path = _state_file(state_dir)
    if os.path.exists(path):
        try:
            old = _parse_state(path)
        except CorruptState as exc:
            typer.echo(f"vsva up: removed a corrupt state file {path} ({exc})", err=True)
            old = {"pid": -1}
        if _pid_alive(old["pid"]):
            typer.echo(
                f"vsva: a topology is already running (supervisor pid {old['pid']}, {old['run_dir']});"
                " `vsva down` first",
                err=True,
            )
            raise typer.Exit(1)
        _cleanup_stale(old, path)
    log_path = os.path.join(os.path.dirname(path), "supervisor.log")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cmd = [sys.executable, "-m", "vsva.ops.supervisor", "--state-file", path]
    if topology:
        cmd.append(os.path.abspath(topology))
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    end = time.monotonic() + ready_timeout
    state = None
    while time.monotonic() < end:
        if proc.poll() is not None:
            tail = open(log_path, errors="replace").read().splitlines()[-15:]
            typer.echo(f"vsva up: the supervisor exited with {proc.returncode}\n" + "\n".join(tail), err=True)
            raise typer.Exit(1)
        if os.path.exists(path):
            with open(path) as f:
                state = json.load(f)
            if state.get("pid") == proc.pid:
                break
        time.sleep(0.02)
    else:
        proc.kill()
        typer.echo(f"vsva up: not ready within {ready_timeout:.0f} s (log: {log_path})", err=True)
        raise typer.Exit(1)
    if detach:
        typer.echo(
            f"vsva: {len(state['actors'])} actors running, supervisor pid {proc.pid}, run dir "
            f"{state['run_dir']}; `vsva ps`, `vsva down`"
        )
        return
    import signal as _signal

    from rich.live import Live

    def _interrupt(signum, frame):
        raise KeyboardInterrupt

    _signal.signal(_signal.SIGTERM, _interrupt)
    try:
        with Live(_ps_table(_ctl(state, "ps")), refresh_per_second=4) as live:
            while proc.poll() is None:
                time.sleep(0.5)
                if proc.poll() is None:
                    try:
                        live.update(_ps_table(_ctl(state, "ps", timeout=5.0)))
                    except typer.Exit:
                        pass
    except KeyboardInterrupt:
        typer.echo("vsva: stopping ...")
        _ctl(state, "down")
        proc.wait(60)
    if proc.returncode not in (0, None):
        raise typer.Exit(1)


def _cleanup_stale(state: dict, path: str) -> list[str]:
    """A supervisor that died without cleaning up: its children died with it (PDEATHSIG);
    remove its shared memory, socket files and run directory, then the state file."""
    import shutil

    removed = []
    for p in (state.get("shm"),):
        if p and os.path.exists(p):
            os.unlink(p)
            removed.append(p)
    run_dir = state.get("run_dir")
    if run_dir and os.path.isdir(run_dir) and os.path.basename(run_dir).startswith("vsva-"):
        shutil.rmtree(run_dir, ignore_errors=True)
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
    status = _ctl(_read_state(state_dir), "ps")
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
    as_json: bool = typer.Option(False, "--json", help="One JSON object {ok, violations}."),
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
        typer.echo("audit: clean" if result["ok"] else f"audit: {len(result['violations'])} violation(s)")
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
    """Stop the running topology (VMs stopped through F8, then every process) and clean up."""
    import signal

    path = _state_file(state_dir)
    try:
        _parse_state(path)
    except CorruptState as exc:
        os.unlink(path)
        typer.echo(f"vsva: removed the corrupt state file {path} ({exc})")
        return
    except FileNotFoundError:
        pass
    state = _read_state(state_dir)
    pid = state["pid"]
    if _pid_alive(pid):
        try:
            _ctl(state, "down", timeout=5.0)
        except typer.Exit:
            os.kill(pid, signal.SIGTERM)
        if not _wait_exit(pid, timeout):
            os.kill(pid, signal.SIGKILL)
            _wait_exit(pid, 2.0)
    left = _cleanup_stale(state, path)
    typer.echo(f"vsva: stopped (supervisor pid {pid})" + (f"; removed leftovers {left}" if left else ""))


@app.command()
def run(
    scenario: str = typer.Argument(..., help="Scenario TOML: a topology plus [[faults]]."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
) -> None:
    """Run a scenario to completion: workloads, scheduled kills, recovery, audit; print a report."""
    from vsva.ops.scenario import render, run_scenario

    rep = run_scenario(_load_run(scenario))
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
        return command.main(args=sys.argv[1:], prog_name="vsva", standalone_mode=False) or 0
    except NoArgsIsHelpError as exc:
        typer.echo(exc.format_message())
        return 0
    except ClickException as exc:
        ctx = getattr(exc, "ctx", None)
        message = " ".join(exc.format_message().split())
        typer.echo(f"{ctx.command_path if ctx else 'vsva'}: {message}", err=True)
        return exc.exit_code
    except typer.Abort:
        typer.echo("vsva: interrupted", err=True)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
