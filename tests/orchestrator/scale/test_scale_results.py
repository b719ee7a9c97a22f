"""A results directory from the iotlb experiment (the hot path directly, no processes): every
documented file and column, real PNGs of the expected size, refused points kept and drawn,
the run without matplotlib, and --resume."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from vsva.cli.app import app
from vsva.scale import plots
from vsva.scale.experiments import runner
from vsva.scale.results import AUDIT_KEYS, ENV_KEYS, ROW_KEYS, STATUSES, ResultsDir, csv_columns
from vsva.scale.runner import sweep_of

SMALL = [
    "--points",
    "64,4096",
    "--set",
    "ways=8",
    "--set",
    "page_size=4k",
    "--set",
    "pattern=loop",
    "--set",
    "accesses=4096",
    "--repeat",
    "2",
]


def run_cli(args: list[str]):
    result = CliRunner().invoke(app, ["scale", "run", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


@pytest.fixture(scope="module")
def iotlb_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    result = run_cli(["iotlb", *SMALL, "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    return out, summary


def test_results_files_carry_every_documented_column(iotlb_dir):
    out, summary = iotlb_dir
    path = summary["dir"]
    assert os.path.realpath(os.path.join(out, "iotlb", "latest")) == os.path.realpath(path)
    for name in (
        "run.json",
        "sweep.toml",
        "command.txt",
        "points.jsonl",
        "series.jsonl",
        "points.csv",
        "summary.md",
    ):
        assert os.path.isfile(os.path.join(path, name)), name
    rd = ResultsDir.open(path)
    sweep = sweep_of(rd)
    rows = rd.rows()
    assert len(rows) == 2 * 3 * 2 == summary["runs"]  # working_set x sets x repeat
    metrics = set(runner("iotlb").METRICS)
    for row in rows:
        assert set(row) == set(ROW_KEYS)
        assert set(row["audit"]) == set(AUDIT_KEYS) and row["audit"]["ok"]
        assert set(ENV_KEYS) <= set(row["env"]) and row["env"]["cores"] >= 1
        assert set(row["metrics"]) == metrics and row["status"] == "ok"
        assert set(row["params"]) == set(runner("iotlb").PARAMS) and row["hosts"] == 1
    # cycling through 4096 pages: a 1024 x 8 IOTLB holds them, a 64 x 8 one keeps none (PLRU)
    hits = {(r["params"]["sets"], r["params"]["working_set"]): r["metrics"]["hit_rate"] for r in rows}
    assert hits[64, 64] == hits[1024, 64] == 1.0
    assert hits[1024, 4096] > 0.9 and hits[64, 4096] < 0.05
    with open(os.path.join(path, "points.csv")) as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == csv_columns(["working_set", "sets"], sweep.metrics)
        assert len(list(reader)) == len(rows)
    table = open(os.path.join(path, "summary.md")).read()
    assert table.count("\n| 64 |") == 3 and table.count("\n| 4,096 |") == 3  # one line per point
    assert open(os.path.join(path, "command.txt")).read().startswith("vsva scale run iotlb --points 64,4096")


def test_pngs_are_real_images_of_the_expected_size(iotlb_dir):
    pytest.importorskip("matplotlib")
    from PIL import Image

    _, summary = iotlb_dir
    rd = ResultsDir.open(summary["dir"])
    sweep = sweep_of(rd)
    assert [os.path.basename(p) for p in summary["plots"]] == [f"{p.name}.png" for p in sweep.plots]
    for path in summary["plots"]:
        os.unlink(path)
    redraw = CliRunner().invoke(app, ["scale", "plot", summary["dir"]])
    assert redraw.exit_code == 0 and redraw.output.split() == summary["plots"]
    for path, plot in zip(summary["plots"], sweep.plots):
        with Image.open(path) as img:
            img.load()
            assert img.format == "PNG"
            assert img.size == plots.size(plots.panels_of(plot, rd.rows(), rd.series()))
            assert len(img.convert("L").getcolors(maxcolors=1 << 16) or []) > 10  # drawn on, not blank


def test_show_prints_the_table(iotlb_dir):
    _, summary = iotlb_dir
    shown = CliRunner().invoke(app, ["scale", "show", summary["dir"]])
    assert shown.exit_code == 0 and "| working_set | sets | runs | hit_rate |" in shown.output
    rows = json.loads(CliRunner().invoke(app, ["scale", "show", summary["dir"], "--json"]).output)
    assert len(rows) == summary["runs"]


def test_a_refused_point_is_recorded_and_drawn_never_dropped(tmp_path):
    sweep = tmp_path / "s.toml"
    sweep.write_text(
        '[experiment]\nname = "geom"\nrunner = "iotlb"\n[params]\naccesses = 1024\n'
        '[vary]\nsets = [48, 64]\n[[plots]]\nname = "h"\nx = "sets"\ny = ["hit_rate"]\n'
    )
    result = run_cli([str(sweep), "--out", str(tmp_path), "--json"])
    assert result.exit_code == 1  # not every run was ok
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    rows = {r["params"]["sets"]: r for r in ResultsDir.open(summary["dir"]).rows()}
    assert rows[48]["status"] == "refused" and "not a power of two" in rows[48]["reason"]
    assert rows[48]["metrics"]["hit_rate"] is None and rows[64]["status"] == "ok"
    assert set(summary["statuses"]) <= set(STATUSES)
    text = open(os.path.join(summary["dir"], "summary.md")).read()
    assert "refused 1" in text and "sets=48 repeat 0: refused: sets = 48 is not a power of two" in text


def test_without_matplotlib_the_data_is_written_and_the_run_says_how_to_plot(tmp_path):
    shim = tmp_path / "shim" / "matplotlib"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vsva",
            "scale",
            "run",
            "iotlb",
            *SMALL,
            "--repeat",
            "1",
            "--out",
            str(tmp_path / "r"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "matplotlib is not installed" in proc.stderr and "pip install -e '.[plots]'" in proc.stderr
    path = os.path.join(tmp_path, "r", "iotlb", "latest")
    assert len(ResultsDir.open(path).rows()) == 6
    assert not [f for f in os.listdir(path) if f.endswith(".png")]


def test_resume_runs_only_what_is_missing(tmp_path):
    result = run_cli(["iotlb", *SMALL, "--out", str(tmp_path), "--json"])
    path = json.loads(result.stdout[result.stdout.index("{") :])["dir"]
    rd = ResultsDir.open(path)
    rows = rd.rows()
    kept = rows[:5]
    with open(os.path.join(path, "points.jsonl"), "w") as f:  # as if stopped after five runs
        f.writelines(json.dumps(r) + "\n" for r in kept)
        f.write('{"experiment": "iotlb", "cut sh')  # and killed while writing the sixth
    rd.update_meta(state="interrupted")
    again = CliRunner().invoke(app, ["scale", "run", "--resume", path])
    assert again.exit_code == 0, again.output
    assert "5/12 runs done" in again.stderr
    after = ResultsDir.open(path).rows()
    assert after[:5] == kept and len(after) == 12
    assert {(r["point_id"], r["repeat"]) for r in after} == {(r["point_id"], r["repeat"]) for r in rows}
    assert ResultsDir.open(path).meta()["state"] == "done"
    bad = CliRunner().invoke(app, ["scale", "run", "--resume", path, "--repeat", "3"])
    assert bad.exit_code == 2 and "give no --points" in bad.output
