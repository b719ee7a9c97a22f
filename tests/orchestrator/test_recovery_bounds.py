"""Every recovery the supervisor starts ends in `t_recovered` or an `error` that says what it
awaited, from whom and how long (vsva.ops.supervisor.recovery): never in silence.

Recovery's steps run here on the deterministic runtime, as the orchestrator's actor ("orch")
of a world whose kvm is restarted the way the supervisor restarts it (`resync_on_start`);
`SimSupervisor` is what those steps use of a Supervisor."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from vsva.actors.base import Actor, Wait
from vsva.actors.catalogue import ORCHESTRATOR
from vsva.actors.kvm import Kvm
from vsva.actors.subscriber import RESYNC_ATTEMPTS, resync_budget
from vsva.ops.config import GuestDeath
from vsva.ops.pacing import orch_config
from vsva.ops.scenario import verdict
from vsva.ops.supervisor.loop import VmState
from vsva.ops.supervisor.recovery import RESYNC_SLACK_S, TEARDOWN_S, Recovery


class SimSupervisor:
    """The parts of a Supervisor that Recovery's steps use, over a SimRuntime world."""

    def __init__(self, w: SimpleNamespace):
        self.rt = w.rt
        self.run = SimpleNamespace(topology=w.t)
        self.actor = w.rt.add(Actor(ORCHESTRATOR, w.rt.env(orch_config(w.t))))  # SupervisorActor's
        self.launcher = SimpleNamespace(alive=lambda name: name in w.rt.actors)
        self.vms = {vm: VmState(vm, "running") for vm in w.t.vms}
        self.host_lost = False
        self.events: list[tuple[str, str]] = []
        self.recovery = Recovery(self)  # type: ignore[arg-type]

    def now(self) -> float:
        return self.rt.now

    def event(self, what: str, actor: str = "", **detail: Any) -> None:
        self.events.append((what, actor))

    def spawn(self, gen_fn: Any) -> None:
        self.rt.run_task(ORCHESTRATOR, gen_fn)

    def await_resync(self, name: str) -> dict[str, Any]:
        """Run Recovery's resync wait for `name` to its end; returns the death's record."""
        rec: dict[str, Any] = {"actor": name, "kind": "kvm", "t_death_seen": self.rt.now}
        self.spawn(lambda: self.recovery._await_resync(rec, name))
        self.rt.run(until=lambda: "t_recovered" in rec or "error" in rec)
        self.rt.run()
        return rec


class MuteKvm(Kvm):
    """A restarted kvm that never resyncs and never says why (a broken incarnation)."""

    def on_start(self) -> None:
        return None


class BusyKvm(Kvm):
    """A kvm whose snapshot waits BUSY_S behind the requests of the VMs it serves."""

    def on_snapshot(self, msg, req):
        yield Wait(("busy", msg.id), BUSY_S)
        return super().on_snapshot(msg, req)


BUSY_S = 3.0  # past the supervisor's old flat 2 s, within the topology's snapshot timeout


def test_a_restarted_kvm_that_resyncs_is_recovered(vsva):
    w = vsva.bound_world()
    sup = SimSupervisor(w)
    vsva.restarted(w, "kvm")
    rec = sup.await_resync("kvm")
    assert "error" not in rec and rec["resynced_bindings"] == 2, rec
    assert ("resynced", "kvm") in sup.events


def test_a_resync_the_restarted_kvm_gave_up_is_the_records_error_with_its_timeouts(vsva):
    w = vsva.bound_world()
    sup = SimSupervisor(w)
    w.rt.hold("kvm", "host")  # no pasid_bindings of the new kvm reaches the host
    vsva.restarted(w, "kvm")
    rec = sup.await_resync("kvm")
    assert "t_recovered" not in rec
    assert rec["error"].startswith(
        f"resync of kvm given up: pasid_bindings to host failed {RESYNC_ATTEMPTS} time(s), last -ETIMEDOUT"
    ), rec["error"]
    assert "\n" not in rec["error"]
    assert ("recovery failed", "kvm") in sup.events  # a live `vsva ps` shows it (its last_error)
    sup.recovery.records.append(rec)
    assert sup.recovery.last_error("kvm") == rec["error"]
    # the actor's own timeouts travel with the record, for the reports' timeouts section
    assert [(t["actor"], t["kind"], t["peer"]) for t in rec["timeouts"]] == [
        ("kvm", "pasid_bindings", "host")
    ] * RESYNC_ATTEMPTS


def test_a_restarted_kvm_that_never_reports_synced_is_an_error_after_its_bound(vsva):
    w = vsva.bound_world()
    sup = SimSupervisor(w)
    w.rt.kill("kvm")
    w.rt.add(MuteKvm("kvm", w.rt.env(dict(w.kvm.config, resync_on_start=True))))
    t0 = w.rt.now
    rec = sup.await_resync("kvm")  # before the fix: silence after 10 s, no error
    bound = resync_budget(w.t.spec("kvm").config) + RESYNC_SLACK_S
    assert "t_recovered" not in rec
    assert rec["error"].startswith("resync of kvm from the host: not synced after "), rec["error"]
    assert f"(bound {bound:.1f} s," in rec["error"]
    assert bound <= w.rt.now - t0 <= bound + 1.0


def test_a_snapshot_the_restarted_kvm_does_not_answer_is_an_error(vsva):
    w = vsva.bound_world()
    sup = SimSupervisor(w)
    vsva.restarted(w, "kvm")
    w.rt.hold(ORCHESTRATOR, "kvm")
    rec = sup.await_resync("kvm")
    assert rec["error"].startswith("resync not confirmed: snapshot of kvm failed: -ETIMEDOUT"), rec["error"]
    assert f"no reply after {w.t.timeouts['snapshot']} s" in rec["error"]  # pacing's, not a flat 2 s


def test_a_restarted_kvm_whose_snapshot_is_slower_than_2_s_is_recovered(vsva):
    """The snapshot waits as long as the topology's snapshot timeout; before, a flat 2 s
    made a busy kvm's resync an error ('snapshot of kvm failed: -ETIMEDOUT')."""
    w = vsva.bound_world()
    sup = SimSupervisor(w)
    w.rt.add(BusyKvm("kvm", w.rt.env(w.kvm.config)))  # kvm's class swapped: the restart keeps it
    vsva.restarted(w, "kvm")
    rec = sup.await_resync("kvm")
    assert "error" not in rec and rec["resynced_bindings"] == 2, rec
    assert BUSY_S < w.t.timeouts["snapshot"]


def test_a_teardown_the_host_never_finishes_is_an_error_after_its_bound(vsva):
    w = vsva.world(2)
    sup = SimSupervisor(w)
    rec: dict[str, Any] = {"actor": "vm1.vmm", "kind": "vmm"}
    t0 = w.rt.now
    sup.spawn(lambda: sup.recovery._watch_teardown(rec, 1))  # VM 1's vmm is alive: no teardown
    w.rt.run(until=lambda: "t_recovered" in rec or "error" in rec)
    assert rec.get("error") == (
        f"teardown of VM 1: host did not report it finished after {w.rt.now - t0:.1f} s (bound {TEARDOWN_S:g} s)"
    ), rec  # before the fix: silence after 15 s
    assert TEARDOWN_S <= w.rt.now - t0 <= TEARDOWN_S + 1.0


def test_a_teardown_is_recovered_when_the_host_reports_it_finished(vsva):
    w = vsva.world(2)
    sup = SimSupervisor(w)
    rec: dict[str, Any] = {"actor": "vm1.vmm", "kind": "vmm"}
    w.rt.kill("vm1.vmm")  # the host sees the VFIO fd close with the process: F8
    sup.spawn(lambda: sup.recovery._watch_teardown(rec, 1))
    w.rt.run(until=lambda: "t_recovered" in rec or "error" in rec)
    assert "error" not in rec and rec["teardown"]["vm"] == 1, rec


def test_a_vm_stop_that_fails_is_an_error_not_a_recovery(vsva):
    w = vsva.world(2)
    sup = SimSupervisor(w)
    rec: dict[str, Any] = {"actor": "vm1.guest", "kind": "guest", "action": "VM 1 crashed: vm_stop (F8)"}
    w.rt.hold(ORCHESTRATOR, "vm1.vmm")  # the vmm is alive but never gets the request
    sup.spawn(lambda: sup.recovery._guest_crashed(rec, 1, GuestDeath.STOP))
    w.rt.run(until=lambda: "t_recovered" in rec or "error" in rec)
    assert "t_recovered" not in rec  # before the fix: recovered, with vm_stop = -ETIMEDOUT
    assert rec["error"].startswith("vm_stop to vm1.vmm failed: -ETIMEDOUT"), rec["error"]
    assert sup.vms[1].state == "gone"


def test_a_recovery_left_unfinished_gets_an_error_when_the_report_is_written(vsva):
    w = vsva.world(1)
    sup = SimSupervisor(w)
    done = {"actor": "vm1.guest", "kind": "guest", "t_recovered": 1.0}
    open_ = {"actor": "kvm", "kind": "kvm", "action": "restart + resync from the host"}
    host = {"actor": "host", "kind": "host", "action": "host lost"}
    sup.recovery.records += [done, open_, host]
    sup.recovery.close_unfinished("when the run ended")
    assert open_["error"] == "restart + resync from the host: unfinished when the run ended"
    assert "error" not in done and "error" not in host
    assert sup.recovery.failed() == [open_]


def test_a_run_with_a_recovery_in_error_does_not_pass(vsva):
    sup = SimSupervisor(vsva.world(1))
    passing = {"host_lost": False, "audit": {"ok": True}, "survivors_ok": True, "timed_out": False}
    sup.recovery.records.append({"actor": "kvm", "kind": "kvm", "t_recovered": 1.0})
    assert verdict(passing, sup.recovery)
    sup.recovery.records.append({"actor": "vdcm", "kind": "vdcm", "error": "resync of vdcm given up: ..."})
    assert not verdict(passing, sup.recovery)  # before the fix: only given_up actors failed it
