"""How long a request may take, how many go out at once, and where the ones that timed out
are shown.

A request's timeout is scaled to what it waits for. Most requests wait for one handler of
one actor: the base timeout (`request_timeout`, 5 s). The host serves every VM one message
at a time, so a request it handles waits behind whatever the other VMs have queued there:
`vfio_open` (a VM's RAM and second level: the host's longest handler) and `vfio_close`
(the F8 teardown) get `HOST_S_PER_VM` per VM of the topology on top, and the vmm's
`vm_start` / `vm_stop`, which wait for those, a base timeout more. A work descriptor
(`dev_submit`: a guest's or vdcm's wait on the host's DMA engine) gets the same as
`vfio_open`: each of its page faults is a page request in the host's one queue (`prq_depth`
entries for all VMs; while it is full the device retries until an entry frees) and a round
trip through the vmm and the guest, so when every VM faults at once it waits behind all
their requests (VMs demand-paging 4 pages each at once on a loaded 2-core machine: up to
6.3 s at the host with 128 VMs, 11.1 s with 256; a guest that gives up first has an
indefinite outcome, which the audit reports as I6). An mdev's descriptor (`mdev_submit` to vdcm) waits for vdcm's
`dev_submit`: a base timeout more. A restarted kvm's or vdcm's resync (`pasid_bindings`)
waits behind the host's queue like `vfio_open`, and its pages (at most half a frame each)
list every (PASID, device) binding the host holds, at most each VM's quota times its
devices: `HOST_S_PER_BINDING` each on top (about 3 us each on an idle machine to build,
encode, decode and load them; 49,152 at 256 VMs of quota 64 and 3 devices, in 7 pages).
This timeout is the whole resync's, all its pages (vsva.actors.subscriber), so it counts
the host's queue once per page the listing may take (`resync_pages`: each page is a request
of its own, queued again behind the other VMs'). A snapshot of every actor grows with the
topology too.
Powering VMs on goes `POWER_ON_WINDOW` at a time (`gather_bounded`), so the host's queue
stays short and nobody waits for all of them.

A timeout that happens anyway is recorded by the actor that waited (the kind, the peer, how
long it waited: `Actor.timeouts`, and in the failed reply's body under "timed_out");
`timeouts_in` collects those records from a run's results for the reports.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from vsva.actors.base import Call, Gather, Steps
from vsva.actors.catalogue import BINDINGS_PAGE_BYTES

HOST_S_PER_VM = 0.05  # s a host handler may wait per VM queued there (a loaded 2-core machine)
HOST_S_PER_BINDING = 50e-6  # s per binding a resync lists (about 15x the idle cost: a loaded machine)
SNAPSHOT_S_PER_ACTOR = 0.01
POWER_ON_WINDOW = 16  # vm_start requests in flight at once


def resync_pages(bindings: int, widest: int) -> int:
    """The most pages a resync's listing of `bindings` takes when none is wider than `widest`
    bytes (catalogue.binding_bytes): a page holds at least as many as fit at that width, and
    even an empty listing is one page."""
    per_page = max(1, BINDINGS_PAGE_BYTES // max(1, widest))
    return max(1, -(-bindings // per_page))


def request_timeouts(vms: int, base: float, bindings: int, pages: int = 1) -> dict[str, float]:
    """Per message kind: how long a request of that kind may take in a topology of `vms`
    VMs whose host may hold `bindings` (PASID, device) bindings, listed in at most `pages`
    resync pages (kinds not listed: `base`)."""
    host_queue = HOST_S_PER_VM * vms
    snapshot = base + SNAPSHOT_S_PER_ACTOR * (2 * vms + 3)
    return {
        "vfio_open": base + host_queue,
        "vfio_close": base + host_queue,
        "dev_submit": base + host_queue,
        "mdev_submit": 2 * base + host_queue,
        "vm_start": 2 * base + host_queue,
        "vm_stop": 2 * base + host_queue,
        "pasid_bindings": base + host_queue * pages + HOST_S_PER_BINDING * bindings,
        "snapshot": snapshot,
        "pool_status": snapshot,
    }


def gather_bounded(calls: list[Call], window: int = POWER_ON_WINDOW) -> Steps[list[Any]]:
    """Send `calls` `window` at a time (a handler does `replies = yield from
    gather_bounded(calls)`); the replies in the order of the calls."""
    replies: list[Any] = []
    for i in range(0, len(calls), window):
        replies += yield Gather(calls[i : i + window])
    return replies


def orch_config(topology: Any) -> dict[str, Any]:
    """The configuration of the orchestrator's own actor (it powers on, snapshots and stops
    every VM: the same per-kind timeouts as the actors, `topology.timeouts`)."""
    return {"request_timeout": topology.request_timeout, "timeouts": topology.timeouts}


def timeouts_in(*results: Any, records: Iterable[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """Every timeout record ("timed_out": {actor, kind, peer, elapsed_s, timeout_s}) in these
    results (reply bodies, nested in dicts and lists) and in `records` (an actor's
    `timeouts`), once each."""
    found: list[dict[str, Any]] = list(records)

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            rec = value.get("timed_out")
            if isinstance(rec, dict) and rec not in found:
                found.append(rec)
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    for result in results:
        walk(result)
    return found


def render_timeouts(records: Iterable[dict[str, Any]]) -> list[str]:
    """One line per timeout, for the text reports."""
    return [
        f"{r.get('actor')}: {r.get('kind')} to {r.get('peer')} had no reply after "
        f"{r.get('elapsed_s')} s (timeout {r.get('timeout_s')} s)"
        for r in records
    ]
