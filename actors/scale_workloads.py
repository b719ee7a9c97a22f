"""Workloads the scale experiments compose (`vsva scale`, orchestrator/scale/experiments).

phases     run other workloads one after another, config "phases" = [[name, iterations], ...],
           recording each phase's start and end on the guest's clock (t0, t1) and the epoch
           time at its start (wall0): actor clocks are per process, so that pair is what lets
           an experiment put every guest's times (phases, bind starts) on one time line.
inv_flood  the noisy neighbour: bind one PASID on the passthrough function and issue
           `iterations` whole-PASID IOTLB + device-TLB invalidations (F3 without an address),
           each followed by a wait, back to back; their latencies are recorded.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from vsva.actors.base import Steps
from vsva.actors.catalogue import QiSubmit

if TYPE_CHECKING:
    from vsva.actors.guest.actor import Guest


def phases(g: Guest) -> Steps[None]:
    from vsva.actors.guest import WORKLOADS

    saved = g.config.get("iterations")
    for name, iterations in g.config.get("phases", []):
        g.config["iterations"] = iterations
        t0, wall0, first = g.now, time.time(), len(g.steps)
        yield from WORKLOADS[name](g)
        failed = sum(1 for s in g.steps[first:] if not s["ok"])
        g.steps.append(
            {
                "flow": "bench",
                "what": "phase",
                "ok": True,
                "ret": 0,
                "check": True,
                "phase": name,
                "t0": t0,
                "t1": g.now,
                "wall0": wall0,
                "steps": len(g.steps) - first,
                "failed": failed,
            }
        )
    g.config["iterations"] = saved


def inv_flood(g: Guest) -> Steps[None]:
    proc = g.booted_kernel.spawn(1)
    pf = next(d for d in g.pasid_dirs if d not in g.mdevs)
    pasid = yield from g.alloc_pasid(proc, pf)
    if not pasid or (yield from g.bind(proc, pf, pasid))["ret"]:
        return
    latencies: list[float] = []
    for _ in range(int(g.config.get("iterations", 100))):
        started = g.now
        whole = {"dev": pf, "gpasid": pasid}  # no address: every entry of the PASID
        reply = yield from g.flow_request(
            "F3",
            g.vmm,
            QiSubmit(descs=[{"type": "piotlb", **whole}, {"type": "dev_iotlb", **whole}, {"type": "wait"}]),
        )
        latencies.append(g.now - started)
        if not g.step("F3", f"pid 1 whole-PASID flush {pf} PASID {pasid}", reply):
            break
    g.steps.append(
        {
            "flow": "bench",
            "what": "invalidation latencies",
            "ok": True,
            "ret": 0,
            "check": True,
            "latencies": latencies,
        }
    )
    yield from g.unbind(proc, pf, pasid)
    yield from g.free(proc, pf, pasid)


SCALE_WORKLOADS = {"phases": phases, "inv_flood": inv_flood}
