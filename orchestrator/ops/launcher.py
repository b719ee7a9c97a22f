"""Start a topology as one OS process per actor, supervise it, and take it all down again.

    with Launcher(topology) as launcher:          # all actors bound, started, ready
        launcher.processes()                      # [{name, pid, state, exitcode}, ...]
        launcher.run_actor(controller, timeout=60)  # the orchestrator's actor, named "orch"
        launcher.kill("kvm")                      # SIGKILL; death seen through a pidfd
        launcher.poll_deaths(timeout=1.0)         # [("kvm", -9)]
        records = launcher.trace()                # live: each child writes its trace first
    # here: no child process, socket file, shared-memory file or run directory remains

Run directory (`<tmp>/vsva-<owner>-<random>`, mode 0700, named after this process: see
vsva.ops.runfiles, whose sweep removes the runs of dead owners): `topology.json`
(dataclasses.asdict of the Topology), `run.json` (t0 = run start epoch, shm path, run id,
launcher pid, trace_out), `<name>.sock` (each actor's ROUTER; `orch.sock` is the controller's, bound by
the launcher before any child starts so early messages to "orch" queue there; with
`topology.transport == "tcp"` the ROUTERs bind `tcp://127.0.0.1:<kernel-chosen port>` and
`<name>.ep` holds that endpoint instead, see vsva.runtime.loop),
`orch-ctl.sock` (control ROUTER for the readiness handshake), `<name>.log` (the child's
stdout/stderr), `trace-<name>.frames` (vsva.runtime.trace_buffer). Shared memory: `/dev/shm/vsva-<runid>.mem`. With
`trace_out`, `close` writes the merged trace's exports there (vsva.analysis.export.write_all),
also when the run ends by an exception or a signal turned into one; when it cannot,
`trace_error` says which file and why.

Readiness: every child, once its ROUTER is bound and its actor built, sends {"ready": name,
"pid": pid, "endpoint": its ROUTER's endpoint} on a DEALER (routing id "name/pid",
`endpoints.control_id`: one per incarnation) to `orch-ctl.sock`; when all children of
the run are ready the launcher answers each with {"go": true} and only then does the child
run `actor.start`. Waiting is bounded (`ready_timeout`); a child that exits first, or a
timeout, aborts the launch with `LaunchError` (the child's log tail in the message) after
tearing everything down.

Stopping on a signal (`stop`, vsva.cli.exits.StopSignals): nothing is raised where the signal
lands; its wakeup descriptor is polled with the rest, a request during the launch aborts it
(`LaunchStopped`, everything torn down) and one during `run_actor` makes it return at once;
the caller then closes the launcher.

Children die with the launcher: each child sets `PR_SET_PDEATHSIG = SIGKILL` as its first
act and exits if the launcher is already gone; children run in their own session so a
terminal Ctrl-C reaches only the launcher, which then shuts them down in order. (PDEATHSIG
follows the *thread* that spawned the child: create the Launcher in a long-lived thread.)

Shutdown (`close`, idempotent, also run from `__exit__` on exceptions/KeyboardInterrupt and
at interpreter exit): SIGTERM to every live child (each flushes, closes its sockets with a
100 ms linger and exits 0), wait up to `term_timeout` s, SIGKILL the rest, reap all; close the
launcher's sockets; read the merged trace and the logs (`trace()`, `logs()` still work after
close); unmap and unlink the shared memory; delete the socket files, then the run directory
unless `keep=True`.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import msgpack
import zmq

from vsva.actors import errno as E
from vsva.actors.base import Actor, ActorEnv, Body, Call, Gather, Steps
from vsva.actors.catalogue import TraceSync
from vsva.actors.memory import PhysMem
from vsva.analysis import export
from vsva.analysis import trace as tracefile
from vsva.ops import capacity, forkserver, runfiles
from vsva.ops.forkserver import ForkedChild, ForkServer, ForkServerError
from vsva.ops.topology import ORCH, PER_VM_KINDS, ActorSpec, Topology
from vsva.runtime.curve import create_keys
from vsva.runtime.endpoints import TRANSPORTS, control_endpoint, control_id, valid_name
from vsva.runtime.loop import ZmqRuntime, new_context

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESERVED = {ORCH, "orch-ctl"}


class LaunchError(RuntimeError):
    """A child died or did not report ready during launch."""


class LaunchStopped(LaunchError):
    """A stop was requested (the launcher's `stop`) while the actors were starting."""


class StopRequest(Protocol):
    """What asks a run to stop (vsva.cli.exits.StopSignals): `fd` turns readable when it
    may have, `check()` says whether it has (emptying `fd`), `signum` is the signal that did."""

    fd: int
    signum: int | None

    def check(self) -> bool: ...


@dataclass
class _Proc:
    spec: ActorSpec
    child: subprocess.Popen[bytes] | ForkedChild  # a child of ours, or one the fork server forked
    pidfd: int | None
    started: float
    ready_at: float | None = None
    killed_by_us: int | None = None

    @property
    def pid(self) -> int:
        return self.child.pid

    @property
    def exitcode(self) -> int | None:
        return self.child.returncode


class Launcher:
    """Runs a Topology as processes; see the module docstring."""

    def __init__(
        self,
        topology: Topology,
        *,
        keep: bool = False,
        ready_timeout: float = 20.0,
        term_timeout: float = 2.0,
        extra_path: Sequence[str] = (),
        base_dir: str | None = None,
        log: Callable[[str], None] | None = None,
        python: str = sys.executable,
        fork: bool | None = None,
        trace_out: str | None = None,
        stop: StopRequest | None = None,
    ):
        self.topology = topology
        self.stop = stop  # a stop request ends the launch (LaunchStopped) or run_actor
        self.keep = keep
        self.trace_out = os.path.abspath(trace_out) if trace_out else None
        self.trace_files: dict[str, Any] | None = None  # what close wrote into trace_out
        self.trace_error: str | None = None  # or why it could not (one line, naming the file)
        self.ready_timeout = ready_timeout
        self.term_timeout = term_timeout
        self.extra_path = list(extra_path)
        self.base_dir = base_dir
        self.python = python
        self.messages: list[str] = []
        self._log_fn = log
        self.run_dir: str | None = None
        self.run_id: str | None = None
        self.shm_path: str | None = None
        self.mem: PhysMem | None = None
        self.t0: float | None = None
        self.ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self.ctl: zmq.Socket[bytes] | None = None
        self.runtime: ZmqRuntime | None = None
        self.procs: dict[str, _Proc] = {}
        self.deaths: list[tuple[str, int]] = []  # every (name, exitcode), in order seen
        self.on_death: list[Callable[[str, int], None]] = []
        self._death_cursor = 0
        self._trace: list[dict[str, Any]] | None = None
        self._trace_bytes: dict[str, bytes] | None = None  # the trace files, kept by close
        self._logs: dict[str, str] | None = None
        self.closed = False
        self.started = False
        self.ready_seconds: float | None = None  # first spawn -> all ready
        self.transport: str = getattr(topology, "transport", "ipc")
        self._endpoints: dict[str, str] = {}  # name -> ROUTER endpoint (from the ready messages)
        self.fork = _use_fork(fork, self.log)  # start actors through the fork server?
        self.forkserver: ForkServer | None = None

    # ---- context manager -------------------------------------------------------------------
    def __enter__(self) -> Launcher:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def log(self, line: str) -> None:
        line = f"launcher: {line}"
        self.messages.append(line)
        if self._log_fn is not None:
            self._log_fn(line)

    # ---- start -------------------------------------------------------------------------------
    def start(self) -> Launcher:
        if self.started:
            return self
        self.started = True
        names = [a.name for a in self.topology.actors]
        bad = [n for n in names if not valid_name(n) or n in RESERVED]
        if bad or len(set(names)) != len(names):
            raise ValueError(f"invalid or duplicate actor names: {bad or names}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"unknown transport {self.transport!r}; valid: {', '.join(TRANSPORTS)}")
        capacity.raise_fd_limit()
        capacity.check(self.topology, self.base_dir)  # CapacityError (a ValueError) naming the limit
        atexit.register(self.close)
        try:
            self._prepare()
            t_spawn = time.monotonic()
            self._spawn(self.topology.actors)
            self._await_ready(names, self.ready_timeout)
            self.ready_seconds = time.monotonic() - t_spawn
            self.log(
                f"{len(names)} actors ready in {self.ready_seconds * 1000:.0f} ms (run dir {self.run_dir})"
            )
        except BaseException:
            self.close()
            raise
        return self

    def _prepare(self) -> None:
        self.t0 = time.time()
        self.run_dir = runfiles.make_run_dir(self.base_dir)
        self.run_id = os.path.basename(self.run_dir)[len(runfiles.PREFIX) :]
        self.shm_path = runfiles.shm_path(self.run_dir)
        self.mem = PhysMem.create(self.shm_path, self.topology.mem_frames)
        with open(os.path.join(self.run_dir, "topology.json"), "w") as f:
            json.dump(dataclasses.asdict(self.topology), f, indent=1)
        with open(os.path.join(self.run_dir, "run.json"), "w") as f:
            json.dump(
                {
                    "t0": self.t0,
                    "shm": self.shm_path,
                    "run_id": self.run_id,
                    "launcher_pid": os.getpid(),
                    "trace_out": self.trace_out,
                },
                f,
            )
        if self.transport == "tcp":  # a CURVE key pair per actor: vsva.runtime.curve
            create_keys(self.run_dir, [ORCH, *(a.name for a in self.topology.actors)])
        if self.fork:  # its imports overlap with the rest of the set-up
            self.forkserver = ForkServer(self._child_env(), self.python)
        self.ctx = new_context()
        self.ctl = self.ctx.socket(zmq.ROUTER)
        self.ctl.setsockopt(zmq.LINGER, 0)
        self.ctl.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.ctl.setsockopt(zmq.MAXMSGSIZE, 4096)
        self.ctl.bind(control_endpoint(self.run_dir))
        self.runtime = ZmqRuntime(
            ORCH,
            self.run_dir,
            t0=self.t0,
            ctx=self.ctx,
            log=self.log,
            transport=self.transport,
            run_root=os.getpid(),  # a frame counts only from us or a process we started (ipc)
        )
        self._endpoints[ORCH] = self.runtime.endpoint
        if self.stop is not None:
            self.runtime.watch(self.stop.fd, self._on_stop_fd)

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        paths = [PROJECT_ROOT, *self.extra_path]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        return env

    def _spawn(self, specs: Sequence[ActorSpec]) -> None:
        """Start these actors: forked by the fork server (all requests at once), or one
        interpreter each; then watch each one's pidfd."""
        assert self.runtime is not None and self.run_dir is not None  # made by _prepare
        started = time.monotonic()
        children: Sequence[tuple[subprocess.Popen[bytes] | ForkedChild, int]]
        if self.forkserver is not None:
            # the actors that serve every VM first, running at once: they have the most to do
            shared = [s for s in specs if s.kind not in PER_VM_KINDS]
            specs = [*shared, *(s for s in specs if s.kind in PER_VM_KINDS)]
            try:
                children = self.forkserver.spawn_many([s.name for s in specs], self.run_dir, len(shared))
            except ForkServerError as exc:
                raise LaunchError(str(exc)) from None
        else:
            children = [self._exec(spec) for spec in specs]
        for spec, (child, pidfd) in zip(specs, children):
            self.procs[spec.name] = _Proc(spec, child, pidfd, started)
            self.runtime.run_pids.add(child.pid)
            self.runtime.watch(pidfd, partial(self._on_pidfd, spec.name))
            self.runtime.peer_restarted(spec.name)

    @property
    def stopping(self) -> bool:
        """A stop was requested: `run_actor` returns at once, the caller takes the run down."""
        return self.stop is not None and self.stop.check()

    def _on_stop_fd(self) -> list[str]:
        """The runtime's callback when the stop request's descriptor turns readable."""
        if self.stopping:
            assert self.runtime is not None  # watched once made
            self.runtime.request_stop()
        return []

    def _on_pidfd(self, name: str) -> list[str]:
        """The runtime's callback when a child's pidfd turns readable: reap it (the death
        reaches the runtime and the callbacks through _reap; nothing to deliver here)."""
        self._reap(name)
        return []

    def _exec(self, spec: ActorSpec) -> tuple[subprocess.Popen[bytes], int]:
        """The fallback: a fresh interpreter running vsva.runtime.actor_process."""
        assert self.run_dir is not None  # made by _prepare
        cmd = [
            self.python,
            "-m",
            "vsva.runtime.actor_process",
            "--run-dir",
            self.run_dir,
            "--name",
            spec.name,
            "--parent-pid",
            str(os.getpid()),
        ]
        with open(os.path.join(self.run_dir, f"{spec.name}.log"), "ab") as logf:
            popen = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=self._child_env(),
                cwd=self.run_dir,
                start_new_session=True,
                close_fds=True,
            )
        return popen, os.pidfd_open(popen.pid)

    def _await_ready(self, names: list[str], timeout: float) -> None:
        """Collect the ready messages of `names` (bounded), connect to them, then send each
        its go. Connecting first: until their go the actors only wait, so the connections
        are made on an otherwise quiet machine (after the go, N actors starting at once
        would each take an equal share of the CPU from the launcher)."""
        assert self.ctl is not None and self.runtime is not None  # made by _prepare
        waiting = set(names)
        end = time.monotonic() + timeout
        poller = zmq.Poller()
        poller.register(self.ctl, zmq.POLLIN)
        if self.stop is not None:
            poller.register(self.stop.fd, zmq.POLLIN)
        for name in names:
            poller.register(self.procs[name].pidfd, zmq.POLLIN)
        while waiting:
            if self.stopping:
                raise LaunchStopped(f"stopped while {len(waiting)} actors were starting")
            left = end - time.monotonic()
            if left <= 0:
                raise LaunchError(
                    f"not ready within {timeout:.1f} s: {sorted(waiting)}" + self._tails(sorted(waiting))
                )
            for sock, _ in poller.poll(int(min(left, 0.1) * 1000) + 1):
                if sock is self.ctl:
                    self._on_ready_messages(waiting)
                    continue
                for name in names:
                    proc = self.procs[name]
                    if proc.pidfd == sock and self._reap(name):
                        raise LaunchError(
                            f"{name} exited with {proc.exitcode} before ready" + self._tails([name])
                        )
        self.runtime.expect(names)
        for name in names:
            try:
                go = [control_id(name, self.procs[name].pid), msgpack.packb({"go": True})]
                self.ctl.send_multipart(go, zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                raise LaunchError(f"cannot send go to {name}: {exc}") from None

    def _on_ready_messages(self, waiting: set[str]) -> None:
        assert self.ctl is not None  # bound by _prepare
        while True:
            try:
                frames = self.ctl.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                name = frames[0].decode().partition("/")[0]
                msg = msgpack.unpackb(frames[-1], raw=False)
            except Exception:
                self.log("ignored a malformed control frame")
                continue
            proc = self.procs.get(name)
            if (
                len(frames) != 2
                or not isinstance(msg, dict)
                or msg.get("ready") != name
                or proc is None
                or msg.get("pid") != proc.pid
                or frames[0] != control_id(name, proc.pid)
            ):
                self.log(f"ignored control frame from {frames[0]!r}: {msg!r}")
                continue
            proc.ready_at = time.monotonic()
            if isinstance(msg.get("endpoint"), str):
                self._endpoints[name] = msg["endpoint"]
            waiting.discard(name)

    def _tails(self, names: list[str], lines: int = 15) -> str:
        out = []
        for name in names:
            text = self._read_log(name).splitlines()[-lines:]
            out.append(f"\n--- {name}.log ---\n" + "\n".join(text))
        return "".join(out)

    def _read_log(self, name: str) -> str:
        if self._logs is not None:
            return self._logs.get(name, "")
        if self.run_dir is None:  # not started
            return ""
        try:
            with open(os.path.join(self.run_dir, f"{name}.log"), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    # ---- supervision -------------------------------------------------------------------------
    def _reap(self, name: str) -> list[str]:
        """If `name` has exited, reap it, record the death and return [name]; else []."""
        proc = self.procs.get(name)
        if proc is None or proc.pidfd is None:
            return []
        code = proc.child.poll()
        if code is None:
            return []
        if self.runtime is not None:
            self.runtime.unwatch(proc.pidfd)
        os.close(proc.pidfd)
        proc.pidfd = None
        if self.forkserver is not None:
            self.forkserver.release(proc.pid)
        self.deaths.append((name, code))
        if self.runtime is not None and not self.runtime.closed:
            self.runtime.peer_exited(name)
        self.log(f"{name} (pid {proc.pid}) exited with {code}")
        for callback in list(self.on_death):
            try:
                callback(name, code)
            except Exception as exc:
                self.log(f"death callback failed: {exc!r}")
        return [name]

    def poll_deaths(self, timeout: float = 0.0) -> list[tuple[str, int]]:
        """Deaths not yet returned by this method, waiting up to `timeout` s for one."""
        end = time.monotonic() + timeout
        while True:
            fds = {p.pidfd: n for n, p in self.procs.items() if p.pidfd is not None}
            ready = []
            if fds:
                poller = select.poll()
                for fd in fds:
                    poller.register(fd, select.POLLIN)
                left = max(0.0, end - time.monotonic())
                if self._death_cursor < len(self.deaths):
                    left = 0.0
                ready = poller.poll(int(left * 1000))
            for fd, _ in ready:
                self._reap(fds[fd])
            if self._death_cursor < len(self.deaths) or time.monotonic() >= end or not fds:
                break
        new = self.deaths[self._death_cursor :]
        self._death_cursor = len(self.deaths)
        return new

    def processes(self) -> list[dict[str, Any]]:
        """The process table: name, pid, state ("running"/"exited"/"killed"), exit code."""
        rows = []
        for name, proc in self.procs.items():
            if proc.pidfd is not None:
                code = proc.child.poll()
                if code is not None:
                    self._reap(name)
            code = proc.child.returncode
            state = "running" if code is None else "killed" if code < 0 else "exited"
            rows.append(
                {"name": name, "kind": proc.spec.kind, "pid": proc.pid, "state": state, "exitcode": code}
            )
        return rows

    def endpoints(self) -> dict[str, str]:
        """Where each actor's ROUTER (and the orchestrator's, "orch") is bound, as reported
        by the latest incarnation: `ipc://<run_dir>/<name>.sock` or `tcp://127.0.0.1:<port>`."""
        return dict(self._endpoints)

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    def alive(self, name: str) -> bool:
        proc = self.procs[name]
        return proc.pidfd is not None and proc.child.poll() is None

    def kill(self, name: str, sig: int = signal.SIGKILL) -> bool:
        """Send `sig` to actor `name` through its pidfd (no pid-reuse race). False if gone."""
        proc = self.procs[name]
        if proc.pidfd is None:
            return False
        try:
            signal.pidfd_send_signal(proc.pidfd, sig)
        except ProcessLookupError:
            return False
        proc.killed_by_us = sig
        self.log(f"sent signal {sig} to {name} (pid {proc.pid})")
        return True

    def wait_exit(self, name: str, timeout: float) -> int | None:
        """Wait (bounded) for `name` to exit; its exit code, or None if still running."""
        proc = self.procs[name]
        if proc.pidfd is not None:
            poller = select.poll()
            poller.register(proc.pidfd, select.POLLIN)
            if poller.poll(int(timeout * 1000)):
                self._reap(name)
        return proc.child.returncode

    def restart(self, name: str, timeout: float | None = None) -> int:
        """Start a dead actor again (same name, config; same ipc endpoint, or with tcp most
        likely a new port, to which the survivors reconnect); returns its new pid."""
        proc = self.procs[name]
        if proc.pidfd is not None and proc.child.poll() is None:
            raise RuntimeError(f"{name} is still running")
        self._reap(name)
        self._spawn([proc.spec])
        self._await_ready([name], self.ready_timeout if timeout is None else timeout)
        return self.procs[name].pid

    def run_actor(
        self, actor: Actor, timeout: float = 60.0, until: Callable[[Actor], bool] | None = None
    ) -> bool:
        """Run the orchestrator's own actor (named "orch") on this process's runtime; child
        deaths reach it as `peer_down(name, now)`. See ZmqRuntime.run_actor."""
        if self.runtime is None or self.closed:
            raise RuntimeError("launcher is not running")
        return self.runtime.run_actor(actor, timeout=timeout, until=until)

    # ---- results -----------------------------------------------------------------------------
    def trace(self) -> list[dict[str, Any]]:
        """Every actor's trace merged by logical clock (kept after close).

        While the run is live, a child keeps its trace records in memory and writes them in
        batches (vsva.runtime.trace_buffer), so a live read first asks every live child to
        write them (`trace_sync`; the child's runtime answers only once its records, the
        answer's included, are on disk) and waits for the answers, up to the topology's
        `request_timeout`; then it writes the orchestrator's own records and reads the
        files. A child that is dead, dies meanwhile or has not answered by then is read
        without waiting: its records are whatever it wrote (a SIGKILL takes the batch it had
        not written), and the log names it. After `close` it has all.
        """
        if self._trace is None and self._trace_bytes is not None:
            self._trace, self._trace_bytes = tracefile.from_files(self._trace_bytes), None
        if self._trace is not None:
            return self._trace
        if not self.run_dir:
            return []
        if not self.closed and self.runtime is not None and not self.runtime.closed:
            self._sync_trace(self.runtime)
        return tracefile.load(self.run_dir)

    def _sync_trace(self, runtime: ZmqRuntime) -> None:
        """Have every live child write its trace (see `trace`) and wait for their answers, on
        the actor this runtime runs: the replies, deaths and failed sends reach that one (a
        plain one is made the runtime's actor if none has run yet)."""
        names = [name for name in self.procs if self.alive(name)]
        bound = self.topology.request_timeout
        answers: list[list[Body]] = []

        def sync() -> Steps[None]:
            answers.append((yield Gather([Call(n, TraceSync(), timeout=bound) for n in names])))

        actor = runtime.actor
        if actor is None:
            actor = Actor(ORCH, ActorEnv(log=self.log))
            runtime.run_actor(actor, timeout=0)  # makes it the runtime's actor, nothing more
        runtime.send(actor.run_task(sync, runtime.now()))
        # the calls' own timeouts end the wait first; a stop request ends it at once
        runtime.run_actor(actor, timeout=2 * bound, until=lambda a: bool(answers))
        replies = answers[0] if answers else [{"ret": -E.ECANCELED}] * len(names)  # stopped waiting
        for name, reply in zip(names, replies):
            if reply.get("ret") != 0:
                self.log(
                    f"trace read: no answer from {name} ({E.name(reply['ret'])}): its records as written"
                )

    def logs(self) -> dict[str, str]:
        """Each child's log text (kept after close)."""
        if self._logs is not None:
            return self._logs
        return {name: self._read_log(name) for name in self.procs}

    # ---- shutdown ----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop everything and remove every trace of the run from the system (idempotent)."""
        if self.closed:
            return
        self.closed = True
        try:
            atexit.unregister(self.close)
        except Exception:
            pass
        steps = (
            self._stop_children,
            self._stop_forkserver,
            self._close_sockets,
            self._collect,
            self._drop_memory,
            self._remove_files,
        )
        errors = []
        for step in steps:
            try:
                step()
            except BaseException as exc:  # keep cleaning up; re-raise the first at the end
                errors.append(exc)
        if errors:
            raise errors[0]

    def _stop_children(self) -> None:
        live = [n for n, p in self.procs.items() if p.pidfd is not None]
        for name in live:
            self.kill(name, signal.SIGTERM)
        self._wait_all(live, self.term_timeout)
        rest = [n for n in live if self.procs[n].pidfd is not None]
        for name in rest:
            self.log(f"{name} ignored SIGTERM; SIGKILL")
            self.kill(name, signal.SIGKILL)
        self._wait_all(rest, 5.0)
        for proc in self.procs.values():  # anything left (should be nothing): block-reap
            if proc.child.returncode is None:
                try:
                    proc.child.kill()
                except OSError:
                    pass
                proc.child.wait(5.0)
            if proc.pidfd is not None:
                self._reap(proc.spec.name)

    def _stop_forkserver(self) -> None:
        if self.forkserver is not None:
            self.forkserver.close()

    def _wait_all(self, names: list[str], timeout: float) -> None:
        end = time.monotonic() + timeout
        pending = [n for n in names if self.procs[n].pidfd is not None]
        while pending and time.monotonic() < end:
            poller = select.poll()
            fds = {fd: n for n in pending if (fd := self.procs[n].pidfd) is not None}
            for fd in fds:
                poller.register(fd, select.POLLIN)
            for fd, _ in poller.poll(max(1, int((end - time.monotonic()) * 1000))):
                self._reap(fds[fd])
            pending = [n for n in pending if self.procs[n].pidfd is not None]

    def _close_sockets(self) -> None:
        if self.runtime is not None:
            self.runtime.close()
        if self.ctl is not None:
            self.ctl.close(0)
        if self.ctx is not None:
            self.ctx.destroy(linger=100)  # closes any socket still open on it: bounded

    def _collect(self) -> None:
        if self.run_dir and os.path.isdir(self.run_dir):
            self._logs = {name: self._read_log(name) for name in self.procs}
            self._trace_bytes = tracefile.trace_files(self.run_dir)  # parsed when asked for
            if self.trace_out:  # a trace that cannot be written is said, not raised: the run's
                # report (and the rest of the cleanup) must not be lost to it
                self.trace_files, self.trace_error = export.write_or_say(self.trace(), self.trace_out)
                if self.trace_error:
                    self.log(self.trace_error)

    def _drop_memory(self) -> None:
        if self.mem is not None:
            try:
                self.mem.close()
            except BufferError:  # a caller still holds a view; the unlink still happens
                pass
            self.mem = None
        if self.shm_path:
            try:
                os.unlink(self.shm_path)
            except FileNotFoundError:
                pass

    def _remove_files(self) -> None:
        if not self.run_dir or not os.path.isdir(self.run_dir):
            return
        for entry in os.listdir(self.run_dir):
            if entry.endswith((".sock", ".ep")):
                try:
                    os.unlink(os.path.join(self.run_dir, entry))
                except FileNotFoundError:
                    pass
        if not self.keep:
            shutil.rmtree(self.run_dir, ignore_errors=True)


_FALLBACK_LOGGED = False


def _use_fork(fork: bool | None, log: Callable[[str], None]) -> bool:
    """Fork actors from the fork server unless told not to or it cannot work here; the
    fallback (one interpreter per actor) is logged once per process."""
    global _FALLBACK_LOGGED
    ok, why = forkserver.available()
    if fork is False or (fork is None and not ok):
        if not _FALLBACK_LOGGED:
            _FALLBACK_LOGGED = True
            log(f"starting one interpreter per actor ({why or 'fork server disabled'})")
        return False
    if not ok:
        raise ValueError(f"fork server unavailable: {why}")
    return True
