"""F8 on a VM's death (deterministic runtime): the host notices the dead vmm on its own.

VM 1 is driven by hand (one process, PASID bound to pf1, DMA done); VM 2 runs the real demo
workload and is killed part way, once it holds PASIDs bound on its passthrough function and
on its mdevs (so kvm and vdcm both translate for it), or while one of its binds is still in
the host's notifier. `rt.kill` makes every surviving actor see the peer go (peer_down): for
the host that is the VFIO fd closing, and it must tear the VM down by itself (docs/design.md §3, F8).
"""

from __future__ import annotations

import pytest

from vsva.analysis.audit import audit
from vsva.hotpath.layout import PAGE_SIZE, PGTT_FIRST_ONLY, encode_pasid_entry

POLICIES = ["naive", "ordered", "reclaim"]
VA, PAGES = 0x4000_0000, 4


def vm_gone_everywhere(w, vm: int) -> None:
    host, snap = w.host, w.host.snapshot()
    assert vm not in host.vfio.domains and str(vm) not in snap["vms"]
    assert [p for p, a in host.ioasid.allocated.items() if a.vm == vm] == []
    assert [a for a in host.ioasid.allocated.values() if a.svm is not None and a.svm.vm == vm] == []
    assert str(vm) not in snap["owned_frames"]
    assert [r for r in host.prq.pending if r.get("vm") == vm] == []
    assert [e for e in host.iommu.cache_dump()["iotlb"] if e[0] == vm] == []
    assert [e for e in host.iommu.cache_dump()["pasid_cache"] if e[2] == vm] == []
    assert host.vfio.phys[f"pf{vm}"].pasid_dir.present_pasids() == []
    assert str(vm) not in w.kvm.snapshot()["tables"]
    assert str(vm) not in w.vdcm.snapshot()["tables"]
    assert host.ioasid.reclaiming == {} and host.ioasid.quarantined == {}
    assert not host.busy and not w.kvm.busy and not w.vdcm.busy


def vm1_dma(g, proc, pasid, pattern):
    reply = g.submit("pf1", pasid, "fill", dst=VA, length=PAGES * PAGE_SIZE, pattern=pattern)
    assert reply["ret"] == 0, reply
    assert g.kernel.read(proc, VA, PAGES * PAGE_SIZE) == bytes([pattern]) * PAGES * PAGE_SIZE


@pytest.fixture(params=POLICIES)
def policy(request):
    return request.param


def start(vsva, policy):
    w = vsva.world(2, hand=(1,), policy=policy)
    w.g1 = vsva.HandGuest(w.rt, 1, devices=["pf1"])
    w.p1 = w.g1.spawn(1, VA, PAGES)
    w.P1 = w.g1.alloc("pf1")["gpasid"]
    assert w.g1.bind(w.p1, "pf1", w.P1)["ret"] == 0
    vm1_dma(w.g1, w.p1, w.P1, 0x11)
    # VM 2's demo workload, run only part of the way
    vsva.Wire(w.rt).send("orch", "vm2.guest", "start_workload")
    return w


def vm2_bound_everywhere(w) -> bool:
    host = w.host
    pf_bound = [a for a in host.ioasid.allocated.values() if a.vm == 2 and a.svm and "pf2" in a.svm.devs]
    return len(pf_bound) >= 2 and "2" in w.vdcm.snapshot()["tables"] and "2" in w.kvm.snapshot()["tables"]


def vm2_bind_in_notifier(w) -> bool:
    """A bind of VM 2 has written its entry and its BIND notification is out, not yet acked."""
    trace = w.rt.trace
    sent = sum(
        1
        for r in trace
        if r["kind"] == "ioasid_notify"
        and r["corr"] is None
        and r["dst"] == "kvm"
        and r["body"]["event"] == "bind"
        and r["body"]["vm"] == 2
    )
    answered = sum(
        1 for r in trace if r["kind"] == "bind_gpasid" and r["corr"] is not None and r["dst"] == "vm2.vmm"
    )
    return sent > answered


@pytest.mark.parametrize("when", ["bound", "mid_bind"])
@pytest.mark.parametrize(
    "order", [("vm2.vmm", "vm2.guest"), ("vm2.guest", "vm2.vmm")], ids=["vmm_first", "guest_first"]
)
def test_killed_vm_is_torn_down_by_the_host(vsva, policy, when, order):
    w = start(vsva, policy)
    rt, host = w.rt, w.host
    rt.run(until=(lambda: vm2_bound_everywhere(w)) if when == "bound" else (lambda: vm2_bind_in_notifier(w)))
    vm2_pasids = sorted(p for p, a in host.ioasid.allocated.items() if a.vm == 2)
    assert vm2_pasids and any(host.ioasid.allocated[p].svm for p in vm2_pasids)
    assert host.snapshot()["owned_frames"].get("2")
    assert host.teardowns == []
    if when == "mid_bind":
        assert host.busy  # the host still waits for the subscribers' acks of VM 2's bind
    for name in order:
        rt.kill(name)
    rt.run()
    assert [(t["vm"], t["why"]) for t in host.teardowns] == [(2, "vm2.vmm died")]
    assert host.teardowns[0]["pasids"] == len(vm2_pasids) and "finished" in host.teardowns[0]
    vm_gone_everywhere(w, 2)
    assert audit(w.snapshots(), w.t) == []
    # VM 1 is untouched: its PASID still bound and translating, and it binds anew
    assert host.ioasid.state(w.P1) == "bound"
    assert str(1) in w.kvm.snapshot()["tables"]
    vm1_dma(w.g1, w.p1, w.P1, 0x22)
    p2 = w.g1.spawn(2, VA, PAGES)
    new = w.g1.alloc("pf1")["gpasid"]
    assert w.g1.bind(p2, "pf1", new)["ret"] == 0
    vm1_dma(w.g1, p2, new, 0x33)
    assert w.g1.kernel.read(w.p1, VA, PAGES * PAGE_SIZE) == b"\x22" * PAGES * PAGE_SIZE
    assert audit(w.snapshots(), w.t) == []
    assert host.iommu.counters()["owner_violations"] == 0 and host.dma.foreign == []


def test_freed_vm_pasids_are_reused_cleanly(vsva, policy):
    """After the teardown, VM 2's PASIDs (reuse-first) go to VM 1: nothing stale follows them."""
    w = start(vsva, policy)
    rt, host = w.rt, w.host
    rt.run(until=lambda: vm2_bound_everywhere(w))
    vm2_pasids = {p for p, a in host.ioasid.allocated.items() if a.vm == 2}
    rt.kill("vm2.vmm")
    rt.kill("vm2.guest")
    rt.run()
    procs, got = [], []
    for pid in range(10, 10 + len(vm2_pasids)):
        proc = w.g1.spawn(pid, VA, PAGES)
        pasid = w.g1.alloc("pf1")["gpasid"]
        assert w.g1.bind(proc, "pf1", pasid)["ret"] == 0
        procs.append(proc)
        got.append(pasid)
    assert set(got) == vm2_pasids
    for i, (proc, pasid) in enumerate(zip(procs, got)):
        vm1_dma(w.g1, proc, pasid, 0x40 + i)
    assert audit(w.snapshots(), w.t) == []


def test_kill_during_dma_loops_vm1_unaffected(vsva, policy):
    """Both guests run the `dma_loop` workload (real guest actors); VM 2 dies part way.
    VM 1's loop completes with every step ok; VM 2 is gone everywhere; the audit is clean."""
    w = vsva.world(2, policy=policy, workload="dma_loop", iterations=40)
    rt, host = w.rt, w.host
    wire = vsva.Wire(rt)
    runs = {vm: wire.send("orch", f"vm{vm}.guest", "start_workload") for vm in (1, 2)}
    guests = {vm: rt.actors[f"vm{vm}.guest"] for vm in (1, 2)}
    rt.run(until=lambda: all(g.dma.completed >= 6 for g in guests.values()))
    assert "2" in w.vdcm.snapshot()["tables"] and "2" in w.kvm.snapshot()["tables"]
    rt.kill("vm2.vmm")
    rt.kill("vm2.guest")
    rt.run()
    done = [r["body"] for r in rt.trace if r["corr"] == runs[1].rid and r["src"] == "vm1.guest"]
    assert len(done) == 1 and done[0]["ret"] == 0 and done[0]["ok"], done
    assert sum(1 for s in done[0]["steps"] if s["flow"] == "F7" and s["ok"]) == 2 * 40
    assert [t["vm"] for t in host.teardowns] == [2]
    vm_gone_everywhere(w, 2)
    assert audit(w.snapshots(), w.t) == []
    assert host.iommu.counters()["owner_violations"] == 0 and host.dma.foreign == []


@pytest.mark.parametrize("policy", ["ordered", "reclaim"])
def test_dead_vms_mdev_descriptor_in_flight_never_reaches_the_next_owner(vsva, policy):
    """VM 2's guest had a descriptor in vdcm, on its way to the shared accelerator, when VM 2
    died. Its PASID may go to VM 1 only after vdcm acknowledged FREE_SET: vdcm's ack travels
    behind that descriptor, so the descriptor reaches the device while the PASID is still
    VM 2's (torn down: it faults) and can never run under VM 1's entry on the same parent."""
    w = vsva.world(2, hand=(1, 2), policy=policy)
    rt, host, vdcm = w.rt, w.host, w.vdcm
    wire = vsva.Wire(rt)
    g1 = vsva.HandGuest(rt, 1, devices=["vm1.mdev0"])
    g2 = vsva.HandGuest(rt, 2, devices=["vm2.mdev0"])
    p1, p2 = g1.spawn(1, VA, PAGES), g2.spawn(1, VA, PAGES)
    a2 = g2.alloc("vm2.mdev0")
    assert g2.bind(p2, "vm2.mdev0", a2["gpasid"])["ret"] == 0
    P2 = a2["hpasid"]
    rt.hold("vdcm", "host")  # the descriptor is on its way to the device
    wire.send(
        "vm2.guest",
        "vdcm",
        "mdev_submit",
        {
            "dev": "vm2.mdev0",
            "gpasid": a2["gpasid"],
            "op": "fill",
            "src": 0,
            "dst": VA,
            "len": PAGE_SIZE,
            "pattern": 0x99,
        },
    )
    rt.run(until=lambda: vdcm.portal.submitted == 1)
    rt.kill("vm2.vmm")
    rt.kill("vm2.guest")
    rt.run(until=lambda: "2" not in vdcm.snapshot()["tables"])  # vdcm got FREE_SET; its ack waits
    # VM 1 allocates (reuse-first: VM 2's PASID if it is in the pool) and binds on its mdev
    a1 = wire.call("vm1.guest", "vm1.vmm", "vcmd_alloc", {"dev": "vm1.mdev0"})
    assert a1["ret"] == 0
    g1.dirs["vm1.mdev0"].write_entry(
        a1["gpasid"], encode_pasid_entry(flptr=p1.cr3, slptr=0, did=1, eafe=True, pgtt=PGTT_FIRST_ONLY)
    )
    bind = wire.send(
        "vm1.guest",
        "vm1.vmm",
        "qi_submit",
        {"descs": [{"type": "pc", "dev": "vm1.mdev0", "gpasid": a1["gpasid"]}, {"type": "wait"}]},
    )
    rt.run(until=lambda: a1["hpasid"] in host.vfio.phys["dsa0"].pasid_dir.present_pasids())
    rt.release("vdcm", "host")
    assert wire.wait(bind)["ret"] == 0
    rt.run()
    # VM 2's descriptor never ran under VM 1's entry: VM 1's memory is untouched
    assert host.dma.foreign == []
    assert g1.kernel.read(p1, VA, PAGE_SIZE) == bytes(PAGE_SIZE)
    assert a1["hpasid"] != P2  # VM 2's PASID was not handed out before vdcm's acknowledgement
    assert host.teardowns and "finished" in host.teardowns[0]
    assert host.ioasid.state(P2) == "free" and P2 in host.ioasid.pool
    vm_gone_everywhere(w, 2)
    assert audit(w.snapshots(), w.t) == []


@pytest.mark.parametrize("policy", POLICIES)
def test_teardown_with_a_dead_subscriber(vsva, policy):
    """kvm is dead when VM 2 dies: the teardown still finishes (bounded, nothing hangs).
    reclaim and ordered: the PASIDs that were bound are quarantined (never reused), the
    unbound one is free; naive: everything is back in the pool at once."""
    w = vsva.world(2, hand=(2,), policy=policy)
    rt, host = w.rt, w.host
    g2 = vsva.HandGuest(rt, 2, devices=["pf2"])
    proc = g2.spawn(1, VA, PAGES)
    bound, unbound = g2.alloc("pf2")["gpasid"], g2.alloc("pf2")["gpasid"]
    assert g2.bind(proc, "pf2", bound)["ret"] == 0
    rt.kill("kvm")
    rt.kill("vm2.vmm")
    rt.run()
    assert [t["vm"] for t in host.teardowns] == [2] and "finished" in host.teardowns[0]
    assert not host.busy
    assert host.ioasid.state(unbound) == "free" and unbound in host.ioasid.pool
    if policy == "naive":
        assert host.ioasid.state(bound) == "free" and host.notify_failures == 0
    else:
        assert host.ioasid.state(bound) == "quarantined" and bound not in host.ioasid.pool
        assert host.notify_failures == 1
    assert 2 not in host.vfio.domains and "2" not in host.snapshot()["owned_frames"]
    assert host.vfio.phys["pf2"].pasid_dir.present_pasids() == []
