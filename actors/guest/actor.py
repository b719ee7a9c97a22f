"""The guest actor: the vIOMMU driver (PASID allocation through VCMD, PASID-table writes and
invalidation-queue submissions, the virtual page request queue) and the device drivers
(work descriptors through a device's portal). Memory management is kernel.py, the
workloads that drive all of it are workloads.py.

Everything the guest does to the IOMMU goes through what a real guest has: it writes its
PASID tables and page tables as bytes in its own RAM, then queues invalidation descriptors
and a wait to the virtual IOMMU (the vmm traps them). Devices get work through their
portals: the passthrough function's directly (it runs on the host), an mdev's through vdcm.
F6: a device's DMA into memory a process mapped but never touched raises page requests that
the vmm injects into the guest's virtual page request queue; `on_vpage_request` makes the
page present if the address lies in one of the process's VMAs (INVALID otherwise) and
answers the page group.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, TypedDict

import msgpack

from vsva.actors import errno as E
from vsva.actors.base import Actor, ActorEnv, Body, Call, Handler, Steps, Wait, failed
from vsva.actors.catalogue import (
    DevSubmit,
    FlowWatch,
    MdevSubmit,
    Message,
    QiSubmit,
    Quiesce,
    Resume,
    StartWorkload,
    VcmdAlloc,
    VcmdFree,
    VmInfo,
    VPageRequest,
    VPageResponse,
)
from vsva.actors.guest.kernel import GuestKernel, Process
from vsva.actors.memory import GuestRam, PasidDirectory
from vsva.actors.messages import MAX_FRAME, Envelope
from vsva.actors.uapi import IOMMU_FAULT_PERM_WRITE, IOMMU_PAGE_RESP_INVALID
from vsva.hotpath.layout import PAGE_SIZE, PASID_DIR_FRAMES, PGTT_FIRST_ONLY, encode_pasid_entry


@dataclass
class DmaCounts:
    """The guest's work descriptors: submitted, and how each ended (I6: none vanishes);
    `resubmitted` counts the retries after a portal's process died (`portal_retry`)."""

    submitted: int = 0
    completed: int = 0
    failed: int = 0
    aborted: int = 0
    indefinite: int = 0
    resubmitted: int = 0


class PortalWork(TypedDict):
    """A work descriptor's fields that a device's portal takes whatever the device."""

    dev: str
    op: str
    src: int
    dst: int
    len: int
    pattern: int


FLOW_WATCH_TIMEOUT = 600.0  # seconds a flow watch may wait (a workload's length at most)


class Guest(Actor):
    """One per VM: runs a workload when the orchestrator asks (`start_workload`)."""

    def __init__(self, name: str, env: ActorEnv):
        super().__init__(name, env)
        self.vm: int = self.config["vm"]
        self.vmm: str = self.config["vmm"]
        self.host: str = self.config["host"]
        self.vdcm: str = self.config["vdcm"]
        self.mdevs: set[str] = set(self.config.get("mdevs", []))
        self.kernel: GuestKernel | None = None
        self.pasid_dirs: dict[str, PasidDirectory] = {}
        self.steps: list[dict[str, Any]] = []
        self.flow_seq: dict[str, int] = {}
        self.running = False
        self.dma = DmaCounts()
        self.in_flight = 0  # requests of ours without their reply yet
        self.hold_until = 0.0  # a live audit holds new flow instances until then (on_quiesce)
        self.held: set[tuple[str, int]] = set()  # Wait keys of the flow instances held
        self.drain_waits: set[tuple[str, int]] = set()  # Wait keys of quiesce requests draining
        self._waits_made = 0

    # ---- requests, and a live audit's cut (docs/design.md §5) ---------------------------------------
    def begin(self, flow: str) -> Steps[str]:
        """Start an instance of `flow` and return its tag; while a live audit holds this guest
        it waits first, as a paused vCPU issues nothing (`on_quiesce`, `on_resume`)."""
        while self.hold_until > self.now:
            key = self._wait_key("held")
            self.held.add(key)
            yield Wait(key, self.hold_until - self.now)
            self.held.discard(key)
        return self.flow_tag(flow)

    def request(self, dst: str, msg: Message, flow: str | None = None) -> Steps[Body]:
        """Send one request and return its reply; it counts as in flight until the reply (or
        its timeout, or its peer's death) comes back: what `on_quiesce` waits out."""
        self.in_flight += 1
        reply: Body = yield Call(dst, msg, flow=flow)
        self.in_flight -= 1
        if not self.in_flight:
            for key in list(self.drain_waits):
                self.wake(key, {"ret": 0})
        return reply

    def flow_request(self, flow: str, dst: str, msg: Message) -> Steps[Body]:
        """A flow instance made of one request (begin, then request)."""
        tag = yield from self.begin(flow)
        return (yield from self.request(dst, msg, tag))

    def _wait_key(self, what: str) -> tuple[str, int]:
        self._waits_made += 1
        return (what, self._waits_made)

    def on_quiesce(self, msg: Envelope, req: Quiesce) -> Handler:
        """Hold every new flow instance for `hold` seconds at most (a lease: a lost resume
        cannot stop the VM for good) and answer once nothing of ours is in flight. Every
        flow the guest started has then ended on every actor it went through (each reply
        comes after the work it answers), so the state audited is one no flow is inside."""
        self.hold_until = max(self.hold_until, self.now + req.hold)
        if self.in_flight:
            key = self._wait_key("drained")
            self.drain_waits.add(key)
            yield Wait(key, req.drain)
            self.drain_waits.discard(key)
        if self.in_flight:
            return failed(
                -E.EBUSY,
                error=f"{self.in_flight} request(s) still in flight after {req.drain} s",
                in_flight=self.in_flight,
            )
        return {"ret": 0, "held": len(self.held)}

    def on_resume(self, msg: Envelope, req: Resume) -> Body:
        """End the hold: every held flow instance starts."""
        self.hold_until = 0.0
        held = list(self.held)
        for key in held:
            self.wake(key, {"ret": 0})
        return {"ret": 0, "released": len(held)}

    @property
    def booted_kernel(self) -> GuestKernel:
        """The guest kernel: workloads run only after `boot` made it."""
        if self.kernel is None:
            raise RuntimeError(f"{self.name} has not booted")
        return self.kernel

    # ---- the vIOMMU driver -------------------------------------------------------------------
    def flow_tag(self, flow: str) -> str:
        n = self.flow_seq[flow] = self.flow_seq.get(flow, 0) + 1
        tag = f"{flow}:vm{self.vm}.{n}"
        self.wake(("flow_watch", flow, n), {"ret": 0, "tag": tag})  # see on_flow_watch
        return tag

    def step(
        self, flow: str, what: str, reply: dict[str, Any], ok: bool | None = None, **detail: Any
    ) -> bool:
        """Record the outcome of one flow instance; `ok` defaults to 'ret == 0'. A request
        that timed out keeps its record (kind, peer, how long), which the reports list."""
        ok = reply.get("ret", 0) == 0 if ok is None else ok
        self.steps.append(
            {
                "flow": flow,
                "what": what,
                "ok": ok,
                "ret": reply.get("ret", 0),
                "error": reply.get("error", ""),
                **({"timed_out": reply["timed_out"]} if "timed_out" in reply else {}),
                **detail,
            }
        )
        return ok

    def boot(self) -> Steps[int]:
        """Read the firmware tables, set up memory and one PASID directory per device."""
        tag = yield from self.begin("boot")
        info = yield from self.request(self.vmm, VmInfo(), tag)
        ret: int = info["ret"]
        if ret:
            return ret
        self.kernel = GuestKernel(GuestRam(self.memory, info["ram_frames"]), len(info["devices"]))
        for dev in info["devices"]:
            pdir = self.kernel.alloc_contiguous(PASID_DIR_FRAMES)
            self.pasid_dirs[dev] = PasidDirectory(self.kernel.ram, pdir, self.kernel.alloc_page)
            reply = yield from self.request(
                self.vmm, QiSubmit(descs=[{"type": "cc", "dev": dev, "pdir": pdir}, {"type": "wait"}]), tag
            )
            ret = reply["ret"]
            if ret:
                return ret
        return 0

    def alloc_pasid(self, proc: Process, dev: str) -> Steps[int]:
        """F1: the virtual command 'allocate PASID'; returns the guest PASID (0 on failure)."""
        reply = yield from self.flow_request("F1", self.vmm, VcmdAlloc(dev=dev))
        if self.step(
            "F1",
            f"pid {proc.pid} alloc PASID for {dev}",
            reply,
            gpasid=reply.get("gpasid"),
            hpasid=reply.get("hpasid"),
        ):
            gpasid: int = reply["gpasid"]
            proc.pasids[dev] = gpasid
            return gpasid
        return 0

    def bind(self, proc: Process, dev: str, pasid: int, allowed: tuple[int, ...] = (0,)) -> Steps[Body]:
        """F2: write the first-level PASID entry (FLPTR = CR3), PASID-cache invalidation, wait.
        `allowed`: the answers that count as the step's success (a refusal the caller expects)."""
        tag = yield from self.begin("F2")
        self.pasid_dirs[dev].write_entry(
            pasid, encode_pasid_entry(flptr=proc.cr3, slptr=0, did=self.vm, eafe=True, pgtt=PGTT_FIRST_ONLY)
        )
        reply = yield from self.request(
            self.vmm, QiSubmit(descs=[{"type": "pc", "dev": dev, "gpasid": pasid}, {"type": "wait"}]), tag
        )
        users = next((d.get("users") for d in reply.get("done", []) if d.get("type") == "pc"), None)
        self.step(
            "F2",
            f"pid {proc.pid} bind {dev} PASID {pasid}",
            reply,
            ok=reply.get("ret") in allowed,
            users=users,
        )
        return {**reply, "users": users}

    def unbind(self, proc: Process, dev: str, pasid: int) -> Steps[Body]:
        """F4: clear the PASID entry, PASID-cache invalidation, wait."""
        tag = yield from self.begin("F4")
        self.pasid_dirs[dev].clear_entry(pasid)
        reply = yield from self.request(
            self.vmm, QiSubmit(descs=[{"type": "pc", "dev": dev, "gpasid": pasid}, {"type": "wait"}]), tag
        )
        self.step("F4", f"pid {proc.pid} unbind {dev} PASID {pasid}", reply)
        return reply

    def flush(self, proc: Process, dev: str, pasid: int, va: int, size_order: int = 0) -> Steps[Body]:
        """F3: PASID-based IOTLB + device-TLB invalidation of a range, then wait."""
        base = {"dev": dev, "gpasid": pasid, "addr": va & ~(PAGE_SIZE - 1), "size_order": size_order}
        reply = yield from self.flow_request(
            "F3",
            self.vmm,
            QiSubmit(descs=[{"type": "piotlb", **base}, {"type": "dev_iotlb", **base}, {"type": "wait"}]),
        )
        self.step("F3", f"pid {proc.pid} flush {dev} PASID {pasid} @ {va:#x}", reply)
        return reply

    def free(self, proc: Process, dev: str, pasid: int) -> Steps[Body]:
        """F5: the virtual command 'free PASID'."""
        reply = yield from self.flow_request("F5", self.vmm, VcmdFree(gpasid=pasid))
        self.step("F5", f"pid {proc.pid} free PASID {pasid}", reply)
        proc.pasids.pop(dev, None)
        return reply

    def submit(
        self, dev: str, pasid: int, op: str, *, src: int = 0, dst: int = 0, length: int = 0, pattern: int = 0
    ) -> Steps[Body]:
        """F7: a work descriptor through the device's portal (mdevs: vdcm's virtual registers)."""
        fields: PortalWork = {"dev": dev, "op": op, "src": src, "dst": dst, "len": length, "pattern": pattern}
        # an mdev takes the guest PASID (vdcm translates it); the passthrough function is
        # programmed with the host PASID, which the identity allocation made equal to it
        work = MdevSubmit(gpasid=pasid, **fields) if dev in self.mdevs else DevSubmit(hpasid=pasid, **fields)
        portal = self.vdcm if dev in self.mdevs else self.host
        flow = yield from self.begin("F7")
        self.dma.submitted += 1
        reply = yield from self.request(portal, work, flow)
        # The portal's process died (vdcm restarted by the supervisor): the device was reset
        # under the descriptor. With `portal_retry` (set by the supervisor) the driver waits
        # for the device and resubmits, visibly (counted): copy and fill are idempotent.
        retry_end = self.now + float(self.config.get("portal_retry", 0.0))
        while reply.get("ret") == -E.EHOSTDOWN and self.now < retry_end:
            self.dma.resubmitted += 1
            self._retry_key = getattr(self, "_retry_key", 0) + 1
            yield Wait(("portal", self._retry_key), 0.02)
            reply = yield from self.request(portal, work, flow)
        outcome = (
            "indefinite"
            if reply.get("indefinite")
            else "aborted"
            if reply.get("aborted")
            else "failed"
            if reply["ret"]
            else "completed"
        )
        setattr(self.dma, outcome, getattr(self.dma, outcome) + 1)
        return reply

    # ---- F6: the virtual page request queue ------------------------------------------------------
    def on_vpage_request(self, msg: Envelope, req: VPageRequest) -> Handler:
        """The vIOMMU's page request interrupt (intel_svm prq handler in the guest): find the
        process bound to (device, PASID), fault the page in, answer the page group."""
        if msg.src != self.vmm:
            return failed(-E.EPERM)
        kernel = self.kernel
        procs = kernel.procs.values() if kernel else []
        proc = next((p for p in procs if p.pasids.get(req.dev) == req.gpasid), None)
        write = bool(req.perm & IOMMU_FAULT_PERM_WRITE)
        code = (
            IOMMU_PAGE_RESP_INVALID
            if kernel is None or proc is None
            else kernel.fault_in(proc, req.addr, write)
        )
        reply = yield from self.request(
            self.vmm, VPageResponse(dev=req.dev, gpasid=req.gpasid, grpid=req.grpid, code=code)
        )
        self.step(
            "F6",
            f"pid {proc.pid if proc else '?'} page request {req.dev} PASID {req.gpasid} "
            f"@ {req.addr:#x} {'write' if write else 'read'} -> "
            f"{('SUCCESS', 'INVALID', 'FAILURE')[code]}",
            reply,
            code=code,
            grpid=req.grpid,
        )
        return None

    # ---- workloads ------------------------------------------------------------------------------
    def on_flow_watch(self, msg: Envelope, req: FlowWatch) -> Handler:
        """Answer when instance `nth` of `flow` starts (at once if it has): the event a fault
        trigger waits for, so the orchestrator never polls. The answer leaves in the same
        batch as that instance's first request, so a kill on it lands inside the step."""
        if self.flow_seq.get(req.flow, 0) >= req.nth:
            return {"ret": 0, "tag": f"{req.flow}:vm{self.vm}.{self.flow_seq[req.flow]}"}
        reply: Body = yield Wait(("flow_watch", req.flow, req.nth), FLOW_WATCH_TIMEOUT)
        return reply

    def on_start_workload(self, msg: Envelope, req: StartWorkload) -> Handler:
        if self.running:
            return failed(-E.EBUSY, error="workload already running")
        self.running = True
        ret = yield from self.boot()
        if ret:
            return failed(ret, error="boot failed", steps=self.steps)
        from vsva.actors.guest.workloads import WORKLOADS  # the workloads drive this actor

        yield from WORKLOADS[self.config.get("workload", "demo")](self)
        ok = all(s["ok"] for s in self.steps)
        return {"ret": 0 if ok else -E.EIO, "ok": ok, **self.results()}

    def results(self) -> dict[str, Any]:
        """The steps and their summary. Every step while they fit in half a frame; beyond
        that (thousands of rounds) the failed ones only, at most 100: a workload of any
        length reports its end in one reply (MAX_FRAME bounds every frame)."""
        steps = self.steps
        summary = {
            "total": len(steps),
            "failed": sum(not s["ok"] for s in steps),
            "verified": sum(1 for s in steps if s.get("verified") and s["ok"]),
        }
        if len(msgpack.packb(steps, use_bin_type=True)) <= MAX_FRAME // 2:
            return {"steps": steps, "summary": summary}
        return {"steps": [s for s in steps if not s["ok"]][:100], "summary": {**summary, "truncated": True}}

    def snapshot(self) -> dict[str, Any]:
        procs = self.kernel.procs.values() if self.kernel else []
        return {
            **super().snapshot(),
            "vm": self.vm,
            "pasids": [{"pid": p.pid, "dev": d, "pasid": g} for p in procs for d, g in p.pasids.items()],
            "steps_ok": sum(s["ok"] for s in self.steps),
            "steps_failed": sum(not s["ok"] for s in self.steps),
            "dma": asdict(self.dma),
            "flows": dict(self.flow_seq),
        }
