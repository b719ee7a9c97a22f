"""The supervisor's main loop: one live topology kept running.

The Supervisor owns the Launcher (one OS process per actor) and runs the orchestrator's actor
(named "orch") on the launcher's runtime: it powers the VMs on, starts their workloads, pings
every actor each `dead_peer_interval` (heartbeat: an actor that is alive but does not answer
shows as "unresponsive"), and between the actor's turns handles deaths (vsva.ops.supervisor.
recovery), control requests (.control) and scheduled faults (.faults).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from types import FrameType
from typing import Any, TypeVar

from vsva.actors.base import Actor, Body, Call, Gather, Steps
from vsva.actors.catalogue import Ping
from vsva.ops import runfiles
from vsva.ops.control import Orchestrator
from vsva.ops.supervisor.control import ControlServer
from vsva.ops.supervisor.faults import WORKLOAD_TIMEOUT, FaultInjector
from vsva.ops.supervisor.recovery import RESTARTED, Recovery
from vsva.ops.supervisor.statefile import ctl_endpoint, write_state
from vsva.ops.topology import HOST, guest_name, vmm_name
from vsva.ops.topology_file import RunFile
from vsva.runtime.loop import ZmqRuntime

T = TypeVar("T")


@dataclass
class VmState:
    vm: int
    state: str = "off"  # off, booting, running, crashed, gone
    workload: dict[str, Any] | None = None
    runs: int = 0


@dataclass
class Event:
    t: float  # seconds since the run started (the trace's clock)
    what: str
    actor: str = ""
    detail: dict[str, Any] = field(default_factory=dict)


class SupervisorActor(Orchestrator):
    """The orchestrator's actor under supervision: the run engine's steps (boot, workloads,
    audit, vm_stop) plus the recovery steps that need messages (resync checks, heartbeat).
    Process-level actions go back to the Supervisor. Deaths come from the launcher (pidfds),
    see Recovery.on_death."""

    def __init__(self, sup: Supervisor):
        super().__init__(sup.run.topology)
        self.sup = sup
        self.booted = False
        self.heartbeat_busy = False

    def on_start(self) -> Steps[None]:
        yield from self.sup.boot_vms(self, [v.vm for v in self.sup.vms.values()])
        self.booted = True


class Supervisor:
    """Drives one live topology; see the package docstring."""

    def __init__(
        self,
        run: RunFile,
        *,
        launcher_kw: dict[str, Any] | None = None,
        log: Callable[[str], None] | None = None,
        workloads: bool = True,
    ):
        from vsva.ops.launcher import Launcher

        self.run = run
        topo = run.topology
        for spec in topo.actors:
            if spec.kind == "guest":
                spec.config["portal_retry"] = max(5.0, 4 * run.dead_peer_interval)
            elif spec.kind in RESTARTED:
                spec.config["resync_on_start"] = True
        self.launcher = Launcher(topo, log=log, **(launcher_kw or {}))
        self.vms = {vm: VmState(vm) for vm in topo.vms}
        self.autoworkload = workloads
        self.events: list[Event] = []
        self.recovery = Recovery(self)
        self.faults = FaultInjector(self)
        self.control: ControlServer | None = None
        self.unresponsive: set[str] = set()
        self.host_lost = False
        self.host_lost_info: dict[str, Any] | None = None  # when and why, for the state file
        self.stop_requested = False
        self.t_start = 0.0
        self.t_workloads: float | None = None
        self.state_file: str | None = None
        self.ready_s = 0.0
        self.actor = SupervisorActor(self)

    # ---- lifecycle ---------------------------------------------------------------------------
    def now(self) -> float:
        return time.time() - (self.launcher.t0 or time.time())

    def event(self, what: str, actor: str = "", **detail: Any) -> None:
        self.events.append(Event(round(self.now(), 4), what, actor, detail))

    def start(self, state_file: str | None = None) -> None:
        t = time.monotonic()
        self.launcher.on_death.append(self.recovery.on_death)
        self.launcher.start()
        self.ready_s = time.monotonic() - t
        self.t_start = self.now()
        self.control = ControlServer(self, ctl_endpoint(self.run_dir))
        self.state_file = state_file
        self.write_state()
        self.faults.plan(self.run.faults)

    def write_state(self, host_lost: dict[str, Any] | None = None, trace_error: str | None = None) -> None:
        """The state file `vsva ps/kill/audit/down` read; with `host_lost`, the record of a
        topology that lost its host (nothing runs any more); with `trace_error`, of one whose
        trace could not be written when it stopped (`vsva down`, which waits for this
        process's exit and cannot see its exit code, reads it there)."""
        if not self.state_file:
            return
        write_state(
            self.state_file,
            {
                "pid": os.getpid(),
                "owner": runfiles.owner_tag(),
                "run_dir": self.launcher.run_dir,
                "shm": self.launcher.shm_path,
                "ctl": ctl_endpoint(self.run_dir),
                "source": self.run.source,
                "started": self.launcher.t0,
                "actors": {}
                if host_lost or trace_error
                else {r["name"]: r["pid"] for r in self.launcher.processes()},
                "host_lost": host_lost,
                "trace_error": trace_error,
            },
        )

    @property
    def run_dir(self) -> str:
        """The launcher's run directory (it exists once the launcher has started)."""
        if self.launcher.run_dir is None:
            raise RuntimeError("the supervisor has not started")
        return self.launcher.run_dir

    @property
    def runtime(self) -> ZmqRuntime:
        """The launcher's runtime, on which the orchestrator's actor runs."""
        if self.launcher.runtime is None:
            raise RuntimeError("the supervisor has not started")
        return self.launcher.runtime

    def close(self) -> None:
        if self.control is not None:
            self.control.close()
        self.launcher.close()
        if self.state_file:
            try:
                os.unlink(self.state_file)
            except FileNotFoundError:
                pass

    # ---- the main loop -----------------------------------------------------------------------
    def _wake(self, actor: Actor) -> bool:
        return bool(
            self.recovery.busy()
            or self.stop_requested
            or (self.control is not None and self.control.readable())
        )

    def step(self, slice_s: float = 0.02) -> None:
        """One turn: run the actor for up to `slice_s`, then deaths, actions, control, faults."""
        if self.launcher.closed:
            return
        self.launcher.run_actor(self.actor, timeout=slice_s, until=self._wake)
        self.recovery.handle_pending()
        self.recovery.do_actions()
        if self.control is not None:
            self.control.serve()
        self.faults.fire()
        self._heartbeat()

    def serve(self) -> None:
        """`vsva up`: run until a `down` request (or SIGTERM/SIGINT, or the host is lost)."""

        def on_signal(signum: int, frame: FrameType | None) -> None:
            self.stop_requested = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        while not self.stop_requested:
            self.step(0.05)
        self.shutdown()

    def shutdown(self) -> None:
        """Stop the running VMs cleanly (F8 through vm_stop), then every process; clean up."""
        if not self.host_lost and self.launcher.alive(HOST):
            self.run_step(self.stop_vms, timeout=10.0)
        self.close()

    def run_step(self, gen_fn: Callable[[], Steps[T]], timeout: float) -> T | None:
        """Run a step (a generator function) on the actor to completion (bounded) from the
        main loop, handling deaths meanwhile; returns its result (None on timeout)."""
        box: dict[str, T] = {}

        def wrapper() -> Steps[None]:
            box["result"] = yield from gen_fn()

        self.spawn(wrapper)
        end = time.monotonic() + timeout
        while "result" not in box and time.monotonic() < end and not self.launcher.closed:
            self.launcher.run_actor(
                self.actor,
                timeout=min(0.05, end - time.monotonic()),
                until=lambda a: "result" in box or bool(self.recovery.pending),
            )
            self.recovery.handle_pending()
        return box.get("result")

    def spawn(self, gen_fn: Callable[[], Steps[Any]]) -> None:
        """Start a step on the actor from the main loop; its deadlines count from now."""
        self.runtime.send(self.actor.run_task(gen_fn, self.runtime.now()))

    # ---- VMs and workloads -----------------------------------------------------------------
    def boot_vms(self, actor: SupervisorActor, vms: list[int]) -> Steps[dict[int, Body]]:
        """Power `vms` on (their workloads start as each runs); returns {vm: vm_start reply}."""
        for vm in vms:
            self.vms[vm].state = "booting"
        replies = yield from actor.boot(vms)
        for vm, r in replies.items():
            if r.get("ret") == 0 and self.vms[vm].state == "booting":
                self.vms[vm].state = "running"
                self.event("vm started", vmm_name(vm))
                if self.autoworkload:
                    self.faults.arm(actor, vm)
                    actor.spawn(partial(self._workload, vm))
            elif self.vms[vm].state == "booting":
                self.vms[vm].state = "off"
                self.event("vm start failed", vmm_name(vm), ret=r.get("ret"), error=r.get("error", ""))
        if self.t_workloads is None:
            self.t_workloads = self.now()
        return replies

    def _workload(self, vm: int) -> Steps[None]:
        st = self.vms[vm]
        st.runs += 1
        run = st.runs
        reply = yield from self.actor.workload(vm, timeout=WORKLOAD_TIMEOUT)
        if st.runs == run:
            st.workload = reply
            self.event("workload finished", guest_name(vm), ret=reply.get("ret"), ok=reply.get("ok"))

    def workloads_done(self) -> bool:
        return (
            all(v.state != "running" or v.workload is not None for v in self.vms.values())
            and all(v.state != "booting" for v in self.vms.values())
            and not self.recovery.busy()
            and self.actor.booted
        )

    def stop_vms(self) -> Steps[dict[int, Body]]:
        """vm_stop (F8) on every running VM whose vmm is alive; returns {vm: reply}."""
        live = [
            vm for vm, v in self.vms.items() if v.state == "running" and self.launcher.alive(vmm_name(vm))
        ]
        replies = yield from self.actor.stop_vms(live, timeout=None)
        for vm, r in replies.items():
            self.vms[vm].state = "off" if r.get("ret") == 0 else self.vms[vm].state
        return replies

    # ---- heartbeat ---------------------------------------------------------------------------
    _next_beat = 0.0

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if self.actor.heartbeat_busy or now < self._next_beat or self.host_lost:
            return
        self._next_beat = now + self.run.dead_peer_interval
        names = [n for n in self.run.topology.names() if self.launcher.alive(n)]
        interval = self.run.dead_peer_interval

        def beat() -> Steps[None]:
            self.actor.heartbeat_busy = True
            try:
                replies = yield Gather([Call(n, Ping(), timeout=interval) for n in names])
                for n, r in zip(names, replies):
                    (self.unresponsive.add if r.get("ret") else self.unresponsive.discard)(n)
            finally:
                self.actor.heartbeat_busy = False

        self.spawn(beat)

    # ---- audit -------------------------------------------------------------------------------
    def audit_task(self) -> Steps[dict[str, Any]]:
        """The run engine's live audit over the actors that are alive (none: the host is gone)."""
        if self.host_lost or not self.launcher.alive(HOST):
            return {
                "ok": False,
                "violations": [
                    {
                        "invariant": "run",
                        "what": "the host is gone",
                        "actors": [HOST],
                        "vm": None,
                        "pasid": None,
                    }
                ],
            }
        return (
            yield from self.actor.audit_live([n for n in self.run.topology.names() if self.launcher.alive(n)])
        )

    # ---- what `vsva ps` shows ----------------------------------------------------------------
    def processes(self) -> list[dict[str, Any]]:
        rows = []
        mono = time.monotonic()
        for r in self.launcher.processes():
            proc = self.launcher.procs[r["name"]]
            state = r["state"]
            if state == "running" and r["name"] in self.unresponsive:
                state = "unresponsive"
            rows.append(
                {
                    "name": r["name"],
                    "kind": r["kind"],
                    "pid": r["pid"],
                    "state": state,
                    "exitcode": r["exitcode"],
                    "restarts": self.recovery.restarts.get(r["name"], 0),
                    "recovery_error": self.recovery.last_error(r["name"]),
                    "uptime_s": round(mono - proc.started, 2) if r["exitcode"] is None else None,
                }
            )
        return rows

    def status(self) -> dict[str, Any]:
        return {
            "processes": self.processes(),
            "run_dir": self.launcher.run_dir,
            "vms": {
                str(vm): {
                    "state": v.state,
                    "workload": None
                    if v.workload is None
                    else {"ret": v.workload.get("ret"), "ok": v.workload.get("ok")},
                }
                for vm, v in self.vms.items()
            },
            "host_lost": self.host_lost,
            "events": [e.__dict__ for e in self.events[-20:]],
        }
