"""A run's files are named after the process that owns them, so that a dead owner's are found.

A run leaves two things on the system while it lives: its run directory
(`<tmp>/vsva-<pid>.<start>.<pidns>-<random>`, 0700) and its shared memory
(`/dev/shm/vsva-<pid>.<start>.<pidns>-<random>.mem`), where <pid> and <start> are the owner's
pid and its start time (field 22 of /proc/<pid>/stat, clock ticks since boot: with the pid it
names one process for the whole uptime, pid reuse included) and <pidns> the inode of its PID
namespace. A pid means something only in its own namespace (a container or `unshare --pid`
may share /tmp and /dev/shm with the host), so a sweep judges only its own namespace's runs. The owner removes both when it closes
(vsva.ops.launcher). An owner that is SIGKILLed, or loses its machine state otherwise, cannot;
`sweep()` (run by every `vsva` command) removes the runs of this user whose owner is gone,
after exporting a run's trace to the `trace_out` its run.json names.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

PREFIX = "vsva-"
SHM_DIR = "/dev/shm"
_RUN = re.compile(r"^vsva-(\d+)\.(\d+)\.(\d+)-[a-z0-9_]+$")
_SHM = re.compile(r"^(vsva-\d+\.\d+\.\d+-[a-z0-9_]+)\.mem$")


def start_time(pid: int) -> int | None:
    """The start time of process `pid` (clock ticks since boot), None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def pid_namespace() -> int:
    """The inode of this process's PID namespace."""
    return os.stat("/proc/self/ns/pid").st_ino


def owner_tag(pid: int | None = None) -> str:
    """ "<pid>.<start time>.<pid namespace>" of this process (or of `pid`, seen from here)."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}.{start_time(pid)}.{pid_namespace()}"


def make_run_dir(base_dir: str | None = None) -> str:
    """A fresh private run directory owned by this process."""
    path = tempfile.mkdtemp(prefix=f"{PREFIX}{owner_tag()}-", dir=base_dir)
    os.chmod(path, 0o700)
    return path


def shm_path(run_dir: str) -> str:
    """The shared-memory file of the run whose directory is `run_dir`."""
    return os.path.join(SHM_DIR, os.path.basename(run_dir) + ".mem")


def owner_alive(name: str) -> bool | None:
    """Whether the owner named in a run's file name lives; None for a name not made here or
    made in another PID namespace (its pids cannot be checked from this one)."""
    m = _RUN.match(name)
    if m is None or int(m.group(3)) != pid_namespace():
        return None
    return start_time(int(m.group(1))) == int(m.group(2))


def sweep(base_dir: str | None = None) -> list[str]:
    """Remove every run directory and shared-memory file of this user whose owner is dead;
    returns what was removed. A run directory's trace goes to its `trace_out` first."""
    removed = []
    base = base_dir or tempfile.gettempdir()
    for entry in _entries(base):
        path = os.path.join(base, entry)
        if owner_alive(entry) is False and _mine(path) and os.path.isdir(path):
            remove_run_dir(path)
            removed.append(path)
    for entry in _entries(SHM_DIR):
        m = _SHM.match(entry)
        path = os.path.join(SHM_DIR, entry)
        if m and owner_alive(m.group(1)) is False and _mine(path):
            try:
                os.unlink(path)
                removed.append(path)
            except FileNotFoundError:
                pass
    return removed


def remove_run_dir(path: str) -> None:
    """Remove a dead run's directory, its trace exported to its `trace_out` first."""
    _export_trace(path)
    shutil.rmtree(path, ignore_errors=True)


def _entries(directory: str) -> list[str]:
    try:
        return [e for e in os.listdir(directory) if e.startswith(PREFIX)]
    except OSError:
        return []


def _mine(path: str) -> bool:
    try:
        return os.lstat(path).st_uid == os.getuid()
    except OSError:
        return False


def _export_trace(run_dir: str) -> None:
    """A killed run's trace, kept where its owner was asked to write it."""
    from vsva.analysis import export, trace

    try:
        with open(os.path.join(run_dir, "run.json")) as f:
            out = json.load(f).get("trace_out")
        if out:
            export.write_all(trace.load(run_dir), out)
    except (OSError, ValueError, AttributeError):
        pass  # no run.json yet, or an unusable one: nothing to keep
