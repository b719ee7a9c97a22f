"""Pacing: timeouts per request kind scaled to the topology, power-on a window at a time,
and a timeout that happens is recorded (kind, peer, elapsed) and shown in the reports."""

from __future__ import annotations

import pytest

from vsva.actors import errno as E
from vsva.actors.base import Actor, ActorEnv, Call
from vsva.actors.catalogue import BINDINGS_PAGE_BYTES, binding_bytes
from vsva.actors.messages import Envelope
from vsva.actors.subscriber import resync_timeout
from vsva.ops import pacing
from vsva.ops.control import Controller
from vsva.ops.topology import HOST, default_topology
from vsva.runtime.sim import SimRuntime

BINDINGS_PER_VM = 64 * 3  # the default quota, each PASID bound once per device (pf, 2 mdevs)


class Caller(Actor):
    def __init__(self, calls, config=None, window=None):
        super().__init__("orch", ActorEnv(config=config or {}))
        self.calls, self.window, self.result = calls, window, None

    def on_start(self):
        if self.window is None:
            self.result = yield self.calls[0]
        else:
            self.result = yield from pacing.gather_bounded(self.calls, self.window)


def reply_to(env: Envelope, body: dict) -> Envelope:
    return Envelope(src=env.dst, dst=env.src, kind=env.kind, body=body, corr=env.id, clock=1)


def test_timeouts_grow_with_what_the_kind_waits_for():
    small, large = (
        pacing.request_timeouts(2, 5.0, 2 * BINDINGS_PER_VM),
        pacing.request_timeouts(256, 5.0, 256 * BINDINGS_PER_VM),
    )
    kinds = ("vfio_open", "vm_start", "vfio_close", "vm_stop", "snapshot", "dev_submit", "mdev_submit")
    for kind in (*kinds, "pasid_bindings"):
        assert large[kind] > small[kind] >= 5.0
    assert large["vm_start"] > large["vfio_open"]  # it waits for one
    assert large["mdev_submit"] > large["dev_submit"]  # vdcm's dev_submit runs inside it
    topo = default_topology(128)
    pages = pacing.resync_pages(128 * BINDINGS_PER_VM, binding_bytes("vm128.mdev1"))
    scaled = pacing.request_timeouts(128, 5.0, 128 * BINDINGS_PER_VM, pages)
    for name in ("vm1.vmm", "vm1.guest", "vdcm", "kvm"):  # who waits on the host
        assert topo.spec(name).config["timeouts"] == scaled
    assert pacing.orch_config(topo)["timeouts"] == scaled
    # 128 VMs demand-paging at once kept a 4-page copy 2.5-3.1 s at the host (loaded machine)
    assert scaled["dev_submit"] > 2 * 3.1


def test_a_resync_waits_for_the_host_queue_and_every_binding_it_lists():
    """pasid_bindings had no entry: a restarted kvm or vdcm waited the base 5 s for a host
    that serves every VM and lists every binding of theirs."""
    few, many = (pacing.request_timeouts(128, 5.0, n)["pasid_bindings"] for n in (0, 128 * BINDINGS_PER_VM))
    assert few == pacing.request_timeouts(128, 5.0, 0)["vfio_open"]  # the host's queue, as any host handler
    assert many - few == pytest.approx(pacing.HOST_S_PER_BINDING * 128 * BINDINGS_PER_VM)
    queue = pacing.HOST_S_PER_VM * 128
    paged = pacing.request_timeouts(128, 5.0, 0, pages=4)["pasid_bindings"]
    assert paged - few == pytest.approx(3 * queue)  # each page queues at the host again
    for name in ("kvm", "vdcm"):
        config = default_topology(128, quota=1024).spec(name).config
        pages = pacing.resync_pages(128 * 1024 * 3, binding_bytes("vm128.mdev1"))
        assert pages > 1
        assert (
            resync_timeout(config)
            == pacing.request_timeouts(128, 5.0, 128 * 1024 * 3, pages)["pasid_bindings"]
        )


@pytest.mark.parametrize(
    "bindings, widest, pages",
    [
        (0, 80, 1),  # an empty listing is still one page
        (1, 80, 1),
        (BINDINGS_PAGE_BYTES // 80, 80, 1),
        (BINDINGS_PAGE_BYTES // 80 + 1, 80, 2),
        (3, BINDINGS_PAGE_BYTES + 1, 3),  # wider than a page: one binding a page (the host's rule)
    ],
)
def test_resync_pages_bounds_the_pages_the_host_lists(bindings, widest, pages):
    assert pacing.resync_pages(bindings, widest) == pages


def test_a_descriptor_the_host_never_answers_is_i6_and_its_timeout_is_reported():
    """The audit stays honest with the longer wait: VM 1's passthrough descriptors get no
    reply (the host's replies to its guest are held), each fails indefinite after
    dev_submit's timeout, the audit reports I6 for VM 1 only, and the report lists them."""
    topology = default_topology(2)
    rt = SimRuntime(topology)
    ctl = rt.add(Controller(topology, env=rt.env({})))
    rt.hold(HOST, "vm1.guest")
    rt.start()
    rt.run(until=lambda: ctl.result is not None)
    assert ctl.result is not None
    i6 = [v for v in ctl.result["violations"] if v["invariant"] == "I6"]
    assert [(v["vm"], v["actors"]) for v in i6] == [(1, ["vm1.guest"])]
    lost = rt.actors["vm1.guest"].dma.indefinite
    timed_out = [s for s in ctl.result["workloads"]["vm1.guest"]["steps"] if "timed_out" in s]
    assert i6[0]["what"] == f"{lost} descriptor(s) without a definite outcome" and lost == len(timed_out) > 0
    found = pacing.timeouts_in(ctl.result["workloads"])  # what the demo's report lists
    limit = topology.timeouts["dev_submit"]
    assert found and all(
        (r["actor"], r["kind"], r["peer"], r["timeout_s"]) == ("vm1.guest", "dev_submit", HOST, limit)
        and r["elapsed_s"] >= limit
        for r in found
    )


def test_kind_timeout_applies_and_a_timeout_is_recorded_with_peer_and_elapsed():
    actor = Caller(
        [Call("vm1.vmm", "vm_start", {})], config={"request_timeout": 1.0, "timeouts": {"vm_start": 12.5}}
    )
    [sent] = actor.start(0.0)
    assert actor.next_deadline() == 12.5
    assert actor.expire(12.0) == [] and actor.result is None
    actor.expire(12.6)
    assert actor.result["ret"] == -E.ETIMEDOUT and actor.result["indefinite"]
    rec = {"actor": "orch", "kind": "vm_start", "peer": "vm1.vmm", "elapsed_s": 12.6, "timeout_s": 12.5}
    assert actor.result["timed_out"] == rec and actor.timeouts == [rec]
    assert "vm_start to vm1.vmm" in actor.result["error"]


def test_power_on_goes_a_window_at_a_time():
    calls = [Call(f"vm{i}.vmm", "vm_start", {}) for i in range(1, 6)]
    actor = Caller(calls, window=2)
    out = actor.start(0.0)
    waves = []
    while out:
        waves.append([e.dst for e in out])
        out = [
            e
            for env in out  # error replies: only "ret" is checked against the schema
            for e in actor.deliver(reply_to(env, {"ret": -E.EBUSY, "error": env.dst}), 0.1)
        ]
    assert waves == [["vm1.vmm", "vm2.vmm"], ["vm3.vmm", "vm4.vmm"], ["vm5.vmm"]]
    assert [r["error"] for r in actor.result] == [c.dst for c in calls]


def test_timeouts_are_found_in_nested_results_and_rendered():
    rec = {"actor": "vm3.vmm", "kind": "vfio_open", "peer": "host", "elapsed_s": 11.4, "timeout_s": 11.4}
    own = {"actor": "orch", "kind": "snapshot", "peer": "kvm", "elapsed_s": 5.1, "timeout_s": 5.0}
    results = {"vm3.vmm": {"ret": -E.ETIMEDOUT, "timed_out": rec}, "steps": [{"ok": True}]}
    found = pacing.timeouts_in(results, [results], records=[own])
    assert found == [own, rec]
    assert pacing.render_timeouts(found)[1] == (
        "vm3.vmm: vfio_open to host had no reply after 11.4 s (timeout 11.4 s)"
    )
