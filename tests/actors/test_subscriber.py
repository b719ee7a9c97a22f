"""The notifier subscribers' shared part (actors/subscriber.py): what kvm and vdcm count of
the notifier and of a resync from the host's current bindings (the supervisor reads
`notifier.resynced` after restarting one of them)."""

from __future__ import annotations

import copy

from vsva.actors import errno as E


def test_resync_counts_the_bindings_each_subscriber_tracks(vsva):
    w = vsva.world(2, hand=(2,))
    g2 = vsva.HandGuest(w.rt, 2, devices=["pf2", "vm2.mdev0"])
    proc = g2.spawn(1)
    for dev in ("pf2", "vm2.mdev0"):
        assert g2.bind(proc, dev, g2.alloc(dev)["gpasid"])["ret"] == 0
    tables = {name: copy.deepcopy(w.rt.actors[name].snapshot()["tables"]) for name in ("kvm", "vdcm")}
    for sub in (w.kvm, w.vdcm):
        w.rt.run_task(sub.name, sub.resync)
    w.rt.run()
    # kvm keeps every device's translation, vdcm only its mdevs'; the notifier had told both
    # the same, so the resync changes no table
    assert w.kvm.snapshot()["notifier"] == {"events": 2, "refused": 0, "resyncs": 1, "resynced": 2}
    assert w.vdcm.snapshot()["notifier"] == {"events": 2, "refused": 0, "resyncs": 1, "resynced": 1}
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
