"""The supervisor's control socket under many requests: a flood is answered CTL_BATCH a step
while the rest of the loop goes on, and concurrent `audit` requests share one live audit.

A real supervisor (one process per actor) whose loop the test steps. The client is a raw
DEALER on an inproc endpoint that the test binds on the supervisor's own control ROUTER:
an inproc send is in the ROUTER's queue when it returns, so "N requests queued before the
supervisor steps" holds exactly (over ipc they arrive a little later, and by how much is
the I/O threads' business). What the ROUTER and the loop do with them is the same."""

from __future__ import annotations

import os
import signal
import time

import msgpack
import pytest
import zmq
from supervised import step_until, supervised

from vsva.ops.supervisor.control import AUDIT_WAITERS, CTL_BATCH
from vsva.ops.topology_file import default_run

ENDPOINT = "inproc://ctl-flood"
FLOOD_STEPS = 1000  # a steady flood lasts this many steps at most (and 20 s)


@pytest.fixture(scope="module")
def sup():
    with supervised(default_run(1), workloads=False) as s:
        assert s.control is not None and s.control.ctl is not None
        s.control.ctl.bind(ENDPOINT)
        yield s


@pytest.fixture
def client(sup):
    sock = sup.runtime.ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(ENDPOINT)
    yield sock
    sock.close(0)


@pytest.fixture
def audit_runs(sup, monkeypatch) -> list[int]:
    """Counts the supervisor's live audits: one entry per audit_task started."""
    runs: list[int] = []
    real = sup.audit_task

    def counted():
        runs.append(len(runs))
        return (yield from real())

    monkeypatch.setattr(sup, "audit_task", counted)
    return runs


def send(client, **req) -> None:
    client.send(msgpack.packb(req))


def received(client) -> list[dict]:
    """Every reply the client has now (inproc: a reply sent is already here)."""
    out = []
    while client.poll(0):
        out.append(msgpack.unpackb(client.recv(), raw=False))
    return out


def kill_nobody(i: int) -> dict:
    """A request whose refusal names it: `kill` of an actor that does not exist."""
    return {"op": "kill", "name": f"nobody{i}"}


def refused_for(reply: dict, i: int) -> bool:
    return reply["ok"] is False and reply["error"].startswith(f"no actor 'nobody{i}';")


def collect(sup, client, n: int, what: str) -> list[dict]:
    """Step the loop until `n` replies are in (bounded); a few steps more bring none."""
    got: list[dict] = []

    def done() -> bool:
        got.extend(received(client))
        return len(got) >= n

    step_until(sup, done, 10.0, what)
    for _ in range(3):
        sup.step(0.01)
    got.extend(received(client))
    assert len(got) == n, f"{len(got)} replies to {n} requests"
    return got


def test_a_serve_answers_ctl_batch_requests_and_the_next_steps_the_rest_in_order(sup, client):
    n = 3 * CTL_BATCH
    for i in range(n):
        send(client, **kill_nobody(i))
    sup.control.serve()
    first = received(client)
    assert len(first) == CTL_BATCH, "one serve answered more than its bound"
    rest = collect(sup, client, n - CTL_BATCH, "the rest of the flood")
    replies = first + rest
    assert len(replies) == n
    assert all(refused_for(r, i) for i, r in enumerate(replies)), "answered out of order"
    assert all(p["state"] == "running" for p in sup.processes())


def test_a_steady_flood_does_not_hold_back_the_recovery_of_a_killed_actor(sup, client):
    """kvm is SIGKILLed while the control socket never holds fewer than 2 * CTL_BATCH
    requests: it is seen dead, restarted and resynced from the host (its recovery needs the
    actor's replies) with the flood still queued; then the flood is answered in full, in
    order. Before, a step woken by a waiting request gave the actor no round at all."""
    before = len(sup.recovery.records)
    old_pid = sup.launcher.pid("kvm")
    os.kill(old_pid, signal.SIGKILL)

    def recovery():
        recs = [r for r in sup.recovery.records[before:] if r["actor"] == "kvm"]
        return recs[0] if recs and ("t_recovered" in recs[0] or "error" in recs[0]) else None

    sent, replies = 0, []
    end = time.monotonic() + 20.0
    for _ in range(FLOOD_STEPS):
        if recovery() is not None:
            break
        assert time.monotonic() < end, "kvm not recovered within 20 s of flood"
        while sent - len(replies) < 3 * CTL_BATCH:
            send(client, **kill_nobody(sent))
            sent += 1
        sup.step(0.01)
        replies += received(client)
    rec = recovery()
    assert rec is not None, f"kvm not recovered within {FLOOD_STEPS} steps of flood"
    assert "error" not in rec, rec
    assert sup.launcher.pid("kvm") != old_pid and sup.launcher.alive("kvm")
    assert sent - len(replies) >= 2 * CTL_BATCH, "the flood was over before the recovery"
    replies += collect(sup, client, sent - len(replies), "the rest of the flood")
    assert all(refused_for(r, i) for i, r in enumerate(replies)), "answered out of order"


def test_ten_audits_at_once_share_at_most_two_live_audits(sup, client, audit_runs):
    send(client, op="audit")
    (single,) = collect(sup, client, 1, "a single audit")
    assert single["ok"] is True and single["audit"]["ok"] is True, single
    del audit_runs[:]
    for _ in range(10):
        send(client, op="audit")
    replies = collect(sup, client, 10, "ten audits")
    assert len(audit_runs) <= 2, f"{len(audit_runs)} live audits for ten requests"
    for r in replies:
        assert r["ok"] is True and set(r["audit"]) == set(single["audit"]), r
        assert r["audit"]["ok"] is True and r["audit"]["violations"] == [] == r["audit"]["incomplete"]


def test_audits_beyond_the_waiters_bound_are_refused_at_once(sup, client, audit_runs):
    pids = {p["name"]: (p["pid"], p["state"]) for p in sup.processes()}
    extra = 3
    for _ in range(1 + AUDIT_WAITERS + extra):  # one starts, AUDIT_WAITERS wait, the rest
        send(client, op="audit")
    send(client, op="ps")
    sup.control.serve()
    now = received(client)  # before the actor ran: the refusals and ps only
    assert len(now) == extra + 1, now
    for r in now[:extra]:
        assert r["ok"] is False and "\n" not in r["error"], r
        assert "running" in r["error"] and f"{AUDIT_WAITERS} requests wait" in r["error"], r
    assert now[-1]["ok"] is True and "processes" in now[-1]
    replies = collect(sup, client, 1 + AUDIT_WAITERS, "the queued audits")
    assert all(r["ok"] is True and r["audit"]["ok"] is True for r in replies), replies
    assert len(audit_runs) == 2
    assert {p["name"]: (p["pid"], p["state"]) for p in sup.processes()} == pids
    assert not sup.control.audits.running and sup.control.audits.waiting == []


def test_an_audit_that_raises_answers_in_one_line_and_the_next_one_runs(sup, client, monkeypatch):
    real = sup.audit_task

    def broken():
        monkeypatch.setattr(sup, "audit_task", real)
        raise RuntimeError("snapshot decoder bug\nsecond line")
        yield

    monkeypatch.setattr(sup, "audit_task", broken)
    send(client, op="audit")
    (failed,) = collect(sup, client, 1, "the broken audit's answer")
    assert failed["ok"] is False and "\n" not in failed["error"], failed
    assert failed["error"].startswith("audit failed: RuntimeError(")
    send(client, op="audit")
    (ok,) = collect(sup, client, 1, "the next audit")
    assert ok["ok"] is True and ok["audit"]["ok"] is True, ok
