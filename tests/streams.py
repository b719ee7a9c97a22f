"""Waiting on what a command prints: the tests that drive `python -m vsva` as a user would act
when a line appears (a phase reached, a stop begun), not after a poll of the file system."""

from __future__ import annotations

import os
import select
import subprocess
import time
from typing import IO


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
