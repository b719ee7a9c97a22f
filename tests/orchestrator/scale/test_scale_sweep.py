"""Sweep files and the command's arguments: built-ins parse, bad input is one clear line."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from vsva.cli.app import app
from vsva.scale.experiments import RUNNERS, runner
from vsva.scale.sweep import SweepError, builtin, builtin_names, fix, loads, narrow, parse, run_seed

BUILTIN = {"iotlb", "noisy-neighbour", "policies", "vms"}
MINIMAL = '[experiment]\nrunner = "iotlb"\n[vary]\nworking_set = [64, 128]\n'


def test_every_builtin_parses_and_names_known_metrics():
    assert set(builtin_names()) == BUILTIN
    for name in builtin_names():
        sweep = builtin(name)
        mod = runner(sweep.runner)
        assert sweep.points in sweep.vary and sweep.plots
        assert set(sweep.metrics) == set(mod.METRICS)
        for params in sweep.grid():
            assert set(params) == set(mod.PARAMS)


def test_list_shows_one_line_per_builtin():
    result = CliRunner().invoke(app, ["scale", "list"])
    assert result.exit_code == 0
    lines = result.output.strip().splitlines()
    assert sorted(line.split()[0] for line in lines) == sorted(BUILTIN)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("[experiment]\n", "experiment.runner: missing"),
        ('[experiment]\nrunner = "nope"\n', "unknown runner 'nope'"),
        ("[bogus]\n", "unknown section 'bogus'"),
        ('[experiment]\nrunner = "iotlb"\ncolour = 1\n', "experiment: unknown key 'colour'"),
        ('[experiment]\nrunner = "iotlb"\nrepeat = "3"\n', "experiment.repeat: expected integer"),
        ('[experiment]\nrunner = "iotlb"\nrepeat = 0\n', "experiment.repeat: 0 out of range"),
        ('[experiment]\nrunner = "iotlb"\n[params]\nways = 3\n', "params.ways: 3 not one of 1, 2, 4, 8"),
        (
            '[experiment]\nrunner = "iotlb"\n[params]\nways = true\n',
            "params.ways: expected integer, got True",
        ),
        ('[experiment]\nrunner = "iotlb"\n[vary]\nsets = []\n', "vary.sets: an empty list"),
        ('[experiment]\nrunner = "iotlb"\n[vary]\nsets = [64, 0]\n', "vary.sets[1]: 0 out of range"),
        ('[experiment]\nrunner = "iotlb"\n[vary]\nsets = [64, 64]\n', "vary.sets: a value appears twice"),
        ('[experiment]\nrunner = "iotlb"\n[vary]\nvms = [1]\n', "vary: unknown key 'vms'"),
        (
            '[experiment]\nrunner = "iotlb"\n[params]\nsets = 64\n[vary]\nsets = [64]\n',
            "also fixed in [params]",
        ),
        (
            '[experiment]\nrunner = "iotlb"\nmetrics = ["speed"]\n',
            "experiment.metrics[0]: runner 'iotlb' has no metric 'speed'",
        ),
        (
            '[experiment]\nrunner = "iotlb"\npoints = "sets"\n',
            "experiment.points: 'sets' is not a parameter in [vary]",
        ),
        (
            MINIMAL + '[[plots]]\nname = "a"\nx = "sets"\ny = ["hit_rate"]\n',
            "plots[0].x: 'sets' is not a parameter",
        ),
        (
            MINIMAL + '[[plots]]\nname = "a"\nx = "working_set"\ny = ["nope"]\n',
            "plots[0].y: 'nope' is not a collected metric",
        ),
        (MINIMAL + '[[plots]]\nname = "a/b"\nx = "working_set"\ny = ["hit_rate"]\n', "plots[0].name"),
        (
            MINIMAL + '[[plots]]\nname = "a"\nkind = "pie"\ny = ["hit_rate"]\n',
            "plots[0].kind: unknown kind 'pie'",
        ),
        (MINIMAL + '[[plots]]\nname = "a"\nkind = "timeline"\ny = ["x"]\n', "records no series 'x'"),
        (
            MINIMAL
            + '[[plots]]\nname = "a"\nx = "working_set"\ny = ["hit_rate"]\nwhere = { working_set = 7 }\n',
            "plots[0].where.working_set: 7 is not one of its values",
        ),
        (
            '[experiment]\nrunner = "iotlb"\n[vary]\nworking_set = ['
            + ",".join(map(str, range(1, 10002)))
            + "]\n",
            "exceed 10000 runs",
        ),
        ("experiment = 3\n", "experiment: expected a table"),
        ("[experiment\n", "not valid TOML"),
        (MINIMAL + "x = " + "[" * 500 + "]" * 500, "nested too deeply"),
    ],
)
def test_bad_sweeps_are_one_line_errors(text, fragment):
    with pytest.raises(SweepError) as err:
        loads(text, "s.toml")
    message = str(err.value)
    assert fragment in message and "\n" not in message and message.startswith("s.toml: ")


def test_points_and_set_narrow_the_grid():
    sweep = narrow(builtin("iotlb"), "64, 4096")
    assert sweep.vary["working_set"] == [64, 4096]
    fix(sweep, ["sets=64", "page_size=2m"])
    assert "sets" not in sweep.vary and sweep.params["sets"] == 64
    grid = sweep.grid()
    assert len(grid) == 2 * 3 and all(p["sets"] == 64 and p["page_size"] == "2m" for p in grid)
    for bad, fragment in [
        ("x", "'x' is not an integer"),
        ("0", "0 out of range"),
        ("", "no values"),
        ("64,4096, 64", r"--points \(working_set\): a value appears twice: 64"),  # as in [vary]
    ]:
        with pytest.raises(SweepError, match=fragment):
            narrow(builtin("iotlb"), bad)
    for bad, fragment in [
        ("ways", "expected KEY=VALUE"),
        ("nope=1", "has no parameter 'nope'"),
        ("ways=3", "not one of"),
    ]:
        with pytest.raises(SweepError, match=fragment):
            fix(builtin("iotlb"), [bad])


def test_run_seeds_depend_on_point_and_repeat_only():
    assert run_seed(1, "vms=4", 0) == run_seed(1, "vms=4", 0)
    seeds = {run_seed(1, p, r) for p in ("vms=1", "vms=2") for r in range(3)} | {run_seed(2, "vms=1", 0)}
    assert len(seeds) == 7


def test_every_runner_documents_its_parameters_and_metrics():
    for name in RUNNERS:
        mod = runner(name)
        assert mod.DOC and mod.PARAMS and mod.METRICS
        for metric in mod.METRICS.values():
            assert metric.agg in ("sum", "max", "min", "mean") and metric.doc
        for p in mod.PARAMS.values():
            assert isinstance(p.default, p.type) and p.doc
            assert p.choices is None or p.default in p.choices
            assert p.range is None or p.range[0] <= p.default <= p.range[1]


def test_cli_refuses_bad_input_with_one_line_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[experiment]\nrunner = "iotlb"\n[params]\nways = 3\n')
    out = tmp_path / "results"
    cli = CliRunner()
    for args in (
        ["scale", "run", str(bad)],
        ["scale", "run", "nope"],
        ["scale", "run"],
        ["scale", "run", "iotlb", "--points", "x"],
        ["scale", "run", "iotlb", "--set", "q=1"],
        ["scale", "show", str(tmp_path)],
        ["scale", "run", "--resume", str(tmp_path)],
    ):
        result = cli.invoke(app, [*args, "--out", str(out)] if args[1] == "run" else args)
        assert result.exit_code == 2, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1 and result.output.startswith("vsva scale: ")
    assert not out.exists()


_SCALARS = st.one_of(
    st.integers(-3, 70000),
    st.floats(allow_nan=False, width=32),
    st.booleans(),
    st.sampled_from(["", "iotlb", "vms", "4k", "lines", "timeline", "sets", "hit_rate", "a"]),
)
_KEYS = st.sampled_from(
    [
        "runner",
        "name",
        "repeat",
        "seed",
        "timeout",
        "points",
        "metrics",
        "sets",
        "ways",
        "working_set",
        "page_size",
        "x",
        "y",
        "kind",
        "where",
        "vms",
        "bogus",
    ]
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_KEYS, inner, max_size=3)),
    max_leaves=5,
)


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(
    st.dictionaries(
        st.sampled_from(["experiment", "params", "vary", "plots", "extra"]),
        st.one_of(
            st.dictionaries(_KEYS, _VALUES, max_size=5),
            st.lists(st.dictionaries(_KEYS, _VALUES, max_size=4), max_size=2),
        ),
        max_size=4,
    )
)
def test_any_document_parses_or_is_one_sweep_error(data):
    """Whatever the TOML holds: a Sweep, or one SweepError line; never another exception."""
    try:
        sweep = parse(data, "f.toml")
    except SweepError as exc:
        assert "\n" not in str(exc)
        return
    assert sweep.runner in RUNNERS and len(sweep.grid()) >= 1
