"""A live topology under the in-process supervisor (what `vsva up` runs: real processes), for
tests that drive its loop themselves."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from vsva.ops.supervisor import Supervisor
from vsva.ops.topology_file import RunFile


@contextmanager
def supervised(run: RunFile, **kw: Any) -> Iterator[Supervisor]:
    """Start the topology, step the supervisor until every VM is powered on, yield it; close it."""
    s = Supervisor(run, **kw)
    try:
        s.start()
        for _ in range(500):
            s.step(0.01)
            if s.actor.booted:
                break
        assert s.actor.booted, "the VMs were not powered on"
        yield s
    finally:
        s.close()
