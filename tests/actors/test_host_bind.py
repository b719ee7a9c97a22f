"""intel_svm_bind_gpasid / intel_svm_unbind_gpasid as the host models them.

The test acts as the VMM (requests sent from "vm1.vmm": the host authenticates callers by
sender) and compares results with the kernel's codes and check order
(drivers/iommu/intel/svm.c: intel_svm_bind_gpasid, intel_svm_unbind_gpasid). Every refused request must leave the host as
it was and notify nobody.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from vsva.actors import errno as E
from vsva.hotpath.layout import PAGE_SIZE, PASID_MAX, decode_pasid_entry

EXTRA = {
    "plat1": {"id": 9, "pci": False, "vm": 1},
    "small1": {"id": 10, "pci": True, "max_pasids": 1 << 16, "vm": 1},
}
VMM1, VMM2 = "vm1.vmm", "vm2.vmm"


@pytest.fixture
def w(vsva):
    """Two VMs (VM 1 with a platform device and a 16-bit-PASID device too), one PASID each."""
    w = vsva.world(2, extra=EXTRA)
    w.ask = lambda dst, kind, body, src=VMM1: vsva.ask(w.rt, dst, kind, body, src=src)
    w.mine = w.ask("host", "ioasid_alloc", {})["hpasid"]
    w.other = w.ask("host", "ioasid_alloc", {}, src=VMM2)["hpasid"]
    w.bind = lambda dev, data, src=VMM1: w.ask("host", "bind_gpasid", {"dev": dev, "data": data}, src=src)
    w.unbind = lambda dev, pasid, src=VMM1: w.ask(
        "host", "unbind_gpasid", {"dev": dev, "hpasid": pasid}, src=src
    )
    return w


def _refused(vsva, w, expect, dev, data, src=VMM1):
    before, trace_len = vsva.host_state(w.host), len(w.rt.trace)
    kvm, vdcm = w.kvm.snapshot()["tables"], w.vdcm.snapshot()["tables"]
    reply = w.bind(dev, data, src=src)
    assert reply["ret"] == expect, (E.name(reply["ret"]), E.name(expect), dev, data)
    assert vsva.host_state(w.host) == before
    assert vsva.notifies(w.rt, trace_len) == []
    assert (w.kvm.snapshot()["tables"], w.vdcm.snapshot()["tables"]) == (kvm, vdcm)


def test_valid_record_binds_and_notifies(vsva, w):
    """The baseline the refusals below vary from: it binds, writes a nested entry, notifies."""
    trace_len = len(w.rt.trace)
    reply = w.bind("pf1", vsva.bind_record(w.mine))
    assert reply == {"ret": 0, "users": 1}
    entry = decode_pasid_entry(w.host.vfio.phys["pf1"].pasid_dir.read_entry(w.mine))
    dom = w.host.vfio.domains[1]
    assert entry["present"] and entry["pgtt"] == 3 and entry["flptr"] == 0x10000
    assert entry["slptr"] == dom.sl.root and entry["did"] == 1
    events = vsva.notifies(w.rt, trace_len)
    assert sorted(r["dst"] for r in events) == ["kvm", "vdcm"]
    assert all(r["body"]["event"] == "bind" and r["body"]["hpasid"] == w.mine for r in events)
    assert w.kvm.pasids.lookup(1, w.mine) == w.mine


@pytest.mark.parametrize(
    "case",
    [
        "version",
        "format",
        "pasid_bits",
        "not_pci",
        "hpasid0",
        "hpasid_neg",
        "hpasid_max",
        "unallocated",
        "foreign",
        "not_assigned",
        "no_such_dev",
        "mdev_of_other_vm",
    ],
)
def test_refusals_have_kernel_codes(vsva, w, case):
    rec = vsva.bind_record
    dev, data, expect = {
        "version": ("pf1", rec(w.mine, version=2), -E.EINVAL),
        "format": ("pf1", rec(w.mine, format=2), -E.EINVAL),
        "pasid_bits": ("small1", rec(w.mine), -E.EINVAL),
        "not_pci": ("plat1", rec(w.mine), -E.ENOTSUPP),
        "hpasid0": ("pf1", rec(0), -E.EINVAL),
        "hpasid_neg": ("pf1", rec(-1), -E.EINVAL),
        "hpasid_max": ("pf1", rec(PASID_MAX), -E.EINVAL),
        "unallocated": ("pf1", rec(w.mine + 1000), -E.ENOENT),
        "foreign": ("pf1", rec(w.other), -E.EACCES),
        "not_assigned": ("pf2", rec(w.mine), -E.ENODEV),
        "no_such_dev": ("nodev", rec(w.mine), -E.ENODEV),
        "mdev_of_other_vm": ("vm2.mdev0", rec(w.mine), -E.ENODEV),
    }[case]
    _refused(vsva, w, expect, dev, data)
    assert -E.ENOTSUPP == -524


@pytest.mark.parametrize("src", ["vm1.guest", "kvm", "vdcm", "orch", "vm9.vmm"])
def test_caller_not_a_vmm_is_eperm(vsva, w, src):
    _refused(vsva, w, -E.EPERM, "pf1", vsva.bind_record(w.mine), src=src)


def test_other_vmm_cannot_bind_my_pasid_on_its_device(vsva, w):
    _refused(vsva, w, -E.EACCES, "pf2", vsva.bind_record(w.mine), src=VMM2)


@pytest.mark.parametrize(
    "dev,over,expect",
    [
        # version (step 2) before the foreign PASID (step 5)
        ("pf1", {"version": 0, "hpasid": "other"}, -E.EINVAL),
        # format before the device check (step 3)
        ("plat1", {"format": 0}, -E.EINVAL),
        # non-PCI (step 3) before the hpasid range (step 4) and before ioasid_find
        ("plat1", {"hpasid": 0}, -E.ENOTSUPP),
        ("plat1", {"hpasid": "other"}, -E.ENOTSUPP),
        # partial PASID support (step 3) before ioasid_find
        ("small1", {"hpasid": "unallocated"}, -E.EINVAL),
        # hpasid range (step 4) before everything about the IOASID
        ("pf1", {"hpasid": PASID_MAX + 5}, -E.EINVAL),
        # not allocated / foreign (step 5) before the nested-entry checks (step 10)
        ("pf1", {"hpasid": "unallocated", "addr_width": 57}, -E.ENOENT),
        ("pf1", {"hpasid": "other", "gpgd": 0x10001}, -E.EACCES),
        # VFIO's own checks come before the IOMMU driver is reached at all
        ("pf2", {"version": 2}, -E.ENODEV),
    ],
)
def test_check_order(vsva, w, dev, over, expect):
    names = {"other": w.other, "unallocated": w.mine + 1000}
    over = {k: names.get(v, v) if isinstance(v, str) else v for k, v in over.items()}
    _refused(vsva, w, expect, dev, vsva.bind_record(w.mine, **over))


def test_eperm_before_anything(vsva, w):
    _refused(vsva, w, -E.EPERM, "pf2", vsva.bind_record(0, version=9), src="vm1.guest")


@pytest.mark.parametrize(
    "over",
    [
        {"addr_width": 57},
        {"gpgd": -PAGE_SIZE},
        {"vtd_flags": 1 << 7},
        {"gpgd": (1 << 52) | 0x10000},  # would be truncated to a valid-looking GPA
        {"gpgd": 1024 * PAGE_SIZE},  # the first page past guest RAM (domain->max_addr)
        {"argsz": 8},
        {"hpasid": True},
        {"flags": "1"},
    ],
)
def test_bad_entry_fields_refused_without_trace(vsva, w, over):
    """Nested-entry setup failures (step 10) also leave no svm, no entry, no notification."""
    _refused(vsva, w, -E.EINVAL, "pf1", vsva.bind_record(w.mine, **over))
    assert w.bind("pf1", vsva.bind_record(w.mine))["ret"] == 0  # nothing half-made blocks it


def test_failed_setup_keeps_existing_binding(vsva, w):
    """A failing second device on a bound PASID must not disturb the first device's bind."""
    assert w.bind("pf1", vsva.bind_record(w.mine))["ret"] == 0
    _refused(vsva, w, -E.EINVAL, "vm1.mdev0", vsva.bind_record(w.mine, addr_width=57))
    assert w.host.ioasid.allocated[w.mine].svm.devs["pf1"].users == 1


def test_gpasid_val_records_guest_pasid(vsva, w):
    from vsva.actors.uapi import IOMMU_SVA_GPASID_VAL

    trace_len = len(w.rt.trace)
    data = vsva.bind_record(w.mine, gpasid=0x123, flags=IOMMU_SVA_GPASID_VAL)
    assert w.bind("vm1.mdev0", data)["ret"] == 0
    svm = w.host.ioasid.allocated[w.mine].svm
    assert svm.gpasid == 0x123 and svm.flags & (1 << 3)
    assert {r["body"]["gpasid"] for r in vsva.notifies(w.rt, trace_len)} == {0x123}
    assert w.vdcm.pasids.lookup(1, 0x123, "vm1.mdev0") == w.mine
    assert w.vdcm.pasids.lookup(1, 0x123, "vm1.mdev1") is None


# ---- unbind ------------------------------------------------------------------------------------


def _unbind_refused(vsva, w, expect, dev, pasid, src=VMM1):
    before, trace_len = vsva.host_state(w.host), len(w.rt.trace)
    reply = w.unbind(dev, pasid, src=src)
    assert reply["ret"] == expect, (E.name(reply["ret"]), E.name(expect))
    assert vsva.host_state(w.host) == before
    assert vsva.notifies(w.rt, trace_len) == []


def test_unbind_unknown_pasid_enoent(vsva, w):
    """ioasid_find (drivers/iommu/ioasid.c) answers ERR_PTR(-ENOENT) for a PASID never
    allocated; intel_svm_unbind_gpasid (drivers/iommu/intel/svm.c) returns it."""
    _unbind_refused(vsva, w, -E.ENOENT, "pf1", w.mine + 1000)


def test_unbind_allocated_but_never_bound_einval(vsva, w):
    _unbind_refused(vsva, w, -E.EINVAL, "pf1", w.mine)


def test_unbind_device_never_bound_einval(vsva, w):
    assert w.bind("pf1", vsva.bind_record(w.mine))["ret"] == 0
    _unbind_refused(vsva, w, -E.EINVAL, "vm1.mdev0", w.mine)


def test_unbind_other_vms_pasid_eacces(vsva, w):
    assert w.bind("pf2", vsva.bind_record(w.other), src=VMM2)["ret"] == 0
    _unbind_refused(vsva, w, -E.EACCES, "pf1", w.other)
    assert w.host.ioasid.allocated[w.other].svm.devs["pf2"].users == 1


def test_unbind_device_of_other_vm_enodev_and_non_vmm_eperm(vsva, w):
    assert w.bind("pf2", vsva.bind_record(w.other), src=VMM2)["ret"] == 0
    _unbind_refused(vsva, w, -E.ENODEV, "pf2", w.other)
    _unbind_refused(vsva, w, -E.EPERM, "pf2", w.other, src="vm2.guest")


def test_two_binds_two_unbinds(vsva, w):
    """users counts binds; the entry (real bytes), svm and kvm translation go with the last."""
    pdir = w.host.vfio.phys["pf1"].pasid_dir
    rec = vsva.bind_record(w.mine)
    assert w.bind("pf1", rec) == {"ret": 0, "users": 1}
    assert w.bind("pf1", rec) == {"ret": 0, "users": 2}
    assert w.host.ioasid.allocated[w.mine].svm.devs["pf1"].users == 2

    trace_len = len(w.rt.trace)
    assert w.unbind("pf1", w.mine) == {"ret": 0, "users": 1}
    words = pdir.read_entry(w.mine)
    assert words is not None and decode_pasid_entry(words)["present"]
    assert w.mine in pdir.present_pasids()
    assert w.host.ioasid.allocated[w.mine].svm is not None
    assert w.kvm.pasids.lookup(1, w.mine) == w.mine, "kvm dropped a translation still bound"
    assert [r["body"]["event"] for r in vsva.notifies(w.rt, trace_len)] == ["unbind", "unbind"]

    assert w.unbind("pf1", w.mine) == {"ret": 0, "users": 0}
    assert pdir.read_entry(w.mine) == [0] * 8
    assert w.mine not in pdir.present_pasids()
    assert w.host.ioasid.allocated[w.mine].svm is None
    assert w.kvm.pasids.lookup(1, w.mine) is None
    # unbind never frees the IOASID: it is still allocated, in VM 1's set, and can be freed
    assert w.mine in w.host.ioasid.allocated and w.mine in w.host.vfio.domains[1].ioasids
    assert w.unbind("pf1", w.mine)["ret"] == -E.EINVAL
    assert w.ask("host", "ioasid_free", {"hpasid": w.mine})["ret"] == 0
    assert w.mine not in w.host.ioasid.allocated


def test_two_mdevs_share_parent_sdev(vsva, w):
    """Two mdevs of one parent: one sdev with users 2; vdcm keeps per-mdev translations."""
    dsa = w.host.vfio.phys["dsa0"].pasid_dir
    rec = vsva.bind_record(w.mine)
    assert w.bind("vm1.mdev0", rec)["users"] == 1
    assert w.bind("vm1.mdev1", rec)["users"] == 2
    assert w.host.ioasid.allocated[w.mine].svm.devs == {
        "dsa0": w.host.ioasid.allocated[w.mine].svm.devs["dsa0"]
    }
    assert w.vdcm.pasids.lookup(1, w.mine, "vm1.mdev1") == w.mine

    assert w.unbind("vm1.mdev0", w.mine)["users"] == 1
    assert w.mine in dsa.present_pasids()
    assert w.vdcm.pasids.lookup(1, w.mine, "vm1.mdev0") is None
    assert w.vdcm.pasids.lookup(1, w.mine, "vm1.mdev1") == w.mine
    assert w.kvm.pasids.lookup(1, w.mine) == w.mine

    assert w.unbind("vm1.mdev1", w.mine)["users"] == 0
    assert w.mine not in dsa.present_pasids()
    assert w.host.ioasid.allocated[w.mine].svm is None
    assert w.vdcm.snapshot()["tables"] == {} and w.kvm.snapshot()["tables"] == {}
    assert w.mine in w.host.ioasid.allocated


def test_svm_survives_until_last_device(vsva, w):
    rec = vsva.bind_record(w.mine)
    assert w.bind("pf1", rec)["ret"] == 0 and w.bind("vm1.mdev0", rec)["ret"] == 0
    assert w.unbind("pf1", w.mine)["ret"] == 0
    svm = w.host.ioasid.allocated[w.mine].svm
    assert svm is not None and list(svm.devs) == ["dsa0"]
    assert w.mine not in w.host.vfio.phys["pf1"].pasid_dir.present_pasids()
    assert w.mine in w.host.vfio.phys["dsa0"].pasid_dir.present_pasids()
    assert w.unbind("vm1.mdev0", w.mine)["ret"] == 0
    assert w.host.ioasid.allocated[w.mine].svm is None


# ---- random records ------------------------------------------------------------------------


def _expected(w, src, dev, data):
    """The kernel's order (drivers/iommu/intel/svm.c: intel_svm_bind_gpasid), plus VFIO's caller checks."""
    vm = {VMM1: 1, VMM2: 2}.get(src)
    if vm is None:
        return -E.EPERM
    if dev not in w.host.vfio.domains[vm].devices:
        return -E.ENODEV
    ints = ("argsz", "version", "format", "flags", "hpasid", "gpasid", "gpgd", "addr_width")
    vtd = data.get("vtd_flags", 0)
    if any(type(data.get(f)) is not int for f in ints) or type(vtd) is not int or data["argsz"] < 72:
        return -E.EINVAL
    if data["version"] != 1 or data["format"] != 1 or data["flags"] & ~1 or vtd & ~0x7F:
        return -E.EINVAL
    if dev == "plat1":
        return -E.ENOTSUPP
    if dev == "small1" or not 0 < data["hpasid"] < PASID_MAX:
        return -E.EINVAL
    owner = w.host.ioasid.allocated.get(data["hpasid"])
    if owner is None:
        return -E.ENOENT
    if owner.vm != vm:
        return -E.EACCES
    gpgd = data["gpgd"]
    if vtd & 0b111100 or data["addr_width"] != 48 or not 0 <= gpgd < 1024 * PAGE_SIZE:
        return -E.EINVAL
    return 0


_ANY = st.one_of(
    st.integers(-2, 3),
    st.integers(-(1 << 63), (1 << 64) - 1),
    st.booleans(),
    st.text(max_size=3),
    st.none(),
    st.lists(st.integers(), max_size=2),
)


_GOOD = {
    "argsz": 72,
    "version": 1,
    "format": 1,
    "flags": 0,
    "hpasid": "mine",
    "gpasid": 0x100,
    "gpgd": 0x20000,
    "addr_width": 48,
    "vtd_flags": 0,
}
_BAD = {
    "argsz": [0, 47, 55, 56, 71, 1 << 32],
    "version": [0, 2],
    "format": [0, 2],
    "flags": [1, 2, 3],
    "hpasid": ["other", "unallocated", 0, -1, PASID_MAX, PASID_MAX - 1],
    "gpasid": [0, PASID_MAX],
    "gpgd": [0, 0x20001, 1024 * PAGE_SIZE, 1023 * PAGE_SIZE, (1 << 52) | 0x2000, -PAGE_SIZE],
    "addr_width": [39, 57],
    "vtd_flags": [1, 0x7F, 0x80, 1 << 40],
}


@st.composite
def _records(draw):
    """Mostly one or two fields off (each from its own bad values or anything at all)."""
    data = dict(_GOOD)
    n = draw(st.sampled_from([0, 1, 1, 1, 2, 3]))
    for key in draw(st.lists(st.sampled_from(sorted(_GOOD)), min_size=n, max_size=n, unique=True)):
        data[key] = draw(st.one_of(st.sampled_from(_BAD[key]), _ANY) if draw(st.integers(0, 3)) else _ANY)
    if draw(st.integers(0, 4)) == 0:
        data["hpasid"] = draw(st.sampled_from(["other", "unallocated"]))
    for key in draw(st.lists(st.sampled_from(sorted(data)), max_size=1)):
        if draw(st.integers(0, 3)) == 0:
            del data[key]
    dev = draw(st.sampled_from(["pf1"] * 5 + ["vm1.mdev0", "plat1", "small1", "pf2", "vm2.mdev1", "x"]))
    if draw(st.integers(0, 3)):  # mostly the VMM whose devices those are
        return {"pf2": VMM2, "vm2.mdev1": VMM2}.get(dev, VMM1), dev, data
    return draw(st.sampled_from([VMM1, VMM2, "vm1.guest", "kvm"])), dev, data


def test_random_bind_records(vsva):
    """Never a crash; the result is the kernel's for that record; refused -> nothing changed;
    accepted -> unbinding restores the state exactly."""
    w = vsva.world(2, extra=EXTRA)
    mine = vsva.ask(w.rt, "host", "ioasid_alloc", {}, src=VMM1)["hpasid"]
    other = vsva.ask(w.rt, "host", "ioasid_alloc", {}, src=VMM2)["hpasid"]
    names = {"mine": mine, "other": other, "unallocated": 4242}
    seen = set()

    @settings(
        max_examples=150,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    @given(_records())
    @example((VMM1, "plat1", dict(_GOOD)))  # a non-PCI device with a good record: -ENOTSUPP, always tried
    @example((VMM1, "pf1", {**_GOOD, "hpasid": "unallocated"}))  # ioasid_find: -ENOENT, always tried
    def check(case):
        src, dev, data = case
        if isinstance(data.get("hpasid"), str) and data["hpasid"] in names:
            data["hpasid"] = names[data["hpasid"]]
        expect = _expected(w, src, dev, data)
        before, trace_len = vsva.host_state(w.host), len(w.rt.trace)
        reply = vsva.ask(w.rt, "host", "bind_gpasid", {"dev": dev, "data": data}, src=src)
        entry = None
        if reply["ret"] == 0:  # look, then undo at once: a wrong acceptance must not leak on
            entry = decode_pasid_entry(w.host.vfio.physical(dev).pasid_dir.read_entry(data["hpasid"]))
            unbound = vsva.ask(w.rt, "host", "unbind_gpasid", {"dev": dev, "hpasid": data["hpasid"]}, src=src)
        assert reply["ret"] == expect, (E.name(reply["ret"]), E.name(expect), src, dev, data, reply)
        seen.add(expect)
        if expect:
            assert vsva.host_state(w.host) == before
            assert vsva.notifies(w.rt, trace_len) == []
        else:
            assert reply["users"] == 1 and unbound == {"ret": 0, "users": 0}
            assert (
                entry["present"] and entry["flptr"] == data["gpgd"] & ~(PAGE_SIZE - 1) and entry["pgtt"] == 3
            )
            after = vsva.host_state(w.host)
            before.pop("caches"), after.pop("caches")  # the teardown flushes are allowed
            assert after == before

    check()
    assert {0, -E.EINVAL, -E.ENOTSUPP, -E.ENOENT, -E.EACCES, -E.ENODEV, -E.EPERM} <= seen
