"""One frame or one connection must not take a topology down: a real topology (one process
per actor) against a hostile local process written with raw pyzmq (tests/orchestrator/hostile.py).
After each attack the orchestrator still reaches every actor and nothing died."""

from __future__ import annotations

import os

import msgpack
import pytest
import zmq
from hostile import Raw
from supervised import step_until
from zmqrt_toys import Script

from vsva.actors import errno as E
from vsva.actors.base import Call, Gather
from vsva.ops.launcher import Launcher
from vsva.ops.topology import default_topology


@pytest.fixture(scope="module")
def topo():
    with Launcher(default_topology(1)) as launcher:
        yield launcher


def pings(launcher, names=None) -> dict[str, dict]:
    names = names or [p["name"] for p in launcher.processes()]
    actor = Script(steps=[Gather([Call(n, "ping", {}, timeout=2.0) for n in names])])
    assert launcher.run_actor(actor, timeout=10.0)
    return dict(zip(names, actor.result[0]))


def all_alive(launcher) -> bool:
    return all(p["state"] == "running" for p in launcher.processes())


def test_a_duplicate_routing_id_does_not_displace_the_live_peer(topo):
    """ROUTER_HANDOVER would hand "orch" (at the host) and "host" (at the orchestrator) to the
    newcomer and cut the real channels for good."""
    assert all(r["ret"] == 0 for r in pings(topo).values())  # every channel is up: live peers
    squatters = [
        Raw(topo.run_dir, "host", "orch", listen=False),
        Raw(topo.run_dir, "orch", "host", listen=False),
        Raw(topo.run_dir, "kvm", "host", listen=False),
    ]
    try:
        for s in squatters:
            s.send(s.envelope("ping"))
        assert all(r["ret"] == 0 for r in pings(topo).values())
        assert all(s.answer(0.3) is None for s in squatters), "a squatter was served"
        assert all(r["ret"] == 0 for r in pings(topo).values())
    finally:
        for s in squatters:
            s.close()
    # the name with another incarnation's id: refused, and it changes nothing either
    forger = Raw(topo.run_dir, "host", "orch", listen=False, routing_id=b"orch/1.2")
    try:
        assert forger.request("snapshot")["ret"] == -E.EPERM
    finally:
        forger.close()
    assert all(r["ret"] == 0 for r in pings(topo).values())
    assert all_alive(topo)


@pytest.mark.parametrize("clock", [2**64 - 1, 2**64 - 2000, 2**62 + 1])
def test_a_clock_out_of_range_is_refused_and_nothing_overflows(topo, clock):
    m = Raw(topo.run_dir, "host", "mallory")
    try:
        assert m.request("ping", clock=clock)["ret"] == -E.ERANGE
        assert m.request("ping", clock=-1)["ret"] == -E.ERANGE
        m.send(b"\xc1")  # the next frame it must refuse: its answer is encoded with the clock
        assert m.answer()["ret"] == -E.EBADMSG
    finally:
        m.close()
    assert all(r["ret"] == 0 for r in pings(topo).values())
    assert all_alive(topo)


def test_a_clock_at_the_bound_leaves_the_actor_heard_by_everyone(topo):
    """A clock of exactly 2**62 is in range: refused as a control kind from a stranger, but
    taken in by the Lamport clock, which must not pass the bound its peers check."""
    m = Raw(topo.run_dir, "host", "mallory")
    try:
        assert m.request("ping", clock=2**62)["ret"] == -E.EPERM
    finally:
        m.close()
    assert all(r["ret"] == 0 for r in pings(topo).values())
    assert all_alive(topo)


def test_four_hundred_sender_names_do_not_exhaust_the_peer_table(topo):
    """Each name has its socket in the run directory, so the target opens a DEALER (three
    sockets) to answer it: without a bound, libzmq's socket limit (1023) kills it. Every
    request is answered (refused: only the host notifies kvm), the table stays bounded."""
    kvm_pid = topo.pid("kvm")
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, 4096)
    clients = []
    try:
        for i in range(400):
            m = Raw(topo.run_dir, "kvm", f"m{i}", ctx=ctx)
            clients.append(m)
            reply = m.request(
                "ioasid_notify", {"event": "bind", "vm": 1, "hpasid": 1, "gpasid": 1, "dev": "x"}
            )
            assert reply is not None and reply["ret"] == -E.EPERM, (i, reply)
            m.dealer.close(0)  # its inbound connection goes; kvm's DEALER to it stays
        assert pings(topo, ["kvm"])["kvm"]["ret"] == 0
        fds = len(os.listdir(f"/proc/{kvm_pid}/fd"))
        assert fds < 300, f"kvm holds {fds} fds"
    finally:
        for m in clients:
            m.router.close(0)
        ctx.destroy(0)
    assert topo.pid("kvm") == kvm_pid and all_alive(topo)


def test_supervisor_control_fields_are_validated(tmp_path):
    from vsva.ops.supervisor import Supervisor, ctl_endpoint
    from vsva.ops.topology_file import default_run

    sup = Supervisor(default_run(1), workloads=False)
    ctx = zmq.Context()
    try:
        sup.start()
        client = ctx.socket(zmq.DEALER)
        client.connect(ctl_endpoint(sup.launcher.run_dir))

        def ask(req):
            client.send(req if isinstance(req, bytes) else msgpack.packb(req))
            step_until(sup, lambda: client.poll(0), 5.0, f"an answer to {req!r}")
            return msgpack.unpackb(client.recv(), raw=False)

        bad = [
            {"op": "kill", "name": ["x"]},
            {"op": "kill", "name": {"a": 1}},
            {"op": "kill"},
            {"op": ["ps"]},
            {"op": "kill", "name": "host", "extra": 1},
            [1, 2],
            b"\xc1",
            {"op": "frobnicate"},
            {1: 2},
            "down",
        ]
        for req in bad:
            reply = ask(req)
            assert reply["ok"] is False and reply["error"], req
        assert all(p["state"] == "running" for p in sup.processes())
        assert ask({"op": "ps"})["ok"] is True
        client.close(0)
    finally:
        ctx.destroy(0)
        sup.close()


def test_a_workload_of_thousands_of_rounds_reports_its_end(vsva):
    """4000 churn rounds: 16,000 steps, more than a frame can carry in full (1.2 MiB)."""
    from vsva.actors.messages import MAX_FRAME

    w = vsva.world(1, workload="churn", iterations=4000)
    reply = vsva.ask(w.rt, "vm1.guest", "start_workload", {})
    assert reply["ret"] == 0 and reply["ok"]
    assert reply["summary"] == {"total": 16000, "failed": 0, "verified": 4000, "truncated": True}
    assert len(msgpack.packb(reply)) < MAX_FRAME // 2
