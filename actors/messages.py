"""The envelope every message travels in, and its wire form (msgpack).

All actors, both runtimes, the trace and the audit use it. What a body may hold is the
message catalogue's business (vsva.actors.catalogue); here a frame is only checked to be a
well-formed envelope, so garbage is refused with an errno before anyone looks inside.

Envelope (a msgpack map with short keys, to keep frames small):
    v     protocol version          id    message id, unique per sender
    src   sender name               dst   receiver name
    kind  message kind              corr  for a reply: the id of the request it answers
    rr    True when a reply is expected
    clock Lamport clock of the sender at send time
    flow  flow tag ("F2#3") inherited from the request that caused this message
    body  the kind's fields; a reply body always has "ret" (0 or a negative errno)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import msgpack

from vsva.actors import errno as E

PROTOCOL_VERSION = 1
MAX_FRAME = 1 << 20  # larger frames are refused with -EMSGSIZE
MAX_CLOCK = 1 << 62  # a Lamport clock beyond this is refused (-ERANGE)
# A receiver takes in a received clock only up to ADOPTED_CLOCK_MAX (Actor.deliver): else one
# frame with a clock at MAX_CLOCK would push the receiver's own clock past it, and every peer
# would refuse everything it sends from then on. Below it, 2**61 events of headroom remain.
ADOPTED_CLOCK_MAX = MAX_CLOCK >> 1


@dataclass(slots=True)
class Envelope:
    """One message on the wire or in the deterministic scheduler."""

    src: str
    dst: str
    kind: str
    body: dict[str, Any] = field(default_factory=dict)
    id: int = 0
    corr: int | None = None
    rr: bool = False
    clock: int = 0
    flow: str = ""
    v: int = PROTOCOL_VERSION

    @property
    def is_reply(self) -> bool:
        return self.corr is not None

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": self.v,
            "id": self.id,
            "src": self.src,
            "dst": self.dst,
            "kind": self.kind,
            "corr": self.corr,
            "rr": self.rr,
            "clock": self.clock,
            "flow": self.flow,
            "body": self.body,
        }


class ProtocolError(Exception):
    """A frame that cannot be accepted; `ret` is the errno to answer with."""

    def __init__(self, ret: int, why: str, partial: dict[str, Any] | None = None):
        super().__init__(why)
        self.ret = ret
        self.why = why
        self.partial = partial or {}


class _Packer(threading.local):
    """One msgpack Packer per thread: `packb` builds a new Packer for every call, which is
    most of what encoding an envelope costs; a Packer resets itself after each pack (also
    when one fails)."""

    def __init__(self) -> None:
        self.pack = msgpack.Packer(use_bin_type=True).pack


_packer = _Packer()


def encode(env: Envelope) -> bytes:
    frame: bytes = _packer.pack(env.to_wire())
    return frame


_WIRE_TYPES = {"id": int, "src": str, "dst": str, "kind": str, "clock": int, "body": dict}
_unpackb = msgpack.unpackb


def decode(frame: bytes) -> Envelope:
    """Decode and check one frame; raise ProtocolError with the errno to answer.

    The checks are exact type tests (msgpack yields exactly int, str, dict; `type(x) is int`
    also refuses a bool), each field read once: this runs for every frame a runtime takes in."""
    if len(frame) > MAX_FRAME:
        raise ProtocolError(-E.EMSGSIZE, f"frame of {len(frame)} bytes exceeds {MAX_FRAME}")
    try:
        raw = _unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise ProtocolError(-E.EBADMSG, f"undecodable frame: {type(exc).__name__}") from None
    if type(raw) is not dict:
        raise ProtocolError(-E.EBADMSG, "frame is not a map")
    get = raw.get
    try:
        v, id_, src, dst, kind, clock, body = (
            raw["v"], raw["id"], raw["src"], raw["dst"], raw["kind"], raw["clock"], raw["body"]
        )  # fmt: skip
    except KeyError:  # refused below, naming the first field missing
        v, id_, src, dst, kind, clock, body = get("v"), None, None, None, None, None, None
    if v != PROTOCOL_VERSION:
        raise ProtocolError(
            -E.EPROTONOSUPPORT, f"protocol version {get('v')!r}, want {PROTOCOL_VERSION}", raw
        )
    if not (
        type(id_) is int and type(src) is str and type(dst) is str and type(kind) is str
        and type(clock) is int and type(body) is dict
    ):  # fmt: skip
        key, typ = next((k, t) for k, t in _WIRE_TYPES.items() if type(get(k)) is not t)
        raise ProtocolError(-E.EBADMSG, f"envelope field {key!r} missing or not {typ.__name__}", raw)
    corr = get("corr")
    if corr is not None and type(corr) is not int:
        raise ProtocolError(-E.EBADMSG, "corr is not an int", raw)
    if not 0 <= clock <= MAX_CLOCK:
        raise ProtocolError(-E.ERANGE, f"clock {clock} outside [0, 2**62]", raw)
    flow = get("flow")
    flow = flow if type(flow) is str else str(flow or "")
    return Envelope(src, dst, kind, body, id_, corr, bool(get("rr")), clock, flow)  # the fields' order
