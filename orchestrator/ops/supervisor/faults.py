"""Fault injection for scenarios (`vsva run`): each [[faults]] entry becomes a plan that
fires when its trigger holds (a flow step that a guest reports as it starts, a time after
the workloads started, or a seeded random actor and time) and kills its target."""

from __future__ import annotations

import random
import signal
from functools import partial
from typing import TYPE_CHECKING, Any

from vsva.actors.base import Call
from vsva.actors.catalogue import FlowWatch
from vsva.ops.topology import guest_name
from vsva.ops.topology_file import Fault

if TYPE_CHECKING:
    from vsva.actors.base import Actor, Steps
    from vsva.ops.supervisor.loop import Supervisor

WORKLOAD_TIMEOUT = 600.0


class FaultInjector:
    """The plans of one run's faults (`plans`: what fired, when, on which trigger)."""

    def __init__(self, sup: Supervisor):
        self.sup = sup
        self.plans: list[dict[str, Any]] = []

    def plan(self, faults: list[Fault]) -> None:
        for i, f in enumerate(faults):
            self.plans.append(self._plan(i, f))

    def _plan(self, i: int, f: Fault) -> dict[str, Any]:
        plan: dict[str, Any] = {"index": i, "fault": f.__dict__.copy(), "target": f.kill, "done": False}
        if f.random:
            rng = random.Random(f"{f.seed}:fault:{i}")
            plan["target"] = f.kill or rng.choice(self.sup.run.topology.names())
            plan["at_time"] = rng.uniform(0, f.window)
        elif f.at_time is not None:
            plan["at_time"] = f.at_time
        return plan

    def arm(self, actor: Actor, vm: int) -> None:
        """Send VM `vm`'s flow watches before its workload starts: they travel on the same
        link as start_workload, so the guest holds them before the workload's first step
        (a watch sent later, on a loaded machine, could find instance nth already past)."""
        for plan in self.plans:
            f = self.sup.run.faults[plan["index"]]
            if plan["done"] or plan.get("watching") or "at_time" in plan or f.vm != vm:
                continue
            plan["watching"] = True
            actor.spawn(partial(self._watch_flow, plan, f))

    def _watch_flow(self, plan: dict[str, Any], f: Fault) -> Steps[None]:
        """Ask VM f.vm's guest to tell us when instance f.nth of f.at_flow starts (one
        request, answered on that event: no polling); kill the target on the answer. The
        guest is then waiting for that instance's first reply: the kill lands inside the step."""
        vm, flow = f.vm, f.at_flow
        assert vm is not None and flow is not None, "a fault without a time has a flow (topology_file)"
        r = yield Call(guest_name(vm), FlowWatch(flow=flow, nth=f.nth), timeout=WORKLOAD_TIMEOUT)
        if plan["done"]:
            return
        if r.get("ret"):
            plan["done"] = True
            plan["result"] = f"skipped: {guest_name(vm)} did not report {flow} ({r.get('ret')})"
            return
        self._kill_now(plan, f, f"flow step {r['tag']} started (guest event)")

    def _kill_now(self, plan: dict[str, Any], f: Fault, trigger: str) -> None:
        sup = self.sup
        plan["done"] = True
        target = plan["target"]
        plan["trigger"] = trigger
        plan["t"] = round(sup.now(), 4)
        if not sup.launcher.alive(target):
            plan["result"] = "skipped: not running"
            return
        plan["pid"] = sup.launcher.pid(target)
        sup.launcher.kill(target, signal.SIGKILL if f.signal == "KILL" else signal.SIGTERM)
        plan["result"] = f"SIG{f.signal} sent"
        sup.event("fault injected", target, trigger=trigger)

    def fire(self) -> None:
        sup = self.sup
        if not self.plans or sup.launcher.closed:
            return
        for plan in self.plans:
            if plan["done"]:
                continue
            f = sup.run.faults[plan["index"]]
            trigger = None
            if "at_time" in plan:
                if sup.t_workloads is None:
                    continue
                if sup.now() - sup.t_workloads >= plan["at_time"]:
                    trigger = f"t = {plan['at_time']:.3f} s after the workloads started"
            elif not plan.get("watching"):
                plan["watching"] = True
                sup.spawn(partial(self._watch_flow, plan, f))
            if trigger is None:
                continue
            self._kill_now(plan, f, trigger)
