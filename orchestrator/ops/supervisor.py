"""The supervisor: keeps a topology running, recovers from deaths, injects faults, serves control.

One supervisor process per live topology (`vsva up`, or in-process for `vsva run`). It owns
the Launcher (one OS process per actor) and runs the orchestrator's actor (named "orch") on
the launcher's runtime: it powers the VMs on, starts their workloads, pings every actor each
`dead_peer_interval` (heartbeat: an actor that is alive but does not answer shows as
"unresponsive"), and reacts to every death the launcher sees through its pidfds (a kill
through `vsva kill` and a plain `kill -9 PID` from outside are the same event).

Recovery contracts (what the supervisor does when an actor dies):
- guest: the VM has crashed. The supervisor asks its vmm to stop the VM (`vm_stop`: the vmm
  closes its VFIO fd, the host runs the F8 teardown: every PASID of the guest unbound and
  freed). With `on_guest_death = "restart"` the guest is started again, the VM powered on
  again and its workload rerun; with "stop" (default) the VM stays off.
- vmm: the VM is gone. The host notices by itself (the vmm's connection drops) and tears the
  VM down (F8); the supervisor kills the VM's guest.
- kvm / vdcm: restarted at once (same name, config, endpoint). On start they rebuild their
  translation tables from the host (`pasid_bindings`) before serving; vdcm resyncs again
  before a submission if that has not finished. Work that was in flight through vdcm fails
  back to the guest (-EHOSTDOWN); under supervision the guest driver resubmits it once the
  portal answers again (`portal_retry`, counted as `resubmitted`).
- host: the host and all its VMs are gone. The supervisor reports it, stops every other
  actor and cleans up (the run ends with `host_lost`).

Control socket: a ROUTER at `<run_dir>/ctl.sock` (ipc, in the 0700 run directory); a client
sends one msgpack map {"op": "ps" | "kill" | "audit" | "down" | "status", ...} and gets one
map back. The state file (`state_path()`) names the run directory, the control endpoint, the
supervisor's pid and every actor's pid; it is rewritten on every restart and removed by down.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
import zmq

from vsva.actors.base import Call, Gather
from vsva.actors.catalogue import FlowWatch, Ping, PoolStatus, Snapshot, VmStop
from vsva.ops import runfiles
from vsva.ops.config import VM, GuestDeath
from vsva.ops.control import Orchestrator
from vsva.ops.topology import HOST, guest_name, vmm_name
from vsva.ops.topology_file import Fault, RunFile

RESTARTED = ("kvm", "vdcm")
CONTROL_OPS: dict[str, dict[str, type]] = {
    "ps": {},
    "status": {},
    "kill": {"name": str},
    "audit": {},
    "down": {},
}  # op -> its fields and their types
WORKLOAD_TIMEOUT = 600.0


def state_dir() -> str:
    """Where the state file lives: $VSVA_STATE_DIR, else $XDG_RUNTIME_DIR/vsva, else
    /tmp/vsva-<uid> (created 0700)."""
    d = os.environ.get("VSVA_STATE_DIR")
    if not d:
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        d = os.path.join(xdg, "vsva") if xdg else f"/tmp/vsva-{os.getuid()}"
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


def state_path(directory: str | None = None) -> str:
    return os.path.join(directory or state_dir(), "current.json")


def ctl_endpoint(run_dir: str) -> str:
    return f"ipc://{os.path.join(run_dir, 'ctl.sock')}"


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
    see Supervisor._on_death."""

    def __init__(self, sup: Supervisor):
        super().__init__(sup.run.topology)
        self.sup = sup
        self.booted = False
        self.heartbeat_busy = False

    def on_start(self):
        yield from self.sup.boot_vms(self, [v.vm for v in self.sup.vms.values()])
        self.booted = True


class Supervisor:
    """Drives one live topology; see the module docstring."""

    def __init__(
        self, run: RunFile, *, launcher_kw: dict[str, Any] | None = None, log=None, workloads: bool = True
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
        self.pending: list[tuple[str, int, float]] = []  # deaths not yet handled
        self.actions: list[tuple] = []  # process-level work for the main loop
        self.restarts: dict[str, int] = {}
        self.unresponsive: set[str] = set()
        self.host_lost = False
        self.host_lost_info: dict[str, Any] | None = None  # when and why, for the state file
        self.stop_requested = False
        self.ctl: zmq.Socket | None = None
        self.ctl_replies: dict[bytes, Any] = {}
        self.actor: SupervisorActor | None = None
        self.t_start = 0.0
        self.t_workloads: float | None = None
        self.faults: list[dict[str, Any]] = []
        self.recoveries: list[dict[str, Any]] = []
        self.state_file: str | None = None
        self.ready_s = 0.0

    # ---- lifecycle ---------------------------------------------------------------------------
    def now(self) -> float:
        return time.time() - (self.launcher.t0 or time.time())

    def event(self, what: str, actor: str = "", **detail: Any) -> None:
        self.events.append(Event(round(self.now(), 4), what, actor, detail))

    def start(self, state_file: str | None = None) -> None:
        t = time.monotonic()
        self.launcher.on_death.append(self._on_death)
        self.launcher.start()
        self.ready_s = time.monotonic() - t
        self.t_start = self.now()
        self.ctl = self.launcher.ctx.socket(zmq.ROUTER)
        self.ctl.setsockopt(zmq.LINGER, 0)
        self.ctl.setsockopt(zmq.MAXMSGSIZE, 65536)
        self.ctl.bind(ctl_endpoint(self.launcher.run_dir))
        self.actor = SupervisorActor(self)
        self.state_file = state_file
        self.write_state()
        for i, f in enumerate(self.run.faults):
            self.faults.append(self._plan(i, f))

    def write_state(self, host_lost: dict[str, Any] | None = None) -> None:
        """The state file `vsva ps/kill/audit/down` read; with `host_lost`, the record of a
        topology that lost its host (nothing runs any more)."""
        if not self.state_file:
            return
        state = {
            "pid": os.getpid(),
            "owner": runfiles.owner_tag(),
            "run_dir": self.launcher.run_dir,
            "shm": self.launcher.shm_path,
            "ctl": ctl_endpoint(self.launcher.run_dir),
            "source": self.run.source,
            "started": self.launcher.t0,
            "actors": {} if host_lost else {r["name"]: r["pid"] for r in self.launcher.processes()},
            "host_lost": host_lost,
        }
        tmp = self.state_file + f".{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(state, f, indent=1)
        os.replace(tmp, self.state_file)

    def close(self) -> None:
        if self.ctl is not None:
            self.ctl.close(0)
            self.ctl = None
        self.launcher.close()
        if self.state_file:
            try:
                os.unlink(self.state_file)
            except FileNotFoundError:
                pass

    # ---- the main loop -----------------------------------------------------------------------
    def _wake(self, actor: SupervisorActor) -> bool:
        return bool(
            self.pending
            or self.actions
            or self.stop_requested
            or (self.ctl is not None and self.ctl.getsockopt(zmq.EVENTS) & zmq.POLLIN)
        )

    def step(self, slice_s: float = 0.02) -> None:
        """One turn: run the actor for up to `slice_s`, then deaths, actions, control, faults."""
        if self.launcher.closed:
            return
        self.launcher.run_actor(self.actor, timeout=slice_s, until=self._wake)
        while self.pending:
            self._handle_death(*self.pending.pop(0))
        while self.actions:
            self._do(self.actions.pop(0))
        self._serve_ctl()
        self._fire_faults()
        self._heartbeat()

    def serve(self) -> None:
        """`vsva up`: run until a `down` request (or SIGTERM/SIGINT, or the host is lost)."""

        def on_signal(signum, frame):
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

    def run_step(self, gen_fn, timeout: float):
        """Run a step (a generator function) on the actor to completion (bounded) from the
        main loop, handling deaths meanwhile; returns its result (None on timeout)."""
        box: dict[str, Any] = {}

        def wrapper():
            box["result"] = yield from gen_fn()

        self.spawn(wrapper)
        end = time.monotonic() + timeout
        while "result" not in box and time.monotonic() < end and not self.launcher.closed:
            self.launcher.run_actor(
                self.actor,
                timeout=min(0.05, end - time.monotonic()),
                until=lambda a: "result" in box or bool(self.pending),
            )
            while self.pending:
                self._handle_death(*self.pending.pop(0))
        return box.get("result")

    def spawn(self, gen_fn) -> None:
        """Start a step on the actor from the main loop; its deadlines count from now."""
        self.launcher.runtime.send(self.actor.run_task(gen_fn, self.launcher.runtime.now()))

    # ---- VMs and workloads -----------------------------------------------------------------
    def boot_vms(self, actor: SupervisorActor, vms: list[int]):
        for vm in vms:
            self.vms[vm].state = "booting"
        replies = yield from actor.boot(vms)
        for vm, r in replies.items():
            if r.get("ret") == 0 and self.vms[vm].state == "booting":
                self.vms[vm].state = "running"
                self.event("vm started", vmm_name(vm))
                if self.autoworkload:
                    actor.spawn(lambda vm=vm: self._workload(vm))
            elif self.vms[vm].state == "booting":
                self.vms[vm].state = "off"
                self.event("vm start failed", vmm_name(vm), ret=r.get("ret"), error=r.get("error", ""))
        if self.t_workloads is None:
            self.t_workloads = self.now()

    def _workload(self, vm: int):
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
            and not self.actions
            and not self.pending
            and self.actor is not None
            and self.actor.booted
        )

    def stop_vms(self):
        """vm_stop (F8) on every running VM whose vmm is alive; returns {vm: reply}."""
        live = [
            vm for vm, v in self.vms.items() if v.state == "running" and self.launcher.alive(vmm_name(vm))
        ]
        replies = yield from self.actor.stop_vms(live, timeout=None)
        for vm, r in replies.items():
            self.vms[vm].state = "off" if r.get("ret") == 0 else self.vms[vm].state
        return replies

    # ---- deaths and recovery -----------------------------------------------------------------
    def _on_death(self, name: str, code: int) -> None:
        """Launcher callback (inside its reap): only record; the main loop acts."""
        self.pending.append((name, code, self.now()))

    def _handle_death(self, name: str, code: int, t: float) -> None:
        if self.launcher.closed:
            return
        kind = self.launcher.procs[name].spec.kind
        self.event("died", name, exitcode=code, pid=self.launcher.procs[name].pid)
        rec: dict[str, Any] = {"actor": name, "kind": kind, "exitcode": code, "t_death_seen": t}
        self.recoveries.append(rec)
        if kind == "host":
            self.host_lost = True
            self.host_lost_info = {
                "at": time.time(),
                "after_s": round(t, 3),
                "why": f"host (pid {rec.get('pid', self.launcher.pid(name))}) " + exit_words(code),
            }
            rec["action"] = "host lost: every VM is gone; stopping the run"
            for v in self.vms.values():
                v.state = "gone"
            self.stop_requested = True
        elif kind == "vmm":
            vm = self.run.topology.spec(name).config["vm"]
            self.vms[vm].state = "gone"
            rec["action"] = f"VM {vm} gone: host tears it down (F8); guest killed"
            if self.launcher.alive(guest_name(vm)):
                self.launcher.kill(guest_name(vm))
            self.spawn(lambda: self._watch_teardown(rec, vm))
        elif kind == "guest":
            vm = self.run.topology.spec(name).config["vm"]
            st = self.vms[vm]
            if st.state in ("running", "booting"):
                st.state = "crashed"
                policy = self.run.on_guest_death.get(vm, VM.on_guest_death)
                rec["action"] = f"VM {vm} crashed: vm_stop (F8)" + (
                    ", guest restarted" if policy == GuestDeath.RESTART else ""
                )
                self.spawn(lambda: self._guest_crashed(rec, vm, policy))
            else:
                rec["action"] = f"VM {vm} already {st.state}"
                rec["t_recovered"] = t
        elif kind in RESTARTED:
            rec["action"] = "restart + resync from the host"
            self.actions.append(("restart", name, rec))
        else:
            rec["action"] = "none"
            rec["t_recovered"] = t

    def _do(self, action: tuple) -> None:
        if action[0] == "restart":
            _, name, rec = action
            if self.host_lost or self.launcher.closed:
                return
            pid = self.launcher.restart(name)
            self.restarts[name] = self.restarts.get(name, 0) + 1
            rec["t_restarted"] = self.now()
            rec["new_pid"] = pid
            self.event("restarted", name, pid=pid)
            self.write_state()
            self.spawn(lambda: self._await_resync(rec, name))
        elif action[0] == "restart_guest":
            _, vm, rec = action
            name = guest_name(vm)
            pid = self.launcher.restart(name)
            self.restarts[name] = self.restarts.get(name, 0) + 1
            rec["t_restarted"] = self.now()
            rec["new_pid"] = pid
            self.write_state()
            self.vms[vm].workload = None
            self.spawn(lambda: self.boot_vms(self.actor, [vm]))

    def _await_resync(self, rec: dict, name: str):
        end = self.actor.now + 10.0
        while self.actor.now < end:
            r = yield Call(name, Snapshot(), timeout=2.0)
            if r.get("state", {}).get("synced"):
                rec["t_recovered"] = self.now()
                rec["resynced_bindings"] = r["state"].get("notifier", {}).get("resynced", 0)
                self.event("resynced", name, bindings=rec["resynced_bindings"])
                return
            if r.get("ret"):
                rec["error"] = f"snapshot failed: {r.get('ret')}"
                return

    def _watch_teardown(self, rec: dict, vm: int):
        end = self.actor.now + 15.0
        while self.actor.now < end and not self.host_lost:
            r = yield Call(HOST, PoolStatus(), timeout=2.0)
            if r.get("ret"):
                return
            done = [t for t in r.get("teardowns", []) if t["vm"] == vm and "finished" in t]
            if done:
                rec["t_recovered"] = self.now()
                rec["teardown"] = done[-1]
                return

    def _guest_crashed(self, rec: dict, vm: int, policy: GuestDeath):
        r = yield Call(vmm_name(vm), VmStop(), flow=f"F8:vm{vm}.1", timeout=10.0)
        rec["vm_stop"] = r.get("ret")
        rec["t_recovered"] = self.now()
        if policy == GuestDeath.RESTART and r.get("ret") in (0, -19):  # -ENODEV: it was not started
            self.vms[vm].state = "booting"
            self.actions.append(("restart_guest", vm, rec))
        else:
            self.vms[vm].state = "off" if r.get("ret") == 0 else "gone"

    # ---- heartbeat ---------------------------------------------------------------------------
    _next_beat = 0.0

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if self.actor.heartbeat_busy or now < self._next_beat or self.host_lost:
            return
        self._next_beat = now + self.run.dead_peer_interval
        names = [n for n in self.run.topology.names() if self.launcher.alive(n)]
        interval = self.run.dead_peer_interval

        def beat():
            self.actor.heartbeat_busy = True
            try:
                replies = yield Gather([Call(n, Ping(), timeout=interval) for n in names])
                for n, r in zip(names, replies):
                    (self.unresponsive.add if r.get("ret") else self.unresponsive.discard)(n)
            finally:
                self.actor.heartbeat_busy = False

        self.spawn(beat)

    # ---- audit -------------------------------------------------------------------------------
    def audit_task(self):
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

    # ---- control socket ----------------------------------------------------------------------
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
                    "restarts": self.restarts.get(r["name"], 0),
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

    def _serve_ctl(self) -> None:
        while self.ctl is not None:
            try:
                rid, payload = self.ctl.recv_multipart(zmq.NOBLOCK)[:2]
            except zmq.Again:
                return
            except ValueError:
                continue
            req, why = control_request(payload)
            if why is not None:
                self._reply(rid, {"ok": False, "error": why})
                continue
            op = req["op"]
            if op in ("ps", "status"):
                self._reply(rid, {"ok": True, **self.status()})
            elif op == "kill":
                name = req.get("name")
                if name not in self.launcher.procs:
                    self._reply(
                        rid,
                        {
                            "ok": False,
                            "error": f"no actor {name!r}; actors: " + ", ".join(self.launcher.procs),
                        },
                    )
                elif not self.launcher.alive(name):
                    self._reply(rid, {"ok": False, "error": f"{name} is not running"})
                else:
                    pid = self.launcher.pid(name)
                    self.launcher.kill(name)
                    self.event("killed by request", name, pid=pid)
                    self._reply(rid, {"ok": True, "name": name, "pid": pid})
            elif op == "audit":

                def run_audit(rid=rid):
                    res = yield from self.audit_task()
                    self._reply(
                        rid,
                        {
                            "ok": True,
                            "audit": {k: res.get(k, []) for k in ("ok", "violations", "incomplete", "cut")},
                        },
                    )

                self.spawn(run_audit)
            else:  # down
                self.stop_requested = True
                self._reply(rid, {"ok": True, "pid": os.getpid()})

    def _reply(self, rid: bytes, body: dict[str, Any]) -> None:
        if self.ctl is None:
            return
        try:
            self.ctl.send_multipart([rid, msgpack.packb(body, default=repr)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    # ---- fault injection (scenarios) ---------------------------------------------------------
    def _plan(self, i: int, f: Fault) -> dict[str, Any]:
        plan = {"index": i, "fault": f.__dict__.copy(), "target": f.kill, "done": False}
        if f.random:
            rng = random.Random(f"{f.seed}:fault:{i}")
            plan["target"] = f.kill or rng.choice(self.run.topology.names())
            plan["at_time"] = rng.uniform(0, f.window)
        elif f.at_time is not None:
            plan["at_time"] = f.at_time
        return plan

    def _watch_flow(self, plan: dict[str, Any], f: Fault):
        """Ask VM f.vm's guest to tell us when instance f.nth of f.at_flow starts (one
        request, answered on that event: no polling); kill the target on the answer. The
        guest is then waiting for that instance's first reply: the kill lands inside the step."""
        r = yield Call(guest_name(f.vm), FlowWatch(flow=f.at_flow, nth=f.nth), timeout=WORKLOAD_TIMEOUT)
        if plan["done"]:
            return
        if r.get("ret"):
            plan["done"] = True
            plan["result"] = f"skipped: {guest_name(f.vm)} did not report {f.at_flow} ({r.get('ret')})"
            return
        self._kill_now(plan, f, f"flow step {r['tag']} started (guest event)")

    def _kill_now(self, plan: dict[str, Any], f: Fault, trigger: str) -> None:
        plan["done"] = True
        target = plan["target"]
        plan["trigger"] = trigger
        plan["t"] = round(self.now(), 4)
        if not self.launcher.alive(target):
            plan["result"] = "skipped: not running"
            return
        plan["pid"] = self.launcher.pid(target)
        self.launcher.kill(target, signal.SIGKILL if f.signal == "KILL" else signal.SIGTERM)
        plan["result"] = f"SIG{f.signal} sent"
        self.event("fault injected", target, trigger=trigger)

    def _fire_faults(self) -> None:
        if not self.faults or self.launcher.closed:
            return
        for plan in self.faults:
            if plan["done"]:
                continue
            f = self.run.faults[plan["index"]]
            trigger = None
            if "at_time" in plan and self.t_workloads is None:
                continue
            if "at_time" in plan:
                if self.now() - self.t_workloads >= plan["at_time"]:
                    trigger = f"t = {plan['at_time']:.3f} s after the workloads started"
            elif not plan.get("watching"):
                plan["watching"] = True
                self.spawn(lambda plan=plan, f=f: self._watch_flow(plan, f))
            if trigger is None:
                continue
            self._kill_now(plan, f, trigger)


def control_request(payload: bytes) -> tuple[dict[str, Any], str | None]:
    """Decode one control request and check it like a message body: a map whose "op" is a
    CONTROL_OPS key and whose other fields are exactly that op's, of their types. Returns
    (request, None) or ({}, why it is refused)."""
    try:
        req = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception:
        return {}, "malformed request: not msgpack"
    if not isinstance(req, dict) or not isinstance(req.get("op"), str):
        return {}, "malformed request: not a map with a string 'op'"
    fields = CONTROL_OPS.get(req["op"])
    if fields is None:
        return {}, f"unknown op {req['op'][:32]!r}; valid: {', '.join(CONTROL_OPS)}"
    for key in req:
        if key != "op" and key not in fields:
            return {}, f"{req['op']}: unknown field {str(key)[:32]!r}"
    for key, typ in fields.items():
        if not isinstance(req.get(key), typ):
            return {}, f"{req['op']}: field {key!r} missing or not {typ.__name__}"
    return req, None


EXIT_HOST_LOST = 4  # vsva.cli.app.EXIT_CODES


def exit_words(code: int) -> str:
    """'killed by SIGKILL' / 'exited with 3'."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with {code}"


def detach_main(argv: list[str] | None = None) -> int:
    """The detached supervisor process of `vsva up`: `python -m vsva.ops.supervisor`.

    It holds the state directory's lock (the descriptor `vsva up` passed down) until it exits.
    A SIGTERM while it is still starting unwinds the launch and removes its files. When the
    host is lost it stops, leaves a state file that records when and why (`vsva ps` shows it
    until `vsva down`) and exits with EXIT_HOST_LOST."""
    import argparse

    from vsva.ops.topology_file import TopologyError, default_run, load

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    p = argparse.ArgumentParser(prog="vsva.ops.supervisor")
    p.add_argument("topology", nargs="?")
    p.add_argument("--state-file", required=True)
    p.add_argument("--trace-out")
    args = p.parse_args(argv)
    try:
        run = load(args.topology) if args.topology else default_run()
    except TopologyError as exc:
        print(f"vsva up: {exc}", file=sys.stderr, flush=True)
        return 2
    sup = Supervisor(
        run,
        log=lambda line: print(line, file=sys.stderr, flush=True),
        launcher_kw={"trace_out": args.trace_out},
    )
    try:
        sup.start(state_file=args.state_file)
    except KeyboardInterrupt:
        sup.close()
        return 130
    except Exception as exc:
        print(f"vsva up: launch failed: {exc}", file=sys.stderr, flush=True)
        sup.close()
        return 1
    print(
        f"vsva: supervisor {os.getpid()} running {len(run.topology.actors)} actors in {sup.launcher.run_dir}",
        file=sys.stderr,
        flush=True,
    )
    try:
        sup.serve()
    finally:
        sup.close()
    if sup.host_lost_info is not None:
        sup.write_state(host_lost=sup.host_lost_info)
        print(f"vsva up: the host was lost: {sup.host_lost_info['why']}", file=sys.stderr, flush=True)
        return EXIT_HOST_LOST
    return 0


if __name__ == "__main__":
    sys.exit(detach_main())
