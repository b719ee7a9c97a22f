"""The host's CPU per message, per message kind, on the deterministic runtime, next to a
msgpack round trip of the same message measured in the same run.

`--vms` VMs boot on the deterministic runtime (vsva.runtime.sim: every actor real, each
envelope round-tripped through msgpack as on a socket); then every guest runs the
`bind_latency` workload at once (bind one PASID, unbind it, `--iterations` times) and each
`Host.deliver` of that window is timed on its own, interleaved with the other actors as
the scheduler orders them. Just before each one, a msgpack round trip of the same envelope's
wire map (`unpackb(packb(...))`, no vsva code) is timed too: the baseline. A host reply that is not a success stops the run (the figures
are the success path's).

Kinds: the vmm's bind_gpasid and unbind_gpasid, and the notifier acks of kvm and vdcm to
the host's ioasid_notify, split in the ack the handler still waits past (nothing to send)
and the one that resumes it (it sends its reply). Per kind: the median (robust to
preemption on a loaded machine), the mean (which also holds the garbage collector's share
and preemptions), and the median over the baseline's median. `all`: the kinds' medians
weighted by how many of each the host took in (the bind loop's mix), and the same for the
baseline. Each figure is the median of `--repeats` runs, with the min-max.

    python benchmarks/bench_host_handlers.py [--vms 8] [--iterations 150] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from typing import Any

from msgpack import packb, unpackb

from vsva.actors.base import Steps
from vsva.actors.messages import Envelope
from vsva.ops.control import Orchestrator
from vsva.ops.topology import HOST, Topology, default_topology
from vsva.runtime.sim import SimRuntime

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_bind import print_figures

WAITS, RESUMES = "ioasid_notify ack (waits)", "ioasid_notify ack (resumes)"
KINDS = ("bind_gpasid", "unbind_gpasid", WAITS, RESUMES)


class _Window(Orchestrator):
    """Boot every VM, then run every workload at once; `timing` is on in between."""

    def __init__(self, topology: Topology, rt: SimRuntime):
        super().__init__(topology, rt.env({"request_timeout": topology.request_timeout}))
        self.timing = False
        self.done = False

    def on_start(self) -> Steps[None]:
        vms = self.topology.vms
        yield from self.boot(vms)
        self.timing = True
        yield from self.workloads(vms)
        self.timing = False
        self.done = True


def _kind(env: Envelope, out: list[Envelope]) -> str:
    if not env.is_reply:
        return env.kind
    return RESUMES if out else WAITS


def measure(vms: int, iterations: int) -> dict[str, float]:
    topology = default_topology(vms, workload="bind_latency", iterations=iterations)
    rt = SimRuntime(topology)
    window = rt.add(_Window(topology, rt))
    host = rt.actors[HOST]
    deliver, clock = host.deliver, time.perf_counter_ns
    samples: defaultdict[str, list[int]] = defaultdict(list)
    baseline: defaultdict[str, list[int]] = defaultdict(list)

    def timed(env: Envelope, now: float) -> list[Envelope]:
        if not window.timing:
            return deliver(env, now)
        wire = env.to_wire()
        t0 = clock()
        unpackb(packb(wire))
        t1 = clock()
        out = deliver(env, now)
        t2 = clock()
        kind = _kind(env, out)
        samples[kind].append(t2 - t1)
        baseline[kind].append(t1 - t0)
        failed = [e for e in out if e.is_reply and e.body.get("ret")]
        if failed:
            sys.exit(f"the host refused {env.kind}: {failed[0].body}")
        return out

    host.deliver = timed  # type: ignore[method-assign]
    rt.start()
    rt.run(until=lambda: window.done)
    figures: dict[str, float] = {}
    for kind in KINDS:
        if not samples[kind]:
            sys.exit(f"no {kind} reached the host")
        median = statistics.median(samples[kind]) / 1e3
        figures[f"{kind} median_us"] = median
        figures[f"{kind} mean_us"] = statistics.fmean(samples[kind]) / 1e3
        figures[f"{kind} over_msgpack_roundtrip"] = median / (statistics.median(baseline[kind]) / 1e3)
    count = sum(len(samples[kind]) for kind in KINDS)
    mixed = sum(statistics.median(samples[kind]) * len(samples[kind]) for kind in KINDS) / count / 1e3
    floor = sum(statistics.median(baseline[kind]) * len(baseline[kind]) for kind in KINDS) / count / 1e3
    figures["all median_us"] = mixed
    figures["all over_msgpack_roundtrip"] = mixed / floor
    return figures


def summarise(runs: list[dict[str, float]]) -> dict[str, Any]:
    """Each figure's median over the repeats, with its min-max."""
    figures: dict[str, Any] = {}
    for key in runs[0]:
        values = [r[key] for r in runs]
        figures[key] = round(statistics.median(values), 2)
        if min(values) != max(values):
            figures[f"{key} min-max"] = f"{min(values):.2f}-{max(values):.2f}"
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    load0 = os.getloadavg()[0]
    figures = summarise([measure(args.vms, args.iterations) for _ in range(args.repeats)])
    figures["load_average_1min"] = f"{load0:.1f} -> {os.getloadavg()[0]:.1f}"
    print_figures(figures, args.json)


if __name__ == "__main__":
    main()
