"""The kill matrix: for each actor kind and a few flow steps, a seeded scenario (real processes,
`vsva run --json`) kills that actor the moment VM 1 starts that step; after recovery the audit
must be clean (no PASID leaked: quarantined PASIDs count as a leak), every surviving VM's
workload must complete with its data verified, and nothing of the run may remain.

The workload is chosen so the step repeats and the kill lands inside it: F1 (PASID
allocation) under `bind_many`, F2 (bind) under `bind_latency`, F7 (work submission, both the
passthrough and the mdev path) under `dma_loop`. The table is printed (pytest -s) and written
to `kill-matrix.txt` in the test's tmp directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from zmqrt_toys import pid_alive

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = {"F1": ("bind_many", 30, 10), "F2": ("bind_latency", 60, 10), "F7": ("dma_loop", 100, 20)}
KINDS = {
    "guest": "vm1.guest",
    "guest+restart": "vm1.guest",
    "vmm": "vm1.vmm",
    "kvm": "kvm",
    "vdcm": "vdcm",
    "host": "host",
}
SEED = 11


def scenario(kind: str, step: str) -> str:
    workload, iterations, nth = STEPS[step]
    restart = '\non_guest_death = "restart"' if kind == "guest+restart" else ""
    vms = "".join(
        f'[[vms]]\nid = {i}\nworkload = "{workload}"\niterations = {iterations}{restart}\n' for i in (1, 2)
    )
    return (
        f'[run]\nseed = {SEED}\n{vms}[[faults]]\nkill = "{KINDS[kind]}"\nat_flow = "{step}"\n'
        f"vm = 1\nnth = {nth}\n[scenario]\ntimeout = 30\n"
    )


def run_case(tmp_path, kind: str, step: str) -> dict:
    path = tmp_path / f"{kind}-{step}.toml"
    path.write_text(scenario(kind, step))
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "vsva", "run", "--json", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    try:
        rep = json.loads(done.stdout)
    except ValueError:
        rep = {"error": done.stderr[-3000:]}
    rep["rc"] = done.returncode
    rep["wall_s"] = round(time.monotonic() - started, 2)
    return rep


def check_case(kind: str, step: str, rep: dict) -> list[str]:
    """What is wrong with one case (empty: it passed)."""
    if "error" in rep:
        return [f"no report: {rep['error']}"]
    bad = []
    inj = rep["injected"][0]
    nth = STEPS[step][2]  # the guest reports the instance's start: the kill is at that one
    if inj.get("result") != "SIGKILL sent" or f"{step}:vm1.{nth} " not in inj.get("trigger", ""):
        bad.append(f"not injected at {step}:vm1.{nth}: {inj}")
    if any(pid_alive(p["pid"]) for p in rep["processes"]):
        bad.append("processes left")
    if any(os.path.exists(f) for f in rep.get("run_files", [])):
        bad.append(f"run files left: {rep['run_files']}")
    if kind == "host":
        if not rep["host_lost"] or rep["rc"] != 1:
            bad.append("host loss not reported")
        return bad
    if rep["rc"] != 0 or not rep["ok"]:
        bad.append(f"run not ok (rc {rep['rc']})")
    if rep["audit"]["violations"]:
        bad.append(f"audit: {rep['audit']['violations'][:3]}")
    expect_survivors = {"guest": [2], "vmm": [2]}.get(kind, [1, 2])
    if rep["surviving_vms"] != expect_survivors:
        bad.append(f"survivors {rep['surviving_vms']} != {expect_survivors}")
    for vm in expect_survivors:
        w = rep["workloads"][str(vm)]
        if w["ret"] != 0 or not w["ok"] or w["failed_steps"]:
            bad.append(f"vm{vm} workload: ret {w['ret']} {w['failed_steps'][:2]}")
        if step == "F7" and w["verified_dma"] != 2 * STEPS["F7"][1]:
            bad.append(f"vm{vm}: {w['verified_dma']} verified DMAs")
    rec = {r["actor"]: r for r in rep["recoveries"]}
    target = KINDS[kind]
    if target not in rec or "recovery_s" not in rec[target]:
        bad.append(f"no recovery recorded for {target}: {rec}")
    if kind in ("kvm", "vdcm") and rec.get(target, {}).get("new_pid") is None:
        bad.append("not restarted")
    return bad


def row(kind: str, step: str, rep: dict, bad: list[str]) -> str:
    rec = {r["actor"]: r for r in rep.get("recoveries", [])}.get(KINDS[kind], {})
    trig = rep.get("injected", [{}])[0].get("trigger", "-").replace("flow step ", "").split(" ")[0]
    rs = rec.get("recovery_s")
    return (
        f"{kind:<14} {step:<3} {trig:<13} {(rec.get('action') or '-')[:48]:<48} "
        f"{'-' if rs is None else f'{rs * 1000:.0f} ms':>7} "
        f"{'clean' if rep.get('audit', {}).get('ok') else 'n/a' if kind == 'host' else 'DIRTY':<6} "
        f"{str(rep.get('surviving_vms', '-')):<7} {rep.get('wall_s', 0):>5} s "
        f"{'PASS' if not bad else 'FAIL: ' + '; '.join(bad)}"
    )


@pytest.mark.timeout(120)
def test_kill_matrix(tmp_path):
    cases = [(k, s) for k in KINDS for s in STEPS]
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=3) as pool:
        reports = list(pool.map(lambda c: run_case(tmp_path, *c), cases))
    elapsed = time.monotonic() - t0
    lines = [
        f"{'killed':<14} {'at':<3} {'trigger':<13} {'recovery':<48} {'took':>7} {'audit':<6} "
        f"{'surv.':<7} {'wall':>7} verdict"
    ]
    failures = []
    for (kind, step), rep in zip(cases, reports):
        bad = check_case(kind, step, rep)
        lines.append(row(kind, step, rep, bad))
        if bad:
            failures.append((kind, step, bad))
    lines.append(f"{len(cases)} cases in {elapsed:.1f} s (seed {SEED})")
    table = "\n".join(lines)
    (tmp_path / "kill-matrix.txt").write_text(table + "\n")
    print("\n" + table)
    assert not failures, table
