"""A results directory from the iotlb experiment (the hot path directly, no processes): every
documented file and column, real PNGs of the expected size, refused points kept and drawn,
the run without matplotlib, and --resume."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from vsva.cli.app import app
from vsva.scale import plots, results
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


@pytest.fixture
def copy_dir(iotlb_dir, tmp_path):
    """A copy of the iotlb results directory, to edit by hand."""
    path = str(tmp_path / "copy")
    shutil.copytree(iotlb_dir[1]["dir"], path)
    return path


def _edit_row(path: str, **changes) -> None:
    """Append a copy of the first row of points.jsonl with `changes` (None: the key removed)."""
    with open(os.path.join(path, "points.jsonl")) as f:
        row = json.loads(f.readline())
    row.update(changes)
    row = {k: v for k, v in row.items() if v is not None}
    with open(os.path.join(path, "points.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def _edit_options(path: str, options) -> None:
    with open(os.path.join(path, "run.json")) as f:
        meta = json.load(f)
    meta["options"] = options(meta["options"])
    with open(os.path.join(path, "run.json"), "w") as f:
        json.dump(meta, f)


def _append(path: str, name: str, data: bytes) -> None:
    with open(os.path.join(path, name), "ab") as f:
        f.write(data)


def _to_dev_zero(path: str) -> None:
    os.unlink(os.path.join(path, "points.jsonl"))
    os.symlink("/dev/zero", os.path.join(path, "points.jsonl"))


def _snapshot(path: str) -> dict[str, bytes | str]:
    """Every file's bytes (a link's target): what must stay as it was."""
    names = (os.path.join(path, n) for n in os.listdir(path))
    return {n: os.readlink(n) if os.path.islink(n) else open(n, "rb").read() for n in names}


HAND_EDITS = {
    "random bytes": (
        lambda p: _append(p, "points.jsonl", b"\xff\xfe\x00\x9c\n"),
        "points.jsonl:13: not a JSON row",
    ),
    "no sweep.toml": (lambda p: os.unlink(os.path.join(p, "sweep.toml")), "sweep.toml: missing"),
    "no status": (
        lambda p: _edit_row(p, status=None, metrics=None),
        "points.jsonl:13: not a row of this file: no",
    ),
    "an array": (lambda p: _append(p, "points.jsonl", b"[1,2,3]\n"), "expected an object, got [1, 2, 3]"),
    "point x": (lambda p: _edit_row(p, point="x"), 'point: expected an integer, got "x"'),
    "bad status": (lambda p: _edit_row(p, status="OK"), "status: 'OK' is not one of ok,"),
    "options x": (
        lambda p: _edit_options(p, lambda o: "x"),
        "run.json: not a run description: options: expected",
    ),
    "repeat x": (
        lambda p: _edit_options(p, lambda o: {**o, "repeat": "x"}),
        "run.json: options.repeat: expected",
    ),
    "points 0": (lambda p: _edit_options(p, lambda o: {**o, "points": "0"}), "run.json: options: --points"),
    "/dev/zero": (_to_dev_zero, "points.jsonl: not a regular file"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("edit", HAND_EDITS)
def test_a_hand_edited_results_directory_is_refused_in_one_line_and_left_as_it_is(copy_dir, edit):
    """Rows are the results: a line of another shape refuses the directory, naming the file
    and line, before anything is shown or run again (a skipped row would be run again)."""
    damage, fragment = HAND_EDITS[edit]
    path = copy_dir
    damage(path)
    before = _snapshot(path)
    for args in (["show", path], ["show", path, "--json"], ["plot", path], ["run", "--resume", path]):
        result = CliRunner().invoke(app, ["scale", *args])
        assert result.exit_code == 2, (args, result.output, result.exception)
        assert result.output.count("\n") == 1 and result.output.startswith(f"vsva scale: {path}/")
        assert fragment in result.output, result.output
    assert _snapshot(path) == before


def test_a_file_too_large_for_results_is_refused(copy_dir, monkeypatch):
    path = copy_dir
    monkeypatch.setattr(results, "MAX_FILE_BYTES", os.path.getsize(os.path.join(path, "points.jsonl")) - 1)
    result = CliRunner().invoke(app, ["scale", "show", path])
    assert result.exit_code == 2 and "points.jsonl: larger than the" in result.output


def test_a_duplicated_row_counts_once_and_is_said(copy_dir):
    path = copy_dir
    _edit_row(path)  # the first run's row, once more
    shown = CliRunner().invoke(app, ["scale", "show", path])
    assert shown.exit_code == 0 and "12 runs (ok 12)" in shown.stdout
    assert shown.stderr == (
        f"vsva scale: {path}/points.jsonl: 1 row(s) record a run that a later row records again; "
        "each run counts once (its last row)\n"
    )
    assert len(ResultsDir.open(path).rows()) == 12


def _latest_a_directory(tmp_path) -> str:
    (tmp_path / "out" / "iotlb" / "latest").mkdir(parents=True)
    (tmp_path / "out" / "iotlb" / "latest" / "mine.txt").write_text("kept\n")
    return str(tmp_path / "out")


def _a_file(tmp_path) -> str:
    (tmp_path / "out").write_text("kept\n")
    return str(tmp_path / "out")


OUTS = {
    "a file": (_a_file, "is not a directory"),
    "under a file": (lambda t: os.path.join(_a_file(t), "sub"), "cannot make a results directory there"),
    "/proc/x": (lambda t: "/proc/x", "cannot make a results directory there"),
    "empty": (lambda t: "", "--out: an empty path"),
    "latest a directory": (_latest_a_directory, "latest is not a symbolic link"),
}


@pytest.mark.parametrize("kind", OUTS)
def test_an_out_that_cannot_hold_results_is_refused_before_the_run(tmp_path, monkeypatch, kind):
    make, fragment = OUTS[kind]
    out = make(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    result = run_cli(["iotlb", *SMALL, "--out", out])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert result.output.startswith("vsva scale: ") and fragment in result.output
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing run, written or left
