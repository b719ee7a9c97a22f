"""The notifier subscribers' shared part (actors/subscriber.py): what kvm and vdcm count of
the notifier and of a resync from the host's current bindings (the supervisor reads
`notifier.resynced` after restarting one of them)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

from vsva.actors import errno as E
from vsva.actors.base import Wait
from vsva.actors.host import Host
from vsva.actors.subscriber import RESYNC_ATTEMPTS, RESYNC_BACKOFF_S, resync_budget, resync_timeout
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
