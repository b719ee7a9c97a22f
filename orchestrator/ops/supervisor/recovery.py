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
- every recovery ends in `t_recovered` or an `error` (one line: what was awaited, from whom,
  how long): a resync the restarted actor gave up (its snapshot's `resync_error`) or did not
  finish within its bound (`resync_budget` + RESYNC_SLACK_S), a snapshot, pool_status or
  vm_stop that failed, a teardown the host did not finish within TEARDOWN_S, a restarted
  guest whose VM did not power on again. `vsva run` fails a run with any such error.
  The snapshots and pool_status polls wait as long as the kind's timeout in the topology
  (vsva.ops.pacing: it grows with the VMs); a flat 2 s failed a recovery whose kvm or host,
  busy with every VM, answered later.
- host: the host and all its VMs are gone. The supervisor reports it, stops every other
  actor and cleans up (the run ends with `host_lost`).
"""

from __future__ import annotations

import signal
import time
from typing import TYPE_CHECKING, Any

from vsva.actors import errno as E
from vsva.actors.base import Call, Wait
from vsva.actors.catalogue import PoolStatus, Snapshot, VmStop
from vsva.actors.subscriber import resync_budget
from vsva.ops.config import VM, GuestDeath
from vsva.ops.topology import HOST, guest_name, vmm_name

if TYPE_CHECKING:
    from vsva.actors.base import Steps
    from vsva.ops.supervisor.loop import Supervisor

RESTARTED = ("kvm", "vdcm")
RESYNC_SLACK_S = 2.0  # beyond the actor's own resync bound: its start and our last snapshot
RESYNC_POLL_S = 0.01  # between snapshots of a restarted actor that is not synced yet
TEARDOWN_S = 15.0
VM_STOP_S = 10.0


def failure(reply: dict[str, Any]) -> str:
    """A failed reply in words: '-ETIMEDOUT (snapshot to kvm: no reply after 5.1 s)'."""
    return E.name(reply.get("ret", 0)) + (f" ({reply['error']})" if reply.get("error") else "")


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

    def close_unfinished(self, why: str) -> None:
        """Give every recovery that has neither finished nor failed an error saying so (the
        report is written now): none is left silent."""
        for rec in self.records:
            if rec["kind"] != "host" and "t_recovered" not in rec and "error" not in rec:
                rec["error"] = f"{rec.get('action', 'recovery')}: unfinished {why}"

    def failed(self) -> list[dict[str, Any]]:
        """The recoveries that ended in an error."""
        return [rec for rec in self.records if "error" in rec]

    def last_error(self, name: str) -> str | None:
        """The error of `name`'s latest recovery, if that one failed (what `vsva ps` shows)."""
        mine = [rec for rec in self.records if rec["actor"] == name]
        return mine[-1].get("error") if mine else None

    def _fail(self, rec: dict[str, Any], error: str) -> None:
        """End the recovery `rec` in `error` (one line), and say so among the events, as a
        restart that failed does: a live topology's `vsva ps` shows it, not only a report."""
        rec["error"] = error
        self.sup.event("recovery failed", rec["actor"], error=error)

    def _do(self, action: tuple[Any, ...]) -> None:
        sup = self.sup
        if action[0] == "restart":
            _, name, rec = action
            if sup.host_lost or sup.launcher.closed:
                self._fail(
                    rec, "not restarted: " + ("the host is lost" if sup.host_lost else "the run ended")
                )
                return
            if not self._restart(name, rec):
                return
            sup.event("restarted", name, pid=rec["new_pid"])
            sup.spawn(lambda: self._await_resync(rec, name))
        elif action[0] == "restart_guest":
            _, vm, rec = action
            if not self._restart(guest_name(vm), rec):
                sup.vms[vm].state = "off"  # vm_stop has run: the VM is down, its guest too
                return
            sup.vms[vm].workload = None
            sup.spawn(lambda: self._reboot(rec, vm))

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
        """Poll the restarted `name` until it reports synced; its own resync is bounded
        (`resync_budget` of its config), so we wait that and RESYNC_SLACK_S more. Ends in
        `t_recovered` or an `error` that says what was awaited, from whom and how long."""
        sup, actor = self.sup, self.sup.actor
        bound = resync_budget(sup.run.topology.spec(name).config) + RESYNC_SLACK_S
        start = actor.now
        polls = 0
        while True:
            r = yield Call(name, Snapshot())  # the topology's snapshot timeout (pacing)
            polls += 1
            state = r.get("state", {})
            if r.get("ret"):
                self._fail(rec, f"resync not confirmed: snapshot of {name} failed: {failure(r)}")
                return
            if state.get("synced"):
                rec["t_recovered"] = sup.now()
                rec["resynced_bindings"] = state.get("notifier", {}).get("resynced", 0)
                sup.event("resynced", name, bindings=rec["resynced_bindings"])
                return
            if state.get("resync_timeouts"):
                rec["timeouts"] = state["resync_timeouts"]  # the actor's, for the reports
            if state.get("resync_error"):
                self._fail(rec, f"resync of {name} given up: {state['resync_error']}")
                return
            waited = actor.now - start
            if waited >= bound or sup.host_lost:
                self._fail(
                    rec,
                    f"resync of {name} from the host: not synced after {waited:.1f} s "
                    f"(bound {bound:.1f} s, {polls} snapshots)"
                    + ("; the host is lost" if sup.host_lost else ""),
                )
                return
            yield Wait(("resync poll", name, polls), RESYNC_POLL_S)

    def _watch_teardown(self, rec: dict[str, Any], vm: int) -> Steps[None]:
        """Poll the host until VM `vm`'s teardown (F8) has finished, TEARDOWN_S at most."""
        sup = self.sup
        start = sup.actor.now
        while True:
            r = yield Call(HOST, PoolStatus())
            if r.get("ret"):
                self._fail(
                    rec, f"teardown of VM {vm} not confirmed: pool_status to {HOST} failed: {failure(r)}"
                )
                return
            done = [t for t in r.get("teardowns", []) if t["vm"] == vm and "finished" in t]
            if done:
                rec["t_recovered"] = sup.now()
                rec["teardown"] = done[-1]
                return
            waited = sup.actor.now - start
            if waited >= TEARDOWN_S or sup.host_lost:
                self._fail(
                    rec,
                    f"teardown of VM {vm}: {HOST} did not report it finished after {waited:.1f} s"
                    + (" (the host is lost)" if sup.host_lost else f" (bound {TEARDOWN_S:g} s)"),
                )
                return
            yield Wait(("teardown poll", vm), RESYNC_POLL_S)

    def _guest_crashed(self, rec: dict[str, Any], vm: int, policy: GuestDeath) -> Steps[None]:
        """vm_stop the crashed guest's VM (F8); with the restart policy, start its guest again
        (`_reboot` then powers the VM on: that is its recovery)."""
        sup = self.sup
        r = yield Call(vmm_name(vm), VmStop(), flow=f"F8:vm{vm}.1", timeout=VM_STOP_S)
        ret = r.get("ret")
        rec["vm_stop"] = ret
        if ret == -E.EHOSTDOWN and not sup.launcher.alive(vmm_name(vm)):
            # the vmm died too: its own record watches the host tear the VM down (F8)
            rec["t_recovered"] = sup.now()
            rec["action"] += f"; {vmm_name(vm)} gone too: its recovery tears the VM down"
            sup.vms[vm].state = "gone"
            return
        if ret not in (0, -E.ENODEV):  # -ENODEV: the VM was not started
            self._fail(rec, f"vm_stop to {vmm_name(vm)} failed: {failure(r)}")
            sup.vms[vm].state = "gone"
            return
        if policy == GuestDeath.RESTART:
            rec["t_vm_stopped"] = sup.now()
            sup.vms[vm].state = "booting"
            self.actions.append(("restart_guest", vm, rec))
        else:
            rec["t_recovered"] = sup.now()
            sup.vms[vm].state = "off" if ret == 0 else "gone"

    def _reboot(self, rec: dict[str, Any], vm: int) -> Steps[None]:
        """Power VM `vm` on again after its guest's restart: recovered once it runs."""
        sup = self.sup
        replies = yield from sup.boot_vms(sup.actor, [vm])
        if sup.vms[vm].state == "running":
            rec["t_recovered"] = sup.now()
            return
        r = replies.get(vm, {})
        answer = f"vm_start {failure(r)}" if r.get("ret") else "vm_start answered"
        self._fail(
            rec, f"VM {vm} not powered on again after its guest's restart: {answer}; VM {sup.vms[vm].state}"
        )
