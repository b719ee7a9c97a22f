"""The audit (docs/design.md §5) must be able to fail: corrupted snapshots and real inconsistencies."""

from __future__ import annotations

import copy

import pytest

from vsva.analysis.audit import audit


def _hold(g):
    """A workload that stops with work bound: pf (one process) and both mdevs on one PASID."""
    from vsva.actors.guest import demo_passthrough

    k = g.kernel
    p1, p3 = k.spawn(1), k.spawn(3)
    pf = next(d for d in g.pasid_dirs if d not in g.mdevs)
    g.held_pf = yield from demo_passthrough(g, p1, pf, 0x4000_0000)
    m0, m1 = sorted(g.mdevs)[:2]
    k.mmap(p3, 0x5000_0000, 1)
    pasid = yield from g.alloc_pasid(p3, m0)
    yield from g.bind(p3, m0, pasid)
    yield from g.bind(p3, m1, pasid)
    reply = yield from g.submit(m1, pasid, "fill", dst=0x5000_0000, length=4096, pattern=9)
    g.step("F7", "mdev fill", reply)
    g.held_mdev = pasid
    g.procs = (p1, p3)


@pytest.fixture
def held(vsva, monkeypatch):
    import vsva.actors.guest as guest

    monkeypatch.setitem(guest.WORKLOADS, "hold", _hold)
    rt, c = vsva.session(2, workload="hold", shutdown=False)
    snaps = c.result["snapshots"]
    assert c.result["violations"] == []
    assert all(w["ret"] == 0 for w in c.result["workloads"].values()), c.result["workloads"]
    host = snaps["host"]
    assert host["svms"] and host["caches"]["iotlb"] and snaps["kvm"]["tables"] and snaps["vdcm"]["tables"]
    return rt, c, snaps


def _pasids(snaps, vm):
    g = snaps[f"vm{vm}.vmm"]
    return g["g2h"], [b for b in g["bound"]]


def _only(violations, inv, pasid=None):
    assert violations, "the audit found nothing"
    assert {v["invariant"] for v in violations} == {inv}, violations
    if pasid is not None:
        assert {v["pasid"] for v in violations} == {pasid}, violations


def _free_pasid(snaps):
    used = {int(p) for p in snaps["host"]["ioasids"]}
    return next(p for p in range(1, 1000) if p not in used)


def _bound(snaps, vm, dev_prefix="pf"):
    svms = snaps["host"]["svms"]
    return next(
        int(p) for p, s in svms.items() if s["vm"] == vm and any(d.startswith(dev_prefix) for d in s["devs"])
    )


def test_clean_hold_state(held):
    rt, c, snaps = held
    assert audit(snaps, c.topology) == []
    users = {(p, d): u for p, s in snaps["host"]["svms"].items() for d, u in s["devs"].items()}
    assert sorted(users.values()) == [1, 1, 2, 2]  # pf of each VM, the mdev pair of each VM


def test_kvm_translation_for_unbound_pasid_is_i3(held):
    rt, c, snaps = held
    bad = copy.deepcopy(snaps)
    free = _free_pasid(snaps)
    bad["kvm"]["tables"].setdefault("1", {})["777"] = {"hpasid": free, "devs": ["pf1"]}
    _only(audit(bad, c.topology), "I3", free)


def test_vdcm_translation_to_other_vms_pasid_is_i7(held):
    rt, c, snaps = held
    bad = copy.deepcopy(snaps)
    theirs = _bound(snaps, 2)
    bad["vdcm"]["tables"].setdefault("1", {})["778"] = {"hpasid": theirs, "devs": ["vm1.mdev0"]}
    _only(audit(bad, c.topology), "I7", theirs)


@pytest.mark.parametrize("delta", [+1, -1])
def test_users_off_by_one_is_i5(held, delta):
    rt, c, snaps = held
    for prefix in ("pf", "dsa"):
        bad = copy.deepcopy(snaps)
        pasid = _bound(snaps, 1, prefix)
        devs = bad["host"]["svms"][str(pasid)]["devs"]
        dev = next(iter(devs))
        devs[dev] += delta
        if devs[dev] == 0:
            continue  # users 0 with an sdev is its own corruption; 1 - 1 covered by "+1"
        _only(audit(bad, c.topology), "I5", pasid)


def test_vmm_maps_pasid_not_held_is_i3(held):
    rt, c, snaps = held
    bad = copy.deepcopy(snaps)
    free = _free_pasid(snaps)
    bad["vm1.vmm"]["g2h"]["4000"] = free
    _only(audit(bad, c.topology), "I3", free)
    bad = copy.deepcopy(snaps)
    theirs = _bound(snaps, 2)
    bad["vm1.vmm"]["g2h"]["4001"] = theirs  # another VM's PASID: not in VM 1's set either
    _only(audit(bad, c.topology), "I3", theirs)


def test_iotlb_entry_for_free_pasid_is_i3(held):
    rt, c, snaps = held
    bad = copy.deepcopy(snaps)
    free = _free_pasid(snaps)
    did, _, vpn, frame, perms = bad["host"]["caches"]["iotlb"][0]
    bad["host"]["caches"]["iotlb"].append([did, free, vpn, frame, perms])
    _only(audit(bad, c.topology), "I3", free)


def test_devtlb_entry_for_free_pasid_is_i3(held):
    rt, c, snaps = held
    bad = copy.deepcopy(snaps)
    free = _free_pasid(snaps)
    dev, entries = next((d, e) for d, e in bad["host"]["caches"]["devtlb"].items() if e)
    entries.append([free] + list(entries[0][1:]))
    _only(audit(bad, c.topology), "I3", free)


def test_iotlb_entry_of_other_domain_is_i7(held):
    rt, c, snaps = held
    bad = copy.deepcopy(snaps)
    entry = next(e for e in bad["host"]["caches"]["iotlb"] if e[0] == 1)
    bad["host"]["caches"]["iotlb"].append([2] + list(entry[1:]))
    _only(audit(bad, c.topology), "I7", entry[1])


def test_pasid_entry_without_svm_is_i3(held):
    rt, c, snaps = held
    bad = copy.deepcopy(snaps)
    free = _free_pasid(snaps)
    bad["host"]["pasid_entries"]["pf1"].append(free)
    _only(audit(bad, c.topology), "I3", free)


def test_svm_without_entry_is_i3(held):
    rt, c, snaps = held
    bad = copy.deepcopy(snaps)
    pasid = _bound(snaps, 1)
    bad["host"]["pasid_entries"]["pf1"].remove(pasid)
    _only(audit(bad, c.topology), "I3", pasid)


def test_page_request_for_unbound_pasid_is_i3(held):
    rt, c, snaps = held
    bad = copy.deepcopy(snaps)
    free = _free_pasid(snaps)
    bad["host"]["prq"].append({"dev": "pf1", "pasid": free, "addr": 0, "grpid": 1})
    _only(audit(bad, c.topology), "I3", free)


def test_set_holding_other_vms_pasid_is_i7(held):
    rt, c, snaps = held
    bad = copy.deepcopy(snaps)
    theirs = _bound(snaps, 2)
    bad["host"]["vms"]["1"]["ioasids"].append(theirs)
    assert {v["invariant"] for v in audit(bad, c.topology)} >= {"I7"}
    assert any(
        v["invariant"] == "I7" and v["pasid"] == theirs and v["vm"] == 1 for v in audit(bad, c.topology)
    )


def test_missing_snapshots_reported(held):
    rt, c, snaps = held
    bad = copy.deepcopy(snaps)
    del bad["vm2.vmm"]
    assert any(v["invariant"] == "audit" for v in audit(bad, c.topology))
    assert audit({}, c.topology)[0]["invariant"] == "audit"


# ---- real inconsistencies made by acting behind the vmm's back -----------------------------------


def _snapshots(vsva, rt, topology):
    return {n: vsva.ask(rt, n, "snapshot", {})["state"] for n in topology.names()}


def test_bind_behind_vmms_back_caught(vsva, held):
    rt, c, snaps = held
    g = rt.actors["vm1.guest"]
    pasid = vsva.ask(rt, "host", "ioasid_alloc", {}, src="vm1.vmm")["hpasid"]
    data = vsva.bind_record(pasid, gpgd=g.procs[0].cr3)
    assert vsva.ask(rt, "host", "bind_gpasid", {"dev": "pf1", "data": data}, src="vm1.vmm")["ret"] == 0
    found = audit(_snapshots(vsva, rt, c.topology), c.topology)
    assert {v["invariant"] for v in found} == {"I3", "I5"}
    assert {v["pasid"] for v in found} == {pasid}
    assert any("leaked" in v["what"] for v in found)


def test_extra_bind_of_held_pasid_caught(vsva, held):
    """The vmm's shadow says one bind; a second one made behind its back is an I5 violation."""
    rt, c, snaps = held
    g = rt.actors["vm1.guest"]
    data = vsva.bind_record(g.held_pf, gpgd=g.procs[0].cr3)
    assert vsva.ask(rt, "host", "bind_gpasid", {"dev": "pf1", "data": data}, src="vm1.vmm")["users"] == 2
    _only(audit(_snapshots(vsva, rt, c.topology), c.topology), "I5", g.held_pf)


def test_unbind_behind_vmms_back_caught(vsva, held):
    rt, c, snaps = held
    g = rt.actors["vm1.guest"]
    reply = vsva.ask(rt, "host", "unbind_gpasid", {"dev": "pf1", "hpasid": g.held_pf}, src="vm1.vmm")
    assert reply["ret"] == 0
    found = audit(_snapshots(vsva, rt, c.topology), c.topology)
    assert {v["invariant"] for v in found} == {"I3", "I5"}
    assert {v["pasid"] for v in found} == {g.held_pf}
    assert any("believes" in v["what"] for v in found)


def test_free_behind_vmms_back_caught(vsva, held):
    rt, c, snaps = held
    g = rt.actors["vm1.guest"]
    assert vsva.ask(rt, "host", "ioasid_free", {"hpasid": g.held_pf}, src="vm1.vmm")["ret"] == 0
    found = audit(_snapshots(vsva, rt, c.topology), c.topology)
    assert "I3" in {v["invariant"] for v in found}
    assert {v["pasid"] for v in found} == {g.held_pf}
    # the FREE notifier did its part: no entry, no cache entry, no kvm translation left
    host = rt.actors["host"]
    assert g.held_pf not in host.vfio.phys["pf1"].pasid_dir.present_pasids()
    assert not [e for e in host.iommu.cache_dump()["iotlb"] if e[1] == g.held_pf]
    assert rt.actors["kvm"].pasids.lookup(1, g.held_pf) is None
