"""A live topology under the in-process supervisor (what `vsva up` runs: real processes), for
tests that drive its loop themselves."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from vsva.ops.supervisor import Supervisor
from vsva.ops.topology_file import RunFile

T = TypeVar("T")


def step_until(sup: Supervisor, cond: Callable[[], T], timeout: float, what: str) -> T:
    """`cond()` once it is true, stepping the supervisor's loop meanwhile (bounded in time,
    not in steps: a step ends early when the loop has work). What the test waits for is made
    by that loop, in this thread, and each step waits on its sockets and descriptors: the
    test drives the loop it awaits, nothing sleeps."""
    end = time.monotonic() + timeout
    while not (value := cond()):
        assert time.monotonic() < end, f"timed out after {timeout} s waiting for {what}"
        sup.step(0.01)
    return value


@contextmanager
def supervised(run: RunFile, **kw: Any) -> Iterator[Supervisor]:
    """Start the topology, step the supervisor until every VM is powered on, yield it; close it."""
    s = Supervisor(run, **kw)
    try:
        s.start()
        step_until(s, lambda: s.actor.booted, 10.0, "the VMs to be powered on")
        yield s
    finally:
        s.close()
