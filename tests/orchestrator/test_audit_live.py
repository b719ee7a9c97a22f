"""The live audit takes a consistent cut (vsva.analysis.cut): on a topology whose VMs bind,
DMA and free without pause (the churn workload, real processes), an audit started the moment
a bind starts reports nothing, twenty times over; a PASID entry written into the host's
PASID table behind the protocol's back (the shared-memory bytes the IOMMU walks) is caught,
and once removed the audit is clean again."""

from __future__ import annotations

import pytest
from supervised import supervised

from vsva.actors.base import Call
from vsva.actors.catalogue import FlowWatch, Snapshot
from vsva.actors.memory import PasidDirectory, PhysMem
from vsva.hotpath.layout import PDE_PRESENT, PGTT_FIRST_ONLY, encode_pasid_entry
from vsva.ops.topology_file import default_run

AUDITS = 20


@pytest.fixture(scope="module")
def sup():
    with supervised(default_run(2, workload="churn", iterations=100_000)) as s:
        yield s


def audit_at_next(sup, guest: str, flow: str) -> dict:
    """Audit the moment `guest` starts its next instance of `flow` (its event, no polling)."""

    def task():
        snap = yield Call(guest, Snapshot(), timeout=5.0)
        nth = snap["state"]["flows"].get(flow, 0) + 1
        started = yield Call(guest, FlowWatch(flow=flow, nth=nth), timeout=20.0)
        return started, (yield from sup.audit_task())

    done = sup.run_step(task, timeout=30.0)
    assert done is not None, "the audit did not finish"
    started, res = done
    assert started["ret"] == 0, started
    return res


def no_new_table() -> int:
    raise AssertionError("the PASID table chosen is one the host allocated")


def test_audits_during_binds_are_clean(sup):
    binds = []
    for i in range(AUDITS):
        res = audit_at_next(sup, ("vm1.guest", "vm2.guest")[i % 2], "F2")
        assert res["ok"], (i, res["violations"], res["incomplete"])
        assert res["violations"] == [] and res["incomplete"] == []
        assert res["cut"]["held_s"] > 0
        binds.append(sum(res["snapshots"][g]["flows"].get("F2", 0) for g in ("vm1.guest", "vm2.guest")))
    # the churn never stopped: both workloads still run, and every audit came after a new bind
    assert all(v.state == "running" and v.workload is None for v in sup.vms.values())
    assert binds == sorted(set(binds))


def test_pasid_entry_written_behind_the_protocol_is_caught(sup):
    clean = audit_at_next(sup, "vm1.guest", "F7")  # a bind of vm1 has completed by then
    assert clean["ok"], clean["violations"]
    host = clean["snapshots"]["host"]
    mem = PhysMem.open(sup.launcher.shm_path)
    # a device whose first PASID table the host allocated (the churn's parent device), and a
    # slot of it the churn does not reach (the allocator reuses the lowest PASIDs)
    dev = next(d for d, base in host["pasid_dirs"].items() if mem.read_u64(base) & PDE_PRESENT)
    pasid = next(p for p in range(63, 0, -1) if str(p) not in host["ioasids"])
    pdir = PasidDirectory(mem, host["pasid_dirs"][dev], alloc_table=no_new_table)
    entry = encode_pasid_entry(flptr=0x1000, slptr=0, did=1, eafe=True, pgtt=PGTT_FIRST_ONLY)
    pdir.write_entry(pasid, entry)
    try:
        caught = audit_at_next(sup, "vm1.guest", "F2")
    finally:
        assert pdir.clear_entry(pasid)
    assert not caught["ok"] and caught["incomplete"] == []
    assert [(v["invariant"], v["pasid"]) for v in caught["violations"]] == [("I3", pasid)]
    assert caught["violations"][0]["what"] == f"PASID entry on {dev} without a bound svm"
    again = audit_at_next(sup, "vm2.guest", "F2")
    assert again["ok"], again["violations"]
