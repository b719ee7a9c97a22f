"""Shared fixtures for the actor and orchestrator tests.

`vsva` (a fixture) gives the helpers: `world(...)` builds a started system with its VMs
powered on, `Wire(rt)` sends requests from any name and waits for their replies,
`ask(rt, dst, kind, body, src=...)` is one such request followed by a run to quiescence,
`snapshots(w)` is what the audit collects, `HandGuest` is a guest driven by hand
(its pages, PASID table and invalidation queue are written here, as bytes in guest RAM),
`session(...)` runs the Controller's whole demo on the deterministic runtime, `run(runtime,
...)` on either runtime. The `runtime` fixture runs a test on both.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest

from vsva.actors.catalogue import DevSubmit, MdevSubmit, Message, QiSubmit, VcmdAlloc, VmInfo, VmStart
from vsva.actors.guest import GuestKernel, Process
from vsva.actors.memory import GuestRam, PasidDirectory
from vsva.actors.messages import Envelope
from vsva.actors.uapi import IOMMU_GPASID_BIND_VERSION_1, IOMMU_PASID_FORMAT_INTEL_VTD
from vsva.hotpath.layout import (
    ADDR_MASK,
    FL_P,
    FL_RW,
    FL_US,
    PASID_DIR_FRAMES,
    PGTT_FIRST_ONLY,
    encode_pasid_entry,
)
from vsva.ops.config import Runtime
from vsva.ops.control import Controller
from vsva.ops.demo import run_session
from vsva.ops.topology import default_topology, guest_name, vmm_name
from vsva.runtime.sim import SimRuntime

_IDS = itertools.count(1 << 40)


@dataclass
class Pending:
    """A request on the wire: its id, who sent it to whom, and how far the trace was read."""

    rid: int
    src: str
    dst: str
    kind: str
    pos: int
    body: dict | None = None


class Wire:
    """Requests from any name (a live actor's included: the transport authenticates the
    sender, so this is how a test acts *as* the vmm or the guest) that wait for their own
    reply only: no run to quiescence, so no timeout fires early while a link is held.

    `kind` is a catalogue message, or a bare kind with any `body` (for hostile input)."""

    def __init__(self, rt: SimRuntime):
        self.rt = rt

    def send(self, src: str, dst: str, kind: str | Message, body: dict | None = None) -> Pending:
        if isinstance(kind, Message):
            kind, body = kind.KIND, kind.body()
        rid = next(_IDS)
        handle = Pending(rid, src, dst, kind, len(self.rt.trace))
        self.rt.inject(
            Envelope(src=src, dst=dst, kind=kind, body={} if body is None else body, id=rid, rr=True, clock=0)
        )
        return handle

    def reply(self, handle: Pending) -> dict | None:
        """The reply to `handle` if it has arrived (the trace is read once, incrementally)."""
        trace = self.rt.trace
        while handle.body is None and handle.pos < len(trace):
            r = trace[handle.pos]
            handle.pos += 1
            if r["corr"] == handle.rid and r["src"] == handle.dst and r["dst"] == handle.src:
                handle.body = r["body"]
        return handle.body

    def wait(self, handle: Pending) -> dict:
        self.rt.run(until=lambda: self.reply(handle) is not None)
        body = self.reply(handle)
        assert body is not None, f"{handle.dst} never answered {handle.kind} from {handle.src}"
        return body

    def call(self, src: str, dst: str, kind: str | Message, body: dict | None = None) -> dict:
        return self.wait(self.send(src, dst, kind, body))


def ask(rt: SimRuntime, dst: str, kind: str | Message, body: dict | None = None, src: str = "orch") -> dict:
    """One request from `src`, run until `dst` answers it, then drain (deliver what is still in
    flight: the reply itself, acks); returns the reply body."""
    reply = Wire(rt).call(src, dst, kind, body)
    rt.run()
    return reply


def snapshots(w: SimpleNamespace) -> dict:
    """Every live actor's snapshot (what the audit collects at a quiescent point)."""
    names = set(w.t.names())
    return {n: a.snapshot() for n, a in w.rt.actors.items() if n in names}


def notifies(rt: SimRuntime, since: int = 0) -> list[dict]:
    """ioasid_notify requests in the trace from index `since` on."""
    return [r for r in rt.trace[since:] if r["kind"] == "ioasid_notify" and r["corr"] is None]


def host_state(host) -> dict:
    """The host's snapshot without counters and bookkeeping that any request moves."""
    snap = copy.deepcopy(host.snapshot())
    for key in ("counters", "pending", "dropped_replies", "dma"):
        snap.pop(key, None)
    snap.get("prq_stats", {}).pop("drain_waits", None)  # invalidation waits issued, like counters
    return snap


def bind_record(hpasid: int, /, **over: Any) -> dict:
    """A valid bind record (uapi iommu_gpasid_bind_data) for an identity-mapped PASID."""
    rec = {
        "argsz": 72,
        "version": IOMMU_GPASID_BIND_VERSION_1,
        "format": IOMMU_PASID_FORMAT_INTEL_VTD,
        "flags": 0,
        "hpasid": hpasid,
        "gpasid": hpasid,
        "gpgd": 0x10000,
        "addr_width": 48,
        "vtd_flags": 0,
    }
    rec.update(over)
    return rec


class HandGuest:
    """A guest kernel driven by the test: real bytes in guest RAM, requests sent as the guest."""

    def __init__(self, rt: SimRuntime, vm: int, devices: list[str] | None = None):
        self.rt, self.vm = rt, vm
        self.name, self.vmm = guest_name(vm), vmm_name(vm)
        info = self.ask(self.vmm, VmInfo())
        assert info["ret"] == 0, info
        self.kernel = GuestKernel(GuestRam(rt.mem, info["ram_frames"]), len(info["devices"]))
        self.devices, self.mdevs = info["devices"], set(info["mdevs"])
        self.dirs: dict[str, PasidDirectory] = {}
        for dev in devices if devices is not None else self.devices:
            pdir = self.kernel.alloc_contiguous(PASID_DIR_FRAMES)
            self.dirs[dev] = PasidDirectory(self.kernel.ram, pdir, self.kernel.alloc_page)
            reply = self.qi([{"type": "cc", "dev": dev, "pdir": pdir}, {"type": "wait"}])
            assert reply["ret"] == 0, reply

    def ask(self, dst: str, kind: str | Message, body: dict | None = None) -> dict:
        return ask(self.rt, dst, kind, body, src=self.name)

    def qi(self, descs: list) -> dict:
        return self.ask(self.vmm, QiSubmit(descs=descs))

    def spawn(self, pid: int, va: int = 0x4000_0000, pages: int = 4) -> Process:
        proc = self.kernel.spawn(pid)
        self.kernel.mmap(proc, va, pages)
        return proc

    def alloc(self, dev: str) -> dict:
        return self.ask(self.vmm, VcmdAlloc(dev=dev))

    def bind(self, proc: Process, dev: str, gpasid: int) -> dict:
        self.dirs[dev].write_entry(
            gpasid, encode_pasid_entry(flptr=proc.cr3, slptr=0, did=self.vm, eafe=True, pgtt=PGTT_FIRST_ONLY)
        )
        return self.qi([{"type": "pc", "dev": dev, "gpasid": gpasid}, {"type": "wait"}])

    def unbind(self, dev: str, gpasid: int) -> dict:
        self.dirs[dev].clear_entry(gpasid)
        return self.qi([{"type": "pc", "dev": dev, "gpasid": gpasid}, {"type": "wait"}])

    def flush(self, dev: str, gpasid: int, va: int, size_order: int = 0, devtlb: bool = True) -> dict:
        base = {"dev": dev, "gpasid": gpasid, "addr": va, "size_order": size_order}
        descs = [{"type": "piotlb", **base}] + ([{"type": "dev_iotlb", **base}] if devtlb else [])
        return self.qi(descs + [{"type": "wait"}])

    def free(self, gpasid: int) -> dict:
        return self.ask(self.vmm, "vcmd_free", {"gpasid": gpasid})

    def submit(
        self, dev: str, pasid: int, op: str, *, src: int = 0, dst: int = 0, length: int = 0, pattern: int = 0
    ) -> dict:
        """Raw bodies: a hostile guest may program any PASID, the catalogue refuses what is out of range."""
        body = {"dev": dev, "op": op, "src": src, "dst": dst, "len": length, "pattern": pattern}
        if dev in self.mdevs:
            return self.ask("vdcm", MdevSubmit.KIND, {**body, "gpasid": pasid})
        return self.ask("host", DevSubmit.KIND, {**body, "hpasid": pasid})

    def frame_of(self, proc: Process, va: int) -> int:
        """The host frame behind `va` in the process's own tables (the CPU's view)."""
        gpa = proc.pt.lookup(va) & ADDR_MASK
        return self.kernel.ram.hpa(gpa) >> 12

    def remap(self, proc: Process, va: int) -> tuple[int, int]:
        """Point `va` at a fresh guest page (no invalidation yet); returns (old GPA, new GPA)."""
        old = proc.pt.lookup(va) & ADDR_MASK
        new = self.kernel.alloc_page()
        proc.pt.map(va, new, FL_P | FL_RW | FL_US)
        return old, new


def world(
    vms: int = 2, *, seed: int = 1, extra: dict | None = None, hand: tuple[int, ...] = (), **topo: Any
) -> SimpleNamespace:
    """A started system with every VM powered on; the guests of VMs in `hand` are removed
    (the test speaks for them)."""
    t = default_topology(vms, seed=seed, extra_devices=extra, **topo)
    rt = SimRuntime(t)
    for vm in hand:
        rt.actors.pop(guest_name(vm))
    rt.start()
    started = {vm: ask(rt, vmm_name(vm), VmStart(), src="orch") for vm in range(1, vms + 1)}
    for vm, reply in started.items():
        assert reply["ret"] == 0, (vm, reply)
    w = SimpleNamespace(
        t=t, rt=rt, host=rt.actors["host"], kvm=rt.actors["kvm"], vdcm=rt.actors["vdcm"], started=started
    )
    w.snapshots = lambda: snapshots(w)
    return w


def bound_world() -> SimpleNamespace:
    """`world(2)` whose VM 2's guest (by hand) has bound pf2 and its mdev: kvm tracks both
    bindings, vdcm the mdev's."""
    w = world(2, hand=(2,))
    g2 = HandGuest(w.rt, 2, devices=["pf2", "vm2.mdev0"])
    proc = g2.spawn(1)
    for dev in ("pf2", "vm2.mdev0"):
        assert g2.bind(proc, dev, g2.alloc(dev)["gpasid"])["ret"] == 0
    w.rt.run()
    return w


def restarted(w: SimpleNamespace, name: str) -> Any:
    """`name` killed and started again the way the supervisor restarts it: a fresh
    incarnation of the same config with `resync_on_start` (vsva.ops.supervisor.loop)."""
    old = w.rt.actors[name]
    w.rt.kill(name)
    new = w.rt.add(type(old)(name, w.rt.env(dict(old.config, resync_on_start=True))))
    w.rt.run_task(name, new.on_start)
    return new


def session(vms: int = 2, *, seed: int = 1, shutdown: bool = True, stop_vms: bool | None = None, **topo: Any):
    """Run the Controller's whole session; returns (runtime, controller). With shutdown=False
    the VMs are left running too (unless stop_vms says otherwise)."""
    t = default_topology(vms, seed=seed, **topo)
    rt = SimRuntime(t)
    stop = shutdown if stop_vms is None else stop_vms
    kw = {"stop_vms": stop} if "stop_vms" in Controller.__init__.__code__.co_varnames else {}
    c = rt.add(Controller(t, shutdown=shutdown, env=rt.env({"request_timeout": t.request_timeout}), **kw))
    rt.start()
    rt.run(until=lambda: c.result is not None)
    assert c.result is not None, "session did not finish"
    rt.run()
    return rt, c


RUNTIMES = (Runtime.SIM, Runtime.PROCESSES)


@pytest.fixture(scope="module", params=RUNTIMES, ids=str)
def runtime(request: pytest.FixtureRequest) -> Runtime:
    """A test that takes `runtime` runs once on the deterministic runtime and once on real
    processes (one per actor, over ZeroMQ), as Pykka runs its suite per implementation."""
    return request.param


def run(runtime: Runtime | str, vms: int = 2, *, seed: int = 1, **topo: Any) -> dict[str, Any]:
    """One Controller session on `runtime`, through the engine `vsva demo` uses
    (vsva.ops.demo.run_session): the Controller's result plus the merged trace."""
    return run_session(default_topology(vms, seed=seed, **topo), runtime)


@pytest.fixture(scope="session")
def vsva() -> SimpleNamespace:
    return SimpleNamespace(
        ask=ask,
        Wire=Wire,
        snapshots=snapshots,
        world=world,
        bound_world=bound_world,
        restarted=restarted,
        session=session,
        run=run,
        HandGuest=HandGuest,
        host_state=host_state,
        notifies=notifies,
        bind_record=bind_record,
    )


def pytest_configure(config: pytest.Config) -> None:
    """CI's compiled pass sets VSVA_REQUIRE_COMPILED=1: a missing extension must fail the run,
    not quietly test the pure twin twice."""
    import os

    from vsva import hotpath
    from vsva.runtime import frames

    if os.environ.get("VSVA_REQUIRE_COMPILED") != "1":
        return
    for what, module in (("hot path", hotpath), ("runtime's frames", frames)):
        if module.IMPLEMENTATION != "compiled":
            raise pytest.UsageError(
                f"VSVA_REQUIRE_COMPILED=1 but the compiled {what} is not in use "
                f"(implementation {module.IMPLEMENTATION!r}): was it built?"
            )
