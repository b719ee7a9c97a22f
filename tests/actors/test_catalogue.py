"""The message catalogue is the protocol: every handler serves a catalogued kind, every kind is
served, host and guest PASIDs never share a field name, the actors' own traffic fits the
schemas (requests and replies), and docs/flows.md is what the catalogue generates."""

from __future__ import annotations

import inspect
from dataclasses import FrozenInstanceError
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


class _Int(int):
    """An int subclass (an IntEnum-like value from inside the process, never from msgpack)."""


class _Str(str):
    pass


ODD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(1 << 65), 1 << 65),
    st.integers(-5, (1 << 21)).map(_Int),
    st.floats(allow_nan=False),
    st.text(max_size=4),
    st.text(max_size=4).map(_Str),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)
SPECS = [(cls.KIND, spec) for cls in PRODUCTION for spec in cls.FIELDS]


@given(st.sampled_from(SPECS), ODD_VALUES)
def test_field_check_accepts_what_its_types_range_and_choices_say(kind_spec, value):
    """The exact-type shortcut in FieldSpec.why_not accepts exactly the values of the rule:
    an instance of the types (a bool only where bool is one of them), in range, among the
    choices; an int or str subclass takes the isinstance path and is accepted the same way."""
    kind, spec = kind_spec
    fits = isinstance(value, spec.types) and not (isinstance(value, bool) and bool not in spec.types)
    fits = fits and (spec.lo is None or spec.lo <= value <= spec.hi)
    fits = fits and (not spec.choices or value in spec.choices)
    assert (spec.why_not(kind, {spec.name: value}) is None) == fits


@given(ODD_VALUES)
def test_reply_ret_is_a_non_positive_int_and_never_a_bool(ret):
    reply = lookup("ioasid_notify").REPLY
    fits = isinstance(ret, int) and not isinstance(ret, bool) and ret <= 0
    assert (reply.check({"ret": ret}) is None) == fits


def _valid(spec) -> st.SearchStrategy:
    if spec.choices:
        return st.sampled_from(spec.choices)
    if spec.lo is not None:
        return st.integers(spec.lo, spec.hi)
    return {
        int: st.integers(-(1 << 63), 1 << 63),
        bool: st.booleans(),
        str: st.text(max_size=8),
        list: st.lists(st.integers(), max_size=3),
        dict: st.dictionaries(st.text(max_size=3), st.integers(), max_size=3),
    }[spec.types[0]]


@st.composite
def _bodies(draw):
    cls = draw(st.sampled_from(PRODUCTION))
    body = {spec.name: draw(_valid(spec)) for spec in cls.FIELDS}
    return cls, {**body, "unknown_extra": draw(st.integers())}


@given(_bodies())
def test_parse_builds_the_same_frozen_message_as_its_constructor(cls_body):
    """parse fills the checked fields into the slots without __init__: the message equals (and
    hashes like) the one the dataclass constructor builds, stays frozen, and round-trips."""
    cls, body = cls_body
    fields = {name: body[name] for name in cls.NAMES}
    msg = cls.parse(body)
    assert msg == cls(**fields) and type(msg) is cls and msg.body() == fields
    if all(not isinstance(v, (list, dict)) for v in fields.values()):
        assert hash(msg) == hash(cls(**fields))
    for name in cls.NAMES[:1]:
        with pytest.raises(FrozenInstanceError):
            setattr(msg, name, None)


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
