"""The `vsva` command line."""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Intel VT-d virtual SVA as a multi-process actor system: run, measure and break it.")

RUNTIMES = ("processes", "sim")


def _check_workload(workload: str) -> str:
    from vsva.actors.guest import WORKLOADS

    if workload not in WORKLOADS:
        raise typer.BadParameter(f"unknown workload {workload!r}; valid: {', '.join(sorted(WORKLOADS))}")
    return workload


def _check_policy(policy: str) -> str:
    from vsva.ops.topology import POLICIES

    if policy not in POLICIES:
        raise typer.BadParameter(f"unknown policy {policy!r}; valid: {', '.join(POLICIES)}")
    return policy


def _check_runtime(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise typer.BadParameter(f"unknown runtime {runtime!r}; valid: {', '.join(RUNTIMES)}")
    return runtime


def _check_transport(transport: str) -> str:
    if transport not in ("ipc", "tcp"):
        raise typer.BadParameter(f"unknown transport {transport!r}; valid: ipc, tcp")
    return transport


@app.command()
def demo(
    vms: int = typer.Option(2, "--vms", min=1, max=32, help="How many VMs (guest + vmm each)."),
    seed: int = typer.Option(1, "--seed", help="The run's seed (workload, frame placement, interleaving)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the timeline."),
    runtime: str = typer.Option("processes", "--runtime", callback=_check_runtime,
                                help="processes: one OS process per actor over ZeroMQ; sim: deterministic, in-process."),
    trace_out: Optional[str] = typer.Option(None, "--trace-out", help="Also write trace.jsonl, "
                                            "trace.perfetto.json and sequence.mmd into this directory."),
    policy: str = typer.Option("reclaim", "--policy", callback=_check_policy,
                               help="Free-before-unbind cleanup policy: naive, ordered or reclaim."),
    transport: str = typer.Option("ipc", "--transport", callback=_check_transport,
                                  help="processes runtime: ipc (sockets in the private run directory) "
                                       "or tcp (127.0.0.1 ports only)."),
    workload: str = typer.Option("demo", "--workload", callback=_check_workload,
                                 help="Guest workload (demo runs every flow; others replay explore's runs)."),
    iterations: int = typer.Option(6, "--iterations", min=1, help="Rounds of looping workloads."),
) -> None:
    """Run every flow end to end on one host and VMS VMs, check the DMA data, audit, print a timeline."""
    from vsva.ops.demo import demo as run_demo, render
    from vsva.analysis.export import write_all

    session, rep = run_demo(vms, seed, runtime, policy, transport, workload, iterations)
    if trace_out:
        rep["trace_files"] = write_all(session["trace"], trace_out)
    if as_json:
        typer.echo(json.dumps(rep, indent=2))
    else:
        render(session, rep, typer.echo)
    raise typer.Exit(0 if rep["ok"] else 1)


@app.command()
def bench(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    batches: str = typer.Option("1,64,1024,65536", "--batches", help="Comma-separated batch sizes."),
) -> None:
    """Throughput of the compiled hot path against the pure-Python twin and bare baselines."""
    from vsva.cli.bench import run_bench

    sizes = [int(b) for b in batches.split(",") if b.strip()]
    result = run_bench(sizes, as_json)
    if as_json:
        typer.echo(json.dumps(result, indent=2))


@app.command()
def explore(
    seeds: int = typer.Option(50, "--seeds", min=1, help="How many seeds to try."),
    first: int = typer.Option(1, "--first", help="The first seed."),
    vms: int = typer.Option(2, "--vms", min=1, max=8),
    policy: str = typer.Option("reclaim", "--policy", callback=_check_policy,
                               help="Cleanup policy: naive, ordered or reclaim."),
    workload: str = typer.Option("demo", "--workload", callback=_check_workload,
                                 help="Guest workload; 'churn' frees bound PASIDs over and over."),
    iterations: int = typer.Option(6, "--iterations", min=1, help="Rounds of looping workloads."),
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
            failing.append({"seed": seed, "violations": rep["audit"]["violations"],
                            "failed_steps": rep["steps"]["failed"]})
            if not as_json:
                typer.echo(f"seed {seed}: FAIL ({len(rep['audit']['violations'])} violations, "
                           f"{len(rep['steps']['failed'])} failed steps); replay: vsva demo --runtime sim "
                           f"--seed {seed} --vms {vms} --policy {policy} --workload {workload} "
                           f"--iterations {iterations}")
    if as_json:
        typer.echo(json.dumps({"seeds": seeds, "first": first, "policy": policy, "workload": workload,
                               "failing": failing}, indent=2))
    else:
        typer.echo(f"{seeds - len(failing)}/{seeds} seeds passed")
    raise typer.Exit(1 if failing else 0)


# ---- live topologies: up / ps / kill / audit / down, and scripted fault runs -----------------

def _state_file(state_dir: Optional[str]) -> str:
    from vsva.ops.supervisor import state_path

    if state_dir:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
    return state_path(state_dir)


def _read_state(state_dir: Optional[str]) -> dict:
    path = _state_file(state_dir)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        typer.echo(f"vsva: no topology is running (no state file {path}); start one with `vsva up`", err=True)
        raise typer.Exit(3)


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
            typer.echo(f"vsva: the supervisor (pid {state['pid']}) did not answer {op!r} within "
                       f"{timeout:.0f} s" + ("" if alive else " (it is not running: `vsva down` cleans up)"),
                       err=True)
            raise typer.Exit(3)
        return msgpack.unpackb(sock.recv(), raw=False)
    finally:
        sock.close(0)


def _load_run(topology: Optional[str]):
    from vsva.ops.topology_file import TopologyError, default_run, load

    try:
        return load(topology) if topology else default_run()
    except TopologyError as exc:
        typer.echo(f"vsva: {exc}", err=True)
        raise typer.Exit(2)


def _ps_table(status: dict):
    from rich.table import Table

    table = Table(title=f"vsva: {status.get('run_dir')}")
    for col in ("actor", "kind", "pid", "state", "uptime", "restarts"):
        table.add_column(col)
    for p in status["processes"]:
        up = "-" if p.get("uptime_s") is None else f"{p['uptime_s']:.1f} s"
        style = {"running": "green", "unresponsive": "yellow"}.get(p["state"], "red")
        table.add_row(p["name"], p["kind"], str(p["pid"]), f"[{style}]{p['state']}[/{style}]", up,
                      str(p["restarts"]))
    vms = ", ".join(f"vm{vm} {v['state']}" + ("" if not v["workload"] else
                                              f" (workload {'ok' if v['workload']['ok'] else 'ret ' + str(v['workload']['ret'])})")
                    for vm, v in status.get("vms", {}).items())
    table.caption = vms + ("  HOST LOST" if status.get("host_lost") else "")
    return table


@app.command()
def up(
    topology: Optional[str] = typer.Argument(None, help="Topology TOML file (default: the two-VM demo topology)."),
    detach: bool = typer.Option(False, "--detach", "-d", help="Start in the background and return."),
    state_dir: Optional[str] = typer.Option(None, "--state-dir", envvar="VSVA_STATE_DIR",
                                            help="Where the state file lives (default $XDG_RUNTIME_DIR/vsva or /tmp/vsva-UID)."),
    ready_timeout: float = typer.Option(30.0, "--ready-timeout", help="Seconds to wait for the topology to start."),
) -> None:
    """Start a topology and keep it running: live status table, or --detach."""
    import subprocess
    import time

    _load_run(topology)  # validate here: errors go to this terminal
    path = _state_file(state_dir)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if _pid_alive(old.get("pid", -1)):
            typer.echo(f"vsva: a topology is already running (supervisor pid {old['pid']}, {old['run_dir']});"
                       " `vsva down` first", err=True)
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
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)
    end = time.monotonic() + ready_timeout
    state = None
    while time.monotonic() < end:
        if proc.poll() is not None:
            tail = open(log_path, errors="replace").read().splitlines()[-15:]
            typer.echo("vsva up: the supervisor exited with %s\n%s" % (proc.returncode, "\n".join(tail)), err=True)
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
        typer.echo(f"vsva: {len(state['actors'])} actors running, supervisor pid {proc.pid}, run dir "
                   f"{state['run_dir']}; `vsva ps`, `vsva down`")
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
    state_dir: Optional[str] = typer.Option(None, "--state-dir", envvar="VSVA_STATE_DIR"),
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
    state_dir: Optional[str] = typer.Option(None, "--state-dir", envvar="VSVA_STATE_DIR"),
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
    state_dir: Optional[str] = typer.Option(None, "--state-dir", envvar="VSVA_STATE_DIR"),
) -> None:
    """Snapshot every live actor and run the full audit (I1, I3-I7) on the live topology."""
    reply = _ctl(_read_state(state_dir), "audit", timeout=30.0)
    result = reply.get("audit", {"ok": False, "violations": [{"invariant": "run", "what": reply.get("error")}]})
    if as_json:
        typer.echo(json.dumps(result, indent=1))
    else:
        typer.echo("audit: clean" if result["ok"] else f"audit: {len(result['violations'])} violation(s)")
        for v in result["violations"]:
            typer.echo(f"  {v['invariant']}: {v['what']} (actors {v.get('actors')}, vm {v.get('vm')}, "
                       f"pasid {v.get('pasid')})")
    raise typer.Exit(0 if result["ok"] else 1)


@app.command()
def down(
    state_dir: Optional[str] = typer.Option(None, "--state-dir", envvar="VSVA_STATE_DIR"),
    timeout: float = typer.Option(30.0, "--timeout", help="Seconds to wait for the supervisor to finish."),
) -> None:
    """Stop the running topology (VMs stopped through F8, then every process) and clean up."""
    import signal

    path = _state_file(state_dir)
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


def main() -> None:
    app(prog_name="vsva")


if __name__ == "__main__":
    sys.exit(main())
