"""Running host stacks: one in this process, several at once as child processes, and the check
that a stack left nothing behind.

A point with `hosts = H` is H independent host stacks (host, kvm, vdcm and their VMs), each
with its own run directory and shared memory, started together. Locally each stack is a
child process (`python -m vsva.scale.stacks SPEC.json`) in its own session, so a Ctrl-C
reaches only the runner, which on a stop request (StopSignals) forwards its signal to every
stack and waits for them to clean up. The same spec and function serve a Ray task on a cluster (vsva.scale.cluster).

Residue: every stack's launchers put their run directories under the stack's own base
directory, so after the stack the runner knows exactly what could be left: a process below
the runner (an actor, forked or started, or a fork server), a run directory, or the
shared-memory file /dev/shm/vsva-<run id>.mem of one of them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vsva.cli.client import wait_exit
from vsva.ops.launcher import LaunchStopped
from vsva.scale.experiments import PointContext, PointStopped, PointTimeout, StackResult, runner

if TYPE_CHECKING:
    from vsva.ops.launcher import StopRequest

GRACE_S = 10.0  # after the deadline, before a stack process is killed


def run_stack_spec(
    spec: dict[str, Any], on_phase: Callable[[str], None] = lambda p: None, stop: StopRequest | None = None
) -> dict[str, Any]:
    """Run one stack described by `spec` (runner, params, seed, timeout, base_dir, host);
    returns {"result": StackResult as JSON} or {"timeout": why} or {"error": why}, and
    raises PointStopped on a `stop` request."""
    mod = runner(spec["runner"])
    ctx = PointContext(
        deadline=time.monotonic() + spec["timeout"],
        base_dir=spec.get("base_dir"),
        host=spec.get("host", 0),
        on_phase=on_phase,
        stop=stop,
    )
    try:
        return {"result": mod.run_stack(spec["params"], spec["seed"], ctx).to_json()}
    except PointTimeout as exc:
        return {"timeout": str(exc)}
    except LaunchStopped as exc:
        raise PointStopped(str(exc)) from None
    except (PointStopped, KeyboardInterrupt):  # KeyboardInterrupt: a cancelled Ray task
        raise
    except Exception as exc:  # a runner bug or a launch failure: recorded, never fatal to the sweep
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]}


def run_local(
    specs: list[dict[str, Any]], on_phase: Callable[[str], None], stop: StopRequest | None = None
) -> list[dict[str, Any]]:
    """Run the stacks of one point: one in this process, several as child processes at once."""
    if len(specs) == 1:
        return [run_stack_spec(specs[0], on_phase, stop)]
    procs = []
    tmp = tempfile.mkdtemp(prefix="vsva-stacks-")
    try:
        for i, spec in enumerate(specs):
            path = os.path.join(tmp, f"stack{i}.json")
            with open(path, "w") as f:
                json.dump(spec, f)
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "vsva.scale.stacks", path],
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
        on_phase(f"{len(specs)} host stacks running")
        _wait_all(procs, specs[0]["timeout"] + GRACE_S, stop)
        out = []
        for i, proc in enumerate(procs):
            try:
                with open(os.path.join(tmp, f"stack{i}.json.out")) as f:
                    out.append(json.load(f))
            except (OSError, ValueError):
                out.append({"error": f"host stack {i} exited with {proc.returncode} and no result"})
        return out
    except BaseException:
        _interrupt_all(procs, (stop.signum if stop is not None else None) or signal.SIGINT)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _wait_all(procs: list[subprocess.Popen[bytes]], timeout: float, stop: StopRequest | None = None) -> None:
    """Wait (bounded) for every stack process; those still running at the end are killed. A
    `stop` request raises PointStopped (the caller interrupts the stacks)."""
    end = time.monotonic() + timeout
    for proc in procs:
        while proc.poll() is None and time.monotonic() < end:
            if stop is not None and stop.check():
                raise PointStopped("stopped while the host stacks ran")
            wait_exit(proc.pid, end - time.monotonic(), stop.fd if stop is not None else -1)
        if proc.poll() is None:
            proc.kill()
            proc.wait(5.0)


def _interrupt_all(procs: list[subprocess.Popen[bytes]], sig: int) -> None:
    """A stop: every stack cleans itself up on `sig` (the signal that stopped the runner, or
    SIGINT); one that does not in time is killed."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(sig)
    _wait_all(procs, GRACE_S)


def residue(base_dir: str) -> list[str]:
    """What a stack left behind: live descendants of this process (actors, fork servers,
    stack processes) and, under `base_dir`, run directories and their shared memory. Each is
    removed (processes killed) and named in the returned list."""
    found = []
    for pid, cmd in descendants(os.getpid()):
        found.append(f"process {pid} ({cmd[:80]})")
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        entries = os.listdir(base_dir)
    except FileNotFoundError:
        entries = []
    for entry in entries:
        path = os.path.join(base_dir, entry)
        if entry.startswith("vsva-"):
            shm = f"/dev/shm/{entry}.mem"
            if os.path.exists(shm):
                found.append(shm)
                os.unlink(shm)
            socks = [e for e in os.listdir(path) if e.endswith(".sock")] if os.path.isdir(path) else []
            found.append(f"run directory {path}" + (f" ({len(socks)} sockets)" if socks else ""))
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.unlink(path)
    return found


def descendants(root: int) -> list[tuple[int, str]]:
    """(pid, command line) of every live (not zombie) process below `root`."""
    children: dict[int, list[int]] = {}
    state: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        state[int(entry)] = fields[0]
        children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        if state.get(pid) == "Z":
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        out.append((pid, cmd))
    return out


def result_of(outcome: dict[str, Any]) -> StackResult | None:
    return StackResult.from_json(outcome["result"]) if "result" in outcome else None


def main(argv: list[str] | None = None) -> int:
    """A host stack in a child process: read the spec file, write `<spec>.out`. The runner's
    SIGINT (or any stop signal) is a stop request: the stack takes itself down."""
    from vsva.cli.exits import StopSignals

    stop = StopSignals()
    path = (argv or sys.argv[1:])[0]
    with open(path) as f:
        spec = json.load(f)
    try:
        outcome = run_stack_spec(spec, stop=stop)
    except PointStopped:
        return 128 + (stop.signum or 0)
    with open(path + ".out", "w") as f:
        json.dump(outcome, f, default=repr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
