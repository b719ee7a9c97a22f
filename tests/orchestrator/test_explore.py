"""`vsva explore`: seeded interleavings find the free-before-unbind hazard under naive only."""

from __future__ import annotations

import pytest

from vsva.ops.demo import hazards, report, run_session
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


@pytest.mark.parametrize("kernel", ["v11", "v5.9"])
def test_naive_hazard_is_named_under_both_kernels(kernel: str) -> None:
    """With the kernel's entry check (intel_pasid_setup_nested: a present entry is -EBUSY) the
    next owner's bind on the shared parent is refused while the old owner's entry still
    stands: explore names that, under either semantics."""
    found = set()
    for seed in SEEDS:
        topology = default_topology(
            2, seed=seed, policy="naive", kernel=kernel, workload="churn", iterations=6
        )
        found |= set(hazards(report(run_session(topology, "sim"), topology, "sim")))
    assert any("-EBUSY" in h and "still present" in h for h in found), found
