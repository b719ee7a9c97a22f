"""Small versions of the built-in process experiments (real processes, shared memory, the
audit): every metric measured, a leak recorded as failed, a multi-host point, and a point
beyond the runtime's capacity refused."""

from __future__ import annotations

import json
import re

from typer.testing import CliRunner

from vsva.cli.app import app
from vsva.scale.experiments import runner
from vsva.scale.results import ResultsDir


def run(tmp_path, *args: str) -> tuple[int, dict, list[dict], str]:
    """`vsva scale run ARGS --json`: exit code, summary, the rows written, and the progress
    lines (stderr)."""
    result = CliRunner().invoke(app, ["scale", "run", *args, "--out", str(tmp_path), "--json"])
    assert "{" in result.stdout, (result.output, result.exception)
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    return result.exit_code, summary, ResultsDir.open(summary["dir"]).rows(), result.stderr


def test_vms_small(tmp_path):
    code, summary, rows, _progress = run(
        tmp_path, "vms", "--points", "1,2", "--set", "binds=5", "--set", "dma_rounds=3"
    )
    assert code == 0, summary["summary"]
    assert [r["params"]["vms"] for r in rows] == [1, 2]
    for row in rows:
        m = row["metrics"]
        assert row["status"] == "ok" and row["audit"]["ok"], row["reason"]
        assert all(m[k] is not None for k in runner("vms").METRICS), m
        assert m["processes"] == 3 + 2 * row["params"]["vms"]
        assert m["start_to_ready_s"] >= m["ready_s"] > 0 and m["binds_per_s"] > 0
        assert 0 < m["bind_p50_us"] <= m["bind_p99_us"]
        assert m["dma_translations_per_s"] > 0 and 0 <= m["devtlb_hit_rate"] <= 1
        assert m["host_msgs_per_s"] > 0 and m["pss_host_mb"] > 1 and m["pss_total_mb"] > m["pss_host_mb"]


def test_vms_two_hosts_aggregate_and_keep_per_host_values(tmp_path):
    """Two host stacks, each a child process: the point's metrics are aggregated per metric,
    each host's kept, and every phase of each stack reaches the runner's progress in order."""
    code, _summary, rows, progress = run(
        tmp_path, "vms", "--points", "1", "--set", "hosts=2", "--set", "binds=5", "--set", "dma_rounds=3"
    )
    assert code == 0
    (row,) = rows
    assert row["hosts"] == 2 and [h["host"] for h in row["per_host"]] == [0, 1]
    per = [h["metrics"] for h in row["per_host"]]
    assert all(h["status"] == "ok" for h in row["per_host"])
    assert row["metrics"]["processes"] == sum(p["processes"] for p in per) == 10  # sum
    assert row["metrics"]["start_to_ready_s"] == max(p["start_to_ready_s"] for p in per)  # max
    assert row["metrics"]["binds_per_s"] == sum(p["binds_per_s"] for p in per)
    for h in (0, 1):
        said = re.findall(rf"^scale: run 1/1 vms=1 #0: host {h}: (.*)$", progress, re.M)
        assert said == ["launched 5 processes", "started", "booted", "worked", "audited", "stopped"], progress


def test_vms_beyond_the_runtime_capacity_is_refused_not_run():
    from vsva.scale.experiments.vms import capacity
    from vsva.scale.runner import plan, run_one
    from vsva.scale.sweep import builtin, narrow

    limit, _ = capacity()
    sweep = narrow(builtin("vms"), str(limit + 1))
    row, series = run_one(sweep, plan(sweep)[0], {}, lambda phase: None)
    assert row["status"] == "refused" and f"limit of {limit}" in row["reason"] and row["elapsed_s"] == 0
    assert row["metrics"] == {m: None for m in sweep.metrics} and series == {}


def test_policies_small_and_a_leak_is_recorded_as_failed(tmp_path):
    """reclaim with a notifier subscriber dead before the VMM kill: no FREE is ever
    acknowledged, so VM 1's PASIDs are quarantined: a leak (I4), the run failed."""
    common = ["--points", "16", "--set", "churn_vms=0", "--set", "other_binds=30"]
    code, _summary, rows, _progress = run(tmp_path, "policies", *common, "--set", "policy=reclaim")
    assert code == 0
    (ok,) = rows
    m = ok["metrics"]
    assert ok["status"] == "ok" and m["bound"] == 16 and m["reclaim_backlog_peak"] <= 16
    assert m["teardown_ms"] > 0 and m["pasids_quarantined"] == m["pasids_leaked"] == 0
    assert m["other_bind_p50_us_outside"] > 0
    code, _summary, rows, _progress = run(
        tmp_path, "policies", *common, "--set", "policy=reclaim", "--set", "kill_subscriber=vdcm"
    )
    assert code == 1
    (leak,) = rows
    assert leak["status"] == "failed" and leak["metrics"]["pasids_quarantined"] == 16
    assert leak["audit"]["invariants"] == ["I4"] and "quarantined (leaked)" in leak["reason"]


def test_noisy_neighbour_small(tmp_path):
    code, summary, rows, _progress = run(
        tmp_path,
        "noisy-neighbour",
        "--points",
        "1",
        "--set",
        "noise_ops=300",
        "--set",
        "binds=5",
        "--set",
        "dma_rounds=10",
        "--set",
        "fault_rounds=3",
        "--set",
        "noise_fault_rounds=10",
    )
    assert code == 0, summary["summary"]
    by = {r["params"]["noise"]: r["metrics"] for r in rows}
    assert set(by) == {"none", "invalidate", "fault"}
    for noise, m in by.items():
        assert m["victim_dma_descriptors_per_s"] > 0 and m["victim_fault_round_p50_us"] > 0, noise
    assert by["none"]["noise_ops_per_s"] is None and by["none"]["noise_overlap"] == 0.0
    assert by["invalidate"]["noise_ops_per_s"] > 0 and by["fault"]["noise_ops_per_s"] > 0


def test_a_point_out_of_time_is_recorded_as_timeout_and_cleaned_up(tmp_path):
    sweep = tmp_path / "slow.toml"
    sweep.write_text(
        '[experiment]\nname = "slow"\nrunner = "vms"\ntimeout = 2.0\n'
        "[params]\nbinds = 100000\n[vary]\nvms = [1]\n"
    )
    code, _summary, rows, _progress = run(tmp_path, str(sweep))
    assert code == 1
    (row,) = rows
    assert row["status"] == "timeout" and row["reason"].startswith("timed out"), row["reason"]
    assert row["metrics"] == {m: None for m in runner("vms").METRICS}
