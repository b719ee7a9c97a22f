"""Keep every CPU out of its idle state while a benchmark measures (the benchmarks' `--awake`).

On a virtual machine an idle vCPU halts, and waking it again costs the hypervisor's exit and
re-entry, and often the physical core's caches, which other guests used meanwhile. A chain
of processes that sleep between messages pays that at every hop, where a ping-pong between
two processes (the raw round trip the bind benchmarks compare with) pays it far less often:
on the 2-vCPU machine of README's figures the raw round trip moved between ~40 and ~210 us,
and the bind with it, depending on what else kept the vCPUs busy. One SCHED_IDLE spinner per
CPU keeps the vCPUs running, the effect of booting with idle=poll: it takes nothing from the
measured processes, since any runnable thread of a normal policy preempts a SCHED_IDLE one at
once and outweighs it 1024 to 3 when both run. Both sides of a same-run ratio run under it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator

_SPINNER = """
import os, sys
os.sched_setaffinity(0, {int(sys.argv[1])})
os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
print("spinning", flush=True)
while True:
    pass
"""


@contextlib.contextmanager
def cpus_awake(enabled: bool = True) -> Iterator[None]:
    """With `enabled`, one SCHED_IDLE busy loop pinned to each CPU this process may use, for
    the duration of the block (all killed and reaped at its end, whatever happens)."""
    if not enabled:
        yield
        return
    spinners = [
        subprocess.Popen([sys.executable, "-c", _SPINNER, str(cpu)], stdout=subprocess.PIPE, text=True)
        for cpu in sorted(os.sched_getaffinity(0))
    ]
    try:
        for spinner in spinners:
            if spinner.stdout is None or spinner.stdout.readline() != "spinning\n":
                raise RuntimeError("a CPU spinner did not start (SCHED_IDLE refused?)")
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
