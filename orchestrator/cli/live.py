"""Commands that look into a running topology or act on one actor: ps, kill, audit."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import typer

from vsva.cli.client import ctl
from vsva.cli.exits import EXIT_FAIL, EXIT_HOST_LOST, EXIT_USAGE, fail, shown
from vsva.cli.options import STATE_DIR
from vsva.cli.replies import AUDIT, KILLED, PS, REFUSED, checked
from vsva.cli.state import read_state

if TYPE_CHECKING:
    from rich.table import Table


def ps_table(status: dict[str, Any]) -> Table:
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
    failed = [
        f"[red]{p['name']}: {p['recovery_error']}[/red]"
        for p in status["processes"]
        if p.get("recovery_error")
    ]
    table.caption = "\n".join([vms + ("  HOST LOST" if status.get("host_lost") else ""), *failed])
    return table


def ps(
    as_json: bool = typer.Option(False, "--json", help="A JSON list of {name, pid, state, ...}."),
    state_dir: str | None = STATE_DIR,
) -> None:
    """List every actor of the running topology with its PID, state and uptime."""
    state = read_state(state_dir)
    if as_json and state.get("host_lost"):
        typer.echo(json.dumps({"host_lost": state["host_lost"], "processes": []}, indent=1))
        raise typer.Exit(EXIT_HOST_LOST)
    status = checked(state, "ps", ctl(state, "ps"), PS)
    if as_json:
        typer.echo(json.dumps(status["processes"], indent=1))
        return
    from rich.console import Console

    Console().print(ps_table(status))


def kill(
    actor: str = typer.Argument(..., help="Actor name, e.g. vm1.vmm, kvm, host."),
    state_dir: str | None = STATE_DIR,
) -> None:
    """SIGKILL one actor; the supervisor then recovers as that actor's contract says."""
    _check_actor_name(actor)
    state = read_state(state_dir)
    reply = ctl(state, "kill", name=actor)
    reply = checked(state, "kill", reply, KILLED if reply.get("ok") else REFUSED)
    if not reply["ok"]:
        typer.echo(f"vsva kill: {reply['error']}", err=True)
        raise typer.Exit(2)
    typer.echo(f"killed {reply['name']} (pid {reply['pid']})")


def _check_actor_name(name: str) -> None:
    """Refuse at once a name no actor can have (vsva.runtime.endpoints.valid_name): a long
    one would exceed the control socket's message size, and the supervisor, which never sees
    the request, would be taken for one that does not answer."""
    from vsva.runtime.endpoints import valid_name

    if not valid_name(name):
        fail(
            EXIT_USAGE,
            f"kill: {shown(name)} cannot be an actor name (letters, digits, '_', '.', '-'; 64 at most)",
        )


def audit(
    as_json: bool = typer.Option(False, "--json", help="One JSON object {ok, violations, incomplete}."),
    state_dir: str | None = STATE_DIR,
) -> None:
    """Snapshot every live actor and run the full audit (I1, I3-I7) on the live topology."""
    from vsva.ops.control import AUDIT_REPLY_S

    state = read_state(state_dir)
    reply = ctl(state, "audit", timeout=AUDIT_REPLY_S)
    if "audit" not in reply:  # refused (busy) or failed: no verdict, so no violation to show
        why = checked(state, "audit", reply, REFUSED)["error"]
        if as_json:
            typer.echo(json.dumps({"ok": False, "error": why}, indent=1))
        typer.echo(f"vsva: {why}", err=True)  # "audit: busy: ...", "audit failed: ..."
        raise typer.Exit(EXIT_FAIL)
    result = checked(state, "audit", reply, AUDIT)["audit"]
    if as_json:
        typer.echo(json.dumps(result, indent=1))
    else:
        typer.echo(audit_lines(result))
    raise typer.Exit(0 if result["ok"] else EXIT_FAIL)


def audit_lines(result: dict[str, Any]) -> str:
    """The verdict as text: one line, then one per part missing and one per violation."""
    silent = result.get("incomplete", [])
    lines = [
        "audit: clean"
        if result["ok"]
        else f"audit: {len(result['violations'])} violation(s)" + (", incomplete" if silent else "")
    ]
    lines += [f"  incomplete: {line}" for line in silent]
    lines += [
        f"  {v.get('invariant')}: {v.get('what')} (actors {v.get('actors')}, vm {v.get('vm')}, "
        f"pasid {v.get('pasid')})"
        for v in result["violations"]
    ]
    return "\n".join(lines)
