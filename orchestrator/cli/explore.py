"""`vsva explore`: many seeded interleavings in the deterministic runtime, and the hazards
the failing ones found."""

from __future__ import annotations

import json

import typer

from vsva.actors.policy import Policy
from vsva.actors.semantics import Kernel
from vsva.cli.options import ITERATIONS, KERNEL, SEEDS, Workload, number_option
from vsva.ops.config import RUN, VM


def explore(
    seeds: int = number_option(50, "--seeds", int, 1, 1_000_000, "How many seeds to try."),
    first: int = number_option(1, "--first", int, *SEEDS, "The first seed."),
    vms: int = number_option(2, "--vms", int, 1, 8, "How many VMs."),
    policy: Policy = typer.Option(RUN.policy, "--policy", help="Cleanup policy."),
    workload: Workload = typer.Option(
        VM.workload, "--workload", help="Guest workload; 'churn' frees bound PASIDs over and over."
    ),
    iterations: int = ITERATIONS,
    kernel: Kernel = KERNEL,
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
