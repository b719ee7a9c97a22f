"""`vsva demo`: one session of every flow on a default topology, its report and its timeline."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vsva import hotpath
from vsva.actors.policy import Policy
from vsva.actors.semantics import Kernel
from vsva.analysis.export import timeline, write_or_say
from vsva.analysis.trace import merge
from vsva.ops.config import DEMO_ITERATIONS, RUN, VM, Runtime
from vsva.ops.control import Controller
from vsva.ops.pacing import render_timeouts, timeouts_in
from vsva.ops.topology import Topology, default_topology
from vsva.runtime.endpoints import Transport
from vsva.runtime.sim import SimRuntime

if TYPE_CHECKING:  # the launcher (zmq) is imported only for the processes runtime
    from vsva.ops.launcher import Launcher, StopRequest

FLOWS = tuple(f"F{i}" for i in range(1, 9))


def run_session(
    topology: Topology,
    runtime: Runtime | str = Runtime.PROCESSES,
    timeout: float = 120.0,
    trace_out: str | None = None,
    stop: StopRequest | None = None,
    on_ready: Callable[[Launcher], None] | None = None,
) -> dict[str, Any]:
    """Run one Controller session; returns its result plus trace, processes and timings.
    With `trace_out` the trace's exports are written there, also if the run is interrupted.
    A `stop` request ends it early (the launcher's LaunchStopped when it comes during the
    launch); the result is then incomplete: the caller asks `stop` before using it.
    `on_ready` is told once every actor process is up (not on the deterministic runtime)."""
    started = time.monotonic()
    if Runtime(runtime) == Runtime.SIM:
        rt = SimRuntime(topology)
        ctl = rt.add(Controller(topology, env=rt.env({})))
        rt.start()
        rt.run(until=lambda: ctl.result is not None or (stop is not None and stop.check()))
        if ctl.result is not None:
            rt.run()  # let the shutdown replies land
        trace = merge(rt.trace)
        trace_files, trace_error = write_or_say(trace, trace_out) if trace_out else (None, None)
        return {
            **(ctl.result or _no_result("the deterministic run went quiescent without a result")),
            "trace": trace,
            "processes": [],
            "ready_s": 0.0,
            "files": [],
            "timeouts": ctl.timeouts,
            "trace_files": trace_files,
            "trace_error": trace_error,
            "elapsed_s": time.monotonic() - started,
        }
    from vsva.ops.launcher import Launcher

    with Launcher(topology, trace_out=trace_out, stop=stop) as launcher:
        if on_ready is not None:
            on_ready(launcher)
        ready = time.monotonic() - started
        ctl = Controller(topology)
        launcher.run_actor(ctl, timeout=timeout)
        launcher.close()
        return {
            **(ctl.result or _no_result(f"no result within {timeout:.0f} s")),
            "trace": launcher.trace(),
            "processes": launcher.processes(),
            "ready_s": ready,
            "files": [launcher.run_dir, launcher.shm_path],
            "endpoints": launcher.endpoints(),
            "timeouts": ctl.timeouts,
            "trace_files": launcher.trace_files,
            "trace_error": launcher.trace_error,
            "elapsed_s": time.monotonic() - started,
        }


def _no_result(why: str) -> dict[str, Any]:
    return {
        "vm_start": {},
        "workloads": {},
        "vm_stop": {},
        "snapshots": {},
        "violations": [{"invariant": "run", "what": why, "actors": [], "vm": None, "pasid": None}],
    }


def report(session: dict[str, Any], topology: Topology, runtime: Runtime | str) -> dict[str, Any]:
    """The machine-readable verdict of a session (what `vsva demo --json` prints)."""
    steps = [dict(s, vm=vm) for vm, w in session["workloads"].items() for s in w.get("steps", [])]
    flows = {f: 0 for f in FLOWS}
    for s in steps:
        if s["ok"] and not s.get("check") and s["flow"] in flows:
            flows[s["flow"]] += 1
    flows["F8"] += sum(1 for r in session.get("vm_stop", {}).values() if r.get("ret") == 0)
    vm_ok = len(session["workloads"]) == len(topology.vms) and all(
        w.get("ret") == 0 for w in session["workloads"].values()
    )
    failed = [s for s in steps if not s["ok"]]
    return {
        "ok": vm_ok and not failed and not session["violations"],
        "vms": len(topology.vms),
        "seed": topology.seed,
        "runtime": str(runtime),
        "transport": str(topology.transport) if runtime != Runtime.SIM else None,
        "hotpath": hotpath.IMPLEMENTATION,
        "frames": _frames() if runtime != Runtime.SIM else None,
        "flows": flows,
        "policy": str(topology.spec("host").config.get("policy")),
        "kernel": str(topology.spec("host").config.get("kernel", RUN.kernel)),
        "audit": {"violations": session["violations"], "checked": ["I1", "I2", "I3", "I4", "I5", "I6", "I7"]},
        "steps": {"total": len(steps), "failed": failed},
        "processes": session["processes"],
        "run_files": session["files"],
        "trace_files": session.get("trace_files"),
        "trace_error": session.get("trace_error"),
        "messages": len(session["trace"]),
        "timeouts": timeouts_in(
            session["vm_start"], session["workloads"], session["vm_stop"], records=session.get("timeouts", ())
        ),
        "ready_s": round(session["ready_s"], 3),
        "elapsed_s": round(session["elapsed_s"], 3),
    }


def hazards(rep: dict[str, Any]) -> list[str]:
    """What a failing run found, in words: each audit violation kind and each kind of failed
    step with its errno (numbers such as PASIDs and pids left out, so seeds compare)."""
    import re

    from vsva.actors import errno as E

    def general(text: str) -> str:
        return re.sub(r"\b\d+\b", "N", text)

    found = {f"audit {v['invariant']}: {general(v['what'])}" for v in rep["audit"]["violations"]}
    found |= {
        f"step {s['flow']} failed {E.name(s.get('ret', 0))}: {general(s.get('error') or s['what'])}"
        for s in rep["steps"]["failed"]
    }
    return sorted(found)


def _frames() -> str:
    """Which per-message socket calls the processes ran (vsva.runtime.frames: it imports zmq,
    which the deterministic runtime never loads)."""
    from vsva.runtime import frames

    return frames.IMPLEMENTATION


def render(session: dict[str, Any], rep: dict[str, Any], echo: Callable[[str], None]) -> None:
    """The human view: the timeline grouped by flow, each VM's steps, then the audit verdict."""
    echo(
        f"vsva demo: {rep['vms']} VMs, seed {rep['seed']}, policy {rep['policy']}, kernel {rep['kernel']}, "
        f"{rep['runtime']} runtime" + (f" over {rep['transport']}" if rep.get("transport") else "") + ", "
        f"hot path {rep['hotpath']}" + (f", frames {rep['frames']}" if rep.get("frames") else "") + ", "
        f"{rep['messages']} messages"
    )
    for title, lines in timeline(session["trace"]):
        echo(f"\n== {title}")
        for line in lines:
            echo("  " + line)
    echo("\n== steps")
    for vm, work in session["workloads"].items():
        for s in work.get("steps", []):
            mark = "ok  " if s["ok"] else "FAIL"
            extra = f" users={s['users']}" if s.get("users") else ""
            echo(
                f"  {mark} {vm:<10} {s['flow']} {s['what']}{extra}"
                + (f"  [{s['error']}]" if s.get("error") else "")
            )
    echo("\n== flows completed: " + ", ".join(f"{f}={n}" for f, n in rep["flows"].items()))
    for proc in rep["processes"]:
        echo(f"  process {proc['name']:<10} pid {proc['pid']:<7} exit {proc.get('exitcode')}")
    echo("\n== timeouts: " + (f"{len(rep['timeouts'])}" if rep["timeouts"] else "none"))
    for line in render_timeouts(rep["timeouts"]):
        echo("  " + line)
    violations = rep["audit"]["violations"]
    echo(
        f"\n== audit ({', '.join(rep['audit']['checked'])}): "
        + ("clean" if not violations else f"{len(violations)} violation(s)")
    )
    for v in violations:
        echo(f"  {v['invariant']}: {v['what']} (actors {v['actors']}, vm {v['vm']}, pasid {v['pasid']})")
    echo(
        f"\nverdict: {'PASS' if rep['ok'] else 'FAIL'} ({rep['elapsed_s']} s, ready after {rep['ready_s']} s)"
    )


def demo(
    vms: int = 2,
    seed: int = RUN.seed,
    runtime: Runtime | str = Runtime.PROCESSES,
    policy: Policy | str = RUN.policy,
    transport: Transport | str = RUN.transport,
    workload: str = VM.workload,
    iterations: int = DEMO_ITERATIONS,
    trace_out: str | None = None,
    kernel: Kernel | str = RUN.kernel,
    stop: StopRequest | None = None,
    on_ready: Callable[[Launcher], None] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """`vsva demo`: one session on `vms` identical VMs; returns (session, report)."""
    topology = default_topology(
        vms,
        seed=seed,
        policy=policy,
        kernel=kernel,
        workload=workload,
        iterations=iterations,
        transport=transport,
    )
    session = run_session(topology, runtime, trace_out=trace_out, stop=stop, on_ready=on_ready)
    return session, report(session, topology, runtime)
