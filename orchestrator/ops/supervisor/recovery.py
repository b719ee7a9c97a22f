"""Recovery from deaths: what the supervisor does when an actor dies.

Deaths come from the launcher (its pidfds: a kill through `vsva kill` and a plain
`kill -9 PID` from outside are the same event). The contracts:
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
- a restart that fails (the new incarnation dies or never reports ready): the actor stays
  down, its record says why in one line (`error`), and the run goes on without it; a later
  death of that incarnation is not recovered again.
- host: the host and all its VMs are gone. The supervisor reports it, stops every other
  actor and cleans up (the run ends with `host_lost`).
"""

from __future__ import annotations

import signal
import time
from typing import TYPE_CHECKING, Any

from vsva.actors.base import Call
from vsva.actors.catalogue import PoolStatus, Snapshot, VmStop
from vsva.ops.config import VM, GuestDeath
from vsva.ops.topology import HOST, guest_name, vmm_name

if TYPE_CHECKING:
    from vsva.actors.base import Steps
    from vsva.ops.supervisor.loop import Supervisor

RESTARTED = ("kvm", "vdcm")


def exit_words(code: int) -> str:
    """'killed by SIGKILL' / 'exited with 3'."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with {code}"


class Recovery:
    """The deaths seen and what was done about each (`records`, one per death, reported by
    `vsva run`), and the process-level work the main loop still owes."""

    def __init__(self, sup: Supervisor):
        self.sup = sup
        self.pending: list[tuple[str, int, float]] = []  # deaths not yet handled
        self.actions: list[tuple[Any, ...]] = []  # process-level work for the main loop
        self.restarts: dict[str, int] = {}
        self.records: list[dict[str, Any]] = []
        self.given_up: set[str] = set()  # actors whose restart failed: left down

    def busy(self) -> bool:
        """Deaths not yet handled, or restarts not yet done."""
        return bool(self.pending or self.actions)

    def on_death(self, name: str, code: int) -> None:
        """Launcher callback (inside its reap): only record; the main loop acts."""
        self.pending.append((name, code, self.sup.now()))

    def handle_pending(self) -> None:
        while self.pending:
            self._handle_death(*self.pending.pop(0))

    def do_actions(self) -> None:
        while self.actions:
            self._do(self.actions.pop(0))

    def _handle_death(self, name: str, code: int, t: float) -> None:
        sup = self.sup
        if sup.launcher.closed or name in self.given_up:
            return
        kind = sup.launcher.procs[name].spec.kind
        sup.event("died", name, exitcode=code, pid=sup.launcher.procs[name].pid)
        rec: dict[str, Any] = {"actor": name, "kind": kind, "exitcode": code, "t_death_seen": t}
        self.records.append(rec)
        if kind == "host":
            sup.host_lost = True
            sup.host_lost_info = {
                "at": time.time(),
                "after_s": round(t, 3),
                "why": f"host (pid {rec.get('pid', sup.launcher.pid(name))}) " + exit_words(code),
            }
            rec["action"] = "host lost: every VM is gone; stopping the run"
            for v in sup.vms.values():
                v.state = "gone"
            sup.stop_requested = True
        elif kind == "vmm":
            vm = sup.run.topology.spec(name).config["vm"]
            sup.vms[vm].state = "gone"
            rec["action"] = f"VM {vm} gone: host tears it down (F8); guest killed"
            if sup.launcher.alive(guest_name(vm)):
                sup.launcher.kill(guest_name(vm))
            sup.spawn(lambda: self._watch_teardown(rec, vm))
        elif kind == "guest":
            vm = sup.run.topology.spec(name).config["vm"]
            st = sup.vms[vm]
            if st.state in ("running", "booting"):
                st.state = "crashed"
                policy = sup.run.on_guest_death.get(vm, VM.on_guest_death)
                rec["action"] = f"VM {vm} crashed: vm_stop (F8)" + (
                    ", guest restarted" if policy == GuestDeath.RESTART else ""
                )
                sup.spawn(lambda: self._guest_crashed(rec, vm, policy))
            else:
                rec["action"] = f"VM {vm} already {st.state}"
                rec["t_recovered"] = t
        elif kind in RESTARTED:
            rec["action"] = "restart + resync from the host"
            self.actions.append(("restart", name, rec))
        else:
            rec["action"] = "none"
            rec["t_recovered"] = t

    def _do(self, action: tuple[Any, ...]) -> None:
        sup = self.sup
        if action[0] == "restart":
            _, name, rec = action
            if sup.host_lost or sup.launcher.closed or not self._restart(name, rec):
                return
            sup.event("restarted", name, pid=rec["new_pid"])
            sup.spawn(lambda: self._await_resync(rec, name))
        elif action[0] == "restart_guest":
            _, vm, rec = action
            if not self._restart(guest_name(vm), rec):
                sup.vms[vm].state = "off"  # vm_stop has run: the VM is down, its guest too
                return
            sup.vms[vm].workload = None
            sup.spawn(lambda: sup.boot_vms(sup.actor, [vm]))

    def _restart(self, name: str, rec: dict[str, Any]) -> bool:
        """Start `name` again and note it in `rec`; False when that fails, the failure in
        `rec["error"]` (one line) and the actor given up."""
        from vsva.ops.launcher import LaunchError

        sup = self.sup
        try:
            pid = sup.launcher.restart(name)
        except LaunchError as exc:
            rec["error"] = f"restart failed: {str(exc).splitlines()[0]}"
            self.given_up.add(name)
            # the incarnation that failed is no new death to recover from: forget its death
            # if it was seen, end it if it lingers (alive, never ready)
            self.pending = [d for d in self.pending if d[0] != name]
            if sup.launcher.alive(name):
                sup.launcher.kill(name)
            sup.event("restart failed", name, error=rec["error"])
            sup.write_state()
            return False
        self.restarts[name] = self.restarts.get(name, 0) + 1
        rec["t_restarted"] = sup.now()
        rec["new_pid"] = pid
        sup.write_state()
        return True

    def _await_resync(self, rec: dict[str, Any], name: str) -> Steps[None]:
        actor = self.sup.actor
        end = actor.now + 10.0
        while actor.now < end:
            r = yield Call(name, Snapshot(), timeout=2.0)
            if r.get("state", {}).get("synced"):
                rec["t_recovered"] = self.sup.now()
                rec["resynced_bindings"] = r["state"].get("notifier", {}).get("resynced", 0)
                self.sup.event("resynced", name, bindings=rec["resynced_bindings"])
                return
            if r.get("ret"):
                rec["error"] = f"snapshot failed: {r.get('ret')}"
                return

    def _watch_teardown(self, rec: dict[str, Any], vm: int) -> Steps[None]:
        sup = self.sup
        end = sup.actor.now + 15.0
        while sup.actor.now < end and not sup.host_lost:
            r = yield Call(HOST, PoolStatus(), timeout=2.0)
            if r.get("ret"):
                return
            done = [t for t in r.get("teardowns", []) if t["vm"] == vm and "finished" in t]
            if done:
                rec["t_recovered"] = sup.now()
                rec["teardown"] = done[-1]
                return

    def _guest_crashed(self, rec: dict[str, Any], vm: int, policy: GuestDeath) -> Steps[None]:
        sup = self.sup
        r = yield Call(vmm_name(vm), VmStop(), flow=f"F8:vm{vm}.1", timeout=10.0)
        rec["vm_stop"] = r.get("ret")
        rec["t_recovered"] = sup.now()
        if policy == GuestDeath.RESTART and r.get("ret") in (0, -19):  # -ENODEV: it was not started
            sup.vms[vm].state = "booting"
            self.actions.append(("restart_guest", vm, rec))
        else:
            sup.vms[vm].state = "off" if r.get("ret") == 0 else "gone"
