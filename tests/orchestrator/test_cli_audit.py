"""What `vsva audit` makes of its supervisor's answer: a verdict is printed (exit 0 clean, 1
violations); a refusal or a failed audit is one error line and exit 1, not a violation of an
invariant; an answer that is no verdict (a local process that is not our supervisor may sit
on the socket) is one error line and exit 3, no traceback.

The supervisor is a stand-in: a ROUTER in this process on the state file's control endpoint,
answering each request with the next reply of a list; the CLI runs as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import zmq
from test_cli_errors import one_line_error

BUSY = "audit: busy: one is running and 16 requests wait for the next (at most 16); ask again"
CLEAN = {"ok": True, "violations": [], "incomplete": [], "cut": {"held_s": 0.01}}
VIOLATION = {
    "invariant": "I3",
    "what": "PASID 5 bound on the host, unknown to vm1.vmm",
    "actors": ["host", "vm1.vmm"],
    "vm": 1,
    "pasid": 5,
}


@pytest.fixture
def supervisor(tmp_path) -> Iterator[Any]:
    """`answer(reply)`: the stand-in answers the next request with `reply`; `run(*args)` runs
    `vsva audit` against it and returns the finished process."""
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    endpoint = f"ipc://{tmp_path}/ctl.sock"
    with open(state_dir / "current.json", "w") as f:
        json.dump({"pid": os.getpid(), "run_dir": str(tmp_path), "ctl": endpoint, "actors": {}}, f)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    replies: list[Any] = []
    asked: list[dict] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            if sock.poll(50, zmq.POLLIN):
                rid, frame = sock.recv_multipart()
                asked.append(msgpack.unpackb(frame))
                sock.send_multipart([rid, msgpack.packb(replies.pop(0))])

    server = threading.Thread(target=serve, daemon=True)
    server.start()

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "vsva", "audit", "--state-dir", str(state_dir), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    run.answer = replies.append
    run.asked = asked
    yield run
    stop.set()
    server.join(timeout=5)
    assert not server.is_alive()
    sock.close(0)
    ctx.term()


def test_a_clean_verdict_and_one_with_a_violation(supervisor):
    supervisor.answer({"ok": True, "audit": CLEAN})
    done = supervisor()
    assert (done.returncode, done.stdout, done.stderr) == (0, "audit: clean\n", "")
    supervisor.answer({"ok": True, "audit": dict(CLEAN, ok=False, violations=[VIOLATION])})
    done = supervisor()
    assert done.returncode == 1
    assert done.stdout.splitlines() == [
        "audit: 1 violation(s)",
        "  I3: PASID 5 bound on the host, unknown to vm1.vmm (actors ['host', 'vm1.vmm'], vm 1, pasid 5)",
    ]
    assert supervisor.asked == [{"op": "audit"}] * 2


@pytest.mark.parametrize("as_json", [False, True])
def test_a_busy_supervisor_is_an_error_line_not_a_violation(supervisor, as_json):
    supervisor.answer({"ok": False, "error": BUSY})
    done = supervisor(*(["--json"] if as_json else []))
    err = one_line_error(done, 1, "busy", "ask again")
    assert err == f"vsva audit: {BUSY}"
    if as_json:
        assert json.loads(done.stdout) == {"ok": False, "error": BUSY}
    else:
        assert done.stdout == ""  # no "violation(s)" line, no pseudo-invariant


@pytest.mark.parametrize(
    "audit",
    [
        5,
        {"violations": []},
        {"ok": "yes", "violations": []},
        {"ok": False, "violations": "I3"},
        {"ok": False, "violations": [3]},
        {"ok": False, "violations": [], "incomplete": "host"},
    ],
    ids=[
        "not-a-map",
        "no-ok",
        "ok-not-bool",
        "violations-not-a-list",
        "violation-not-a-map",
        "incomplete-not-a-list",
    ],
)
def test_an_answer_that_is_no_verdict_is_one_line(supervisor, audit):
    supervisor.answer({"ok": True, "audit": audit})
    one_line_error(supervisor(), 3, "no audit verdict", str(os.getpid()))
