"""What a result was measured on: recorded with every point, so numbers stay comparable."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from functools import lru_cache
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(repo: str = REPO) -> str:
    """The checkout's commit (with `+dirty` when the tree has changes), or "unknown"."""
    try:
        head = subprocess.run(
            ["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + ("+dirty" if dirty else "")) if head else "unknown"


@lru_cache(maxsize=1)
def environment() -> dict[str, Any]:
    """CPU model, core count, Python, pyzmq, libzmq, msgpack, the hot path's and the runtime's
    frames' implementations, commit."""
    import msgpack
    import zmq

    from vsva import hotpath
    from vsva.runtime import frames

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count() or 0,
        "python": platform.python_version(),
        "pyzmq": zmq.pyzmq_version(),
        "libzmq": zmq.zmq_version(),
        "msgpack": ".".join(map(str, msgpack.version)),
        "hotpath": hotpath.IMPLEMENTATION,
        "frames": frames.IMPLEMENTATION,
        "git": git_commit(),
        "node": platform.node(),
        "executable": sys.executable,
    }


def sample() -> dict[str, Any]:
    """The environment plus the machine's 1-minute load average now (a loaded machine's
    figures are not comparable with an idle one's; the row says which it was)."""
    return {**environment(), "load1": round(os.getloadavg()[0], 2)}
