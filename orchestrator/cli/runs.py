"""Commands that run a topology to completion in this process: `vsva demo` (every flow, a
timeline) and `vsva run` (a scenario with its faults, a report).

SIGINT, SIGTERM and SIGHUP stop either the way they stop `vsva up` (StopSignals): the wait
loops of the run see the request, the run's processes and files are taken down, one line
names the signal and the exit code is 128 + its number. Once the actors are up, either says
so on stderr, as `vsva up` does."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, NoReturn

import typer

from vsva.actors.policy import Policy
from vsva.actors.semantics import Kernel
from vsva.cli.exits import EXIT_USAGE, StopSignals, fail
from vsva.cli.options import ITERATIONS, KERNEL, SEEDS, Workload, load_run, number_option, writable_dir
from vsva.ops.config import RUN, VM, Runtime
from vsva.runtime.endpoints import Transport

if TYPE_CHECKING:
    from vsva.ops.launcher import Launcher


def say_running(launcher: Launcher) -> None:
    """The line a user (or a script that acts on the running topology) waits for."""
    typer.echo(f"vsva: {len(launcher.topology.actors)} actors running, run dir {launcher.run_dir}", err=True)


def finish(rep: dict[str, Any]) -> NoReturn:
    """End a run whose report is printed: a trace that could not be written is one line and
    exit 2 (the unwritable --trace-out the exit codes name, found only as the run ended: a
    script learns its input was bad, the report above says the verdict), else the verdict's."""
    if rep.get("trace_error"):
        fail(EXIT_USAGE, rep["trace_error"])
    raise typer.Exit(0 if rep["ok"] else 1)


def demo(
    vms: int = number_option(
        2,
        "--vms",
        int,
        1,
        256,
        "How many VMs (guest + vmm each); refused when this machine cannot hold them (the limit is named).",
    ),
    seed: int = number_option(
        RUN.seed, "--seed", int, *SEEDS, "The run's seed (workload, frame placement, interleaving)."
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
        callback=writable_dir,
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
    iterations: int = ITERATIONS,
    kernel: Kernel = KERNEL,
) -> None:
    """Run every flow end to end on one host and VMS VMs, check the DMA data, audit, print a timeline."""
    from vsva.ops.capacity import CapacityError
    from vsva.ops.demo import demo as run_demo
    from vsva.ops.demo import render
    from vsva.ops.launcher import LaunchStopped

    stop = StopSignals()
    try:
        session, rep = run_demo(
            vms, seed, runtime, policy, transport, workload, iterations, trace_out, kernel, stop, say_running
        )
    except CapacityError as exc:
        fail(EXIT_USAGE, f"--vms {vms}: {exc}")
    except LaunchStopped:
        stop.exit()
    if stop.check():
        stop.exit()
    if as_json:
        typer.echo(json.dumps(rep, indent=2))
    else:
        render(session, rep, typer.echo)
    finish(rep)


def run(
    scenario: str = typer.Argument(..., help="Scenario TOML: a topology plus [[faults]]."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
    trace_out: str | None = typer.Option(
        None,
        "--trace-out",
        callback=writable_dir,
        help="Write the run's trace files here when it ends, however it ends.",
    ),
    kernel: Kernel | None = typer.Option(
        None, "--kernel", help="Override the file's run.kernel: v11 (the seed) or v5.9 (merged)."
    ),
) -> None:
    """Run a scenario to completion: workloads, scheduled kills, recovery, audit; print a report."""
    from vsva.ops.launcher import LaunchStopped
    from vsva.ops.scenario import render, run_scenario

    run_file = load_run(scenario, timed=True)
    for spec in run_file.topology.actors if kernel is not None else ():
        if spec.kind == "host":
            spec.config["kernel"] = kernel
    stop = StopSignals()
    try:
        rep = run_scenario(run_file, trace_out=trace_out, stop=stop, on_ready=say_running)
    except LaunchStopped:
        stop.exit()
    if stop.check():
        stop.exit()
    if as_json:
        typer.echo(json.dumps(rep, indent=1, default=str))
    else:
        render(rep, typer.echo)
    finish(rep)
