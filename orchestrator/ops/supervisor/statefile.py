"""Where a live topology is recorded: the state file (`vsva ps/kill/audit/down` read it) and
the control endpoint in the run directory."""

from __future__ import annotations

import json
import os
from typing import Any


def default_state_dir() -> str:
    """Where the state file lives: $VSVA_STATE_DIR, else $XDG_RUNTIME_DIR/vsva, else
    /tmp/vsva-<uid> (not created here: see state_dir)."""
    d = os.environ.get("VSVA_STATE_DIR")
    if not d:
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        d = os.path.join(xdg, "vsva") if xdg else f"/tmp/vsva-{os.getuid()}"
    return d


def state_dir() -> str:
    """default_state_dir, created 0700."""
    d = default_state_dir()
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


def state_path(directory: str | None = None) -> str:
    return os.path.join(directory or state_dir(), "current.json")


def ctl_endpoint(run_dir: str) -> str:
    return f"ipc://{os.path.join(run_dir, 'ctl.sock')}"


def write_state(path: str, state: dict[str, Any]) -> None:
    """Replace the state file at once (a reader sees the old content or the new, never half)."""
    tmp = path + f".{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(state, f, indent=1)
    os.replace(tmp, path)
