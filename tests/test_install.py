"""Installing without a C compiler works, as the README says: the extensions are optional, the
install goes on, and the pure-Python twins run (vsva.hotpath.IMPLEMENTATION and
vsva.runtime.frames.IMPLEMENTATION == "python").
A throwaway venv over this checkout; pip works offline here (the build requirements, Cython
among them, come from the site packages of the environment running the tests, which the
throwaway venv sees through a .pth file: the base interpreter's need not have them; the
dependencies are not fetched)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def site_packages(venv: Path) -> Path:
    (found,) = venv.glob("lib/python*/site-packages")
    return found


@pytest.mark.timeout(300)
def test_install_without_a_compiler_falls_back_to_pure_python(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    ours = {sysconfig.get_paths()[key] for key in ("purelib", "platlib")}
    (site_packages(venv) / "testing-env.pth").write_text("".join(f"{path}\n" for path in sorted(ours)))
    src = tmp_path / "src"  # a copy: the checkout's own build products must not be picked up
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".git", "build", "*.so", "*.c", "*.egg-info", "__pycache__", ".hypothesis", ".pytest_cache"
        ),
    )
    env = {**os.environ, "CC": "/bin/false", "CXX": "/bin/false", "PIP_NO_INDEX": "1"}
    env.pop("VSVA_PUREPYTHON", None)
    done = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--no-build-isolation", "--no-deps", str(src)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    probe = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import vsva, vsva.hotpath as h, vsva.runtime.frames as f; "
            "print(vsva.__file__, h.IMPLEMENTATION, f.IMPLEMENTATION)",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=True,
    )
    where, hotpath, frames = probe.stdout.split()
    assert where.startswith(str(venv)) and hotpath == frames == "python"
