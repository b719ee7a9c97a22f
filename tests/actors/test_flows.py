"""Whole sessions: the Controller's demo for 1-3 VMs (and 2 VMs as real processes), and the
shape of each flow in the trace."""

from __future__ import annotations

import re
from collections import defaultdict

import pytest

from vsva.actors import errno as E

TAG = re.compile(r"^(F\d):vm(\d+)\.(\d+)$")


def _flows(trace):
    """flow tag -> the trace records carrying it, in send order."""
    out = defaultdict(list)
    for r in trace:
        if TAG.match(r["flow"] or ""):
            out[r["flow"]].append(r)
    return out


# 1-3 VMs on the deterministic runtime; the 2-VM session on real processes too (kept to one
# session there: the suite stays fast)
SESSIONS = [("sim", 1), ("sim", 2), ("sim", 3), ("processes", 2)]


@pytest.fixture(scope="module", params=SESSIONS, ids=lambda p: f"{p[0]}-{p[1]}vm")
def run(request, vsva):
    runtime, vms = request.param
    session = vsva.run(runtime, vms, seed=vms)
    return vms, session["trace"], session


def test_session_passes(run):
    vms, trace, res = run
    assert set(res["vm_start"]) == {f"vm{v}.vmm" for v in range(1, vms + 1)}
    assert all(r["ret"] == 0 for r in res["vm_start"].values())
    assert len(res["workloads"]) == vms
    for guest, w in res["workloads"].items():
        assert w["ret"] == 0 and w["ok"], (guest, [s for s in w["steps"] if not s["ok"]])
        assert w["steps"] and all(s["ok"] for s in w["steps"])
        assert {s["flow"] for s in w["steps"]} >= {"F1", "F2", "F3", "F4", "F5", "F7"}
        assert sum(1 for s in w["steps"] if s.get("verified")) >= 6  # DMA data read back
    assert res["violations"] == []
    assert all(s.get("pending") == 0 for s in res["snapshots"].values())


def test_session_leaves_nothing_behind(run):
    vms, trace, res = run
    snaps = res["snapshots"]
    host = snaps["host"]
    assert host["ioasids"] == {} and host["svms"] == {} and host["prq"] == []
    assert all(p == [] for p in host["pasid_entries"].values())
    assert host["caches"]["iotlb"] == [] and all(e == [] for e in host["caches"]["devtlb"].values())
    assert snaps["kvm"]["tables"] == {} and snaps["vdcm"]["tables"] == {}
    for v in range(1, vms + 1):
        assert snaps[f"vm{v}.vmm"]["g2h"] == {} and snaps[f"vm{v}.vmm"]["bound"] == []
    assert host["dma"]["done"] >= 6 * vms
    assert host["counters"]["owner_violations"] == 0


def test_every_flow_in_trace_for_every_vm(run):
    vms, trace, res = run
    tags = {(m.group(1), int(m.group(2))) for t in _flows(trace) if (m := TAG.match(t))}
    for v in range(1, vms + 1):
        for f in ("F1", "F2", "F3", "F4", "F5", "F6", "F7"):
            assert (f, v) in tags, (f, v)
    assert {r["flow"] for r in trace if r["kind"] == "bind_gpasid"} <= {
        t for t in _flows(trace) if t.startswith("F2:")
    }


def _kinds(records):
    return [(r["src"], r["dst"], r["kind"], r["corr"] is not None) for r in records]


def test_flow_shapes(run):
    """Each flow is the exchange of docs/design.md §3, with the guest's completion last."""
    vms, trace, res = run
    flows = _flows(trace)
    for tag, recs in flows.items():
        f, vm = TAG.match(tag).group(1), TAG.match(tag).group(2)
        guest, vmm = f"vm{vm}.guest", f"vm{vm}.vmm"
        kinds = _kinds(recs)
        last = recs[-1]
        if f == "F8":  # the orchestrator stops the VM: vm_stop -> vfio_close -> notifier
            assert kinds[:2] == [("orch", vmm, "vm_stop", False), (vmm, "host", "vfio_close", False)]
            assert last["dst"] == "orch" and last["corr"] is not None and last["body"]["ret"] == 0, (
                tag,
                kinds,
            )
        elif f != "F7":
            assert last["dst"] == guest and last["corr"] is not None, (tag, kinds)
        if f == "F1":
            assert kinds == [
                (guest, vmm, "vcmd_alloc", False),
                (vmm, "host", "ioasid_alloc", False),
                ("host", vmm, "ioasid_alloc", True),
                (vmm, guest, "vcmd_alloc", True),
            ]
        elif f == "F2":
            kinds_only = [k[2] for k in kinds if not k[3]]
            assert kinds_only[:2] == ["qi_submit", "bind_gpasid"]
            notes = [r for r in recs if r["kind"] == "ioasid_notify"]
            assert sorted(r["dst"] for r in notes if r["corr"] is None) == ["kvm", "vdcm"]
            acks = [i for i, r in enumerate(recs) if r["kind"] == "ioasid_notify" and r["corr"] is not None]
            bind_reply = next(i for i, r in enumerate(recs) if r["kind"] == "bind_gpasid" and r["corr"])
            assert len(acks) == 2 and max(acks) < bind_reply < len(recs) - 1
            assert recs[bind_reply]["body"]["ret"] == 0
            assert all(r["body"]["event"] == "bind" for r in notes if r["corr"] is None)
        elif f == "F3":
            inv = [r for r in recs if r["kind"] == "cache_invalidate" and r["corr"] is None]
            assert [r["body"]["info"]["cache"] for r in inv] == [1, 2]  # IOTLB, then device TLB
            assert all(r["body"]["ret"] == 0 for r in recs if r["kind"] == "cache_invalidate" and r["corr"])
        elif f == "F4":
            reqs = [k[2] for k in kinds if not k[3]]
            assert reqs[:2] == ["qi_submit", "unbind_gpasid"]
            assert {
                r["body"]["event"] for r in recs if r["kind"] == "ioasid_notify" and r["corr"] is None
            } == {"unbind"}
        elif f == "F5":
            assert [k[2] for k in kinds if not k[3]] == ["vcmd_free", "ioasid_free"]
            assert last["body"]["ret"] == 0
        elif f == "F7":
            first = recs[0]
            assert first["src"] == guest and first["kind"] in ("dev_submit", "mdev_submit")
            if first["kind"] == "mdev_submit":
                assert first["dst"] == "vdcm"
                forwarded = [r for r in recs if r["src"] == "vdcm" and r["kind"] == "dev_submit"]
                assert len(forwarded) <= 1
            else:
                assert first["dst"] == "host"
    # the demo's expected refusals: DMA through an mdev after its last unbind (-EINVAL) and
    # DMA to an address outside every VMA, answered INVALID by the guest (F6, -EFAULT)
    refused = [t for t, recs in flows.items() if t.startswith("F7:") and recs[-1]["body"]["ret"] != 0]
    assert len(refused) == 2 * vms
    assert sorted(flows[t][-1]["body"]["ret"] for t in refused) == sorted([-E.EINVAL, -E.EFAULT] * vms)


def test_non_identity_gpasids_for_mdevs(run):
    """The mdev pair runs on a vmm-chosen guest PASID; kvm/vdcm were told both numbers."""
    vms, trace, res = run
    allocs = [r for r in trace if r["kind"] == "vcmd_alloc" and r["corr"] is not None]
    assert all(r["body"]["ret"] == 0 for r in allocs)
    mixed = [r["body"] for r in allocs if r["body"]["gpasid"] != r["body"]["hpasid"]]
    assert len(mixed) == vms
    binds = [
        r["body"]
        for r in trace
        if r["kind"] == "ioasid_notify"
        and r["corr"] is None
        and r["body"]["event"] == "bind"
        and r["body"]["gpasid"] != r["body"]["hpasid"]
    ]
    assert {(b["gpasid"], b["hpasid"]) for b in binds} == {(m["gpasid"], m["hpasid"]) for m in mixed}


def test_identity_and_non_identity_guest_pasids_never_collide(vsva):
    """A host PASID handed out for a passthrough device (identity) that equals a guest PASID
    the vmm chose for an mdev is refused and given back: g2h is never overwritten, nothing leaks."""
    w = vsva.world(1, hand=(1,), quota=400)
    g = vsva.HandGuest(w.rt, 1, devices=[])
    first = g.alloc("vm1.mdev0")
    assert first["ret"] == 0 and first["gpasid"] != first["hpasid"]
    w.rt.actors["host"].ioasid.pool.append(first["gpasid"])  # the host's next PASID equals the chosen one
    for _ in range(2):  # the colliding PASID goes back to the pool first in line, twice
        reply = g.alloc("pf1")
        assert reply["ret"] == 0 and reply["gpasid"] == reply["hpasid"] != first["gpasid"]
    vmm = w.rt.actors["vm1.vmm"]
    assert vmm.g2h[first["gpasid"]] == first["hpasid"] and len(vmm.g2h) == 3
    assert sorted(w.rt.actors["host"].vfio.domains[1].ioasids) == sorted(vmm.g2h.values())
