"""Running host stacks: one in this process, several at once as child processes, and the check
that a stack left nothing behind.

A point with `hosts = H` is H independent host stacks (host, kvm, vdcm and their VMs), each
with its own run directory and shared memory, started together. Locally each stack is a
child process (`python -m vsva.scale.stacks SPEC.json FD`) in its own session, so a Ctrl-C
reaches only the runner, which on a stop request (StopSignals) forwards its signal to every
stack and waits for them to clean up. Each stack writes its phases (launched, booted, ...)
on a pipe (FD) to the runner, which shows them as "host H: PHASE" in its progress: what a
user watches, and what a test that must act in a given phase waits on. The same spec and
function serve a Ray task on a cluster (vsva.scale.cluster).

Residue: every stack's launchers put their run directories under the stack's own base
directory, so after the stack the runner knows exactly what could be left: a process below
the runner (an actor, forked or started, or a fork server), a run directory, or the
shared-memory file /dev/shm/vsva-<run id>.mem of one of them.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vsva.ops.launcher import LaunchStopped
from vsva.scale.experiments import PointContext, PointStopped, PointTimeout, StackResult, runner

if TYPE_CHECKING:
    from vsva.ops.launcher import StopRequest

GRACE_S = 10.0  # after the deadline, before a stack process is killed
PHASE_MAX = 200  # bytes of a phase line from a stack process


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
    """Run the stacks of one point: one in this process, several as child processes at once,
    whose phases are passed on as "host H: PHASE"."""
    if len(specs) == 1:
        return [run_stack_spec(specs[0], on_phase, stop)]
    stacks: list[StackProcess] = []
    tmp = tempfile.mkdtemp(prefix="vsva-stacks-")
    try:
        for i, spec in enumerate(specs):
            path = os.path.join(tmp, f"stack{i}.json")
            with open(path, "w") as f:
                json.dump(spec, f)
            stacks.append(StackProcess(i, path))
        on_phase(f"{len(specs)} host stacks running")
        _wait_all(stacks, specs[0]["timeout"] + GRACE_S, on_phase, stop)
        out = []
        for s in stacks:
            try:
                with open(s.spec_path + ".out") as f:
                    out.append(json.load(f))
            except (OSError, ValueError):
                out.append({"error": f"host stack {s.host} exited with {s.proc.returncode} and no result"})
        return out
    except BaseException:
        _interrupt_all(stacks, (stop.signum if stop is not None else None) or signal.SIGINT, on_phase)
        raise
    finally:
        for s in stacks:
            s.close()
        shutil.rmtree(tmp, ignore_errors=True)


class StackProcess:
    """One host stack as a child process (`python -m vsva.scale.stacks SPEC.json FD`) in its
    own session, with the read end of the pipe on which it writes its phases, a line each, and
    a pidfd that turns readable when it exits: the runner waits on both at once."""

    def __init__(self, host: int, spec_path: str):
        self.host, self.spec_path, self._partial = host, spec_path, b""
        self.phases, write_end = os.pipe2(os.O_CLOEXEC)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vsva.scale.stacks", spec_path, str(write_end)],
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                pass_fds=(write_end,),
            )
        except BaseException:
            os.close(self.phases)
            raise
        finally:
            os.close(write_end)  # the child holds it: end of file once the child is gone
        self.pidfd = os.pidfd_open(self.proc.pid)  # not yet reaped (only poll/wait reap it)

    def read_phases(self, on_phase: Callable[[str], None]) -> None:
        """Pass on every whole line the stack has written; at end of file the pipe is closed."""
        chunk = os.read(self.phases, 4096)
        if not chunk:
            os.close(self.phases)
            self.phases = -1
            return
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        self._partial = self._partial[-PHASE_MAX:]  # bounded, whatever the other end writes
        for line in lines:
            on_phase(f"host {self.host}: {line.decode(errors='replace')}")

    def close(self) -> None:
        for fd in (self.phases, self.pidfd):
            if fd >= 0:
                os.close(fd)
        self.phases = self.pidfd = -1


def phase_writer(fd: int) -> Callable[[str], None]:
    """A stack process's on_phase: one line per phase on the runner's pipe `fd`. A runner that
    is gone has nobody to tell (the write fails): the stack goes on to its end or stop."""

    def write(phase: str) -> None:
        try:
            os.write(fd, (" ".join(phase.split())[:PHASE_MAX] + "\n").encode())
        except OSError:
            pass

    return write


def _wait_all(
    stacks: list[StackProcess],
    timeout: float,
    on_phase: Callable[[str], None],
    stop: StopRequest | None = None,
) -> None:
    """Wait (bounded) for every stack process, passing on the phases they report as they come;
    those still running at the end are killed. A `stop` request raises PointStopped (the
    caller interrupts the stacks)."""
    end = time.monotonic() + timeout
    while (running := [s for s in stacks if s.proc.poll() is None]) and (left := end - time.monotonic()) > 0:
        if stop is not None and stop.check():
            raise PointStopped("stopped while the host stacks ran")
        poller = select.poll()
        pipes = [s.phases for s in stacks if s.phases >= 0]
        for fd in [s.pidfd for s in running] + pipes + ([stop.fd] if stop is not None else []):
            poller.register(fd, select.POLLIN)
        ready = {fd for fd, _ in poller.poll(left * 1000)}
        for s in stacks:
            if s.phases in ready:
                s.read_phases(on_phase)
    for s in stacks:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait(5.0)


def _interrupt_all(stacks: list[StackProcess], sig: int, on_phase: Callable[[str], None]) -> None:
    """A stop: every stack cleans itself up on `sig` (the signal that stopped the runner, or
    SIGINT); one that does not in time is killed."""
    for s in stacks:
        if s.proc.poll() is None:
            s.proc.send_signal(sig)
    _wait_all(stacks, GRACE_S, on_phase)


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
    """A host stack in a child process: read the spec file, write its phases on the pipe the
    runner gave (its descriptor number is the second argument), write `<spec>.out`. The runner's
    SIGINT (or any stop signal) is a stop request: the stack takes itself down."""
    from vsva.cli.exits import StopSignals

    stop = StopSignals()
    path, phase_fd = argv or sys.argv[1:]
    with open(path) as f:
        spec = json.load(f)
    try:
        outcome = run_stack_spec(spec, phase_writer(int(phase_fd)), stop)
    except PointStopped:
        return 128 + (stop.signum or 0)
    with open(path + ".out", "w") as f:
        json.dump(outcome, f, default=repr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
