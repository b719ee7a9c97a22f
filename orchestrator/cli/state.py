"""The state file of a live topology as the commands read it: where it is, what it says,
whether its supervisor still runs, and the cleanup of what a dead one left."""

from __future__ import annotations

import json
import os
import stat
from typing import Any

from vsva.cli.exits import EXIT_NO_TOPOLOGY, EXIT_USAGE, fail, shown
from vsva.ops.userfiles import MIB, in_the_way, read_limited

STATE_LIMIT = MIB  # a supervisor's state: its actors' pids, under 100 KB for 256 VMs
SWEPT: list[str] = []  # leftovers of dead runs this command removed (`vsva down` reports them)


class CorruptState(ValueError):
    """A state file that is not what a supervisor writes."""


class BadStateDir(ValueError):
    """A state directory that cannot be used as it is; the message names it and says why."""


def usable_state_dir(path: str) -> str:
    """`path`, made 0700 if missing, once it is a directory this user owns and can write that
    no other user can: another could put a state file there naming its own control socket and
    run directory (which `vsva down` removes), or take the lock."""
    where = shown(path, 200)
    if not path:
        raise BadStateDir("'': an empty path")
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.stat(path)
    except FileExistsError:  # something that is no directory, or a link to none
        raise BadStateDir(f"{where}: {in_the_way(path)}") from None
    except OSError as exc:
        raise BadStateDir(f"{where}: {exc.strerror}") from None
    if st.st_uid != os.getuid():
        raise BadStateDir(f"{where}: owned by uid {st.st_uid}, not by this user (uid {os.getuid()})")
    if st.st_mode & 0o022:
        raise BadStateDir(
            f"{where}: other users can write in it (mode {stat.S_IMODE(st.st_mode):04o}); `chmod go-w` it"
        )
    if not os.access(path, os.W_OK | os.X_OK):
        raise BadStateDir(f"{where}: not writable")
    return path


def state_file(state_dir: str | None) -> str:
    """The state file's path in `state_dir` (checked by --state-dir's callback), or in the
    default directory, checked here."""
    from vsva.ops.supervisor.statefile import default_state_dir, state_path

    if state_dir is None:
        try:
            state_dir = usable_state_dir(default_state_dir())
        except BadStateDir as exc:
            fail(EXIT_USAGE, f"state directory {exc}")
    return state_path(state_dir)


def parse_state(path: str) -> dict[str, Any]:
    """The state file's content; FileNotFoundError if none, CorruptState if unreadable: not a
    regular file (a directory, a link to /dev/zero), larger than STATE_LIMIT, not JSON
    (arrays nested too deeply for json's recursion)."""
    try:
        state = json.loads(read_limited(path, STATE_LIMIT).decode("utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError, RecursionError) as exc:  # UserFileError, UnicodeDecodeError too
        raise CorruptState(f"{exc}".splitlines()[0]) from None
    if (
        not isinstance(state, dict)
        or not isinstance(state.get("pid"), int)
        or not all(isinstance(state.get(k), str) for k in ("run_dir", "ctl"))
    ):
        raise CorruptState("not a supervisor's state (pid, run_dir, ctl)")
    if not _ipc_endpoint(state["ctl"]):
        raise CorruptState("ctl is not ipc:// and an absolute path of at most 107 bytes")
    if not _host_lost_record(state.get("host_lost")):
        raise CorruptState("host_lost is neither null nor a lost host's record (at, after_s, why)")
    return state


def _ipc_endpoint(ctl: str) -> bool:
    """`ctl` is an endpoint as a supervisor writes it (statefile.ctl_endpoint): anything else
    makes zmq's connect raise (an unknown scheme, a path too long for a unix socket)."""
    path = ctl.removeprefix("ipc://")
    return ctl.startswith("ipc:///") and "\0" not in path and len(path.encode()) <= 107


def _host_lost_record(lost: Any) -> bool:
    """`lost` is None or the record ops/supervisor/recovery.py writes, which host_lost_line
    formats: a time localtime() takes, a number of seconds and a reason."""
    import math
    import time

    if lost is None:
        return True
    if not isinstance(lost, dict) or not isinstance(lost.get("why"), str):
        return False
    if not all(isinstance(lost.get(k), (int, float)) and math.isfinite(lost[k]) for k in ("at", "after_s")):
        return False
    try:
        time.localtime(lost["at"])
    except (OverflowError, OSError):
        return False
    return True


def read_state(state_dir: str | None) -> dict[str, Any]:
    path = state_file(state_dir)
    try:
        return parse_state(path)
    except FileNotFoundError:
        fail(EXIT_NO_TOPOLOGY, f"no topology is running (no state file {path}); start one with `vsva up`")
    except CorruptState as exc:
        fail(EXIT_NO_TOPOLOGY, f"corrupt state file {path} ({exc}); `vsva down` removes it")


def remove_corrupt(path: str) -> None:
    """Remove a corrupt state file. One that unlink() refuses (a directory) is no file a
    supervisor wrote: left as it is, and the command ends saying so (exit 3)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        fail(
            EXIT_NO_TOPOLOGY,
            f"corrupt state file {path} cannot be removed ({exc.strerror}); remove it yourself",
        )


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def supervisor_alive(state: dict[str, Any]) -> bool:
    """The state's supervisor still runs: its pid and its start time (`owner`, which every
    supervisor writes), so neither a reused pid nor a state file naming some other live
    process (which `vsva down` would signal) passes for it."""
    from vsva.ops.runfiles import owner_tag

    if not pid_alive(state["pid"]):
        return False
    return state.get("owner") == owner_tag(state["pid"])


def unnamed_supervisor(path: str) -> int | None:
    """A supervisor of this user still running for the state file `path` (its command line
    names the file) when the file no longer names it: corrupt, or removed. It still holds the
    state directory's lock and every process of its topology, which only it can stop."""
    want = ["-m", "vsva.ops.supervisor", "--state-file", path]
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if entry.stat().st_uid != os.getuid():
                continue
            with open(os.path.join(entry.path, "cmdline"), "rb") as f:
                argv = f.read().decode("utf-8", "replace").split("\0")
        except OSError:  # gone meanwhile
            continue
        if argv[1:5] == want and pid_alive(int(entry.name)):
            return int(entry.name)
    return None


def host_lost_line(state: dict[str, Any]) -> str:
    import time

    lost = state["host_lost"]
    return (
        f"the host was lost at {time.strftime('%H:%M:%S', time.localtime(lost['at']))} "
        f"({lost['why']}, {lost['after_s']:.1f} s after the start); every VM is gone; "
        "`vsva down` clears this record"
    )


def cleanup_stale(state: dict[str, Any], path: str) -> list[str]:
    """A supervisor that died without cleaning up: its children died with it (PDEATHSIG);
    remove its shared memory and run directory (its trace exported first, if it was asked
    for), then the state file."""
    from vsva.ops.runfiles import PREFIX, SHM_DIR, remove_run_dir

    removed = []
    shm = state.get("shm")
    if (
        isinstance(shm, str)
        and os.path.dirname(shm) == SHM_DIR
        and os.path.basename(shm).startswith(PREFIX)
        and os.path.exists(shm)
    ):
        os.unlink(shm)
        removed.append(shm)
    run_dir = state.get("run_dir")
    if run_dir and os.path.isdir(run_dir) and os.path.basename(run_dir).startswith(PREFIX):
        remove_run_dir(run_dir)
        removed.append(run_dir)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return removed
