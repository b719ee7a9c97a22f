"""The tests' bounded waits on other processes: on what a command prints (the tests that drive
`python -m vsva` as a user would act when a line appears: a phase reached, a stop begun), on a
process's exit (its pidfd), and the one poll for state that nothing signals (`poll_until`)."""

from __future__ import annotations

import os
import select
import subprocess
import time
from collections.abc import Callable, Iterable
from typing import IO, TypeVar

from vsva.cli.client import wait_exit

T = TypeVar("T")


def read_until(proc: subprocess.Popen, *needles: str, timeout: float, stream: IO | None = None) -> str:
    """What `proc` wrote on its stderr (or `stream`) until it has written every one of `needles`
    (bounded). Read from the descriptor: a buffered readline could hold the line in its buffer
    while select() waits for more."""
    fd, seen, end = (stream or proc.stderr).fileno(), b"", time.monotonic() + timeout
    while missing := [n for n in needles if n.encode() not in seen]:
        left = end - time.monotonic()
        chunk = os.read(fd, 65536) if left > 0 and select.select([fd], [], [], left)[0] else b""
        assert chunk, (
            f"no {missing} within {timeout} s (or the stream closed); so far:\n{seen[-3000:].decode()}"
        )
        seen += chunk
    return seen.decode(errors="replace")


def wait_gone(pids: Iterable[int], timeout: float, what: str) -> None:
    """Wait (bounded) until every process of `pids` has exited: a pidfd turns readable when its
    process does, whoever its parent is (vsva.cli.client.wait_exit), a zombie included."""
    end = time.monotonic() + timeout
    late = [p for p in pids if not wait_exit(p, max(0.0, end - time.monotonic()))]
    assert not late, f"timed out after {timeout} s waiting for {what}: pids {late} still run"


def poll_until(cond: Callable[[], T], timeout: float, what: str, pause: float = 0.05) -> T:
    """`cond()` once it is true, asked every `pause` s up to `timeout` s. Only for state that
    no event announces to the test: the supervisor's view of its actors is seen only by asking
    it (`vsva ps`, `vsva audit`); a file another process writes with nothing said when (a run
    directory made during a launch, trace records written in batches); a connection another
    process's ZeroMQ I/O thread makes, seen only in the kernel's socket tables. Anything a
    test can await (a reply, a pidfd, a line printed, a socket monitor event) is awaited."""
    end = time.monotonic() + timeout
    while not (value := cond()):
        assert time.monotonic() < end, f"timed out after {timeout} s waiting for {what}"
        time.sleep(pause)
    return value
