"""The `vsva` command line: the typer app, assembled from the command modules beside it.

Errors are one line on stderr (`vsva COMMAND: what went wrong`) and an exit code from
EXIT_CODES (vsva.cli.exits); nothing is started or changed by a refused command.
"""

from __future__ import annotations

import sys

import typer

try:  # recent typer releases carry their own copy of click; its exceptions are the ones raised
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # pragma: no cover - older typer on the real click
    from click.exceptions import ClickException, NoArgsIsHelpError  # type: ignore[assignment]

import vsva
from vsva.cli import explore, lifecycle, live, measure, runs
from vsva.cli.exits import EXIT_CODES, EXIT_INTERRUPTED
from vsva.cli.state import SWEPT

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

for command in (
    runs.demo,
    measure.bench,
    explore.explore,
    lifecycle.up,
    live.ps,
    live.kill,
    live.audit,
    lifecycle.down,
    runs.run,
):
    app.command()(command)


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
    from vsva.ops.runfiles import sweep

    SWEPT.extend(sweep())


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
    except (typer.Abort, KeyboardInterrupt):  # a Ctrl-C before a command took the signals over
        typer.echo("vsva: interrupted", err=True)
        return EXIT_INTERRUPTED
    return code


if __name__ == "__main__":
    sys.exit(main())
