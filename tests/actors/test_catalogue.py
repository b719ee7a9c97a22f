"""The message catalogue is the protocol: every handler serves a catalogued kind, every kind is
served, host and guest PASIDs never share a field name, the actors' own traffic fits the
schemas (requests and replies), and docs/flows.md is what the catalogue generates."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vsva.actors import actor_class
from vsva.actors import errno as E
from vsva.actors.base import Actor
from vsva.actors.catalogue import CATALOGUE, FLOWS, BindGpasid, DevSubmit, IoasidFree, Message, lookup
from vsva.actors.flowdoc import main, render

REPO = Path(__file__).resolve().parents[2]
ACTOR_KINDS = ("guest", "vmm", "host", "kvm", "vdcm")
PRODUCTION = [c for c in CATALOGUE.values() if c.__module__ == Message.__module__]


def _handlers(cls: type[Actor]) -> set[str]:
    return {
        name[3:]
        for name, _ in inspect.getmembers(cls, inspect.isfunction)
        if name.startswith("on_") and name not in ("on_start", "on_peer_down")
    }


def test_docs_flows_md_is_current():
    """Regenerate with: python -m vsva.actors.flowdoc --write docs/flows.md"""
    assert (REPO / "docs" / "flows.md").read_text() == render()
    assert main(["--check", str(REPO / "docs" / "flows.md")]) == 0


def test_stale_document_is_reported(tmp_path, capsys):
    stale = tmp_path / "flows.md"
    stale.write_text(render().replace("intel_svm_bind_gpasid", "intel_svm_bind_mm"))
    assert main(["--check", str(stale)]) == 1 and "stale" in capsys.readouterr().err
    assert main(["--write", str(stale)]) == 0 and main(["--check", str(stale)]) == 0


def test_every_handler_serves_a_catalogued_kind_and_every_kind_is_served():
    served = set()
    for kind in ACTOR_KINDS:
        handlers = _handlers(actor_class(kind))
        assert handlers <= set(CATALOGUE), (kind, handlers - set(CATALOGUE))
        served |= handlers
    assert {c.KIND for c in PRODUCTION} <= served


def test_each_message_names_its_flow_hop_and_kernel_function():
    for cls in PRODUCTION:
        assert cls.FLOWS and set(cls.FLOWS) <= set(FLOWS), cls.KIND
        assert "->" in cls.HOP and cls.KERNEL and cls.__doc__, cls.KIND
    assert BindGpasid.KERNEL == "intel_svm_bind_gpasid" and BindGpasid.FLOWS == ("F2",)


def test_host_and_guest_pasids_never_share_a_field_name():
    for cls in PRODUCTION:
        names = [s.name for s in cls.FIELDS] + ([s.name for s in cls.REPLY.FIELDS] if cls.REPLY else [])
        assert "pasid" not in names, cls.KIND


@given(st.integers(1, (1 << 20) - 1), st.sampled_from(["copy", "fill"]), st.integers(0, 255))
def test_wire_round_trip(hpasid, op, pattern):
    msg = DevSubmit(dev="pf1", hpasid=hpasid, op=op, src=0, dst=1 << 47, len=4096, pattern=pattern)
    assert DevSubmit.parse(msg.body()) == msg


@pytest.mark.parametrize(
    "body,why",
    [
        ({"hpasid": 0}, "out of range [1, 1048575]"),
        ({"hpasid": 1 << 20}, "out of range"),
        ({"hpasid": True}, "missing or not int"),
        ({}, "missing or not int"),
    ],
)
def test_ranges_refused_before_any_handler(body, why):
    assert why in IoasidFree.parse(body)


def test_reply_schema_checked_on_success_only():
    reply = lookup("vcmd_alloc").REPLY
    assert reply.check({"ret": 0, "gpasid": 5, "hpasid": 5}) is None
    assert "gpasid" in reply.check({"ret": 0, "pasid": 5, "hpasid": 5})
    assert reply.check({"ret": -E.ENOSPC, "error": "quota"}) is None
    assert "ret" in reply.check({"ret": 1}) and "ret" in reply.check({"gpasid": 5})


def test_malformed_reply_becomes_ebadmsg(vsva):
    """A success reply without its fields (a hostile or buggy peer) resumes the requester with
    -EBADMSG, not a KeyError in its handler."""
    w = vsva.world(1, hand=(1,))
    vmm, host = w.rt.actors["vm1.vmm"], w.host
    host.on_ioasid_alloc = lambda msg, req: {"ret": 0, "pasid": 3}  # the old field name
    reply = vsva.ask(w.rt, "vm1.vmm", "vcmd_alloc", {"dev": "pf1"}, src="vm1.guest")
    assert reply["ret"] == -E.EBADMSG and "hpasid" in reply["error"] and vmm.g2h == {}


def test_demo_traffic_fits_the_catalogue(vsva):
    """Every request, event and reply the actors exchange in the whole demo fits its schema."""
    rt, c = vsva.session(2)
    assert c.result["violations"] == [] and all(w["ok"] for w in c.result["workloads"].values())
    seen = set()
    for rec in rt.trace:
        cls = lookup(rec["kind"])
        assert cls is not None, rec["kind"]
        if rec["corr"] is None:
            assert cls.check(rec["body"]) is None, rec
        elif cls.REPLY is not None:
            assert cls.REPLY.check(rec["body"]) is None, rec
        seen.add(rec["kind"])
    assert {
        "bind_gpasid",
        "unbind_gpasid",
        "cache_invalidate",
        "page_request",
        "vpage_request",
        "vpage_response",
        "page_response",
        "ioasid_notify",
        "mdev_submit",
        "dev_submit",
    } <= seen
