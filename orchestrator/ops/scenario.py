"""`vsva run SCENARIO.toml`: a topology, its workloads and a fault schedule, run to completion.

The Supervisor (vsva.ops.supervisor) runs in this process: it boots the VMs, starts
the workloads, injects each fault when its trigger holds (a flow step of a VM, which its guest reports
when it starts: `flow_watch`; a time after the workloads started; or a seeded random actor
and time),
recovers as each actor's contract says, and when every running VM's workload has answered
(or `scenario.timeout` passed) audits the live topology, stops the VMs (F8), audits again,
and takes everything down. The report says what was injected, what recovered and how fast,
each VM's outcome, and the audit.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vsva.actors import errno as E
from vsva.ops.pacing import render_timeouts, timeouts_in
from vsva.ops.supervisor import Supervisor, exit_words
from vsva.ops.topology import HOST, PER_VM_KINDS, guest_name, vmm_name
from vsva.ops.topology_file import RunFile

if TYPE_CHECKING:
    from vsva.ops.launcher import Launcher, StopRequest
    from vsva.ops.supervisor.recovery import Recovery


def run_scenario(
    run: RunFile,
    log: Callable[[str], None] | None = None,
    trace_out: str | None = None,
    stop: StopRequest | None = None,
    on_ready: Callable[[Launcher], None] | None = None,
) -> dict[str, Any]:
    """Run the scenario; with `trace_out` its trace files are written there when the run ends,
    however it ends (an interrupt included). A `stop` request ends it early: everything is
    taken down without the final audit, and the report is incomplete (the caller asks `stop`),
    or, during the launch, the launcher's LaunchStopped."""
    sup = Supervisor(run, log=log, launcher_kw={"trace_out": trace_out, "stop": stop})
    return supervise(sup, on_ready)


def supervise(sup: Supervisor, on_ready: Callable[[Launcher], None] | None = None) -> dict[str, Any]:
    """Start `sup` and run its scenario (`sup.run`) to the end; returns the report. The
    Supervisor is the caller's until then: it may watch the launcher (`launcher.on_death`).
    `on_ready` is told once every actor is up."""
    run = sup.run
    t0 = time.monotonic()
    report: dict[str, Any] = {
        "source": run.source,
        "seed": run.topology.seed,
        "policy": run.topology.spec(HOST).config.get("policy"),
        "vms": len(run.topology.vms),
    }
    try:
        sup.start()
        if on_ready is not None:
            on_ready(sup.launcher)
        report["ready_s"] = round(sup.ready_s, 3)
        report["run_files"] = [sup.launcher.run_dir, sup.launcher.shm_path]
        end = time.monotonic() + run.timeout
        while time.monotonic() < end and not sup.stop_requested and not sup.launcher.stopping:
            sup.step(0.01)
            if sup.workloads_done() and all(p["done"] for p in sup.faults.plans) and _recovered(sup):
                break
        report["timed_out"] = time.monotonic() >= end
        final_audit = None
        if sup.launcher.stopping:
            return report  # the caller says why; `finally` takes the run down
        if not sup.host_lost:
            # let restarts and their resyncs settle, then audit the live topology
            settle = time.monotonic() + 5.0
            while time.monotonic() < settle and not _recovered(sup):
                sup.step(0.01)
            final_audit = sup.run_step(sup.audit_task, timeout=15.0)
            stopped = sup.run_step(sup.stop_vms, timeout=15.0) or {}
            after = sup.run_step(sup.audit_task, timeout=15.0) or _unfinished("the audit after vm_stop")
            report["vm_stop"] = {str(vm): r.get("ret") for vm, r in stopped.items()}
        report["host_lost"] = sup.host_lost
        sup.recovery.close_unfinished("when the host was lost" if sup.host_lost else "when the run ended")
        report["processes"] = sup.processes()
        report["injected"] = [
            {k: v for k, v in p.items() if k != "fault"} | {"fault": p["fault"]} for p in sup.faults.plans
        ]
        report["recoveries"] = [_recovery(r) for r in sup.recovery.records]
        report["workloads"] = {}
        for vm, st in sup.vms.items():
            w = st.workload or {}
            steps, summary = w.get("steps", []), w.get("summary", {})
            report["workloads"][str(vm)] = {
                "state": st.state,
                "runs": st.runs,
                "ret": w.get("ret"),
                "ok": w.get("ok"),
                "steps": summary.get("total", 0),
                "failed_steps": [s for s in steps if not s["ok"]][:5],
                "verified_dma": summary.get("verified", 0),
                "dma": ((final_audit or {}).get("snapshots", {}).get(guest_name(vm), {}) or {}).get("dma"),
                "why": _why_failed(sup, vm, report["timed_out"], run.timeout),
            }
        violations = []
        if final_audit is not None:
            violations = final_audit["violations"] + [
                v for v in after["violations"] if v not in final_audit["violations"]
            ]
        report["timeouts"] = timeouts_in(
            report["workloads"],
            report.get("vm_stop"),
            records=[*sup.actor.timeouts, *(t for r in sup.recovery.records for t in r.get("timeouts", []))],
        )
        report["audit"] = {
            "ran": final_audit is not None,
            "ok": final_audit is not None and not violations,
            "violations": violations,
        }
        killed_vms = {
            int(r["actor"][2:].split(".")[0]) for r in sup.recovery.records if r["kind"] in PER_VM_KINDS
        }
        survivors = [vm for vm in sup.vms if vm not in killed_vms or sup.vms[vm].runs > 1]
        report["surviving_vms"] = survivors if not sup.host_lost else []
        report["survivors_ok"] = all((sup.vms[vm].workload or {}).get("ok") for vm in report["surviving_vms"])
        report["ok"] = verdict(report, sup.recovery)
    finally:
        sup.close()
        report["trace_messages"] = len(sup.launcher.trace())
        report["trace_files"] = sup.launcher.trace_files
        report["trace_error"] = sup.launcher.trace_error
    report["elapsed_s"] = round(time.monotonic() - t0, 3)
    return report


def verdict(report: dict[str, Any], recovery: Recovery) -> bool:
    """Whether the run passed: the host kept, the audit clean, every surviving VM's workload
    ok, no timeout of the run, and every recovery finished (none given up, none in error:
    a resync not confirmed, a teardown not finished, a vm_stop that failed)."""
    return bool(
        not report["host_lost"]
        and report["audit"]["ok"]
        and report["survivors_ok"]
        and not report["timed_out"]
        and not recovery.failed()  # an actor whose restart failed (given up) has its error too
    )


def _unfinished(what: str) -> dict[str, Any]:
    """An audit that did not finish in its bound fails the run: it is never a pass by silence."""
    violation: dict[str, Any] = {
        "invariant": "run",
        "what": f"{what} did not finish",
        "actors": [],
        "vm": None,
        "pasid": None,
    }
    return {"ok": False, "violations": [violation]}


def _why_failed(sup: Supervisor, vm: int, timed_out: bool, timeout: float) -> str | None:
    """What went wrong with VM `vm`'s workload, in words (None if it succeeded): the step that
    failed (flow, request, errno, the error text), or why no answer came (the actor that
    died and how, the request and peer that timed out)."""
    st = sup.vms[vm]
    w = st.workload
    deaths = [
        f"{r['actor']} {exit_words(r['exitcode'])}" + (f" ({r['error']})" if "error" in r else "")
        for r in sup.recovery.records
        if r["actor"] in (guest_name(vm), vmm_name(vm)) or r["kind"] == "host"
    ]
    if w is None:
        if deaths:
            return f"no workload result: {', '.join(deaths)}; VM {st.state}"
        if timed_out:
            return (
                f"start_workload to {guest_name(vm)}: no answer within the scenario timeout "
                f"({timeout:g} s); VM {st.state}"
            )
        return f"no workload result; VM {st.state}"
    if w.get("ret") == 0 and w.get("ok", True):
        return None
    failed = [x for x in w.get("steps", []) if not x["ok"]]
    if failed:
        f = failed[0]
        text = f"{f['flow']} {f['what']}: {E.name(f['ret'])}" + (f" ({f['error']})" if f.get("error") else "")
        more = w.get("summary", {}).get("failed", len(failed)) - 1
        return (
            text
            + (f" (+{more} more failed steps)" if more > 0 else "")
            + (f"; {', '.join(deaths)}" if deaths else "")
        )
    ret = w.get("ret", 0)
    how = "timed out" if ret == -E.ETIMEDOUT else "peer down" if ret == -E.EHOSTDOWN else "failed"
    return (
        f"start_workload to {guest_name(vm)} {how}: {E.name(ret)}"
        + (f" ({w['error']})" if w.get("error") else "")
        + (f"; {', '.join(deaths)}" if deaths else "")
    )


def _recovered(sup: Supervisor) -> bool:
    seen = {r["actor"] for r in sup.recovery.records}
    if any(p.get("pid") is not None and p["target"] not in seen for p in sup.faults.plans):
        return False  # a kill whose death the launcher has not reported yet
    return (
        all("t_recovered" in r or r["kind"] in ("host",) or "error" in r for r in sup.recovery.records)
        and not sup.recovery.busy()
    )


def _recovery(r: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in r.items() if k not in ("teardown",)}
    if "t_recovered" in r:
        out["recovery_s"] = round(r["t_recovered"] - r["t_death_seen"], 4)
    if "teardown" in r:
        out["teardown"] = {k: r["teardown"].get(k) for k in ("vm", "why", "pasids")}
    return out


def render(rep: dict[str, Any], echo: Callable[[str], None]) -> None:
    echo(
        f"vsva run {rep['source']}: {rep['vms']} VMs, seed {rep['seed']}, policy {rep['policy']}, "
        f"ready in {rep.get('ready_s', 0)} s"
    )
    echo("\n== injected")
    for p in rep.get("injected", []):
        echo(
            f"  {p.get('target')}: {p.get('result', 'not fired')}"
            + (f" at t={p['t']} s (pid {p.get('pid')}) on {p.get('trigger')}" if "t" in p else "")
        )
    echo("\n== recovered")
    for r in rep.get("recoveries", []):
        took = f" in {r['recovery_s'] * 1000:.0f} ms" if "recovery_s" in r else ""
        echo(
            f"  {r['actor']} (exit {r['exitcode']}): {r.get('action')}{took}"
            + (f" [{r['error']}]" if r.get("error") else "")
        )
    echo("\n== workloads")
    for vm, w in rep.get("workloads", {}).items():
        outcome = "workload ok" if w.get("why") is None else f"FAILED: {w['why']}"
        echo(f"  vm{vm}: {w['state']}, {outcome}; {w['verified_dma']} verified DMA, dma {w['dma']}")
    echo("\n== timeouts: " + (f"{len(rep.get('timeouts', []))}" if rep.get("timeouts") else "none"))
    for line in render_timeouts(rep.get("timeouts", [])):
        echo("  " + line)
    a = rep["audit"]
    echo(
        "\n== audit: "
        + (
            "not run (host lost)"
            if not a["ran"]
            else "clean"
            if a["ok"]
            else f"{len(a['violations'])} violation(s)"
        )
    )
    for v in a["violations"]:
        echo(f"  {v['invariant']}: {v['what']} (actors {v['actors']}, vm {v['vm']}, pasid {v['pasid']})")
    echo(
        f"\nverdict: {'PASS' if rep['ok'] else 'FAIL'}"
        + (" (host lost: run stopped and cleaned up)" if rep.get("host_lost") else "")
        + f" ({rep['elapsed_s']} s)"
    )
