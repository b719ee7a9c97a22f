"""`vsva explore`: seeded interleavings find the free-before-unbind hazard under naive only."""

from __future__ import annotations

import pytest

from vsva.ops.demo import report, run_session
from vsva.ops.topology import default_topology

SEEDS = range(1, 13)


def _failing(policy: str) -> list[int]:
    bad = []
    for seed in SEEDS:
        topology = default_topology(2, seed=seed, policy=policy, workload="churn", iterations=6)
        if not report(run_session(topology, "sim"), topology, "sim")["ok"]:
            bad.append(seed)
    return bad


def test_naive_churn_fails_on_some_interleavings_and_replays_exactly() -> None:
    bad = _failing("naive")
    assert bad, "no interleaving showed naive's hazard"
    topology = default_topology(2, seed=bad[0], policy="naive", workload="churn", iterations=6)
    first = report(run_session(topology, "sim"), topology, "sim")
    again = report(run_session(topology, "sim"), topology, "sim")
    assert not first["ok"] and first["steps"]["failed"] == again["steps"]["failed"]
    assert first["audit"]["violations"] == again["audit"]["violations"]


@pytest.mark.parametrize("policy", ["ordered", "reclaim"])
def test_safe_policies_pass_every_interleaving(policy: str) -> None:
    assert _failing(policy) == []
