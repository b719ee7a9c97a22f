"""F6 I/O page faults (docs/design.md §3, F6): page request -> host PRQ -> vmm -> guest vPRQ -> page
group response -> vmm -> host -> the device retries from the faulting byte.

Two kinds of guests: the real Guest actor running a workload written here (its page request
handler faults pages in from the process's VMAs), and hand-driven guests (`HandGuest`, the
guest actor removed: the vmm's injection goes nowhere, so a request stays queued until the
test answers it as the guest, it times out, or a drain fails it).

While a request must stay queued nothing runs to quiescence: the deterministic runtime would
jump virtual time to `prq_timeout`. `Wire` sends requests and waits for exactly one reply.
"""

from __future__ import annotations

import pytest
from descriptors import fill

from vsva.actors import errno as E
from vsva.actors import guest as guest_mod
from vsva.actors.uapi import (
    IOMMU_FAULT_PERM_READ,
    IOMMU_FAULT_PERM_WRITE,
    IOMMU_PAGE_RESP_FAILURE,
    IOMMU_PAGE_RESP_INVALID,
    IOMMU_PAGE_RESP_SUCCESS,
)
from vsva.analysis.audit import audit
from vsva.hotpath.layout import ADDR_MASK, FL_P, FL_RW, FL_US, PAGE_SIZE

VA, LAZY, HOLE = 0x4000_0000, 0x4800_0000, 0x4F00_0000


def f6_records(rt, kind, src=None, dst=None, replies=False):
    return [
        r
        for r in rt.trace
        if r["kind"] == kind
        and (r["corr"] is not None) == replies
        and (src is None or r["src"] == src)
        and (dst is None or r["dst"] == dst)
    ]


# ---- with the real guest: its handler makes the pages present -------------------------------


def run_workload(vsva, monkeypatch, body, vms=1, **topo):
    """Run `body(g)` as vm1's workload (after boot); returns (world, guest actor, its reply)."""
    monkeypatch.setitem(guest_mod.WORKLOADS, "f6test", body)
    w = vsva.world(vms, workload="f6test", **topo)
    reply = vsva.ask(w.rt, "vm1.guest", "start_workload", {})
    return w, w.rt.actors["vm1.guest"], reply


def bound_process(g, pid=1):
    """A process with a PASID bound on the passthrough function; returns (proc, dev, pasid)."""
    proc, dev = g.kernel.spawn(pid), "pf1"
    pasid = yield from g.alloc_pasid(proc, dev)
    reply = yield from g.bind(proc, dev, pasid)
    assert reply["ret"] == 0, reply
    return proc, dev, pasid


def test_demand_paged_copy_one_request_per_page(vsva, monkeypatch):
    pages, out = 6, {}

    def body(g):
        k = g.kernel
        proc, dev, pasid = yield from bound_process(g)
        k.mmap(proc, VA, pages)
        k.mmap(proc, LAZY, pages, populate=False)
        data = bytes((i * 13 + 1) & 0xFF for i in range(pages * PAGE_SIZE))
        k.write(proc, VA, data)
        out["copy"] = yield from g.submit(dev, pasid, "copy", src=VA, dst=LAZY, length=len(data))
        out["ok"] = k.read(proc, LAZY, len(data)) == data
        # reading from untouched memory: read requests, zero-filled pages
        k.mmap(proc, LAZY + 0x100000, 2, populate=False)
        out["read"] = yield from g.submit(
            dev, pasid, "copy", src=LAZY + 0x100000, dst=VA, length=2 * PAGE_SIZE
        )
        out["zeros"] = k.read(proc, VA, 2 * PAGE_SIZE) == bytes(2 * PAGE_SIZE)
        yield from g.unbind(proc, dev, pasid)
        yield from g.free(proc, dev, pasid)

    w, g, reply = run_workload(vsva, monkeypatch, body)
    assert reply["ret"] == 0, reply
    assert out["copy"]["ret"] == 0 and out["copy"]["page_requests"] == pages and out["ok"]
    assert out["read"]["ret"] == 0 and out["read"]["page_requests"] == 2 and out["zeros"]
    rt = w.rt
    reqs = f6_records(rt, "page_request", "host", "vm1.vmm")
    assert [r["body"]["perm"] for r in reqs] == [IOMMU_FAULT_PERM_WRITE] * pages + [IOMMU_FAULT_PERM_READ] * 2
    assert [r["body"]["addr"] for r in reqs[:pages]] == [LAZY + i * PAGE_SIZE for i in range(pages)]
    assert all(r["body"]["last"] for r in reqs)
    # every request's path: host -> vmm -> guest, and the response back guest -> vmm -> host
    for req in reqs:
        tag = req["flow"]
        assert tag.startswith("F6:vm1.")
        path = [(r["src"], r["dst"], r["kind"], r["corr"] is not None) for r in rt.trace if r["flow"] == tag]
        assert path == [
            ("host", "vm1.vmm", "page_request", False),
            ("vm1.vmm", "vm1.guest", "vpage_request", False),
            ("vm1.guest", "vm1.vmm", "vpage_response", False),
            ("vm1.vmm", "host", "page_response", False),
            ("host", "vm1.vmm", "page_response", True),
            ("vm1.vmm", "vm1.guest", "vpage_response", True),
        ], tag
    assert len({r["flow"] for r in reqs}) == pages + 2
    f6 = [s for s in g.steps if s["flow"] == "F6"]
    assert len(f6) == pages + 2 and all(s["ok"] and s["code"] == IOMMU_PAGE_RESP_SUCCESS for s in f6)
    assert w.host.prq.pending == [] and w.host.prq.stats.responses == pages + 2
    # the vmm injected each request into the guest's vPRQ and passed each response down
    assert w.rt.actors["vm1.vmm"].snapshot()["prq"] == {
        "injected": pages + 2,
        "unmapped": 0,
        "responses": pages + 2,
        "refused": 0,
    }
    assert audit(w.snapshots(), w.t) == []


def test_invalid_address_and_read_only_vma(vsva, monkeypatch):
    out = {}

    def body(g):
        k = g.kernel
        proc, dev, pasid = yield from bound_process(g)
        k.mmap(proc, LAZY, 1, populate=False, writable=False)
        out["hole"] = yield from g.submit(dev, pasid, "fill", dst=HOLE, length=PAGE_SIZE, pattern=1)
        out["ro"] = yield from g.submit(dev, pasid, "fill", dst=LAZY, length=PAGE_SIZE, pattern=2)
        out["present"] = [proc.pt.lookup(HOLE) & FL_P, proc.pt.lookup(LAZY) & FL_P]

    w, g, reply = run_workload(vsva, monkeypatch, body)
    for key in ("hole", "ro"):
        r = out[key]
        assert r["ret"] == -E.EFAULT and r["page_response"] == IOMMU_PAGE_RESP_INVALID, r
        assert r["fault"].startswith("fl-not-present") and r["page_requests"] == 1
    assert out["hole"]["fault_va"] == HOLE and out["present"] == [0, 0]
    assert g.dma.failed == 2 and g.dma.indefinite == 0
    assert [s["code"] for s in g.steps if s["flow"] == "F6"] == [IOMMU_PAGE_RESP_INVALID] * 2
    assert w.host.prq.pending == [] and audit(w.snapshots(), w.t) == []


def test_write_to_write_protected_page_is_granted(vsva, monkeypatch):
    """A first-level permission fault the guest can fix (a write to a read-only PTE of a
    writable VMA, as after fork's COW): one write request, the PTE becomes writable."""
    out = {}

    def body(g):
        k = g.kernel
        proc, dev, pasid = yield from bound_process(g)
        k.mmap(proc, VA, 2)
        proc.pt.map(VA, proc.pt.lookup(VA) & ADDR_MASK, FL_P | FL_US)  # write-protect page 0
        out["fill"] = yield from g.submit(dev, pasid, "fill", dst=VA, length=2 * PAGE_SIZE, pattern=0x3C)
        out["ok"] = k.read(proc, VA, 2 * PAGE_SIZE) == b"\x3c" * 2 * PAGE_SIZE
        out["rw"] = bool(proc.pt.lookup(VA) & FL_RW)

    w, g, reply = run_workload(vsva, monkeypatch, body)
    assert out["fill"]["ret"] == 0 and out["fill"]["page_requests"] == 1 and out["ok"] and out["rw"]
    (req,) = f6_records(w.rt, "page_request", "host", "vm1.vmm")
    assert req["body"]["perm"] == IOMMU_FAULT_PERM_WRITE and req["body"]["addr"] == VA


def test_device_without_pri_faults_at_once(vsva, monkeypatch):
    out = {}

    def body(g):
        proc, dev, pasid = yield from bound_process(g)
        g.kernel.mmap(proc, LAZY, 1, populate=False)
        out["fill"] = yield from g.submit(dev, pasid, "fill", dst=LAZY, length=PAGE_SIZE)

    monkeypatch.setitem(guest_mod.WORKLOADS, "f6test", body)
    w = vsva.world(1, workload="f6test")
    w.host.vfio.phys["pf1"].pri = False
    vsva.ask(w.rt, "vm1.guest", "start_workload", {})
    assert out["fill"]["ret"] == -E.EFAULT and out["fill"]["page_requests"] == 0
    assert f6_records(w.rt, "page_request") == []


def test_unanswered_request_times_out(vsva, monkeypatch):
    """The guest never answers (its vPRQ link is held): after prq_timeout the host answers
    INVALID for it, the descriptor fails definitely, nothing stays queued; the guest's late
    answer is refused and changes nothing."""
    out = {}

    def body(g):
        proc, dev, pasid = yield from bound_process(g)
        g.kernel.mmap(proc, LAZY, 1, populate=False)
        out["fill"] = yield from g.submit(dev, pasid, "fill", dst=LAZY, length=PAGE_SIZE)
        out["at"] = g.now

    monkeypatch.setitem(guest_mod.WORKLOADS, "f6test", body)
    w = vsva.world(1, workload="f6test")
    rt, host = w.rt, w.host
    handle = vsva.Wire(rt).send("orch", "vm1.guest", "start_workload", {})
    rt.run(until=lambda: host.prq.pending != [])
    rt.hold("vm1.vmm", "vm1.guest")  # the vPRQ injection never reaches the guest
    rt.run(until=lambda: "fill" in out)
    r = out["fill"]
    assert (
        r["ret"] == -E.ETIMEDOUT and r["page_response"] == IOMMU_PAGE_RESP_INVALID and not r.get("indefinite")
    )
    assert host.prq.pending == [] and host.prq.stats.timeouts == 1
    g = rt.actors["vm1.guest"]
    assert g.dma.failed == 1 and g.dma.indefinite == 0
    before = [dict(x) for x in host.prq.pending]
    rt.release("vm1.vmm", "vm1.guest")
    vsva.Wire(rt).wait(handle)
    rt.run()
    late = [x for x in rt.trace if x["kind"] == "page_response" and x["src"] == "host" and x["corr"]]
    assert [x["body"]["ret"] for x in late] == [-E.EINVAL]
    assert host.prq.pending == before and host.prq.stats.rejected == 1
    assert [s["ok"] for s in g.steps if s["flow"] == "F6"] == [False]  # the guest sees its answer refused
    assert audit(w.snapshots(), w.t) == []


# ---- hand-driven guests: the test answers (or does not) ----------------------------------------


class Scene:
    """VM 1 (and VM 2) driven by hand; VM 1's process has PASID P bound on pf1 and Q on an mdev."""

    def __init__(self, vsva, policy="reclaim", mdev=False):
        self.w = w = vsva.world(2, hand=(1, 2), policy=policy)
        self.rt, self.host, self.wire = w.rt, w.host, vsva.Wire(w.rt)
        devs = ["pf1"] + (["vm1.mdev0"] if mdev else [])
        self.g1 = vsva.HandGuest(w.rt, 1, devices=devs)
        self.g2 = vsva.HandGuest(w.rt, 2, devices=["pf2"] + (["vm2.mdev0"] if mdev else []))
        self.p1 = self.g1.spawn(1, VA, 2)
        self.g1.kernel.mmap(self.p1, LAZY, 4, populate=False)
        self.P = self.g1.alloc("pf1")["gpasid"]
        assert self.g1.bind(self.p1, "pf1", self.P)["ret"] == 0
        if mdev:
            alloc = self.g1.alloc("vm1.mdev0")
            self.Q, self.hQ = alloc["gpasid"], alloc["hpasid"]
            assert self.g1.bind(self.p1, "vm1.mdev0", self.Q)["ret"] == 0

    def dma(self, dev="pf1", pasid=None, va=LAZY, pages=1):
        """A descriptor put on the wire as vm1's guest; runs until it is waiting on a page request."""
        portal, kind = ("vdcm", "mdev_submit") if "mdev" in dev else ("host", "dev_submit")
        injected = len(f6_records(self.rt, "vpage_request", "vm1.vmm", "vm1.guest"))
        handle = self.wire.send("vm1.guest", portal, kind, fill(dev, pasid or self.P, va, pages))
        self.rt.run(
            until=lambda: (
                len(f6_records(self.rt, "vpage_request", "vm1.vmm", "vm1.guest")) > injected
                or self.wire.reply(handle) is not None
            )
        )
        return handle

    def answer(self, req, code=IOMMU_PAGE_RESP_SUCCESS, gpasid=None, src="vm1.guest", dst="vm1.vmm"):
        """The guest's page group response for host PRQ entry `req` (or, sent to the host, the
        vmm's with the host PASID)."""
        kind, key = ("page_response", "hpasid") if dst == "host" else ("vpage_response", "gpasid")
        return self.wire.call(
            src,
            dst,
            kind,
            {"dev": req["vdev"], key: gpasid or req["pasid"], "grpid": req["grpid"], "code": code},
        )

    def fault_in(self, va):
        self.g1.kernel.fault_in(self.p1, va, write=True)

    def violations(self):
        return audit(self.w.snapshots(), self.w.t)


def test_hand_answered_request_retries_from_the_fault(vsva):
    s = Scene(vsva)
    d = s.dma(pages=2)
    (req,) = s.host.prq.pending
    assert req["addr"] == LAZY and req["vm"] == 1 and req["pasid"] == s.P
    injected = f6_records(s.rt, "vpage_request", "vm1.vmm", "vm1.guest")
    assert [r["body"]["gpasid"] for r in injected] == [s.P]  # identity PASID on the passthrough function
    s.fault_in(LAZY)
    assert s.answer(req)["ret"] == 0
    s.rt.run(until=lambda: len(s.host.prq.pending) == 1 and s.host.prq.pending[0]["addr"] == LAZY + PAGE_SIZE)
    s.fault_in(LAZY + PAGE_SIZE)
    assert s.answer(s.host.prq.pending[0])["ret"] == 0
    done = s.wire.wait(d)
    assert done["ret"] == 0 and done["page_requests"] == 2
    assert s.g1.kernel.read(s.p1, LAZY, 2 * PAGE_SIZE) == b"\x5a" * 2 * PAGE_SIZE
    assert s.violations() == []


def test_responses_are_matched_and_foreign_ones_refused(vsva):
    """Unknown group, another VM's request, wrong PASID, bad code: refused, nothing changes."""
    s = Scene(vsva, mdev=True)
    pf = s.dma()
    md = s.dma("vm1.mdev0", s.Q)
    r_pf, r_md = s.host.prq.pending
    assert r_md["pasid"] == s.hQ and r_md["dev"] == "dsa0" and r_md["vdev"] == "vm1.mdev0"
    # the vmm injected the mdev's request with the guest PASID (non-identity)
    inj = [r["body"] for r in f6_records(s.rt, "vpage_request", "vm1.vmm", "vm1.guest")]
    assert [b["gpasid"] for b in inj] == [s.P, s.Q] and s.Q != s.hQ
    before = [dict(r) for r in s.host.prq.pending]
    refusals = [
        (s.answer(r_pf, src="vm2.vmm", dst="host"), -E.ENODEV),  # pf1 is not vm2's device
        (
            s.wire.call(
                "vm2.vmm",
                "host",
                "page_response",
                {"dev": "vm2.mdev0", "hpasid": s.hQ, "grpid": r_md["grpid"], "code": 0},
            ),
            -E.EACCES,
        ),
        (
            s.wire.call(
                "vm1.vmm",
                "host",
                "page_response",
                {"dev": "pf1", "hpasid": s.P, "grpid": (r_pf["grpid"] + 7) % 512, "code": 0},
            ),
            -E.EINVAL,
        ),  # unknown group
        (
            s.wire.call(
                "vm1.vmm",
                "host",
                "page_response",
                {"dev": "pf1", "hpasid": s.hQ, "grpid": r_pf["grpid"], "code": 0},
            ),
            -E.EINVAL,
        ),
        (
            s.wire.call(
                "vm1.vmm",
                "host",
                "page_response",
                {"dev": "pf1", "hpasid": s.P, "grpid": r_pf["grpid"], "code": 7},
            ),
            -E.EINVAL,
        ),
        (s.answer(r_pf, gpasid=12345), -E.EINVAL),  # the vmm has no such guest PASID
        (s.answer(r_pf, src="vm2.guest"), -E.EPERM),  # vm2's guest talking to vm1's vmm
        (
            s.wire.call(
                "vm2.guest",
                "vm2.vmm",
                "vpage_response",
                {"dev": "pf1", "gpasid": s.P, "grpid": r_pf["grpid"], "code": 0},
            ),
            -E.EINVAL,
        ),
    ]
    for reply, ret in refusals:
        assert reply["ret"] == ret, (reply, ret)
    assert s.host.prq.pending == before and s.wire.reply(pf) is None and s.wire.reply(md) is None
    # the right answers, from vm1's guest with its guest PASIDs
    s.fault_in(LAZY)
    assert s.answer(r_pf)["ret"] == 0
    assert s.answer(r_md, gpasid=s.Q)["ret"] == 0
    assert s.wire.wait(pf)["ret"] == 0 and s.wire.wait(md)["ret"] == 0
    assert s.host.prq.pending == [] and s.violations() == []


def test_queue_overflow_auto_responds_and_device_retries(vsva):
    """VT-d overflow: with the queue full, PRO is set and further requests are auto-responded
    SUCCESS; the device retries (each retry a new fault, against its budget) and fails when
    the budget is spent; PRO clears when the queue empties and requests queue again."""
    s = Scene(vsva)
    s.host.prq.depth, s.host.prq.max_faults = 1, 5
    first = s.dma(va=LAZY)
    assert len(s.host.prq.pending) == 1
    second = s.wire.send("vm1.guest", "host", "dev_submit", fill("pf1", s.P, LAZY + PAGE_SIZE))
    late = s.wire.wait(second)
    assert late["ret"] == -E.EFAULT and late["error"] == "page request budget exhausted", late
    assert s.host.prq.overflow and s.host.prq.stats.auto_responses == 5
    assert len(s.host.prq.pending) == 1 and s.host.prq.stats.requests == 1
    s.fault_in(LAZY)
    assert s.answer(s.host.prq.pending[0])["ret"] == 0
    assert s.wire.wait(first)["ret"] == 0
    assert s.host.prq.pending == [] and not s.host.prq.overflow
    again = s.dma(va=LAZY + PAGE_SIZE)
    assert len(s.host.prq.pending) == 1 and s.host.prq.stats.requests == 2
    s.fault_in(LAZY + PAGE_SIZE)
    assert s.answer(s.host.prq.pending[0])["ret"] == 0 and s.wire.wait(again)["ret"] == 0
    assert s.violations() == []


@pytest.mark.parametrize("policy", ["reclaim", "ordered", "naive"])
def test_request_in_flight_when_pasid_freed(vsva, policy):
    """reclaim: the free drains the request (descriptor aborted) before the PASID can return.
    ordered: the free is refused while bound; the unbind drains it. naive: the PASID is free
    at once while the request is still queued (the audit's I3 hazard), a request arriving
    meanwhile for it is dropped and counted, and the deferred cleanup drains the queued one."""
    s = Scene(vsva, policy)
    P, host, rt = s.P, s.host, s.rt
    d = s.dma()
    (req,) = host.prq.pending
    if policy == "ordered":
        assert s.wire.call("vm1.guest", "vm1.vmm", "vcmd_free", {"gpasid": P})["ret"] == -E.EBUSY
        assert host.prq.pending == [req] and s.wire.reply(d) is None
        assert s.g1.unbind("pf1", P)["ret"] == 0
    elif policy == "naive":
        rt.hold("host", "host")  # the deferred IOMMU cleanup has not run yet
    reply = s.wire.call("vm1.guest", "vm1.vmm", "vcmd_free", {"gpasid": P})
    assert reply["ret"] == 0
    if policy == "naive":
        assert host.ioasid.state(P) == "free" and host.prq.pending == [req]
        found = s.violations()
        assert any(
            v["invariant"] == "I3"
            and "page request queued for an unbound PASID" in v["what"]
            and v["pasid"] == P
            for v in found
        )
        # the vmm's response for it is refused (the PASID is gone), nothing changes
        assert s.answer(req, src="vm1.vmm", dst="host")["ret"] == -E.ENODEV and host.prq.pending == [req]
        # a new fault through the stale entry: dropped, counted, reported to nobody
        reports = len(f6_records(rt, "page_request", "host"))
        other = s.wire.call("vm1.guest", "host", "dev_submit", fill("pf1", P, LAZY + PAGE_SIZE))
        assert other["ret"] == -E.EFAULT and host.prq.stats.dropped == 1
        assert len(f6_records(rt, "page_request", "host")) == reports
        rt.release("host", "host")
    done = s.wire.wait(d)
    assert done["ret"] == -E.ECANCELED and done.get("aborted"), done
    assert done["page_response"] == IOMMU_PAGE_RESP_INVALID
    rt.run()
    assert host.prq.pending == [] and host.prq.stats.drained == 1 and host.ioasid.state(P) == "free"
    assert not s.p1.pt.lookup(LAZY) & FL_P
    assert s.violations() == []


def _unbind_now(s, pasid, dev="pf1"):
    """The guest clears its entry and invalidates the PASID cache, waiting only for that
    reply (a run to quiescence would let the other queued requests time out)."""
    s.g1.dirs[dev].clear_entry(pasid)
    descs = [{"type": "pc", "dev": dev, "gpasid": pasid}, {"type": "wait"}]
    return s.wire.call("vm1.guest", "vm1.vmm", "qi_submit", {"descs": descs})


def test_drain_then_late_response_is_enodev(vsva):
    """drivers/iommu/intel/svm.c intel_svm_drain_prq: at unbind no request of the PASID is
    left in the queue (then one fenced wait with the drain flag); other PASIDs' requests on
    the device stay. The VMM was told of the drained request, so the iommu core
    (drivers/iommu/iommu.c iommu_page_response) still holds its event: the late response
    reaches intel_svm_page_response, whose pasid_to_svm_sdev finds no sdev: -ENODEV, not an
    unknown group. The event is gone after that: a second response is -EINVAL."""
    s = Scene(vsva)
    P, host = s.P, s.host
    P2 = s.g1.alloc("pf1")["gpasid"]
    assert s.g1.bind(s.p1, "pf1", P2)["ret"] == 0
    waits = host.prq.stats.drain_waits
    d = s.dma()
    d2 = s.dma(pasid=P2, va=LAZY + PAGE_SIZE)
    req, req2 = host.prq.pending
    assert _unbind_now(s, P)["ret"] == 0
    assert host.prq.stats.drain_waits == waits + 1 and host.prq.pending == [req2]
    done = s.wire.wait(d)
    assert done["ret"] == -E.ECANCELED and done.get("aborted"), done
    assert s.answer(req, src="vm1.vmm", dst="host")["ret"] == -E.ENODEV
    assert s.answer(req, src="vm1.vmm", dst="host")["ret"] == -E.EINVAL
    assert host.prq.pending == [req2] and host.prq.drained == []
    s.fault_in(LAZY + PAGE_SIZE)
    assert s.answer(req2, src="vm1.vmm", dst="host")["ret"] == 0
    assert s.wire.wait(d2)["ret"] == 0
    s.rt.run()
    assert s.violations() == []


def test_failure_response_is_sticky_per_device_until_reset(vsva):
    """A FAILURE page response (include/uapi/linux/iommu.h: "drop all further faults from
    this device"; intel_svm_page_response passes the code to the device, whose PRI then
    stops): every later fault of pf1, under any PASID, fails its descriptor unreported; the
    VM's other device and other VMs keep their page requests. Reset, in this model: VFIO's
    FLR when the VM's devices are released (VM stop); after it pf1 raises requests again."""
    s = Scene(vsva)
    P, host, rt = s.P, s.host, s.rt
    pf1 = host.vfio.phys["pf1"]
    d = s.dma()
    (req,) = host.prq.pending
    assert s.answer(req, code=IOMMU_PAGE_RESP_FAILURE, src="vm1.vmm", dst="host")["ret"] == 0
    first = s.wire.wait(d)
    assert first["ret"] == -E.EFAULT and first["page_response"] == IOMMU_PAGE_RESP_FAILURE
    assert pf1.prg_failed and not host.vfio.phys["pf2"].prg_failed
    reports = len(f6_records(rt, "page_request", "host"))
    for pasid in (P, s.g1.alloc("pf1")["hpasid"]):
        if pasid != P:
            assert s.g1.bind(s.p1, "pf1", pasid)["ret"] == 0
        again = s.wire.call("vm1.guest", "host", "dev_submit", fill("pf1", pasid, LAZY + PAGE_SIZE))
        assert again["ret"] == -E.EFAULT and again["page_requests"] == 0, again
        assert again["fault"].startswith("fl-not-present")
    assert host.prq.stats.failure_drops == 2 and len(f6_records(rt, "page_request", "host")) == reports
    assert host.prq.pending == []
    assert s.wire.call("orch", "vm1.vmm", "vm_stop", {})["ret"] == 0
    assert not pf1.prg_failed and host.teardowns[-1]["reset"] == ["pf1"]
    assert s.wire.call("orch", "vm1.vmm", "vm_start", {})["ret"] == 0
    g = vsva.HandGuest(rt, 1, devices=["pf1"])
    proc = g.spawn(1, VA, 1)
    g.kernel.mmap(proc, LAZY, 1, populate=False)
    Q = g.alloc("pf1")["gpasid"]
    assert g.bind(proc, "pf1", Q)["ret"] == 0
    s.wire.send("vm1.guest", "host", "dev_submit", fill("pf1", Q, LAZY))
    rt.run(until=lambda: host.prq.pending != [])
    assert [(r["dev"], r["pasid"]) for r in host.prq.pending] == [("pf1", Q)]


def test_failure_on_a_shared_parent_silences_every_vms_mdevs(vsva):
    """The FAILURE stops the physical function's page requests (the PRI is the function's),
    so one guest's FAILURE through its mdev drops the faults of another VM's mdev on the same
    parent; the parent is reset only when no running VM holds one of its mdevs."""
    s = Scene(vsva, mdev=True)
    host = s.host
    p2 = s.g2.spawn(1, VA, 1)
    s.g2.kernel.mmap(p2, LAZY, 1, populate=False)
    Q2 = s.g2.alloc("vm2.mdev0")["gpasid"]
    assert s.g2.bind(p2, "vm2.mdev0", Q2)["ret"] == 0
    parent = host.vfio.physical("vm1.mdev0")
    assert parent is host.vfio.physical("vm2.mdev0")
    d = s.dma(dev="vm1.mdev0", pasid=s.Q)
    (req,) = host.prq.pending
    assert s.answer(req, code=IOMMU_PAGE_RESP_FAILURE, src="vm1.vmm", dst="host")["ret"] == 0
    assert s.wire.wait(d)["ret"] == -E.EFAULT and parent.prg_failed
    other = s.wire.call("vm2.guest", "vdcm", "mdev_submit", fill("vm2.mdev0", Q2, LAZY))
    assert other["ret"] == -E.EFAULT and other["page_requests"] == 0 and host.prq.stats.failure_drops == 1
    assert s.wire.call("orch", "vm1.vmm", "vm_stop", {})["ret"] == 0
    assert host.teardowns[-1]["reset"] == ["pf1"] and parent.prg_failed  # vm2 still holds an mdev
    assert s.wire.call("orch", "vm2.vmm", "vm_stop", {})["ret"] == 0
    assert host.teardowns[-1]["reset"] == sorted(["pf2", parent.name]) and not parent.prg_failed


def test_vm_death_drains_its_requests(vsva):
    s = Scene(vsva)
    d = s.dma()
    assert len(s.host.prq.pending) == 1
    s.rt.kill("vm1.vmm")
    s.rt.run(until=lambda: s.wire.reply(d) is not None)
    assert s.wire.reply(d)["ret"] == -E.ECANCELED
    s.rt.run()
    assert s.host.prq.pending == [] and 1 not in s.host.vfio.domains
