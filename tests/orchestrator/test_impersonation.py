"""Only the orchestrator may control, and a name must be proven: every impersonation of
issue 11 against a live topology (VM 1 powered on, its workload run: PASIDs bound), over ipc
and over tcp, by a hostile process written with raw pyzmq (tests/orchestrator/hostile.py).
Each attempt is refused (an -EPERM answer, or no service at all) and changes nothing: every
actor's state, read by the orchestrator's own snapshots, is the same before and after.

The attacker: over ipc, a process of the topology's user (it can open the run directory);
over tcp, another user, who can reach the loopback ports but not the 0700 run directory
(so it has no key; a test also lends it an actor's key, which proves only that actor's name).
"""

from __future__ import annotations

import os

import pytest
import zmq
from hostile import Raw
from zmqrt_toys import Script

from vsva.actors import errno as E
from vsva.actors.base import Call, Gather
from vsva.ops.launcher import Launcher
from vsva.ops.topology import default_topology

PF = "pf1"


@pytest.fixture(scope="module", params=["ipc", "tcp"])
def topo(request):
    t = default_topology(1, workload="bind_many", iterations=3)
    t.transport = request.param
    with Launcher(t) as launcher:
        boot = Script(
            steps=[
                Call("vm1.vmm", "vm_start", {}, flow="boot"),
                Call("vm1.guest", "start_workload", {}, timeout=60.0),
            ]
        )
        assert launcher.run_actor(boot, timeout=90.0)
        assert boot.result[0]["ret"] == 0 and boot.result[1]["ret"] == 0, boot.result
        yield launcher


def snapshots(launcher) -> dict:
    names = [p["name"] for p in launcher.processes()]
    actor = Script(steps=[Gather([Call(n, "snapshot", {}, timeout=3.0) for n in names])])
    assert launcher.run_actor(actor, timeout=10.0)
    out = dict(zip(names, actor.result[0]))
    assert all(r["ret"] == 0 for r in out.values()), out
    return out


def bound_hpasid(launcher) -> int:
    vmm = snapshots(launcher)["vm1.vmm"]["state"]
    assert vmm["bound"], "the workload left nothing bound"
    return int(next(iter(vmm["g2h"].values())))


def attacks(hpasid: int) -> list[tuple[str, str, dict, str | None]]:
    """(target, kind, body, claimed name or None for the attacker's own name)."""
    control = [(t, "snapshot", {}, None) for t in ("host", "kvm", "vdcm", "vm1.vmm", "vm1.guest")]
    control += [
        ("host", "pool_status", {}, None),
        ("vm1.vmm", "vm_stop", {}, None),
        ("vm1.vmm", "vm_start", {}, None),
        ("vm1.guest", "start_workload", {}, None),
    ]
    control += [(t, "shutdown", {}, None) for t in ("kvm", "vdcm", "host")]
    claims = [
        ("host", "ioasid_alloc", {}, "vm1.vmm"),
        ("host", "unbind_gpasid", {"dev": PF, "hpasid": hpasid}, "vm1.vmm"),
        ("host", "ioasid_free", {"hpasid": hpasid}, "vm1.vmm"),
        (
            "host",
            "dev_submit",
            {
                "dev": PF,
                "hpasid": hpasid,
                "op": "fill",
                "src": 0,
                "dst": 0x4000_0000,
                "len": 4096,
                "pattern": 7,
            },
            "vm1.guest",
        ),
        ("kvm", "ioasid_notify", {"event": "free_set", "vm": 1, "hpasid": 0, "gpasid": 0, "dev": ""}, "host"),
        ("host", "snapshot", {}, "orch"),
        ("kvm", "shutdown", {}, "orch"),
    ]
    return control + claims


def refused(answer: dict | None) -> bool:
    return answer is None or answer.get("ret") == -E.EPERM


def test_every_impersonation_is_refused_and_changes_nothing(topo):
    hpasid = bound_hpasid(topo)
    before = snapshots(topo)
    tcp = topo.transport == "tcp"
    for target, kind, body, claim in attacks(hpasid):
        name = claim or "mallory"
        # ipc: the topology's user can read the claimed actor's incarnation (its socket file)
        # and so present its exact routing id; tcp: another user cannot, and has no key
        m = Raw(
            topo.run_dir,
            target,
            name,
            listen=claim is None and not tcp,
            routing_id=f"{name}/1.1".encode() if tcp else None,
        )
        try:
            answer = m.request(kind, body, timeout=0.5)
        finally:
            m.close()
        assert refused(answer), (topo.transport, target, kind, claim, answer)
    assert all(p["state"] == "running" for p in topo.processes())
    assert snapshots(topo) == before


def test_over_tcp_an_actor_key_proves_only_that_actor(topo):
    """A client holding kvm's key pair (as kvm itself does) claims other names: refused; its
    own name is accepted, and kvm may not control either."""
    if topo.transport != "tcp":
        pytest.skip("Curve keys exist on tcp only")
    keys = os.path.join(topo.run_dir, "keys")
    with open(os.path.join(keys, "kvm.key"), "rb") as f:
        public, secret = f.read().split()[:2]
    before = snapshots(topo)
    for target, kind, claim in (
        ("host", "snapshot", "orch"),
        ("host", "ioasid_alloc", "vm1.vmm"),
        ("host", "pool_status", "kvm"),
        ("vdcm", "shutdown", "kvm"),
    ):
        with open(os.path.join(keys, f"{target}.key"), "rb") as f:
            server = f.read().split()[0]
        m = Raw(
            topo.run_dir,
            target,
            claim,
            listen=False,
            curve=(public, secret, server),
            routing_id=_incarnation(topo, claim),
        )
        try:
            answer = m.request(kind, {}, timeout=0.5)
        finally:
            m.close()
        assert refused(answer), (target, kind, claim, answer)
    # as kvm it was heard: the host's -EPERM answer went to kvm, which dropped it (a reply
    # to nothing it asked): that counter is the only difference
    after = snapshots(topo)
    after["kvm"]["state"]["dropped_replies"] -= 1
    assert after == before


def test_over_tcp_a_client_without_a_key_gets_no_connection(topo):
    if topo.transport != "tcp":
        pytest.skip("tcp only")
    ctx = zmq.Context.instance()
    m = Raw(topo.run_dir, "host", "mallory", listen=False, routing_id=b"mallory/1.1", ctx=ctx)
    try:
        m.send(m.envelope("ping"))
        assert m.answer(0.5) is None
    finally:
        m.close()


def _incarnation(launcher, name: str) -> bytes:
    from hostile import incarnation_id

    return incarnation_id(launcher.run_dir, name)
