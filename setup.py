"""Build hook: compiles the DMA translation hot path (hotpath/_translate.pyx).

The metadata lives in pyproject.toml; this file only declares the extension so that
`pip install .` always compiles it (Cython is a build requirement).
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "vsva.hotpath._translate",
        ["hotpath/_translate.pyx"],
        extra_compile_args=["-O2"],
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    )
)
