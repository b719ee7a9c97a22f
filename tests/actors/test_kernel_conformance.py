"""The host's answers against the kernel's, one kernel function per test (cited in each), under
both semantics where they differ (`kernel = "v11"`, the seed; `"v5.9"`, what was merged).

Kernel sources: drivers/iommu/intel/svm.c (intel_svm_bind_gpasid, intel_svm_unbind_gpasid,
pasid_to_svm_sdev), drivers/iommu/intel/pasid.c (intel_pasid_setup_nested,
intel_pasid_setup_bind_data), drivers/iommu/iommu.c (iommu_check_bind_data),
drivers/iommu/ioasid.c (ioasid_find), include/uapi/linux/iommu.h.
"""

from __future__ import annotations

import pytest

from vsva.actors import errno as E
from vsva.actors.semantics import Kernel
from vsva.hotpath.layout import PAGE_SIZE, decode_pasid_entry

VMM1 = "vm1.vmm"


@pytest.fixture(params=[k.value for k in Kernel])
def w(vsva, request):
    w = vsva.world(2, kernel=request.param)
    w.kernel = Kernel(request.param)
    w.ask = lambda kind, body, src=VMM1: vsva.ask(w.rt, "host", kind, body, src=src)
    w.mine = w.ask("ioasid_alloc", {})["hpasid"]
    w.bind = lambda dev, rec: w.ask("bind_gpasid", {"dev": dev, "data": rec})
    w.unbind = lambda dev, pasid: w.ask("unbind_gpasid", {"dev": dev, "hpasid": pasid})
    return w


def _refused(vsva, w, ret, dev, rec):
    before = vsva.host_state(w.host)
    assert w.bind(dev, rec)["ret"] == ret
    assert vsva.host_state(w.host) == before


# ---- intel_pasid_setup_nested (drivers/iommu/intel/pasid.c, v5.8+) -----------------------------


def test_bind_over_a_present_entry_is_ebusy(vsva, w):
    """intel_pasid_setup_nested: "Caller must ensure PASID entry is not in use": a present
    entry is -EBUSY, never overwritten. Here the entry is one the host itself left behind."""
    rec = vsva.bind_record(w.mine)
    pdir = w.host.vfio.phys["pf1"].pasid_dir
    other = w.ask("ioasid_alloc", {})["hpasid"]
    assert w.bind("pf1", vsva.bind_record(other)) == {"ret": 0, "users": 1}
    pdir.write_entry(w.mine, pdir.read_entry(other))  # a live entry under w.mine, no svm for it
    before = pdir.read_entry(w.mine)
    _refused(vsva, w, -E.EBUSY, "pf1", rec)
    assert pdir.read_entry(w.mine) == before


@pytest.mark.parametrize("flag", [2, 3, 4, 5])  # PCD, PWT, EMTE, CD
def test_memory_type_flags_are_einval(vsva, w, flag):
    """intel_pasid_setup_bind_data: "No memory type support" (the v13 series dropped MTS)."""
    _refused(vsva, w, -E.EINVAL, "pf1", vsva.bind_record(w.mine, vtd_flags=1 << flag))


def test_gpgd_low_bits_are_masked_not_refused(vsva, w):
    """pasid_set_flptr keeps the page-frame bits of gpgd; only a gpgd beyond the domain's
    address range is refused (intel_pasid_setup_nested)."""
    assert w.bind("pf1", vsva.bind_record(w.mine, gpgd=0x10008))["ret"] == 0
    entry = decode_pasid_entry(w.host.vfio.phys["pf1"].pasid_dir.read_entry(w.mine))
    assert entry["present"] and entry["flptr"] == 0x10000
    other = w.ask("ioasid_alloc", {})["hpasid"]
    _refused(vsva, w, -E.EINVAL, "pf1", vsva.bind_record(other, gpgd=1024 * PAGE_SIZE))


# ---- iommu_check_bind_data (drivers/iommu/iommu.c, v5.10+) and intel_svm_bind_gpasid -----------


@pytest.mark.parametrize("argsz", [0, 55, 56, 64, 71])
def test_argsz_below_the_vtd_data_is_einval(vsva, w, argsz):
    """iommu_check_bind_data: argsz below offsetof(vendor) (56) -> -EINVAL; intel_svm_bind_gpasid:
    below offsetofend(vendor.vtd) (72) -> -EINVAL. 72 is sizeof(struct iommu_gpasid_bind_data)."""
    _refused(vsva, w, -E.EINVAL, "pf1", vsva.bind_record(w.mine, argsz=argsz))
    assert w.bind("pf1", vsva.bind_record(w.mine, argsz=72))["ret"] == 0


def test_our_vmm_sends_a_full_record(vsva, w):
    """The vmm's bind record carries the VT-d vendor data: argsz 72 (uapi iommu.h)."""
    from vsva.actors.vmm import BIND_ARGSZ

    assert BIND_ARGSZ == 72


@pytest.mark.parametrize("flags", [2, 4, 1 << 31])
def test_unknown_flags_are_einval(vsva, w, flags):
    """iommu_check_bind_data: flags other than IOMMU_SVA_GPASID_VAL -> -EINVAL."""
    _refused(vsva, w, -E.EINVAL, "pf1", vsva.bind_record(w.mine, flags=flags))


def test_vendor_flags_checked_before_the_pci_check(vsva):
    """intel_svm_bind_gpasid: unknown vendor flags -> -EINVAL before dev_is_pci (-ENOTSUPP)."""
    w = vsva.world(1, extra={"plat1": {"id": 90, "vm": 1, "pci": False}})
    pasid = vsva.ask(w.rt, "host", "ioasid_alloc", {}, src=VMM1)["hpasid"]
    bind = lambda rec: vsva.ask(w.rt, "host", "bind_gpasid", {"dev": "plat1", "data": rec}, src=VMM1)  # noqa: E731
    assert bind(vsva.bind_record(pasid, vtd_flags=1 << 7))["ret"] == -E.EINVAL
    assert bind(vsva.bind_record(pasid))["ret"] == -E.ENOTSUPP


# ---- a second bind of one device (intel_svm_bind_gpasid) -----------------------------------------


def test_second_bind_of_a_device(vsva, w):
    """v11: the device is on the svm's list: users++ and 0. v5.9 ("Disable multiple GPASID-dev
    bind", drivers/iommu/intel/svm.c): -EBUSY, nothing changes."""
    rec = vsva.bind_record(w.mine)
    assert w.bind("pf1", rec) == {"ret": 0, "users": 1}
    if w.kernel is Kernel.V11:
        assert w.bind("pf1", rec) == {"ret": 0, "users": 2}
        assert w.unbind("pf1", w.mine) == {"ret": 0, "users": 1}
    else:
        _refused(vsva, w, -E.EBUSY, "pf1", rec)
    assert w.unbind("pf1", w.mine) == {"ret": 0, "users": 0}


def test_two_mdevs_of_one_parent(vsva, w):
    """The mdevs share their parent's sdev: v11 counts two users; v5.9 refuses the second."""
    rec = vsva.bind_record(w.mine)
    assert w.bind("vm1.mdev0", rec)["ret"] == 0
    second = w.bind("vm1.mdev1", rec)
    assert second == ({"ret": 0, "users": 2} if w.kernel is Kernel.V11 else second | {"ret": -E.EBUSY})


# ---- intel_svm_unbind_gpasid / pasid_to_svm_sdev ---------------------------------------------------


def test_unbind_of_a_pasid_never_allocated_is_enoent(vsva, w):
    """ioasid_find (drivers/iommu/ioasid.c): ERR_PTR(-ENOENT); the unbind returns PTR_ERR."""
    before = vsva.host_state(w.host)
    assert w.unbind("pf1", 4242)["ret"] == -E.ENOENT
    assert vsva.host_state(w.host) == before


def test_unbind_of_an_allocated_unbound_pasid(vsva, w):
    """v11: no svm -> -EINVAL. v5.9: pasid_to_svm_sdev finds no svm -> the unbind returns 0."""
    before = vsva.host_state(w.host)
    expect = -E.EINVAL if w.kernel is Kernel.V11 else 0
    assert w.unbind("pf1", w.mine)["ret"] == expect
    assert vsva.host_state(w.host) == before


def test_unbind_of_a_device_never_bound(vsva, w):
    """v11: the device is not on the svm's list -> -EINVAL. v5.9: no sdev -> 0."""
    assert w.bind("pf1", vsva.bind_record(w.mine))["ret"] == 0
    before = vsva.host_state(w.host)
    assert w.unbind("vm1.mdev0", w.mine)["ret"] == (-E.EINVAL if w.kernel is Kernel.V11 else 0)
    assert vsva.host_state(w.host) == before


def test_kernel_is_validated_where_it_enters():
    assert Kernel.parse("v5.9") is Kernel.V5_9
    with pytest.raises(ValueError, match="unknown kernel 'v6.1'; valid: v11, v5.9"):
        Kernel.parse("v6.1")
