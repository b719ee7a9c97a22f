"""Every message of the system, defined once: the envelope and the request kinds.

All actors, both runtimes, the trace and the audit use these definitions. A request's body
is checked against its schema before any handler runs, so a malformed request is refused
with an errno and never reaches actor state (SPEC §9).

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

from dataclasses import dataclass, field
from typing import Any

import msgpack

from vsva.actors import errno as E

PROTOCOL_VERSION = 1
MAX_FRAME = 1 << 20  # larger frames are refused with -EMSGSIZE

# Bind record constants (uapi iommu_gpasid_bind_data, merged form).
IOMMU_GPASID_BIND_VERSION_1 = 1
IOMMU_PASID_FORMAT_INTEL_VTD = 1
IOMMU_SVA_GPASID_VAL = 1 << 0
VTD_FLAG_SRE = 1 << 0
VTD_FLAG_EAFE = 1 << 1
VTD_FLAG_WPE = 1 << 6
VTD_FLAGS_LAST = 1 << 7

# Cache invalidation (uapi iommu_cache_invalidate_info).
IOMMU_CACHE_INV_TYPE_IOTLB = 1 << 0
IOMMU_CACHE_INV_TYPE_DEV_IOTLB = 1 << 1
IOMMU_CACHE_INV_TYPE_PASID = 1 << 2
IOMMU_INV_GRANU_DOMAIN = 0
IOMMU_INV_GRANU_PASID = 1
IOMMU_INV_GRANU_ADDR = 2
IOMMU_INV_ADDR_FLAGS_PASID = 1 << 0
IOMMU_INV_ADDR_FLAGS_LEAF = 1 << 2

# Notifier events (IOASID notifier).
EV_BIND = "bind"
EV_UNBIND = "unbind"
EV_FREE = "free"
EV_FREE_SET = "free_set"  # ioasid_free_set(): every PASID of one VM's set

# I/O page faults (uapi iommu_fault_page_request / iommu_page_response; kernel-semantics §6).
IOMMU_FAULT_PERM_READ = 1 << 0
IOMMU_FAULT_PERM_WRITE = 1 << 1
IOMMU_FAULT_PERM_EXEC = 1 << 2
IOMMU_FAULT_PERM_PRIV = 1 << 3
IOMMU_PAGE_RESP_SUCCESS = 0  # page tables populated: retry
IOMMU_PAGE_RESP_INVALID = 1  # do not retry: the access fails
IOMMU_PAGE_RESP_FAILURE = 2  # drop further faults from the device
PAGE_RESP_CODES = (IOMMU_PAGE_RESP_SUCCESS, IOMMU_PAGE_RESP_INVALID, IOMMU_PAGE_RESP_FAILURE)
PRQ_GRPID_MAX = 1 << 9  # the page request group index is 9 bits

# Body schemas: field -> accepted Python types. Replies are not checked beyond "ret".
_INT = (int,)
_STR = (str,)
_DICT = (dict,)
_LIST = (list,)
_BOOL = (bool,)

SCHEMAS: dict[str, dict[str, tuple[type, ...]]] = {
    # guest -> vmm: the virtual IOMMU's registers and queues
    "vm_info": {},
    "vcmd_alloc": {"dev": _STR},
    "vcmd_free": {"pasid": _INT},
    "qi_submit": {"descs": _LIST},
    # guest -> host (passthrough portal) / guest -> vdcm (mdev virtual registers)
    "dev_submit": {"dev": _STR, "pasid": _INT, "op": _STR, "src": _INT, "dst": _INT, "len": _INT,
                   "pattern": _INT},
    "mdev_submit": {"dev": _STR, "pasid": _INT, "op": _STR, "src": _INT, "dst": _INT, "len": _INT,
                    "pattern": _INT},
    # orchestrator -> vmm: power the VM on
    "vm_start": {},
    "vm_stop": {},
    # vmm -> host: the VFIO user API
    "vfio_open": {"vm": _INT, "ram_pages": _INT, "devices": _LIST, "quota": _INT},
    "vfio_close": {},
    "ioasid_alloc": {},
    "ioasid_free": {"pasid": _INT},
    "bind_gpasid": {"dev": _STR, "data": _DICT},
    "unbind_gpasid": {"dev": _STR, "pasid": _INT},
    "cache_invalidate": {"dev": _STR, "info": _DICT},
    # host -> host: deferred IOMMU cleanup (naive policy's work item)
    "ioasid_cleanup": {"pasid": _INT, "vm": _INT, "devs": _LIST},
    # host -> kvm, vdcm: the IOASID notifier
    "ioasid_notify": {"event": _STR, "vm": _INT, "hpasid": _INT, "gpasid": _INT, "dev": _STR},
    # vdcm -> host: queries for (re)building its tables
    "gpasid_lookup": {"vm": _INT, "gpasid": _INT},
    # host -> vmm (host PASID) -> guest (guest PASID): a page request (F6), one-way, as the
    # IOMMU reports it (iommu_report_device_fault) and the vIOMMU injects it into the vPRQ
    "page_request": {"dev": _STR, "pasid": _INT, "grpid": _INT, "addr": _INT, "perm": _INT, "last": _BOOL},
    # guest -> vmm (guest PASID) -> host (host PASID): the page group response, matched on the
    # host to its request by (device, group index, PASID)
    "page_response": {"dev": _STR, "pasid": _INT, "grpid": _INT, "code": _INT},
    # orchestrator -> anyone
    "snapshot": {},
    "pool_status": {},
    "pasid_bindings": {},  # kvm/vdcm -> host: every bound (vm, gpasid, hpasid, dev), to resync
    "ping": {},
    "shutdown": {},
    "start_workload": {},
    "flow_watch": {"flow": _STR, "nth": _INT},  # orchestrator -> guest: fault triggers
}


@dataclass
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
        return {"v": self.v, "id": self.id, "src": self.src, "dst": self.dst, "kind": self.kind,
                "corr": self.corr, "rr": self.rr, "clock": self.clock, "flow": self.flow,
                "body": self.body}


class ProtocolError(Exception):
    """A frame that cannot be accepted; `ret` is the errno to answer with."""

    def __init__(self, ret: int, why: str, partial: dict[str, Any] | None = None):
        super().__init__(why)
        self.ret = ret
        self.why = why
        self.partial = partial or {}


def encode(env: Envelope) -> bytes:
    return msgpack.packb(env.to_wire(), use_bin_type=True)


_WIRE_TYPES = {"id": int, "src": str, "dst": str, "kind": str, "clock": int, "body": dict}


def decode(frame: bytes) -> Envelope:
    """Decode and check one frame; raise ProtocolError with the errno to answer."""
    if len(frame) > MAX_FRAME:
        raise ProtocolError(-E.EMSGSIZE, f"frame of {len(frame)} bytes exceeds {MAX_FRAME}")
    try:
        raw = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise ProtocolError(-E.EBADMSG, f"undecodable frame: {type(exc).__name__}") from None
    if not isinstance(raw, dict):
        raise ProtocolError(-E.EBADMSG, "frame is not a map")
    if raw.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(-E.EPROTONOSUPPORT, f"protocol version {raw.get('v')!r}, want "
                            f"{PROTOCOL_VERSION}", raw)
    for key, typ in _WIRE_TYPES.items():
        if not isinstance(raw.get(key), typ) or isinstance(raw.get(key), bool) and typ is int:
            raise ProtocolError(-E.EBADMSG, f"envelope field {key!r} missing or not {typ.__name__}", raw)
    corr = raw.get("corr")
    if corr is not None and not isinstance(corr, int):
        raise ProtocolError(-E.EBADMSG, "corr is not an int", raw)
    return Envelope(src=raw["src"], dst=raw["dst"], kind=raw["kind"], body=raw["body"],
                    id=raw["id"], corr=corr, rr=bool(raw.get("rr")), clock=raw["clock"],
                    flow=str(raw.get("flow") or ""))


def check_body(kind: str, body: dict[str, Any]) -> str | None:
    """Why a request body does not fit its kind's schema, or None when it fits."""
    schema = SCHEMAS.get(kind)
    if schema is None:
        return f"unknown message kind {kind!r}"
    for name, types in schema.items():
        value = body.get(name)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            return f"{kind}: field {name!r} missing or not {types[0].__name__}"
    return None
