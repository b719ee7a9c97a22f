"""What `vsva ps`, `kill` and `audit` make of their supervisor's answers (vsva.cli.replies): an
audit verdict is printed (exit 0 clean, 1 violations); a refusal or a failed audit is one
error line and exit 1, not a violation of an invariant; an answer of another shape than the
command reads (a local process that is not our supervisor may sit on the socket) is one
error line and exit 3, no traceback, for each command.

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
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cli_errors import one_line_error

from vsva.cli.replies import AUDIT, KILLED, PS, REFUSED, fits
from vsva.ops.runfiles import owner_tag

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
        state = {
            "pid": os.getpid(),
            "owner": owner_tag(),
            "run_dir": str(tmp_path),
            "ctl": endpoint,
            "actors": {},
        }
        json.dump(state, f)
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
        """`vsva audit ARGS`, or the command `args` start with when that is not an option."""
        command = ["audit"] if not args or args[0].startswith("-") else []
        return subprocess.run(
            [sys.executable, "-m", "vsva", *command, *args, "--state-dir", str(state_dir)],
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
    assert err == f"vsva: {BUSY}"  # the supervisor's line says it is the audit
    if as_json:
        assert json.loads(done.stdout) == {"ok": False, "error": BUSY}
    else:
        assert done.stdout == ""  # no "violation(s)" line, no pseudo-invariant


ROW = {"name": "host", "kind": "host", "pid": 7, "state": "running", "restarts": 0, "uptime_s": 1.5}
OTHER_SHAPES = {
    "ps": [
        {},
        {"processes": 5},
        {"processes": [dict(ROW, pid="7")]},
        {"processes": [{k: v for k, v in ROW.items() if k != "kind"}]},
        {"processes": [dict(ROW, uptime_s="long")]},
        {"processes": [ROW], "vms": {"1": {"state": "running", "workload": {"ok": False}}}},
        {"processes": [ROW], "vms": []},
    ],
    "kill": [
        {"ok": True},
        {"ok": True, "name": "host", "pid": "7"},
        {"ok": False},
        {"ok": "no", "error": "x"},
    ],
    "audit": [
        {"ok": True, "audit": 5},
        {"ok": True, "audit": {"violations": []}},
        {"ok": True, "audit": {"ok": "yes", "violations": []}},
        {"ok": True, "audit": {"ok": False, "violations": "I3"}},
        {"ok": True, "audit": {"ok": False, "violations": [3]}},
        {"ok": True, "audit": {"ok": False, "violations": [], "incomplete": "host"}},
        {"ok": False},
        {"ok": False, "error": ["busy"]},
    ],
}


@pytest.mark.parametrize(
    "command,reply",
    [(c, r) for c, replies in OTHER_SHAPES.items() for r in replies],
    ids=[f"{c}-{i}" for c, replies in OTHER_SHAPES.items() for i in range(len(replies))],
)
def test_an_answer_of_another_shape_is_one_line(supervisor, command, reply):
    supervisor.answer(reply)
    args = ("kill", "host") if command == "kill" else (command,)
    one_line_error(
        supervisor(*args), 3, f"answered {command!r} with a reply of another shape", str(os.getpid())
    )


def test_ps_and_kill_read_what_the_supervisor_sends(supervisor):
    """The same stand-in with the shapes the real supervisor sends (test_cli_up drives the real one)."""
    vms = {"1": {"state": "running", "workload": {"ok": True, "ret": 0}}}
    supervisor.answer({"processes": [ROW, dict(ROW, name="kvm", uptime_s=None)], "run_dir": "/r", "vms": vms})
    done = supervisor("ps", "--json")
    assert done.returncode == 0 and [p["name"] for p in json.loads(done.stdout)] == ["host", "kvm"], done
    supervisor.answer({"ok": True, "name": "kvm", "pid": 8})
    assert supervisor("kill", "kvm").stdout == "killed kvm (pid 8)\n"
    supervisor.answer({"ok": False, "error": "no actor 'nobody'"})
    one_line_error(supervisor("kill", "nobody"), 2, "no actor 'nobody'")
    assert supervisor.asked == [{"op": "ps"}, {"op": "kill", "name": "kvm"}, {"op": "kill", "name": "nobody"}]


def test_ps_shows_a_recovery_that_failed(supervisor):
    """A restarted kvm that gave its resync up runs, but the recovery failed: the table says so."""
    error = "resync of kvm given up: pasid_bindings to host failed 4 time(s), last -EHOSTDOWN [0]"
    supervisor.answer({"processes": [ROW, dict(ROW, name="kvm", recovery_error=error)], "vms": VMS})
    done = supervisor("ps")
    assert done.returncode == 0, done
    assert f"kvm: {error}" in " ".join(done.stdout.split()), done.stdout  # (rich wraps the caption)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


VMS = {"1": {"state": "running", "workload": {"ok": True, "ret": 0}}, "2": {"state": "off", "workload": None}}
ANSWERS = [  # (shape, an answer of that shape as the real supervisor sends it)
    (
        PS,
        {
            "processes": [
                ROW,
                dict(ROW, name="kvm", uptime_s=None, recovery_error="resync of kvm given up: ..."),
            ],
            "run_dir": "/r",
            "vms": VMS,
        },
    ),
    (KILLED, {"ok": True, "name": "kvm", "pid": 8}),
    (REFUSED, {"ok": False, "error": BUSY}),
    (AUDIT, {"ok": True, "audit": dict(CLEAN, ok=False, violations=[VIOLATION], incomplete=["vm1.guest"])}),
]


def places(value: Any, path: tuple = ()) -> list[tuple]:
    """Every place in `value` (the paths to it and to each of its parts)."""
    inner = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return [path] + [p for k, v in inner for p in places(v, (*path, k))]


def replaced(value: Any, path: tuple, new: Any) -> Any:
    """`value` with the part at `path` replaced by `new` (copies; `value` is unchanged)."""
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = replaced(value[path[0]], path[1:], new)
    return copy


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_fits_judges_any_part_of_an_answer_replaced_without_raising(data):
    """An answer the supervisor sends fits its shape; with any one part of it replaced by any
    value (the whole answer too: whatever a socket sends; deep parts, where the shape has
    lists, maps and alternatives), `fits` says yes or no and never raises."""
    shape, answer = data.draw(st.sampled_from(ANSWERS))
    assert fits(answer, shape)
    where = data.draw(st.sampled_from(places(answer)))
    assert fits(replaced(answer, where, data.draw(JSON)), shape) in (True, False)
