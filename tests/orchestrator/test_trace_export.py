"""The merged trace and its exports respect causality, and each export is drawable.

Merge: the per-actor traces of the processes runtime carry wall times that can disagree with
causality by a little (a reply stamped before its request); the merge must still put every
reply after its request, keep each actor's own order, and leave times that agree with
causality in their order. Checked on records whose true order is known (a deterministic
run's trace, with skewed times) and on every export of a real multi-process run.

Perfetto: the JSON importer only accepts complete ("X") slices that nest on a thread track,
and binds a flow event to the slice that encloses it on its thread; the checks below are those
rules. Mermaid: a diagram over 50,000 characters is refused by Mermaid's default maxTextSize.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vsva.analysis.export import (
    MERMAID_MAX,
    mermaid_diagrams,
    perfetto,
    timeline,
    write_all,
)
from vsva.analysis.trace import merge
from vsva.ops.demo import demo, run_session
from vsva.ops.topology import default_topology

# ---- checkers (independent of the merge) -------------------------------------------------


def causal_violations(ordered: list[dict]) -> list[str]:
    """Replies placed before their request (a restarted actor numbers from 1 again: a reply
    answers the latest request of its number placed so far)."""
    bad = []
    requests = {(r["src"], r["id"]) for r in ordered if r["rr"]}
    seen: set[tuple[str, int]] = set()
    for r in ordered:
        key = (r["dst"], r["corr"])
        if r["corr"] is not None and key in requests and key not in seen:
            bad.append(f"reply {r['src']}->{r['dst']} {r['kind']} #{r['corr']} before its request")
        if r["rr"]:
            seen.add((r["src"], r["id"]))
    return bad


def program_order_kept(original: list[dict], merged: list[dict]) -> bool:
    def per_src(records):
        out = defaultdict(list)
        for r in records:
            out[r["src"]].append((r["id"], r["clock"]))
        return out

    return per_src(original) == per_src(merged)


def skewed(records: list[dict], rng: random.Random, skew: float) -> list[dict]:
    """The same records with wall times that disagree with their order by up to `skew` s
    (each sender's own times stay increasing, as one process's clock does)."""
    out, last = [], {}
    for i, r in enumerate(records):
        t = max(i * 1e-5 + rng.uniform(-skew, skew), last.get(r["src"], -1.0) + 1e-7)
        last[r["src"]] = t
        out.append({**r, "t": round(t, 7)})
    rng.shuffle(out)
    return out


@pytest.fixture(scope="module")
def sim_trace() -> list[dict]:
    return run_session(default_topology(2, seed=1), "sim")["trace"]


def test_merge_puts_replies_after_requests_despite_skew(sim_trace):
    records = skewed(sim_trace, random.Random(1), skew=5e-5)
    assert causal_violations(sorted(records, key=lambda r: r["t"]))  # the skew does bite
    merged = merge(records)
    assert causal_violations(merged) == []
    assert program_order_kept(sim_trace, merged)
    assert len(merged) == len(sim_trace)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), skew=st.sampled_from([0.0, 1e-6, 2e-5, 1e-3]))
def test_merge_is_causal_for_any_skew(sim_trace, seed, skew):
    merged = merge(skewed(sim_trace, random.Random(seed), skew))
    assert causal_violations(merged) == []
    assert program_order_kept(sim_trace, merged)
    if skew == 0.0:  # times that agree with causality are not reordered
        assert [(r["src"], r["id"]) for r in merged] == [(r["src"], r["id"]) for r in sim_trace]


# ---- Perfetto ----------------------------------------------------------------------------


def perfetto_violations(doc: dict) -> list[str]:
    """What Perfetto's JSON importer would drop or misdraw: X slices that partially overlap on
    one (pid, tid), flow events outside any slice of their thread, unpaired flow ids."""
    bad = []
    slices = defaultdict(list)
    for e in doc["traceEvents"]:
        if e["ph"] == "X":
            if e["dur"] < 0:
                bad.append(f"negative duration {e}")
            slices[(e["pid"], e["tid"])].append((e["ts"], e["ts"] + e["dur"]))
    for key, spans in slices.items():
        spans.sort(key=lambda s: (s[0], -s[1]))
        stack: list[tuple[float, float]] = []
        for s, end in spans:
            while stack and stack[-1][1] <= s:
                stack.pop()
            if stack and end > stack[-1][1]:
                bad.append(f"overlap on {key}: {stack[-1]} and {(s, end)}")
            stack.append((s, end))
    flows = defaultdict(list)
    for e in doc["traceEvents"]:
        if e["ph"] in ("s", "f"):
            flows[(e.get("cat"), e["id"])].append(e)
            if not any(s <= e["ts"] <= end for s, end in slices[(e["pid"], e["tid"])]):
                bad.append(f"flow {e['ph']} {e['id']} outside any slice of {(e['pid'], e['tid'])}")
    for key, evs in flows.items():
        phases = sorted(e["ph"] for e in evs)
        if phases != ["f", "s"]:
            bad.append(f"flow {key}: phases {phases}")
        elif evs[0]["ts"] > evs[1]["ts"] if evs[0]["ph"] == "s" else evs[1]["ts"] > evs[0]["ts"]:
            bad.append(f"flow {key} ends before it starts")
    return bad


def test_perfetto_slices_nest_and_flows_bind(sim_trace):
    doc = perfetto(sim_trace)
    assert perfetto_violations(doc) == []
    pairs = sum(1 for r in sim_trace if r["corr"] is not None)
    assert sum(1 for e in doc["traceEvents"] if e["ph"] == "X") == pairs  # every request drawn
    assert sum(1 for e in doc["traceEvents"] if e["ph"] == "s") > pairs // 2  # most have an arrow


def trace_processor_or_skip():
    try:
        from perfetto.trace_processor import TraceProcessor, TraceProcessorConfig
    except ImportError:
        pytest.skip("perfetto is not installed")
    return TraceProcessor, TraceProcessorConfig


def test_perfetto_trace_processor_accepts_it(sim_trace, tmp_path):
    """Perfetto's own importer: nothing dropped, every slice and flow there. Needs its
    trace_processor_shell binary (downloaded on first use); skipped where it cannot be had."""
    TraceProcessor, TraceProcessorConfig = trace_processor_or_skip()
    path = tmp_path / "trace.perfetto.json"
    doc = perfetto(sim_trace)
    path.write_text(json.dumps(doc))
    try:
        tp = TraceProcessor(trace=str(path), config=TraceProcessorConfig(load_timeout=20))
    except Exception as exc:  # noqa: BLE001 - no shell binary here and no network to fetch one
        pytest.skip(f"trace_processor_shell unavailable: {type(exc).__name__}")
    try:
        n_slices = next(iter(tp.query("select count(*) as n from slice"))).n
        n_flows = next(iter(tp.query("select count(*) as n from flow"))).n
        errors = [
            (r.name, r.value)
            for r in tp.query(
                "select name, value from stats where value > 0 and severity in ('error', 'data_loss')"
            )
        ]
    finally:
        tp.close()
    assert errors == []
    assert n_slices == sum(1 for e in doc["traceEvents"] if e["ph"] in ("X", "i"))
    assert n_flows == sum(1 for e in doc["traceEvents"] if e["ph"] == "s")


# ---- Mermaid -----------------------------------------------------------------------------

_MM = re.compile(r"^\s+(\S+?)(-->>|->>)(\S+?): (\S+)")


def mermaid_arrows(text: str) -> list[tuple[str, str, str, str]]:
    return [m.groups() for m in map(_MM.match, text.splitlines()) if m]


def reply_before_request(arrows: list[tuple[str, str, str, str]]) -> list[tuple]:
    """Within one diagram: a reply arrow (-->>) drawn before a matching request (->>)."""
    open_req: Counter = Counter()
    bad = []
    for a, arrow, b, kind in arrows:
        if arrow == "->>":
            open_req[(a, b, kind)] += 1
        elif open_req[(b, a, kind)] > 0:
            open_req[(b, a, kind)] -= 1
        else:
            bad.append((a, arrow, b, kind))
    return bad


def test_mermaid_one_diagram_per_vm_each_under_the_limit(tmp_path):
    trace = run_session(default_topology(8, seed=2), "sim")["trace"]
    diagrams = mermaid_diagrams(trace)
    assert {f"vm{i}" for i in range(1, 9)} <= {name.split(".")[0] for name in diagrams}
    assert all(len(text) <= MERMAID_MAX for text in diagrams.values())
    assert sum(len(mermaid_arrows(text)) for text in diagrams.values()) == len(trace)
    paths = write_all(trace, str(tmp_path))
    for name, text in diagrams.items():
        assert (tmp_path / f"sequence-{name}.mmd").read_text() == text
    assert set(paths["sequence"]) == {str(tmp_path / f"sequence-{n}.mmd") for n in diagrams}


# ---- every export of a real multi-process run ------------------------------------------


_TL = re.compile(r"^\s*[\d.]+ ms\s+(\S+) (<-|->) (\S+)\s+(\S+)")


@pytest.mark.timeout(180)
def test_every_export_of_a_process_run_is_causal(tmp_path):
    session, rep = demo(vms=2, seed=1)
    assert rep["ok"], rep["steps"]["failed"]
    trace = session["trace"]
    assert causal_violations(trace) == []
    paths = write_all(trace, str(tmp_path))
    written = [json.loads(line) for line in Path(paths["trace"]).read_text().splitlines()]
    assert causal_violations(written) == []
    for path in paths["sequence"]:
        assert reply_before_request(mermaid_arrows(Path(path).read_text())) == []
    assert perfetto_violations(json.loads(Path(paths["perfetto"]).read_text())) == []
    for _title, lines in timeline(trace):
        arrows = []
        for line in lines:
            a, arrow, b, kind = _TL.match(line).groups()
            # a timeline line reads "requester -> responder" for requests and
            # "requester <- responder" for replies
            arrows.append((a, "->>", b, kind) if arrow == "->" else (b, "-->>", a, kind))
        assert reply_before_request(arrows) == []
