"""`vsva bench`: the command and its options; the measurement itself is vsva.cli.bench."""

from __future__ import annotations

import json

import typer


def batch_sizes(value: str) -> list[int]:
    """--batches: each size an integer in [1, the largest bench batch] (options.in_range)."""
    from vsva.cli.bench import ALL_BATCHES
    from vsva.cli.options import in_range

    size = in_range(int, 1, max(ALL_BATCHES), "a batch size")
    try:
        return [size(item) for item in value.split(",")]
    except typer.BadParameter as exc:
        raise typer.BadParameter(
            f"{exc.message} (comma-separated, e.g. 1,64,1024)", param_hint="'--batches'"
        ) from None


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
