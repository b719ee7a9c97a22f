"""The first-level walk of both implementations against unicorn's x86-64 MMU (QEMU's TCG).

hotpath/mmu_differential.py builds the random worlds and runs each access on both sides;
this CI-sized run must find no difference beyond the documented ones
(mmu_differential.reference_quirk). benchmarks/bench_mmu_differential.py is the long run.
"""

import pytest

from vsva import hotpath
from vsva.hotpath import _pure

unicorn = pytest.importorskip("unicorn")
IMPLS = [("python", hotpath.PureIommu)] + (
    [("compiled", hotpath.CompiledIommu)] if hotpath.compiled_available() else []
)

from vsva.hotpath import mmu_differential as mmu  # noqa: E402


@pytest.fixture(scope="module")
def reference():
    return mmu.Reference()


@pytest.mark.parametrize("cls", [c for _, c in IMPLS], ids=[n for n, _ in IMPLS])
def test_walk_agrees_with_an_independent_mmu(cls, reference):
    report = mmu.run(cls, seed=2026, worlds=10, accesses=150, reference=reference)
    assert report.cases == 10 * 2 * 150
    assert not report.differences, "\n".join(map(str, report.differences[:10]))
    # every outcome class was exercised for every access kind (the run is not vacuous)
    for name, _, _ in mmu.KINDS:
        assert report.by_outcome.get(f"{name} ok", 0) > 0, name
        for kind in ("not-present", "reserved", "non-canonical"):
            assert report.by_outcome.get(f"{name} fault:{kind}", 0) > 0, (name, kind)
    for name in ("user-read", "user-write", "user-exec", "sup-write", "sup-exec"):
        assert report.by_outcome.get(f"{name} fault:permission", 0) > 0, name


def test_the_check_catches_a_walker_without_the_supervisor_fetch_rule(monkeypatch, reference):
    """Drop one rule (supervisor fetch from a user page) from the twin: the reference sees it."""

    def without_smep(access, flags, all_rw, all_us, any_xd):
        return _rights_fault(
            access & ~mmu.ACCESS_EXEC if access & mmu.ACCESS_PRIV else access, flags, all_rw, all_us, any_xd
        )

    _rights_fault = _pure._rights_fault
    monkeypatch.setattr(_pure, "_rights_fault", without_smep)
    report = mmu.run(_pure.Iommu, seed=7, worlds=4, accesses=150, reference=reference)
    assert report.differences
    assert {d.kind for d in report.differences} == {"sup-exec"}
