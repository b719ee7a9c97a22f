"""The notifier subscribers' shared part (actors/subscriber.py): what kvm and vdcm count of
the notifier and of a resync from the host's current bindings (the supervisor reads
`notifier.resynced` after restarting one of them)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from vsva.actors import errno as E
from vsva.actors.base import Wait
from vsva.actors.catalogue import U64, PasidBindings, QiSubmit
from vsva.actors.host import Host
from vsva.actors.host.svm import Svm
from vsva.actors.messages import MAX_FRAME, Envelope, encode
from vsva.actors.subscriber import RESYNC_ATTEMPTS, RESYNC_BACKOFF_S, resync_budget, resync_timeout
from vsva.hotpath.layout import PASID_MAX
from vsva.ops.pacing import HOST_S_PER_VM
from vsva.ops.topology import HOST, default_topology
from vsva.runtime.sim import SimRuntime

QUEUED_S = 6.4  # a host handler behind 128 VMs' requests on a loaded machine (pacing.HOST_S_PER_VM)


class QueuedHost(Host):
    """A host whose pasid_bindings answer waits QUEUED_S behind the other VMs' requests."""

    def on_pasid_bindings(self, msg, req):
        yield Wait(("queued", msg.id), QUEUED_S)
        return super().on_pasid_bindings(msg, req)


def test_resync_counts_the_bindings_each_subscriber_tracks(vsva):
    w = vsva.bound_world()
    tables = {name: copy.deepcopy(w.rt.actors[name].snapshot()["tables"]) for name in ("kvm", "vdcm")}
    for sub in (w.kvm, w.vdcm):
        w.rt.run_task(sub.name, sub.resync)
    w.rt.run()
    # kvm keeps every device's translation, vdcm only its mdevs'; the notifier had told both
    # the same, so the resync changes no table
    assert w.kvm.snapshot()["notifier"] == {
        "events": 2,
        "refused": 0,
        "resyncs": 1,
        "resynced": 2,
        "resync_failures": 0,
    }
    assert w.vdcm.snapshot()["notifier"] == {
        "events": 2,
        "refused": 0,
        "resyncs": 1,
        "resynced": 1,
        "resync_failures": 0,
    }
    assert {name: w.rt.actors[name].snapshot()["tables"] for name in ("kvm", "vdcm")} == tables


def test_an_event_the_map_cannot_apply_is_refused_and_counted(vsva):
    w = vsva.world(2)

    def bind(hpasid):
        body = {"event": "bind", "vm": 1, "hpasid": hpasid, "gpasid": 5, "dev": "pf1"}
        return vsva.ask(w.rt, "kvm", "ioasid_notify", body, src="host")["ret"]

    assert bind(5) == 0
    assert bind(6) == -E.EEXIST  # guest PASID 5 is bound to another host PASID: the map refuses it
    assert w.kvm.notifier.events == 1 and w.kvm.notifier.refused == 1
    assert w.kvm.pasids.lookup(1, 5) == 5


def test_a_resync_the_host_never_answers_is_retried_with_backoff_then_given_up_in_the_snapshot(vsva):
    w = vsva.bound_world()
    since, t0 = len(w.rt.trace), w.rt.now
    w.rt.hold("kvm", "host")  # every pasid_bindings of the new kvm stays unanswered
    kvm = vsva.restarted(w, "kvm")
    w.rt.run(until=lambda: kvm.resync_error is not None)
    asked = [r["t"] for r in w.rt.trace[since:] if r["kind"] == "pasid_bindings" and r["src"] == "kvm"]
    assert len(asked) == RESYNC_ATTEMPTS
    timeout = resync_timeout(kvm.config)
    gaps = [round(b - a, 3) for a, b in zip(asked, asked[1:])]
    assert gaps == [round(timeout + RESYNC_BACKOFF_S * 2**i, 3) for i in range(RESYNC_ATTEMPTS - 1)]
    assert w.rt.now - t0 <= resync_budget(kvm.config) + 0.01
    snap = kvm.snapshot()
    assert not snap["synced"] and snap["tables"] == {}
    assert snap["resync_error"].startswith(
        f"pasid_bindings to host failed {RESYNC_ATTEMPTS} time(s), last -ETIMEDOUT (pasid_bindings to host: no reply after"
    )
    assert snap["notifier"]["resync_failures"] == RESYNC_ATTEMPTS and snap["notifier"]["resyncs"] == 0
    w.rt.release("kvm", "host")
    w.rt.run()
    assert len([r for r in w.rt.trace[since:] if r["kind"] == "pasid_bindings" and r["src"] == "kvm"]) == len(
        asked
    )  # given up is given up: no attempt after the bound


def test_a_resync_whose_first_reply_is_lost_is_retried_and_rebuilds_the_tables(vsva):
    w = vsva.bound_world()
    tables = copy.deepcopy(w.kvm.snapshot()["tables"])
    assert tables  # the binds above are what the resync must bring back
    w.rt.hold("kvm", "host")
    kvm = vsva.restarted(w, "kvm")
    w.rt.run(until=lambda: kvm.notifier.resync_failures == 1)
    assert not kvm.synced
    w.rt.release("kvm", "host")
    w.rt.run(until=lambda: kvm.synced)
    snap = kvm.snapshot()
    assert snap["tables"] == tables and snap["resync_error"] is None
    assert snap["notifier"]["resync_failures"] == 1 and snap["notifier"]["resyncs"] >= 1


def test_a_resync_the_host_refuses_is_not_retried(vsva):
    w = vsva.bound_world()
    since = len(w.rt.trace)
    w.rt.actors["host"].subscribers.remove("kvm")  # the host no longer counts kvm a subscriber: EPERM
    kvm = vsva.restarted(w, "kvm")
    w.rt.run()
    assert len([r for r in w.rt.trace[since:] if r["kind"] == "pasid_bindings" and r["src"] == "kvm"]) == 1
    assert kvm.resync_error.startswith("pasid_bindings to host failed 1 time(s), last -EPERM"), (
        kvm.resync_error
    )
    assert not kvm.snapshot()["synced"]


def test_a_resync_behind_128_vms_at_the_host_is_answered_within_one_attempt(vsva):
    """The host serves every VM: a restarted kvm's pasid_bindings among 128 VMs waits behind
    their requests, past the base request timeout. One attempt is enough; before, every
    attempt timed out after 5 s and kvm gave up unsynced."""
    t = default_topology(128)
    rt = SimRuntime(t)
    rt.add(QueuedHost(HOST, rt.env(t.spec(HOST).config)))
    rt.start()
    kvm = vsva.restarted(SimpleNamespace(rt=rt), "kvm")
    rt.run(until=lambda: kvm.synced or kvm.resync_error is not None)
    assert kvm.synced and kvm.resync_error is None, kvm.resync_error
    assert kvm.notifier.resync_failures == 0 and kvm.notifier.resyncs == 1
    assert QUEUED_S < resync_timeout(kvm.config)


def test_a_paged_resync_behind_128_vms_gets_the_host_queue_at_every_page(vsva):
    """128 VMs of full quotas list in 4 pages, each queued QUEUED_S behind the other VMs'
    requests at the host. The attempt's timeout counted that queue once (12.6 s for 25.6 s
    of queueing): every attempt timed out and kvm gave up unsynced. It counts it per page."""
    t = default_topology(128)
    rt = SimRuntime(t)
    host = rt.add(QueuedHost(HOST, rt.env(t.spec(HOST).config)))
    rt.start()
    added = hold_bindings(host, range(1, 1 + 128), 64, topology_devices)
    since = len(rt.trace)
    kvm = vsva.restarted(SimpleNamespace(rt=rt), "kvm")
    rt.run(until=lambda: kvm.synced or kvm.resync_error is not None)
    assert kvm.synced and kvm.resync_error is None, kvm.resync_error
    assert kvm.notifier.resynced == added and kvm.notifier.resync_failures == 0
    assert len(listed(rt, since)) * QUEUED_S > HOST_S_PER_VM * 128 + 5.0  # more than one queue's worth


def hold_bindings(host, vms: range, quota: int, devices) -> int:
    """Give the host `quota` bound PASIDs in each VM of `vms`, each bound once through every
    device `devices(vm)` names (the host's own allocator and svm records: what binds leave,
    without the 49,152 binds through the guests). Returns how many bindings that adds."""
    added = 0
    for vm in vms:
        for _ in range(quota):
            ioasid = host.ioasid.alloc(vm)
            ioasid.svm = Svm(ioasid.pasid, vm, vdevs={dev: 1 for dev in devices(vm)})
            added += len(ioasid.svm.vdevs)
    return added


def topology_devices(vm: int) -> list[str]:
    """A VM's devices as the default topology names them (its function, two mdevs)."""
    return [f"pf{vm}", f"vm{vm}.mdev0", f"vm{vm}.mdev1"]


def listed(rt, since: int) -> list[dict]:
    """The pasid_bindings replies the host sent kvm from trace index `since` on."""
    return [r for r in rt.trace[since:] if r["kind"] == "pasid_bindings" and r["src"] == HOST and r["corr"]]


def test_a_host_holding_more_bindings_than_a_frame_carries_is_resynced_completely(vsva):
    """256 VMs of full quotas (64 PASIDs x 3 devices): 49,152 bindings, 1.9 MB in one reply,
    which the wire refused (-EMSGSIZE) on every attempt. Paged, the resync lists them all."""
    w = vsva.bound_world()
    before = w.kvm.pasids.dump()
    added = hold_bindings(w.host, range(3, 3 + 256), 64, topology_devices)
    assert added == 49_152
    since = len(w.rt.trace)
    kvm = vsva.restarted(w, "kvm")
    w.rt.run(until=lambda: kvm.synced or kvm.resync_error is not None)
    assert kvm.synced and kvm.resync_error is None, kvm.resync_error
    assert kvm.notifier.resynced == added + 2 and kvm.notifier.resync_failures == 0
    tables = kvm.pasids.dump()
    assert {vm: tables[vm] for vm in before} == before
    for vm in (3, 130, 258):
        assert sorted(kvm.pasids.hpasids(vm)) == sorted(
            p for p, a in w.host.ioasid.allocated.items() if a.vm == vm
        )
        assert all(e["devs"] == sorted(topology_devices(vm)) for e in tables[str(vm)].values())
    assert len(listed(w.rt, since)) > 1


def pages(host) -> Iterator[dict]:
    """The host's pasid_bindings pages for kvm, each asked after the last one's end."""
    after = {"hpasid": 0, "dev": ""}
    while True:
        req = PasidBindings(after_hpasid=after["hpasid"], after_dev=after["dev"])
        body = host.on_pasid_bindings(Envelope(src="kvm", dst=HOST, kind=req.KIND), req)
        yield body
        if not body["more"]:
            return
        after = body["bindings"][-1]


@pytest.mark.parametrize("name_bytes", [0, 255, 4096])
def test_every_page_fits_a_frame_whatever_the_devices_names(vsva, name_bytes):
    """A page takes bindings while their widest encoding fits half a frame: the largest
    page's frame (every envelope integer at its widest) stays under MAX_FRAME for short
    device names, NAME_MAX ones and longer, in two-byte UTF-8."""
    w = vsva.world(2)
    added = hold_bindings(
        w.host, range(3, 3 + 64), 64, lambda vm: [f"{vm}.{i}" + "é" * (name_bytes // 2) for i in range(3)]
    )
    listing, sizes = [], []
    for body in pages(w.host):
        wide = Envelope(
            src=HOST, dst="kvm", kind="pasid_bindings", body=body, id=U64[1], corr=U64[1], clock=U64[1]
        )
        sizes.append(len(encode(wide)))
        listing += body["bindings"]
    assert len(listing) == added and len({(b["hpasid"], b["dev"]) for b in listing}) == added
    assert listing == sorted(listing, key=lambda b: (b["hpasid"], b["dev"]))
    assert max(sizes) < MAX_FRAME and len(sizes) > 1


def test_a_binding_unbound_mid_resync_does_not_come_back(vsva):
    """VM 2's pf2 is unbound while kvm is between two pages of its resync: the pages before
    listed it, the ones after do not. The host's generation moved, so kvm lists them again
    (-EAGAIN, one attempt more) instead of loading a table with pf2's binding in it."""
    w = vsva.world(2, hand=(2,))
    g2 = vsva.HandGuest(w.rt, 2, devices=["pf2", "vm2.mdev0"])
    proc = g2.spawn(1)
    gpasids = {dev: g2.alloc(dev)["gpasid"] for dev in ("pf2", "vm2.mdev0")}
    for dev, gpasid in gpasids.items():
        assert g2.bind(proc, dev, gpasid)["ret"] == 0
    w.rt.run()
    hold_bindings(w.host, range(3, 3 + 32), 64, lambda vm: [f"vm{vm}.{'d' * 250}{i}" for i in range(3)])
    since = len(w.rt.trace)
    kvm = vsva.restarted(w, "kvm")
    w.rt.run(until=lambda: len(listed(w.rt, since)) == 1)  # pf2's binding is on the first page
    assert kvm.pasids.lookup(2, gpasids["pf2"], "pf2") is None  # nothing loaded yet
    wire = vsva.Wire(w.rt)  # (not g2.unbind: its run to quiescence would finish the resync first)
    g2.dirs["pf2"].clear_entry(gpasids["pf2"])
    unbind = wire.send(
        g2.name, g2.vmm, QiSubmit(descs=[{"type": "pc", "dev": "pf2", "gpasid": gpasids["pf2"]}])
    )
    assert wire.wait(unbind)["ret"] == 0
    w.rt.run(until=lambda: kvm.synced or kvm.resync_error is not None)
    assert kvm.synced, kvm.resync_error
    assert kvm.notifier.resync_failures == 1 and kvm.notifier.resyncs == 1
    assert kvm.pasids.lookup(2, gpasids["pf2"], "pf2") is None
    assert kvm.pasids.lookup(2, gpasids["vm2.mdev0"], "vm2.mdev0") is not None
    current = {(b["hpasid"], b["dev"]) for body in pages(w.host) for b in body["bindings"]}
    assert {(h, d) for t in kvm.pasids.maps.values() for h, devs in t.values() for d in devs} == current


@pytest.mark.parametrize(
    "cursor, why",
    [
        ({"after_hpasid": PASID_MAX, "after_dev": ""}, f"field 'after_hpasid' = {PASID_MAX} out of range"),
        ({"after_hpasid": -1, "after_dev": ""}, "field 'after_hpasid' = -1 out of range"),
        ({"after_hpasid": 5, "after_dev": 7}, "field 'after_dev' missing or not str"),
        ({}, "field 'after_hpasid' missing or not int"),  # a subscriber that does not page
    ],
)
def test_a_bad_cursor_is_refused_and_changes_nothing(vsva, cursor, why):
    w = vsva.bound_world()
    before = vsva.host_state(w.host)
    reply = vsva.ask(w.rt, HOST, PasidBindings.KIND, cursor, src="kvm")
    assert reply["ret"] == -E.EINVAL and why in reply["error"], reply
    assert vsva.host_state(w.host) == before


class SlowPagesHost(Host):
    """A host whose every pasid_bindings page waits `delay` s behind the other VMs' requests."""

    delay = 0.0

    def on_pasid_bindings(self, msg, req):
        yield Wait(("queued", msg.id), self.delay)
        return super().on_pasid_bindings(msg, req)


def test_the_pages_of_one_attempt_share_its_timeout(vsva):
    """Each page answers within the resync timeout, two of them do not: the attempt times
    out at the second page, so that giving up stays within resync_budget (the supervisor's
    wait for a restarted kvm), however many pages the host holds."""
    t = default_topology(2)
    rt = SimRuntime(t)
    host = rt.add(SlowPagesHost(HOST, rt.env(t.spec(HOST).config)))
    rt.start()
    hold_bindings(host, range(3, 3 + 256), 64, topology_devices)  # several pages
    host.delay = 0.6 * resync_timeout(t.spec("kvm").config)
    t0 = rt.now
    kvm = vsva.restarted(SimpleNamespace(rt=rt), "kvm")
    rt.run(until=lambda: kvm.resync_error is not None)
    assert rt.now - t0 <= resync_budget(kvm.config) + 0.01
    assert [round(r["timeout_s"], 1) for r in kvm.resync_timeouts] == [
        round(0.4 * resync_timeout(kvm.config), 1)
    ] * 4
    assert kvm.resync_error.startswith(
        f"pasid_bindings to host failed {RESYNC_ATTEMPTS} time(s), last -ETIMEDOUT"
    )
