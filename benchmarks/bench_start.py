"""Start-up at scale: the time until N VMs are ready, next to the time to start as many bare
interpreters importing the same modules, measured in the same run; and what each actor
process costs in memory.

For each N: the launcher starts the default N-VM topology (2N + 3 actor processes, forked by
the fork server unless VSVA_NO_FORKSERVER=1) and the time from `Launcher.start` to every
actor ready is taken; then 2N + 3 interpreters are started, each importing zmq, msgpack and numpy
(`BARE`, the issue's baseline: a subset of what an actor imports, so the ratio is
conservative) and printing a line, and the time until all have printed is taken. They start
`--bare-window` at a time (default: the launcher's power-on window, 16), a new one as soon
as one has printed: 515 interpreters started at once (256 VMs) thrash two cores for many
minutes, which would flatter the ratio; bounded, the baseline is as fast as this machine
starts interpreters. The ratio is the first over the second. While the topology runs,
the PSS of every actor process (/proc/PID/smaps_rollup: shared pages count divided among
the processes sharing them, so the fork server's pages are spread over all of them) is
read: the median over the guest and vmm processes, and the host's.

Both sides import bytecode compiled beforehand, as an installed package's modules are: the
baseline's modules come with theirs from pip, and vsva's (an editable install's sources) are
compiled once into a private cache (PYTHONPYCACHEPREFIX, a temporary directory) by an untimed
warm-up of each side, which also brings every file into the page cache. With
PYTHONDONTWRITEBYTECODE set, as on this project's machines, the zygote would otherwise compile
every vsva module from source at each start (~50 ms at 32 VMs); `--from-source` measures that.

    python benchmarks/bench_start.py [--vms 32,128,256] [--repeats 3] [--from-source] [--json]
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from vsva.ops.launcher import Launcher
from vsva.ops.pacing import POWER_ON_WINDOW
from vsva.ops.topology import PER_VM_KINDS, default_topology

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_bind import print_figures


def pss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def launch(vms: int) -> dict[str, Any]:
    """Ready time of the N-VM topology, and its processes' PSS."""
    topology = default_topology(vms)
    started = time.monotonic()
    with Launcher(topology) as launcher:
        ready = time.monotonic() - started
        vm_pss = [pss_kb(launcher.pid(a.name)) for a in topology.actors if a.kind in PER_VM_KINDS]
        host_pss = pss_kb(launcher.pid("host"))
        zygote = pss_kb(launcher.forkserver.pid) if launcher.forkserver else 0
        processes = len(topology.actors)
    return {
        "ready_s": ready,
        "vm_pss_mb": statistics.median(vm_pss) / 1024,
        "host_pss_mb": host_pss / 1024,
        "zygote_pss_mb": zygote / 1024,
        "processes": processes,
    }


BARE = ("zmq", "msgpack", "numpy")


def interpreters(count: int, window: int) -> float:
    """Seconds until `count` interpreters have each imported BARE, at most `window` starting
    at a time (a new one as soon as one has printed; 0: all at once)."""
    code = f"import {', '.join(BARE)}; print('ready', flush=True)"
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    window = window or count
    started = time.monotonic()
    procs: list[subprocess.Popen] = []
    running: dict[int, subprocess.Popen] = {}
    poller = select.poll()
    try:
        while len(procs) < count or running:
            while len(procs) < count and len(running) < window:
                proc = subprocess.Popen(
                    [sys.executable, "-c", code], stdout=subprocess.PIPE, env=env, stdin=subprocess.DEVNULL
                )
                procs.append(proc)
                running[proc.stdout.fileno()] = proc
                poller.register(proc.stdout.fileno(), select.POLLIN)
            for fd, _ in poller.poll(60_000):
                proc = running.pop(fd)
                poller.unregister(fd)
                if proc.stdout.readline() != b"ready\n":
                    raise RuntimeError(f"interpreter {proc.pid} failed")
        return time.monotonic() - started
    finally:
        for proc in procs:
            proc.wait(60)
            proc.stdout.close()


def spread(values: list[float], digits: int = 3) -> str:
    return (
        f"{round(statistics.median(values), digits)} "
        f"({round(min(values), digits)}-{round(max(values), digits)})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", default="32,128,256")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--bare-window",
        type=int,
        default=POWER_ON_WINDOW,
        help="bare interpreters starting at a time (default: as many as the launcher powers on; 0: all)",
    )
    parser.add_argument(
        "--from-source",
        action="store_true",
        help="keep the environment's bytecode setting (with PYTHONDONTWRITEBYTECODE: compile vsva at each start)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    cache = None if args.from_source else tempfile.mkdtemp(prefix="vsva-bench-pyc-")
    if cache is not None:  # inherited by the fork server and by the bare interpreters
        os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
        os.environ["PYTHONPYCACHEPREFIX"] = cache
    figures: dict[str, Any] = {
        "fork_server": os.environ.get("VSVA_NO_FORKSERVER") != "1",
        "bare_window": args.bare_window,
        "bytecode": "from source" if cache is None else "compiled once (warm-up)",
    }
    try:
        launch(1)  # the warm-up of each side: not counted
        interpreters(1, 1)
        measure(args, figures)
    finally:
        if cache is not None:
            shutil.rmtree(cache, ignore_errors=True)
    print_figures(figures, args.json)


def measure(args: argparse.Namespace, figures: dict[str, Any]) -> None:
    """Each N of `--vms`, `--repeats` times: the launch, then the baseline."""
    for vms in [int(v) for v in args.vms.split(",")]:
        ours, bare, ratio, pss, host = [], [], [], [], []
        for _ in range(args.repeats):
            run = launch(vms)
            base = interpreters(run["processes"], args.bare_window)
            ours.append(run["ready_s"])
            bare.append(base)
            ratio.append(run["ready_s"] / base)
            pss.append(run["vm_pss_mb"])
            host.append(run["host_pss_mb"])
        figures[f"vms{vms}_processes"] = run["processes"]
        figures[f"vms{vms}_ready_s"] = spread(ours)
        figures[f"vms{vms}_interpreters_s"] = spread(bare)
        figures[f"vms{vms}_ratio"] = spread(ratio)
        figures[f"vms{vms}_vm_actor_pss_mb"] = spread(pss, 2)
        figures[f"vms{vms}_host_pss_mb"] = spread(host, 1)
        figures[f"vms{vms}_zygote_pss_mb"] = round(run["zygote_pss_mb"], 2)
        figures[f"vms{vms}_load_average_1min"] = round(os.getloadavg()[0], 1)


if __name__ == "__main__":
    main()
