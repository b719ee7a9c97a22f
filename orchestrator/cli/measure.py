"""`vsva bench`: the command and its options; the measurement itself is vsva.cli.bench."""

from __future__ import annotations

import json

import typer


def batch_sizes(value: str) -> list[int]:
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


def bench(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    batches: str = typer.Option(
        "1,64,1024,65536", "--batches", help="Comma-separated batch sizes, each in [1, 65536]."
    ),
) -> None:
    """Throughput of the compiled hot path against the pure-Python twin and bare baselines."""
    from vsva.cli.bench import run_bench

    sizes = batch_sizes(batches)
    result = run_bench(sizes, as_json)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
