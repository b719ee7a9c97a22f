"""Build hook: compiles the DMA translation hot path (hotpath/_translate.pyx), the
bench's bare baselines (hotpath/_baselines.pyx) and the runtime's ROUTER receive loop
(orchestrator/runtime/_frames.pyx).

The metadata lives in pyproject.toml; this file only declares the extensions so that
`pip install .` compiles them (Cython is a build requirement). The constants both
include (hotpath/_layout.pxi, hotpath/_layout.h) are regenerated from hotpath/layout.py
first, so a build never uses stale ones. The extensions are optional: where they cannot be
compiled (no C compiler) the install goes on with a warning and vsva.hotpath runs its
pure-Python twin (vsva.hotpath.IMPLEMENTATION == "python"), as vsva.runtime.frames does.
"""

import runpy
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

HOTPATH = Path(__file__).resolve().parent / "hotpath"
runpy.run_path(str(HOTPATH / "gen_layout.py"))["write"]()

extensions = [
    Extension(
        f"vsva.hotpath.{name}",
        [f"hotpath/{name}.pyx"],
        include_dirs=["hotpath"],
        depends=[str(p) for p in HOTPATH.glob("_*.h")] + [str(p) for p in HOTPATH.glob("_*.pxi")],
        extra_compile_args=["-O3"],
    )
    for name in ("_translate", "_baselines")
] + [
    # the runtime's ROUTER receive loop (vsva.runtime.frames); it calls pyzmq's libzmq
    # through addresses found at import, so it links no libzmq of its own
    Extension("vsva.runtime._frames", ["orchestrator/runtime/_frames.pyx"], extra_compile_args=["-O3"])
]

compiled = cythonize(
    extensions,
    language_level=3,
    compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
)
for ext in compiled:  # set here: cythonize builds new Extension objects
    ext.optional = True
setup(ext_modules=compiled)
