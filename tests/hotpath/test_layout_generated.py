"""The compiled module's constants are generated from hotpath/layout.py, never restated."""

import subprocess
import sys
from pathlib import Path

from vsva.hotpath import gen_layout, layout

HOTPATH = Path(gen_layout.__file__).resolve().parent


def test_committed_constants_are_current():
    """Fails when layout.py changed and `python hotpath/gen_layout.py` was not run."""
    assert gen_layout.stale() == []
    r = subprocess.run(
        [sys.executable, str(HOTPATH / "gen_layout.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout


def test_every_layout_integer_is_in_the_header():
    header = gen_layout.render_header()
    for name in ("FL_XD", "FAULT_FL_RESERVED", "PERM_FL_SUPV", "PASID_CACHE_WAYS"):
        assert f"#define VS_{name} {getattr(layout, name):#x}ULL" in header
    for i, name in enumerate(layout.COUNTER_NAMES):
        assert f"#define VS_C_{name.upper()} {i}\n" in header


def test_no_constant_restated_in_the_compiled_sources():
    """The .pyx/.pxi/.h sources name layout constants only through the generated VS_ names."""
    for path in sorted(HOTPATH.glob("_*.p*")) + sorted(HOTPATH.glob("_*.h")):
        if path.name.startswith("_layout") or path.suffix not in (".pyx", ".pxi", ".h"):
            continue
        text = path.read_text()
        for restated in ("0x000FFFFFFFFFF000", "0x9E3779B97F4A7C15", "cdef enum:\n    PG_"):
            assert restated not in text, (path.name, restated)
