"""What one machine can hold: a topology is refused before anything starts when it needs
more file descriptors, memory, shared memory or processes than there are.

The figures per actor were measured on a 128-VM topology started through the fork server
(notes of issue 13): a guest or vmm process costs ~4.5 MB PSS and ~35 descriptors; the host,
kvm, vdcm and the launcher hold ~4-6 descriptors per peer (a DEALER, its monitor, their
mailboxes, the inbound connection; the launcher a pidfd too) and the host ~0.2 MB per VM.
The estimates below round those up; a refusal names the limit and both numbers.

The run directory is made under $TMPDIR (vsva.ops.runfiles.make_run_dir) and holds the ipc
sockets, `<run_dir>/<name>.sock`: a path longer than a Unix socket address holds (IPC_PATH_MAX)
cannot be bound, so a $TMPDIR too long for the topology's longest name is refused up front.
"""

from __future__ import annotations

import os
import resource
import tempfile

from vsva.hotpath.layout import PAGE_SIZE
from vsva.ops.topology import Topology

MAX_VMS = 256
FDS_PER_PEER = 8  # measured 4-6 (see the module docstring), with headroom
FDS_BASE = 256  # log and trace files, the poll, signal pipes, the zygote socket
MB_PER_ACTOR = 8  # guest / vmm PSS beyond the fork server's pages (measured ~4.5)
MB_PER_VM_SHARED = 1  # host, kvm, vdcm: their tables per VM (host ~0.2 MB measured)
MB_BASE = 512  # host, kvm, vdcm, launcher, zygote at zero VMs
SHM_DIR = "/dev/shm"
IPC_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) on Linux, less its terminating NUL
# The run directory's name past its parent: "vsva-<pid>.<start time>.<pid namespace>-<random>"
# (runfiles.make_run_dir) at its longest: a 7-digit pid (pid_max at most 4194304), a start time
# of 12 digits (clock ticks since boot: 300 years at 100 Hz), a 10-digit (32-bit) namespace
# inode, mkdtemp's 8 random characters.
RUN_DIR_NAME_MAX = len("vsva-") + 7 + 1 + 12 + 1 + 10 + 1 + 8
SOCKETS = ("orch", "orch-ctl", "ctl")  # the launcher's and the supervisor's, beside the actors'


class CapacityError(ValueError):
    """The topology does not fit this machine; the message names the limit."""


def raise_fd_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit (children inherit it);
    returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def needs(topology: Topology) -> dict[str, int]:
    """What the topology needs: descriptors of the busiest process (the launcher and the
    host talk to every actor), memory in MB, shared memory in bytes, processes. The shared
    memory counts in the memory too: the host zeroes every frame of a VM's RAM as it opens
    the VM, so the whole file becomes resident, and tmpfs pages are RAM (a /dev/shm as large
    as RAM took a topology that did not fit it)."""
    actors = len(topology.actors)
    vms = len(topology.vms)
    shm = topology.mem_frames * PAGE_SIZE
    return {
        "fds": FDS_BASE + FDS_PER_PEER * (actors + 1),
        "memory_mb": MB_BASE + MB_PER_ACTOR * actors + MB_PER_VM_SHARED * 3 * vms + (shm >> 20),
        "shm_bytes": shm,
        "processes": actors + 1,
    }


def limits() -> dict[str, int]:
    """What this machine offers now."""
    st = os.statvfs(SHM_DIR)
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[0]
    return {
        "fds": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "memory_mb": _mem_available_mb(),
        "shm_bytes": st.f_bavail * st.f_frsize,
        "processes": nproc if nproc != resource.RLIM_INFINITY else 1 << 30,
    }


def check(topology: Topology, base_dir: str | None = None) -> None:
    """Raise CapacityError naming the first limit the topology exceeds; `base_dir` is where
    its run directory will be made (default: the temporary directory, $TMPDIR)."""
    vms = len(topology.vms)
    if vms > MAX_VMS:
        raise CapacityError(f"{vms} VMs; at most {MAX_VMS}")
    _check_socket_paths(topology, base_dir)
    need, have = needs(topology), limits()
    why = {  # /dev/shm before memory, which includes it: the narrower limit is named
        "fds": "file descriptors per process (RLIMIT_NOFILE, hard limit)",
        "shm_bytes": f"bytes free in {SHM_DIR} for the shared-memory file",
        "memory_mb": "MB of available memory (MemAvailable)",
        "processes": "processes (RLIMIT_NPROC)",
    }
    for key, what in why.items():
        if need[key] > have[key]:
            raise CapacityError(f"{vms} VMs need about {need[key]} {what}; this machine has {have[key]}")


def _check_socket_paths(topology: Topology, base_dir: str | None) -> None:
    """The longest ipc socket path of the run must fit a Unix socket address."""
    base = os.path.abspath(base_dir or tempfile.gettempdir())
    name = max([*SOCKETS, *(a.name for a in topology.actors)], key=len)
    longest = len(os.path.join(base, "x" * RUN_DIR_NAME_MAX, f"{name}.sock"))
    if longest > IPC_PATH_MAX:
        where = "the run directory's parent" if base_dir else "TMPDIR"
        raise CapacityError(
            f"{where} {base} is too long ({len(base)} characters): the run's ipc socket paths "
            f"(up to {longest} characters, for {name}.sock) exceed the {IPC_PATH_MAX} of a Unix "
            f"socket address; use one of at most {len(base) - (longest - IPC_PATH_MAX)} characters"
        )


def _mem_available_mb() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 1 << 30  # unknown: do not refuse on memory
