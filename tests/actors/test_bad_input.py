"""Bad input from untrusted parties (docs/design.md §9): an errno reply, never a crash, no change of state.

Everything runs in the deterministic runtime; hostile requests are put on the wire with
`rt.inject` (through the `ask` helper) under the sender name the transport would report.
"""

from __future__ import annotations

import copy

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from vsva.actors import errno as E
from vsva.actors.catalogue import CATALOGUE
from vsva.actors.messages import MAX_FRAME, Envelope, ProtocolError, decode, encode
from vsva.hotpath.layout import PAGE_SIZE

ACTORS = ["host", "kvm", "vdcm", "vm1.vmm", "vm1.guest"]


def _state(actor):
    snap = copy.deepcopy(actor.snapshot())
    for key in ("counters", "pending", "dropped_replies"):
        snap.pop(key, None)
    return snap


@pytest.fixture
def w(vsva):
    w = vsva.world(2)
    w.pasid = vsva.ask(w.rt, "host", "ioasid_alloc", {}, src="vm1.vmm")["hpasid"]
    return w


@pytest.mark.parametrize("dst", ACTORS)
def test_unknown_kind_eopnotsupp(vsva, w, dst):
    actor = w.rt.actors[dst]
    before = _state(actor)
    reply = vsva.ask(w.rt, dst, "frobnicate", {"pasid": 1}, src="vm1.vmm")
    assert reply["ret"] == -E.EOPNOTSUPP and "frobnicate" in reply["error"]
    assert _state(actor) == before
    assert vsva.ask(w.rt, dst, "ping", {}) == {"ret": 0}


@pytest.mark.parametrize("dst", ACTORS)
def test_known_kind_without_handler_eopnotsupp(vsva, w, dst):
    """A kind in the catalogue that this actor does not serve, with a body that would fit."""
    kind, body = ("vcmd_free", {"gpasid": 1}) if dst != "vm1.vmm" else ("ioasid_free", {"hpasid": 1})
    reply = vsva.ask(w.rt, dst, kind, body, src="vm1.vmm")
    assert reply["ret"] == -E.EOPNOTSUPP and "does not handle" in reply["error"]


@pytest.mark.parametrize(
    "dst,kind,body",
    [
        ("host", "ioasid_free", {"hpasid": "1"}),
        ("host", "ioasid_free", {"hpasid": True}),
        ("host", "ioasid_free", {}),
        ("host", "bind_gpasid", {"dev": 5, "data": {}}),
        ("host", "bind_gpasid", {"dev": "pf1", "data": [1, 2]}),
        ("host", "unbind_gpasid", {"dev": "pf1", "hpasid": 1.0}),
        ("host", "cache_invalidate", {"dev": "pf1", "info": "all"}),
        ("host", "vfio_open", {"vm": 1, "ram_pages": 16, "devices": "pf1", "quota": 1}),
        ("host", "dev_submit", {"dev": "pf1", "hpasid": 1, "op": "fill", "src": 0, "dst": 0, "len": "4"}),
        (
            "host",
            "dev_submit",
            {"dev": "pf1", "hpasid": 0, "op": "fill", "src": 0, "dst": 0, "len": 4, "pattern": 0},
        ),
        (
            "host",
            "dev_submit",
            {"dev": "pf1", "hpasid": 1, "op": "cmp", "src": 0, "dst": 0, "len": 4, "pattern": 0},
        ),
        ("kvm", "ioasid_notify", {"event": "bind", "vm": "1", "hpasid": 1, "gpasid": 1, "dev": "pf1"}),
        ("vdcm", "mdev_submit", {"dev": "vm1.mdev0", "gpasid": None}),
        ("vm1.vmm", "qi_submit", {"descs": {"type": "wait"}}),
        ("vm1.vmm", "vcmd_alloc", {"dev": ["pf1"]}),
        ("vm1.vmm", "vcmd_free", {"gpasid": "x"}),
    ],
)
def test_wrong_field_type_einval(vsva, w, dst, kind, body):
    actor, host = w.rt.actors[dst], w.host
    before, host_before = _state(actor), vsva.host_state(host)
    src = {"vm1.vmm": "vm1.guest", "kvm": "host", "vdcm": "vm1.guest"}.get(dst, "vm1.vmm")
    reply = vsva.ask(w.rt, dst, kind, body, src=src)
    assert reply["ret"] == -E.EINVAL, reply
    assert _state(actor) == before and vsva.host_state(host) == host_before
    # the actor still serves a good request afterwards
    good = {
        "host": ("ioasid_alloc", {}, "vm1.vmm"),
        "kvm": ("ping", {}, "orch"),
        "vdcm": ("ping", {}, "orch"),
        "vm1.vmm": ("vcmd_alloc", {"dev": "pf1"}, "vm1.guest"),
    }[dst]
    assert vsva.ask(w.rt, dst, good[0], good[1], src=good[2])["ret"] == 0


def test_forged_reply_is_dropped(vsva, w):
    vmm = w.rt.actors["vm1.vmm"]
    before = vmm.dropped_replies
    w.rt.inject(
        Envelope(
            src="host",
            dst="vm1.vmm",
            kind="ioasid_alloc",
            body={"ret": 0, "pasid": 9},
            id=77,
            corr=12345,
            clock=1,
        )
    )
    w.rt.run()
    assert vmm.dropped_replies == before + 1 and vmm.g2h == {}
    assert vsva.ask(w.rt, "vm1.vmm", "vm_info", {}, src="vm1.guest")["ret"] == 0


def test_frames_refused_with_errno():
    good = Envelope(src="a", dst="b", kind="ping", id=1, rr=True)
    assert decode(encode(good)) == good
    cases = [
        (b"\xc1\xc1garbage", -E.EBADMSG),
        (msgpack.packb([1, 2, 3]), -E.EBADMSG),
        (msgpack.packb({**good.to_wire(), "v": 2}), -E.EPROTONOSUPPORT),
        (msgpack.packb({**good.to_wire(), "id": "1"}), -E.EBADMSG),
        (msgpack.packb({**good.to_wire(), "id": True}), -E.EBADMSG),
        (msgpack.packb({**good.to_wire(), "body": []}), -E.EBADMSG),
        (msgpack.packb({**good.to_wire(), "corr": "x"}), -E.EBADMSG),
        (b"\x00" * (MAX_FRAME + 1), -E.EMSGSIZE),
    ]
    for frame, ret in cases:
        with pytest.raises(ProtocolError) as info:
            decode(frame)
        assert info.value.ret == ret


# ---- a hostile guest -------------------------------------------------------------------------


@pytest.fixture
def hw(vsva):
    """VM 1's guest is the test (hostile), VM 2 is a victim with a bound PASID."""
    w = vsva.world(2, hand=(1, 2))
    w.g1 = vsva.HandGuest(w.rt, 1, devices=["pf1"])
    w.g2 = vsva.HandGuest(w.rt, 2, devices=["pf2", "vm2.mdev0"])
    proc = w.g2.spawn(1, 0x4000_0000, 2)
    w.victim = w.g2.alloc("pf2")["gpasid"]
    assert w.g2.bind(proc, "pf2", w.victim)["ret"] == 0
    w.victim_m = w.g2.alloc("vm2.mdev0")["gpasid"]
    assert w.g2.bind(proc, "vm2.mdev0", w.victim_m)["ret"] == 0
    w.proc2 = proc
    return w


GARBAGE_DESCS = [
    [1, "x", None],
    [{"type": "pc"}],
    [{"type": "pc", "dev": "pf1", "gpasid": 0}],
    [{"type": "pc", "dev": "pf2", "gpasid": 1}],
    [{"type": "pc", "dev": ["pf1"], "gpasid": 1}],
    [{"type": ["pc"]}],
    [{"type": "cc", "dev": "pf1", "pdir": 1 << 40}, {"type": "pc", "dev": "pf1", "gpasid": 5}],
    [{"type": "cc", "dev": "pf1", "pdir": 1023 * PAGE_SIZE}],
    [{"type": "cc", "dev": "pf2", "pdir": 0}],
    [{"type": "piotlb", "dev": "pf1", "gpasid": 1, "addr": 0, "size_order": 10**12}],
    [{"type": "piotlb", "dev": "pf1", "gpasid": 1, "addr": 0, "size_order": -1}],
    [{"type": "bind", "dev": "pf1"}],
    [{"type": "wait"}, {"type": "pc", "dev": "pf1", "gpasid": 2**20}],
]


@pytest.mark.parametrize("descs", GARBAGE_DESCS, ids=range(len(GARBAGE_DESCS)))
def test_qi_garbage_refused_no_bind(vsva, hw, descs):
    before, trace_len = vsva.host_state(hw.host), len(hw.rt.trace)
    vmm = hw.rt.actors["vm1.vmm"]
    g2h, shadow = dict(vmm.g2h), dict(vmm.shadow)
    reply = hw.g1.qi(descs)
    assert reply["ret"] < 0 and reply["ret"] != -E.EIO, reply
    assert vsva.host_state(hw.host) == before
    assert not [r for r in hw.rt.trace[trace_len:] if r["kind"] in ("bind_gpasid", "unbind_gpasid")]
    assert (vmm.g2h, vmm.shadow) == (g2h, shadow)


def test_qi_pasid_table_pointing_outside_ram(vsva, hw):
    """The guest's directory entry points outside its RAM: refused with -EFAULT, no crash."""
    pdir = hw.g1.dirs["pf1"]
    pdir.space.write_u64(pdir.base + 8 * (5 >> 6), (1 << 45) | 1)  # PDE of PASID 5
    reply = hw.g1.qi([{"type": "pc", "dev": "pf1", "gpasid": 5}, {"type": "wait"}])
    assert reply["ret"] == -E.EFAULT


def test_guest_entry_must_be_first_level(vsva, hw):
    from vsva.hotpath.layout import PGTT_NESTED, encode_pasid_entry

    pasid = hw.g1.alloc("pf1")["gpasid"]
    proc = hw.g1.spawn(1)
    hw.g1.dirs["pf1"].write_entry(
        pasid, encode_pasid_entry(flptr=proc.cr3, slptr=0x1000, did=1, pgtt=PGTT_NESTED)
    )
    before = vsva.host_state(hw.host)
    reply = hw.g1.qi([{"type": "pc", "dev": "pf1", "gpasid": pasid}, {"type": "wait"}])
    assert reply["ret"] == -E.EINVAL and vsva.host_state(hw.host) == before


def test_guest_binding_an_unallocated_pasid(vsva, hw):
    """A PASID entry for a PASID the guest never allocated (say, VM 2's): refused, no bind."""
    proc = hw.g1.spawn(1)
    before = vsva.host_state(hw.host)
    reply = hw.g1.bind(proc, "pf1", hw.victim)
    assert reply["ret"] == -E.EINVAL
    assert vsva.host_state(hw.host) == before


@pytest.mark.parametrize("which", ["never", "victim", "zero", "negative"])
def test_vcmd_free_of_pasid_never_allocated(vsva, hw, which):
    pasid = {"never": 4242, "victim": hw.victim, "zero": 0, "negative": -1}[which]
    before = vsva.host_state(hw.host)
    reply = hw.g1.free(pasid)
    assert reply["ret"] == -E.EINVAL
    assert vsva.host_state(hw.host) == before
    assert hw.victim in hw.host.ioasid.allocated and hw.host.ioasid.allocated[hw.victim].svm is not None


@pytest.mark.parametrize(
    "dst,kind,body",
    [
        ("host", "dev_submit", {"dev": "pf2"}),  # the other VM's passthrough function
        ("vdcm", "mdev_submit", {"dev": "vm2.mdev0"}),  # the other VM's mdev through vdcm
        ("host", "dev_submit", {"dev": "vm2.mdev0"}),  # ... or straight at the host
        ("host", "dev_submit", {"dev": "vm1.mdev0"}),  # own mdev, bypassing vdcm's translation
        ("host", "dev_submit", {"dev": "dsa0"}),  # the parent accelerator itself
    ],
)
def test_dma_to_other_vms_device_eperm(vsva, hw, dst, kind, body):
    pasid = hw.victim_m if "mdev" in body["dev"] else hw.victim
    full = {
        "gpasid" if kind == "mdev_submit" else "hpasid": pasid,
        "op": "fill",
        "src": 0,
        "dst": 0x4000_0000,
        "len": PAGE_SIZE,
        "pattern": 0xEE,
        **body,
    }
    victim_bytes = hw.g2.kernel.read(hw.proc2, 0x4000_0000, PAGE_SIZE)
    dma = (hw.host.dma.done, hw.host.dma.faults)
    reply = hw.g1.ask(dst, kind, full)
    assert reply["ret"] == -E.EPERM
    assert (hw.host.dma.done, hw.host.dma.faults) == dma
    assert hw.g2.kernel.read(hw.proc2, 0x4000_0000, PAGE_SIZE) == victim_bytes
    # the victim's own DMA still works
    assert hw.g2.submit("pf2", hw.victim, "fill", dst=0x4000_0000, length=PAGE_SIZE, pattern=7)["ret"] == 0


def test_own_device_with_victims_pasid_faults(vsva, hw):
    """Programming another VM's host PASID into one's own function: no entry there, a fault."""
    reply = hw.g1.submit("pf1", hw.victim, "fill", dst=0x4000_0000, length=PAGE_SIZE, pattern=1)
    assert reply["ret"] == -E.EFAULT
    assert hw.host.iommu.counters()["owner_violations"] == 0


def test_mdev_submit_without_translation_fails_back(vsva, hw):
    hw.g1.mdevs.add("vm1.mdev0")
    reply = hw.g1.submit("vm1.mdev0", 0x100, "fill", dst=0, length=8)
    assert reply["ret"] == -E.EINVAL


def test_guest_cannot_use_vfio_or_notifier(vsva, hw):
    before = vsva.host_state(hw.host)
    kvm = copy.deepcopy(hw.kvm.snapshot()["tables"])
    applied = hw.kvm.notifier.events
    for dst, kind, body in [
        ("host", "ioasid_alloc", {}),
        ("host", "ioasid_free", {"hpasid": hw.victim}),
        ("host", "unbind_gpasid", {"dev": "pf2", "hpasid": hw.victim}),
        ("host", "vfio_open", {"vm": 1, "ram_pages": 64, "devices": [], "quota": 4}),
        (
            "kvm",
            "ioasid_notify",
            {"event": "free", "vm": 2, "hpasid": hw.victim, "gpasid": hw.victim, "dev": ""},
        ),
        (
            "vdcm",
            "ioasid_notify",
            {"event": "unbind", "vm": 2, "hpasid": hw.victim_m, "gpasid": hw.victim_m, "dev": "vm2.mdev0"},
        ),
        ("vm2.vmm", "vcmd_free", {"gpasid": hw.victim}),
    ]:
        assert hw.g1.ask(dst, kind, body)["ret"] == -E.EPERM, (dst, kind)
    assert vsva.host_state(hw.host) == before and hw.kvm.snapshot()["tables"] == kvm
    # the forged notifier events are counted as refused, none as applied
    assert hw.kvm.snapshot()["notifier"] == {
        "events": applied,
        "refused": 1,
        "resyncs": 0,
        "resynced": 0,
        "resync_failures": 0,
    }
    assert applied == 2 and hw.vdcm.notifier.refused == 1  # (the two binds of the fixture applied)


# ---- fuzz: random bodies for every kind, from a hostile guest and a hostile vmm ----------------

_INTS = st.one_of(
    st.sampled_from(
        [
            0,
            1,
            2,
            3,
            4,
            5,
            -1,
            -3,
            7,
            64,
            4096,
            0x10000,
            0x4000_0000,
            0x4000_1000,
            1 << 20,
            (1 << 20) - 1,
            1 << 48,
            1 << 63,
            (1 << 64) - 1,
            -(1 << 63),
        ]
    ),
    st.integers(-(1 << 63), (1 << 64) - 1),
)
_NAMES = st.sampled_from(
    [
        "pf1",
        "pf2",
        "vm1.mdev0",
        "vm1.mdev1",
        "vm2.mdev0",
        "dsa0",
        "copy",
        "fill",
        "bind",
        "free",
        "unbind",
        "pc",
        "cc",
        "wait",
        "piotlb",
        "dev_iotlb",
        "pasid_flush",
        "x",
    ]
)
_SCALAR = st.one_of(
    _INTS, _INTS, _NAMES, st.booleans(), st.none(), st.text(max_size=4), st.floats(allow_nan=False)
)
_ANYV = st.one_of(
    _SCALAR, st.lists(_SCALAR, max_size=2), st.dictionaries(st.text(max_size=4), _SCALAR, max_size=2)
)
_DESC = st.dictionaries(
    st.sampled_from(["type", "type", "dev", "dev", "gpasid", "gpasid", "pdir", "addr", "size_order", "ih"]),
    st.one_of(_SCALAR, _SCALAR, _SCALAR, _ANYV),
    max_size=5,
)
_BIND = st.dictionaries(
    st.sampled_from(
        ["argsz", "version", "format", "flags", "hpasid", "gpasid", "gpgd", "addr_width", "vtd_flags"]
    ),
    st.one_of(_INTS, st.sampled_from([1, 48, 64]), _ANYV),
    min_size=6,
    max_size=9,
)
_INFO = st.dictionaries(
    st.sampled_from(
        ["version", "cache", "granularity", "pasid", "addr", "granule_size", "nb_granules", "flags"]
    ),
    st.one_of(st.integers(0, 8), _INTS, _ANYV),
    min_size=3,
    max_size=8,
)
_TYPED = {
    int: _INTS,
    str: _NAMES,
    list: st.one_of(st.lists(_DESC, max_size=4), st.lists(_ANYV, max_size=3)),
    dict: st.one_of(_BIND, _INFO, st.dictionaries(st.text(max_size=8), _SCALAR, max_size=4)),
    bool: st.booleans(),
}

_HOST_KINDS = (
    "vfio_open",
    "vfio_close",
    "ioasid_alloc",
    "ioasid_free",
    "bind_gpasid",
    "unbind_gpasid",
    "cache_invalidate",
    "dev_submit",
    "snapshot",
    "ping",
)
_GUEST_TARGETS = {k: "host" for k in _HOST_KINDS}
_GUEST_TARGETS.update({k: "vm1.vmm" for k in ("vm_info", "vcmd_alloc", "vcmd_free", "qi_submit", "vm_start")})
_GUEST_TARGETS.update(
    {
        "mdev_submit": "vdcm",
        "ioasid_notify": "kvm",
        "pasid_bindings": "vdcm",
        "start_workload": "vm2.vmm",
        "vpage_response": "vm1.vmm",
    }
)
_VMM_TARGETS = {k: "host" for k in _HOST_KINDS if k != "vfio_close"}  # (that one ends the VM: no more fuzz)


def _requests(targets):
    @st.composite
    def build(draw):
        kind = draw(st.sampled_from(sorted(targets)))
        body = {}
        for spec in CATALOGUE[kind].FIELDS:
            name, types = spec.name, spec.types
            roll = draw(st.integers(0, 19))
            if roll >= 5 and (spec.choices or spec.lo is not None):  # in the catalogue's range or
                body[name] = draw(
                    st.sampled_from(spec.choices)
                    if spec.choices  # choices, so that
                    else st.integers(spec.lo, spec.hi)
                )  # the handlers get fuzzed
            elif roll >= 2:  # mostly the right type
                body[name] = draw(_TYPED[types[0]])
            elif roll:
                body[name] = draw(_ANYV)
        if kind == "bind_gpasid":
            body["data"] = draw(st.one_of(_BIND, _TYPED[dict]))
        if kind == "cache_invalidate":
            body["info"] = draw(st.one_of(_INFO, _TYPED[dict]))
        if kind in ("dev_submit", "mdev_submit") and draw(st.booleans()):
            body["op"] = draw(st.sampled_from(["copy", "fill", "compare", ""]))
        return kind, body

    return build()


@pytest.mark.parametrize("sender", ["vm1.guest", "vm1.vmm"])
def test_fuzz_hostile_requests(vsva, sender):
    """Whatever a guest (or its vmm, untrusted by the host) sends: a reply with an errno (never
    -EIO from a crashed handler), and VM 2's binding, its IOASIDs and translations untouched."""
    w = vsva.world(2, hand=(1, 2))
    g1 = vsva.HandGuest(w.rt, 1, devices=["pf1"])
    g2 = vsva.HandGuest(w.rt, 2, devices=["pf2"])
    proc = g2.spawn(1, 0x4000_0000, 2)
    victim = g2.alloc("pf2")["gpasid"]
    assert g2.bind(proc, "pf2", victim)["ret"] == 0
    mine = g1.alloc("pf1")["gpasid"]  # something of VM 1's own to act upon
    assert victim < 8 and mine < 8
    targets = _GUEST_TARGETS if sender == "vm1.guest" else _VMM_TARGETS
    kinds_seen = set()

    def protected():
        h = w.host
        return (
            {
                p: (a.vm, a.svm and {d: s.users for d, s in a.svm.devs.items()})
                for p, a in h.ioasid.allocated.items()
                if a.vm == 2
            },
            sorted(h.vfio.domains[2].ioasids),
            h.vfio.phys["pf2"].pasid_dir.read_entry(victim),
            w.kvm.pasids.dump().get("2"),
            w.vdcm.pasids.dump().get("2"),
        )

    @settings(
        max_examples=300,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    @given(_requests(targets))
    def check(req):
        kind, body = req
        before = protected()
        reply = vsva.ask(w.rt, targets[kind], kind, body, src=sender)
        assert isinstance(reply.get("ret"), int) and reply["ret"] <= 0, (kind, body, reply)
        assert reply["ret"] != -E.EIO, (kind, body, reply)
        assert protected() == before, (kind, body)
        kinds_seen.add(kind)
        if not str(reply.get("error", "")).startswith(f"{kind}: field "):
            reached.append(kind)  # passed the catalogue's checks: the handler itself answered

    for kind in sorted(targets):  # every kind at least once, whatever the draws favour
        check = example((kind, {}))(check)
    reached: list[str] = []
    check()
    assert kinds_seen == set(targets)
    assert len(set(reached)) >= len(targets) - 3 and len(reached) >= 100, (len(reached), set(reached))
    assert g2.submit("pf2", victim, "fill", dst=0x4000_0000, length=PAGE_SIZE, pattern=3)["ret"] == 0
