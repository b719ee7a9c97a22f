"""The launcher's side of the fork server (`vsva.runtime.zygote`): start it, ask it for
children, learn how they ended.

A forked actor is not a child of the launcher: the launcher holds the pidfd the zygote sent
with the pid (signals, death detection: exactly as for its own children), and the exit code
comes from the zygote, which reaps. `ForkedChild` offers the part of `subprocess.Popen` the
launcher uses (pid, returncode, poll, wait, kill), so both ways of starting share one
supervision path.

Where there is no fork (or `VSVA_NO_FORKSERVER=1`), `available()` says so and the launcher
starts one interpreter per actor instead (logged once per process).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from typing import Any

from vsva.runtime.zygote import readable

REPORT_WAIT = 2.0  # s: how long a dead child's exit code may take to come from the zygote
START_TIMEOUT = 30.0  # s: the zygote's imports, on a loaded machine
SINGLE_THREADED = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class ForkServerError(RuntimeError):
    """The fork server refused a request, or died."""


def available() -> tuple[bool, str]:
    """Whether actors can be forked here, and why not."""
    if os.environ.get("VSVA_NO_FORKSERVER") == "1":
        return False, "VSVA_NO_FORKSERVER=1"
    if not hasattr(os, "fork") or not hasattr(os, "pidfd_open") or not hasattr(socket, "send_fds"):
        return False, "no fork/pidfd_open on this platform"
    return True, ""


class ForkedChild:
    """An actor process forked by the zygote (the launcher's handle on it)."""

    def __init__(self, server: ForkServer, pid: int, forker: int | None = None):
        self.server = server
        self.pid = pid
        self.forker = forker  # the process that forked it: the zygote or one of its helpers
        self.returncode: int | None = None

    def poll(self) -> int | None:
        """The exit code once the zygote has reported it. A child that has exited (its pidfd
        is readable) but whose report has not arrived yet is waited for, bounded."""
        if self.returncode is None:
            self.server.collect(0)
            pidfd = self.server.pidfds.get(self.pid)
            if self.returncode is None and pidfd is not None and readable(pidfd, 0):
                self.server.collect_exit(self.pid, REPORT_WAIT)
        return self.returncode

    def wait(self, timeout: float) -> int:
        pidfd = self.server.pidfds.get(self.pid)
        if pidfd is not None:
            readable(pidfd, timeout)
        code = self.poll()
        if code is None:
            raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
        return code

    def kill(self) -> None:
        pidfd = self.server.pidfds.get(self.pid)
        if pidfd is not None and self.returncode is None:
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass


class ForkServer:
    """One zygote process per launcher; see the module docstring."""

    def __init__(self, env: dict[str, str], python: str = sys.executable, timeout: float = START_TIMEOUT):
        # numpy's BLAS would start a thread pool at import: one thread, or nothing could fork
        env = {**env, **SINGLE_THREADED}
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock = ours
        self.children: dict[int, ForkedChild] = {}
        self.pidfds: dict[int, int] = {}  # pid -> the pidfd the zygote sent (ours to close)
        try:
            self.proc = subprocess.Popen(
                [
                    python,
                    "-m",
                    "vsva.runtime.zygote",
                    "--fd",
                    str(theirs.fileno()),
                    "--parent-pid",
                    str(os.getpid()),
                ],
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
                pass_fds=(theirs.fileno(),),
            )
        finally:
            theirs.close()
        self.timeout = timeout
        self.closed = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def spawn_many(self, names: Iterable[str], run_dir: str, early: int = 0) -> list[tuple[ForkedChild, int]]:
        """Fork one child per name (one request: the zygote forks them all, then lets them run,
        the first `early` as soon as each is forked); returns [(child, pidfd)] in order. The
        pidfd belongs to the caller until `release`."""
        names = list(names)
        self._send({"spawn": names, "run_dir": run_dir, "early": early})
        out = []
        for name in names:
            msg, fds = self._recv_reply(name)
            if "error" in msg:
                for fd in fds:
                    os.close(fd)
                raise ForkServerError(str(msg["error"]))
            if len(fds) != 1 or not isinstance(msg.get("pid"), int):
                raise ForkServerError(f"{name}: malformed reply from the fork server: {msg!r}")
            forker = msg.get("forker")
            child = ForkedChild(self, msg["pid"], forker if isinstance(forker, int) else None)
            self.children[child.pid] = child
            self.pidfds[child.pid] = fds[0]
            out.append((child, fds[0]))
        return out

    def release(self, pid: int) -> None:
        """The launcher is done with `pid`'s pidfd (it closed it)."""
        self.pidfds.pop(pid, None)

    def collect(self, timeout: float) -> None:
        """Take in the exit reports that have arrived (waiting up to `timeout` s for one)."""
        end = time.monotonic() + timeout
        while True:
            left = max(0.0, end - time.monotonic())
            if not readable(self.sock.fileno(), left):
                return
            msg, fds = self._recv()
            for fd in fds:
                os.close(fd)
            if msg is None:
                return
            if "exit" not in msg:
                raise ForkServerError(f"unexpected message from the fork server: {msg!r}")
            timeout = 0.0
            end = time.monotonic()

    def collect_exit(self, pid: int, timeout: float) -> None:
        end = time.monotonic() + timeout
        child = self.children.get(pid)
        while child is not None and child.returncode is None and time.monotonic() < end:
            self.collect(end - time.monotonic())

    def _send(self, msg: dict[str, Any]) -> None:
        try:
            self.sock.send(json.dumps(msg).encode())
        except OSError as exc:
            raise ForkServerError(f"the fork server is gone: {exc}") from None

    def _recv(self) -> tuple[dict[str, Any] | None, list[int]]:
        """One packet; exit reports are applied here. (None, []) at end of file: the zygote
        died, and with it (PR_SET_PDEATHSIG) every child it had."""
        try:
            data, fds, _, _ = socket.recv_fds(self.sock, 4096, 4)
        except OSError:
            data, fds = b"", []
        if not data:
            self._zygote_gone()
            return None, fds
        msg = json.loads(data)
        if "exit" in msg:
            child = self.children.get(msg["exit"])
            if child is not None:
                child.returncode = int(msg["code"])
        return msg, fds

    def _recv_reply(self, name: str) -> tuple[dict[str, Any], list[int]]:
        end = time.monotonic() + self.timeout
        while time.monotonic() < end:
            if not readable(self.sock.fileno(), end - time.monotonic()):
                break
            msg, fds = self._recv()
            if msg is None:
                raise ForkServerError(f"the fork server died (exit {self.proc.poll()})")
            if "exit" not in msg:
                return msg, fds
        raise ForkServerError(f"{name}: no answer from the fork server within {self.timeout:.0f} s")

    def _zygote_gone(self) -> None:
        for child in self.children.values():
            if child.returncode is None and self._exited(child.pid):
                child.returncode = -signal.SIGKILL  # killed with the zygote (PDEATHSIG)

    def _exited(self, pid: int) -> bool:
        pidfd = self.pidfds.get(pid)
        return pidfd is None or readable(pidfd, REPORT_WAIT)

    def close(self, timeout: float = 5.0) -> None:
        """End the zygote (it SIGKILLs and reaps any child left) and reap it."""
        if self.closed:
            return
        self.closed = True
        self.sock.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)
