"""Talking to a live topology's supervisor: one request on its control socket, answered at
once when there is nobody to ask, and bounded waits for its process to exit."""

from __future__ import annotations

import os
from typing import Any

from vsva.cli.exits import EXIT_HOST_LOST, EXIT_NO_TOPOLOGY, fail
from vsva.cli.state import host_lost_line, supervisor_alive


def check_supervisor(state: dict[str, Any], quiet: bool = False) -> None:
    """Answer at once when there is nobody to ask: a lost host's record, a dead supervisor."""
    if state.get("host_lost"):
        fail(EXIT_HOST_LOST, host_lost_line(state), quiet)
    if not supervisor_alive(state):
        fail(
            EXIT_NO_TOPOLOGY,
            f"the supervisor (pid {state['pid']}) is not running (it died without "
            "cleaning up); `vsva down` removes what it left",
            quiet,
        )


def ctl(
    state: dict[str, Any], op: str, timeout: float = 20.0, quiet: bool = False, **body: Any
) -> dict[str, Any]:
    """One request to the supervisor's control socket; exits with a message on no answer, and
    within a fraction of a second when the supervisor is (or becomes) dead."""
    import time

    import msgpack
    import zmq

    check_supervisor(state, quiet)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(state["ctl"])
        sock.send(msgpack.packb({"op": op, **body}))
        end = time.monotonic() + timeout
        while not sock.poll(200, zmq.POLLIN):
            check_supervisor(state, quiet)
            if time.monotonic() >= end:
                fail(
                    EXIT_NO_TOPOLOGY,
                    f"the supervisor (pid {state['pid']}) did not answer {op!r} within {timeout:.0f} s",
                    quiet,
                )
        try:
            reply = msgpack.unpackb(sock.recv(), raw=False)
        except Exception:  # any local process may answer on that socket
            reply = None
        if not isinstance(reply, dict):
            fail(EXIT_NO_TOPOLOGY, f"the supervisor (pid {state['pid']}) answered {op!r} with no msgpack map")
        return reply
    finally:
        sock.close(0)


def wait_exit(pid: int, timeout: float, wake_fd: int = -1) -> bool:
    """Wait (bounded) for any process to exit, through a pidfd: True once it is gone. A
    readable `wake_fd` (a signal's wakeup descriptor, StopSignals.fd) ends the wait early."""
    import select

    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return fd in select.select([fd] + ([wake_fd] if wake_fd >= 0 else []), [], [], timeout)[0]
    finally:
        os.close(fd)
