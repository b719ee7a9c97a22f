"""The fork server: one process that has imported everything an actor needs forks the actors.

`python -m vsva.runtime.zygote --fd N --parent-pid P` is started by the launcher
(`vsva.ops.forkserver.ForkServer`) with one end of a SOCK_SEQPACKET socketpair as fd N. It
imports zmq, msgpack, numpy, the hot path, every actor module and the runtime *once*, then
serves requests, one packet each (JSON):

    {"spawn": [name, ...], "run_dir": D, "early": k}
                                          ->  per name, in order: {"pid": pid, "forker": p}
                                              with the child's pidfd attached (SCM_RIGHTS), or
                                              {"error": why}
    (nothing else: end of file on the socket)       ->  SIGKILL every child, reap, exit 0

and reports each child's end, as it reaps it, with {"exit": pid, "code": c} (`code` as
`subprocess.Popen.returncode`: the exit status, or -signal). The pidfd is opened before the
child can be reaped, so the launcher's handle can never name a reused pid; the launcher
waits on it (readable when the child exits: it works for processes that are not its
children) and signals through it exactly as for a child of its own.

What must not cross a fork: a ZeroMQ context, a socket or a thread (libzmq's I/O threads
and any Python thread would be missing or half-locked in the child). The zygote never
creates any, and `check_forkable` proves it before every fork: the process has exactly one
OS thread (libzmq starts its reaper and I/O threads with a context's first socket, so a
live context with a socket shows up there) and no global zmq context. A request that
arrives when the check fails is refused, not forked. Each child builds its own context
after the fork (`vsva.runtime.actor_process`).

The children of a batch wait until all of it is forked, except its first `early` names
(default 0) among those the zygote forks itself, which run at once: the actors every VM
talks to (host, kvm, vdcm) have the most start-up work, and would otherwise be the last
ones ready. (A helper's children always wait: until the helper exits, they are not yet the
zygote's.)

A batch of at least 2 x MIN_PER_FORKER names is split in consecutive parts, one per usable
CPU: the zygote forks a helper per part but the first (a copy of itself, so the same
shared image), forks the first part itself while the helpers fork theirs, and passes their
replies on in order. A helper exits when its part is forked; its children, still held,
become the zygote's (it is their PR_SET_CHILD_SUBREAPER) before any of them runs.

Each child: leaves the zygote's signal set-up, starts its own session, writes stdout and
stderr to `<run_dir>/<name>.log`, and runs `actor_process.run_actor_process` with the run
(run.json + topology.json) the zygote parsed once per run directory. Children die with the
zygote (PR_SET_PDEATHSIG), the zygote with the launcher.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import select
import signal
import socket
import sys
import threading
from typing import Any

PRELOAD = (
    "zmq",
    "msgpack",
    "numpy",
    "vsva.hotpath",
    "vsva.actors.guest",
    "vsva.actors.vmm",
    "vsva.actors.host",
    "vsva.actors.kvm",
    "vsva.actors.vdcm",
    "vsva.ops.control",
    "vsva.ops.topology",
    "vsva.runtime.loop",
    "vsva.runtime.actor_process",
)
MAX_PACKET = 64 * 1024
MIN_PER_FORKER = 16  # a batch is split between forking processes only with this many each
FORWARD_TIMEOUT = 10.0  # s: a helper silent this long is killed (the launcher waits 30 s)
PR_SET_CHILD_SUBREAPER = 36


class ForkUnsafe(RuntimeError):
    """This process holds something that must not cross a fork (a thread, a zmq context)."""


def check_forkable() -> None:
    """Raise ForkUnsafe unless this process is safe to fork: one OS thread (no libzmq I/O
    thread, no Python thread) and no global zmq context."""
    try:
        threads = len(os.listdir("/proc/self/task"))
    except OSError:
        threads = threading.active_count()
    if threads != 1 or threading.active_count() != 1:
        raise ForkUnsafe(
            f"{threads} threads in the fork server (a zmq context or a thread would cross the fork)"
        )
    zmq = sys.modules.get("zmq")
    if zmq is not None and getattr(zmq.Context, "_instance", None) is not None:
        raise ForkUnsafe("a global zmq context exists in the fork server")


def preload() -> None:
    """Import what every actor imports, then freeze the heap so the children's garbage
    collector never writes to the shared pages (copy-on-write stays shared)."""
    import importlib

    for module in PRELOAD:
        importlib.import_module(module)
    importlib.import_module("vsva.hotpath").load()  # it picks its implementation lazily
    gc.collect()
    gc.freeze()


class _Server:
    def __init__(self, ctl: socket.socket):
        self.ctl = ctl
        self.pid, self.launcher = os.getpid(), os.getppid()  # also in a forking helper
        self.forkers = len(os.sched_getaffinity(0)) if _adopt_orphans() else 1  # forking at once
        self.children: set[int] = set()
        self.links: list[socket.socket] = []  # our ends of the helpers' sockets (children close them)
        self.runs: dict[str, Any] = {}  # run_dir -> (run, topology), parsed once
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def serve(self) -> None:
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        signal.set_wakeup_fd(self._wake_w)
        poller = select.poll()
        poller.register(self.ctl.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while True:
                for fd, _ in poller.poll():
                    if fd == self._wake_r:
                        self._drain_wake()
                    elif not self._on_request():
                        return
                self._reap()
        finally:
            self._shutdown()

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def _on_request(self) -> bool:
        data = self.ctl.recv(MAX_PACKET)
        if not data:
            return False
        try:
            req = json.loads(data)
            names, run_dir = [str(n) for n in req["spawn"]], str(req["run_dir"])
            early = set(names[: max(0, int(req.get("early", 0)))])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            self._send({"error": f"bad request: {exc!r}"})
            return True
        try:
            check_forkable()
            run = self._run(run_dir)
        except (ForkUnsafe, OSError, ValueError, TypeError, KeyError) as exc:
            for name in names:
                self._send({"error": f"{name}: cannot fork: {exc}"})
            return True
        # The batch's children wait on this pipe until all are forked: forking goes at full
        # speed instead of competing for the CPU with the children's start-up. With more
        # than one CPU, helpers (forked from us: the same image) fork parts of it at once.
        hold_r, hold_w = os.pipe2(os.O_CLOEXEC)
        try:
            count = max(1, min(self.forkers, len(names) // MIN_PER_FORKER))
            size = -(-len(names) // count)
            parts = [names[i : i + size] for i in range(0, len(names), size)]  # replies in order
            helpers = [self._helper(part, run_dir, run, hold_r, hold_w) for part in parts[1:]]
            for name in parts[0]:
                self._fork(name, run_dir, run, hold_r, hold_w, self.ctl, held=name not in early)
            for (pid, link), part in zip(helpers, parts[1:]):
                self._forward(pid, link, part)
        finally:
            os.close(hold_r)
            os.close(hold_w)
        return True

    def _helper(
        self, names: list[str], run_dir: str, run: Any, hold_r: int, hold_w: int
    ) -> tuple[int | None, socket.socket]:
        """Fork a process that forks `names` and sends us each reply; it exits when done,
        its children become ours (PR_SET_CHILD_SUBREAPER) before the batch runs."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            check_forkable()
            pid = os.fork()
        except (ForkUnsafe, OSError):
            theirs.close()
            self.links.append(ours)
            return None, ours  # no helper: _forward answers for its part
        if pid == 0:
            try:
                ours.close()
                for name in names:
                    self._fork(name, run_dir, run, hold_r, hold_w, theirs)
            finally:
                os._exit(0)
        theirs.close()
        self.links.append(ours)
        return pid, ours

    def _forward(self, helper: int | None, link: socket.socket, names: list[str]) -> None:
        """Pass a helper's replies on to the launcher, in order (bounded: a helper that dies
        or stalls leaves an error for each name it did not answer)."""
        failed = helper is None
        try:
            for name in names:
                data: bytes = b""
                fds: list[int] = []
                if not failed and readable(link.fileno(), FORWARD_TIMEOUT):
                    data, fds, _, _ = socket.recv_fds(link, MAX_PACKET, 1)
                if not data:  # gone or stalled: no more waiting for the rest of its part
                    failed = True
                    self._send({"error": f"{name}: cannot fork: the forking helper failed"})
                    continue
                try:
                    pid = json.loads(data).get("pid")
                    if isinstance(pid, int):
                        self.children.add(pid)
                    socket.send_fds(self.ctl, [data], fds)
                finally:
                    for fd in fds:
                        os.close(fd)
        finally:
            link.close()
            self.links.remove(link)
            if helper is not None:
                try:
                    os.kill(helper, signal.SIGKILL)  # gone already, unless it stalled
                except ProcessLookupError:
                    pass
                os.waitpid(helper, 0)

    def _fork(
        self,
        name: str,
        run_dir: str,
        run: Any,
        hold_r: int,
        hold_w: int,
        out: socket.socket,
        held: bool = True,
    ) -> None:
        """Fork the actor `name`; its reply (pid and pidfd, or the error) goes to `out`. A
        held child waits for the end of the batch's forking before it starts."""
        try:
            check_forkable()
            pid = os.fork()
        except (ForkUnsafe, OSError) as exc:
            _send(out, {"error": f"{name}: cannot fork: {exc}"})
            return
        if pid == 0:
            os.close(hold_w)
            if out is not self.ctl:
                out.close()
            if held:
                os.read(hold_r, 1)  # end of file once the zygote has forked the whole batch
            os.close(hold_r)
            self._child(name, run_dir, self.pid, run, self.launcher)
        self.children.add(pid)
        pidfd = os.pidfd_open(pid)
        try:
            socket.send_fds(out, [json.dumps({"pid": pid, "forker": os.getpid()}).encode()], [pidfd])
        finally:
            os.close(pidfd)

    def _run(self, run_dir: str) -> Any:
        if run_dir not in self.runs:
            from vsva.runtime.actor_process import load_run

            self.runs[run_dir] = run = load_run(run_dir)
            if run[1].transport == "tcp":  # CURVE: its import is ~0.1 s
                import vsva.runtime.curve  # noqa: F401  (once here, not in every child)
            gc.freeze()
        return self.runs[run_dir]

    def _child(self, name: str, run_dir: str, zygote: int, run: Any, launcher: int) -> None:
        """In the child: never returns."""
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            self.ctl.close()
            for link in self.links:
                link.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
            os.setsid()
            log = os.open(
                os.path.join(run_dir, f"{name}.log"),
                os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                0o644,
            )
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(log, 1)
            os.dup2(log, 2)
            os.close(log)
            os.close(null)
            os.chdir(run_dir)
            from vsva.runtime.actor_process import run_actor_process

            code = run_actor_process(run_dir, name, parent_pid=zygote, run_root=launcher, loaded=run)
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.children.discard(pid)
            self._send({"exit": pid, "code": os.waitstatus_to_exitcode(status)})

    def _send(self, msg: dict[str, Any]) -> None:
        _send(self.ctl, msg)

    def _shutdown(self) -> None:
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in list(self.children):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        self.children.clear()


def _send(sock: socket.socket, msg: dict[str, Any]) -> None:
    try:
        sock.send(json.dumps(msg).encode())
    except OSError:  # the launcher is gone: its end of file ends the loop
        pass


def readable(fd: int, timeout: float) -> bool:
    """Whether `fd` turns readable within `timeout` seconds (both ends of the protocol wait
    on it: the launcher for replies and exits, the zygote for its helpers)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000 + 0.999))))


def _adopt_orphans() -> bool:
    """Make this process the reaper of its descendants' orphans (Linux's
    PR_SET_CHILD_SUBREAPER): a helper's children are ours once it exits. False where that
    is not possible (then the zygote forks every batch alone)."""
    try:
        import ctypes

        return bool(ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def serve(ctl: socket.socket) -> None:
    """Serve fork requests on `ctl` until its peer closes it (see the module docstring)."""
    _Server(ctl).serve()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vsva.runtime.zygote")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--parent-pid", type=int, default=None)
    args = parser.parse_args(argv)
    from vsva.runtime.actor_process import die_with_parent

    die_with_parent(args.parent_pid)
    ctl = socket.socket(fileno=args.fd)
    preload()
    sys.stdout.flush()
    sys.stderr.flush()
    serve(ctl)
    return 0


if __name__ == "__main__":
    sys.exit(main())
