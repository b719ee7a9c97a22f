"""The shapes of the supervisor's answers that the commands read, checked before they are read.

Any local process may answer on a control socket (one squatting on its path, a supervisor of
another version), and the commands index into what they get: a reply of another shape must
be one line and exit 3, like no answer at all, not a KeyError traceback. A shape is a type, a
tuple of shapes (any of them), `[shape]` for a list of such, `Each(shape)` for a map whose
values are, or a dict of keys and shapes (a key ending in "?" may be missing); extra keys are
allowed, so a newer supervisor may say more."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vsva.cli.exits import EXIT_NO_TOPOLOGY, fail

NUMBER = (int, float)
NONE = type(None)


@dataclass(frozen=True)
class Each:
    """A map whose keys are strings and whose values all have `shape`."""

    shape: Any


def fits(value: Any, shape: Any) -> bool:
    """Whether `value` has `shape` (see the module docstring)."""
    if isinstance(shape, tuple):
        return any(fits(value, alternative) for alternative in shape)
    if isinstance(shape, Each):
        return isinstance(value, dict) and all(
            isinstance(k, str) and fits(v, shape.shape) for k, v in value.items()
        )
    if isinstance(shape, list):
        return isinstance(value, list) and all(fits(v, shape[0]) for v in value)
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return False
        for key, inner in shape.items():
            name = key.rstrip("?")
            if name not in value:
                if key.endswith("?"):
                    continue
                return False
            if not fits(value[name], inner):
                return False
        return True
    return isinstance(value, shape)


REFUSED = {"ok": bool, "error": str}
PS = {
    "processes": [
        {
            "name": str,
            "kind": str,
            "pid": int,
            "state": str,
            "restarts": int,
            "uptime_s": (*NUMBER, NONE),
            "recovery_error?": (str, NONE),
        }
    ],
    "run_dir?": str,
    "vms?": Each({"state": str, "workload": (NONE, {"ok": object, "ret": object})}),
}
KILLED = {"ok": bool, "name": str, "pid": int}
AUDIT = {"audit": {"ok": bool, "violations": [dict], "incomplete?": [str]}}


def checked(
    state: dict[str, Any], op: str, reply: dict[str, Any], shape: Any, quiet: bool = False
) -> dict[str, Any]:
    """`reply` if it has `shape`; else one line (unless `quiet`) and EXIT_NO_TOPOLOGY."""
    if not fits(reply, shape):
        fail(
            EXIT_NO_TOPOLOGY,
            f"the supervisor (pid {state['pid']}) answered {op!r} with a reply of another shape",
            quiet,
        )
    return reply
