"""The `vsva` command line."""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Intel VT-d virtual SVA as a multi-process actor system: run, measure and break it.")

RUNTIMES = ("processes", "sim")


def _check_policy(policy: str) -> str:
    from orchestrator.topology import POLICIES

    if policy not in POLICIES:
        raise typer.BadParameter(f"unknown policy {policy!r}; valid: {', '.join(POLICIES)}")
    return policy


def _check_runtime(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise typer.BadParameter(f"unknown runtime {runtime!r}; valid: {', '.join(RUNTIMES)}")
    return runtime


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
) -> None:
    """Run every flow end to end on one host and VMS VMs, check the DMA data, audit, print a timeline."""
    from orchestrator.demo import demo as run_demo, render
    from orchestrator.export import write_all

    session, rep = run_demo(vms, seed, runtime, policy)
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
    from orchestrator.bench import run_bench

    sizes = [int(b) for b in batches.split(",") if b.strip()]
    result = run_bench(sizes, as_json)
    if as_json:
        typer.echo(json.dumps(result, indent=2))


@app.command()
def explore(
    seeds: int = typer.Option(50, "--seeds", min=1, help="How many seeds to try."),
    first: int = typer.Option(1, "--first", help="The first seed."),
    vms: int = typer.Option(2, "--vms", min=1, max=8),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Seeded interleavings in the deterministic runtime; prints the seed of every failing run."""
    from orchestrator.demo import report, run_session
    from orchestrator.topology import default_topology

    failing = []
    for seed in range(first, first + seeds):
        topology = default_topology(vms, seed=seed)
        rep = report(run_session(topology, "sim"), topology, "sim")
        if not rep["ok"]:
            failing.append({"seed": seed, "violations": rep["audit"]["violations"],
                            "failed_steps": rep["steps"]["failed"]})
            if not as_json:
                typer.echo(f"seed {seed}: FAIL ({len(rep['audit']['violations'])} violations, "
                           f"{len(rep['steps']['failed'])} failed steps); replay: vsva demo --runtime sim "
                           f"--seed {seed} --vms {vms}")
    if as_json:
        typer.echo(json.dumps({"seeds": seeds, "first": first, "failing": failing}, indent=2))
    else:
        typer.echo(f"{seeds - len(failing)}/{seeds} seeds passed")
    raise typer.Exit(1 if failing else 0)


def main() -> None:
    app(prog_name="vsva")


if __name__ == "__main__":
    sys.exit(main())
