"""The message catalogue: every request, reply and event of the system, grouped by flow.

Each message is a frozen dataclass that names its flow(s) (F1..F8 of docs/flows.md, `boot`,
`control`), the hop it travels, and the kernel function it stands for; each field carries
its type and, for integers, its range. On the wire a message stays a msgpack map (the
envelope's `body`); `Actor` decodes it into its class once, before any handler runs, so a
malformed body is refused with -EINVAL and an unknown kind with -EOPNOTSUPP and neither
ever reaches actor state. Replies have schemas too (`REPLY`), checked by the requester.

PASIDs: a field named `hpasid` is always a host PASID and `gpasid` always a guest PASID; no
message carries a bare `pasid`. `docs/flows.md` is generated from this module
(`python -m vsva.actors.flowdoc --write docs/flows.md`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from functools import cache
from typing import Any, ClassVar, Self, TypeVar, dataclass_transform

import msgpack

from vsva.actors.messages import MAX_FRAME
from vsva.actors.uapi import NOTIFY_EVENTS, PAGE_RESP_CODES, PRQ_GRPID_MAX
from vsva.hotpath.layout import PASID_MAX

U64 = (0, (1 << 64) - 1)
U32 = (0, (1 << 32) - 1)
PASID_RANGE = (1, PASID_MAX - 1)  # PASID 0 is reserved (requests without PASID)
DMA_MAX_LEN = 1 << 24


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One body field: accepted types, an inclusive integer range, or a set of choices."""

    name: str
    types: tuple[type, ...]
    lo: int | None = None
    hi: int | None = None
    choices: tuple[Any, ...] = ()
    doc: str = ""

    def why_not(self, kind: str, body: dict[str, Any]) -> str | None:
        value = body.get(self.name)
        # A value of exactly one of the types (what msgpack yields) is what the isinstance
        # test accepts too; only other values take it (a bool is an int, but not one here).
        if type(value) not in self.types and (
            not isinstance(value, self.types) or (isinstance(value, bool) and bool not in self.types)
        ):
            return f"{kind}: field {self.name!r} missing or not {self.types[0].__name__}"
        if self.lo is not None and not self.lo <= value <= self.hi:  # type: ignore[operator]
            return f"{kind}: field {self.name!r} = {value} out of range [{self.lo}, {self.hi}]"
        if self.choices and value not in self.choices:
            return f"{kind}: field {self.name!r} = {value!r} not one of {', '.join(map(str, self.choices))}"
        return None

    def describe(self) -> str:
        """`int 1..1048575`, `str in copy, fill` ... for docs/flows.md."""
        kind = "|".join(t.__name__ for t in self.types)
        if self.lo is not None:
            kind += f" {self.lo}..{self.hi}"
        if self.choices:
            kind += " in " + ", ".join(map(str, self.choices))
        return kind


def f(
    types: type | tuple[type, ...],
    rng: tuple[int, int] | None = None,
    *,
    choices: tuple[Any, ...] = (),
    doc: str = "",
) -> Any:
    """A field of a message class: its types, range or choices, and what it means."""
    spec = {
        "types": types if isinstance(types, tuple) else (types,),
        "range": rng,
        "choices": choices,
        "doc": doc,
    }
    return field(metadata=spec)


def hpasid(doc: str = "host PASID") -> Any:
    return f(int, PASID_RANGE, doc=doc)


def gpasid(doc: str = "guest PASID") -> Any:
    return f(int, PASID_RANGE, doc=doc)


def _spec(name: str, made: Any) -> FieldSpec:
    """The FieldSpec of a field made by `f`."""
    meta = made.metadata
    lo, hi = meta["range"] or (None, None)
    return FieldSpec(name, meta["types"], lo, hi, meta["choices"], meta["doc"])


def _specs(cls: type) -> tuple[FieldSpec, ...]:
    return tuple(_spec(fl.name, fl) for fl in fields(cls))


class Schema:
    """Checking shared by requests, events and replies (fields computed once per class)."""

    __slots__ = ()
    KIND: ClassVar[str] = ""
    FIELDS: ClassVar[tuple[FieldSpec, ...]] = ()
    NAMES: ClassVar[tuple[str, ...]] = ()  # the fields' names, in FIELDS' order

    @classmethod
    def check(cls, body: dict[str, Any]) -> str | None:
        """Why `body` does not fit this message's fields, or None when it fits."""
        return _why_not(cls, body)

    def body(self) -> dict[str, Any]:
        """The wire form: a plain map of the fields."""
        return {name: getattr(self, name) for name in self.NAMES}


def _why_not(schema: type[Schema], body: dict[str, Any]) -> str | None:
    """The first field of `schema` that `body` does not fit, or None."""
    for spec in schema.FIELDS:
        why = spec.why_not(schema.KIND, body)
        if why is not None:
            return why
    return None


class Reply(Schema):
    """A reply body: `ret` (0 or a negative errno); on success the listed fields as well.

    A failed reply carries only `ret`, an optional `error` text and what the request's
    handler adds to explain it; it is not checked beyond `ret`."""

    __slots__ = ()

    @classmethod
    def check(cls, body: dict[str, Any]) -> str | None:
        ret = body.get("ret")
        if (type(ret) is not int and (not isinstance(ret, int) or isinstance(ret, bool))) or ret > 0:
            return f"{cls.KIND} reply: 'ret' missing or not a non-positive int"
        return _why_not(cls, body) if ret == 0 else None


@dataclass(frozen=True, slots=True)
class Flow:
    """One flow: what it does and the audit's invariants (INVARIANTS) it touches."""

    name: str
    title: str
    summary: str
    invariants: tuple[str, ...] = ()


class Message(Schema):
    """A request or an event. `REPLY` is the schema of the answer (None: one-way event)."""

    __slots__ = ()

    FLOWS: ClassVar[tuple[str, ...]] = ()
    CONTROL: ClassVar[bool] = False  # only the orchestrator (or the actor itself) may send it
    HOP: ClassVar[str] = ""
    KERNEL: ClassVar[str] = ""
    REPLY: ClassVar[type[Reply] | None] = None
    SLOTS: ClassVar[tuple[tuple[str, Callable[[Any, Any], None]], ...]] = ()  # (name, slot setter)

    @classmethod
    def parse(cls, body: dict[str, Any]) -> Self | str:
        """The typed message, or why the body is refused.

        Once the body is checked, the fields go straight into the instance's slots: that is
        all the frozen dataclass's __init__ does (`message` refuses a class with a
        __post_init__), without its keyword call and per-field object.__setattr__."""
        why = cls.check(body)
        if why is not None:
            return why
        msg = object.__new__(cls)
        for name, put in cls.SLOTS:
            put(msg, body[name])
        return msg


CATALOGUE: dict[str, type[Message]] = {}
ORCHESTRATOR = "orch"  # the orchestrator's (supervisor's) actor name: the only controller
M = TypeVar("M", bound=Message)


@dataclass_transform(frozen_default=True, kw_only_default=True)
def message(
    kind: str,
    *,
    flows: tuple[str, ...],
    hop: str,
    kernel: str,
    reply: dict[str, Any] | None = None,
    one_way: bool = False,
    control: bool = False,
) -> Callable[[type[M]], type[M]]:
    """Class decorator: make `cls` a frozen dataclass message of `kind` and register it.

    `reply` lists the success fields of its reply (each made by `f`); `one_way` marks an
    event that gets no reply; `control` a kind only ORCHESTRATOR may send (the actor base
    refuses it from anyone else with -EPERM before any handler runs)."""

    def wrap(cls: type[M]) -> type[M]:
        if hasattr(cls, "__post_init__"):
            raise TypeError(f"{cls.__name__}: a message has no __post_init__ (parse does not run __init__)")
        cls = dataclass(frozen=True, slots=True, kw_only=True)(cls)
        cls.KIND, cls.FLOWS, cls.HOP, cls.KERNEL, cls.FIELDS = kind, flows, hop, kernel, _specs(cls)
        cls.NAMES = tuple(spec.name for spec in cls.FIELDS)
        cls.SLOTS = tuple((name, vars(cls)[name].__set__) for name in cls.NAMES)
        cls.CONTROL = control
        if not one_way:
            cls.REPLY = _reply_class(cls.__name__, kind, reply or {})
        return register(cls)

    return wrap


def _reply_class(name: str, kind: str, success: dict[str, Any]) -> type[Reply]:
    """A reply's schema: its success fields (`ret` is checked on its own). Replies are only
    checked, never built, so no dataclass is made for them (28 fewer at every import)."""
    cls: type[Reply] = type(f"{name}Reply", (Reply,), {"__slots__": ()})
    cls.KIND, cls.FIELDS = kind, tuple(_spec(n, made) for n, made in success.items())
    cls.NAMES = tuple(success)
    return cls


def register(cls: type[M]) -> type[M]:
    """Add a message class to the catalogue (tests add their toy protocols the same way)."""
    if CATALOGUE.get(cls.KIND, cls) is not cls:
        raise ValueError(f"message kind {cls.KIND!r} is already {CATALOGUE[cls.KIND].__name__}")
    CATALOGUE[cls.KIND] = cls
    return cls


def lookup(kind: str) -> type[Message] | None:
    return CATALOGUE.get(kind)


# ---- the flows and the invariants the audit checks (orchestrator/analysis/audit.py) -------------------
INVARIANTS = {
    "I1": "isolation: no DMA translation yields a frame the PASID's owning VM does not own",
    "I2": "coherence: no cache entry disagrees with a fresh walk after a completed invalidation",
    "I3": "lifecycle: a host PASID is in one state; a free one has no entry, cache entry, page request "
    "or translation anywhere",
    "I4": "no leaks: after a VM is gone nothing of it remains",
    "I5": "refcount: each (PASID, device) users count equals the outstanding binds",
    "I6": "no lost work: each descriptor completes, fails visibly or is aborted by a recorded teardown",
    "I7": "ownership: a VMM binds, invalidates or frees only PASIDs of its VM's set",
}
FLOWS: dict[str, Flow] = {
    flow.name: flow
    for flow in (
        Flow(
            "control",
            "Orchestration",
            "The orchestrator powers VMs on and off, starts workloads, collects "
            "snapshots for the audit and stops actors; a restarted subscriber resyncs its tables.",
        ),
        Flow(
            "boot",
            "Guest boot",
            "The guest reads its firmware tables, the vmm opens the VM's devices "
            "through VFIO (domain, second level, IOASID set) and the guest programs one PASID directory per "
            "device (context-cache invalidation).",
            ("I4", "I7"),
        ),
        Flow(
            "F1",
            "PASID allocation",
            "guest -> vmm: VCMD allocate -> host: ioasid_alloc() in the VM's set "
            "(quota) -> vmm records gpasid <-> hpasid (identity for passthrough, vmm-chosen for mdevs).",
            ("I3", "I7"),
        ),
        Flow(
            "F2",
            "Bind",
            "The guest writes a first-level PASID entry and invalidates the PASID cache; the "
            "vmm traps it and passes a bind record down; the host checks it in the kernel's order, writes the "
            "nested PASID entry and notifies kvm and vdcm (BIND) before the guest's wait completes.",
            ("I3", "I5", "I7"),
        ),
        Flow(
            "F3",
            "Guest IOTLB flush",
            "The guest changes a first-level entry and invalidates the PASID-based "
            "IOTLB and device TLB; the vmm passes the invalidation down for the host PASID.",
            ("I2", "I7"),
        ),
        Flow(
            "F4",
            "Unbind",
            "The guest clears the PASID entry; the host drops a user of the sdev and at zero "
            "tears the entry down, flushes, drains page requests and notifies (UNBIND).",
            ("I2", "I3", "I5"),
        ),
        Flow(
            "F5",
            "Free",
            "guest -> vmm: VCMD free -> host: ioasid_free(); a PASID still bound goes through "
            "the FREE notifier and the run's cleanup policy.",
            ("I3", "I6", "I7"),
        ),
        Flow(
            "F6",
            "I/O page fault",
            "A DMA hits a non-present or read-only first-level entry; the host queues "
            "a page request and reports it to the owning vmm, which injects it into the guest's virtual PRQ "
            "with the guest PASID; the guest's page group response travels back and the device retries.",
            ("I3", "I4", "I7"),
        ),
        Flow(
            "F7",
            "Work submission",
            "A guest process submits a work descriptor: through the passthrough "
            "function's portal (host PASID, identity) or an mdev's virtual registers in vdcm (guest PASID, "
            "translated).",
            ("I1", "I6", "I7"),
        ),
        Flow(
            "F8",
            "VM teardown",
            "The VFIO fd closes (normal stop or a dead vmm): ioasid_free_set() on the "
            "VM's set, every PASID through F5's cleanup, then the domain and frames go.",
            ("I3", "I4", "I6"),
        ),
    )
}


# ---- control ------------------------------------------------------------------------------------------
@message(
    "vm_start",
    flows=("control", "boot"),
    control=True,
    hop="orch -> vmm",
    kernel="QEMU machine init (VFIO container setup)",
    reply={"ram_frames": f(list, doc="host frames of guest RAM, by GFN")},
)
class VmStart(Message):
    """Power the VM on: the vmm opens its devices through VFIO."""


@message(
    "vm_stop",
    flows=("control", "F8"),
    control=True,
    hop="orch -> vmm",
    kernel="QEMU shutdown: close the VFIO fd",
)
class VmStop(Message):
    """Normal shutdown: the vmm closes its VFIO fd and the host frees the VM's IOASID set."""


@message(
    "start_workload",
    flows=("control",),
    control=True,
    hop="orch -> guest",
    kernel="(a guest process runs)",
    reply={"ok": f(bool), "steps": f(list, doc="one record per flow instance")},
)
class StartWorkload(Message):
    """Boot the guest kernel and run its configured workload."""


@message(
    "flow_watch",
    flows=("control",),
    control=True,
    hop="orch -> guest",
    kernel="(none: a fault trigger's event)",
    reply={"tag": f(str, doc="the flow instance's tag, e.g. F2:vm1.3")},
)
class FlowWatch(Message):
    """Answer when the guest starts instance `nth` of `flow` (a supervisor's fault trigger)."""

    flow: str = f(str, doc="F1 .. F8")
    nth: int = f(int, U32, doc="which instance, from 1")


@message(
    "quiesce",
    flows=("control",),
    control=True,
    hop="orch -> guest",
    kernel="(QEMU stop: vCPUs paused, I/O in flight drained)",
    reply={"held": f(int, U32, doc="flow instances now held at their start")},
)
class Quiesce(Message):
    """A live audit's cut: the guest starts no new flow instance for `hold` seconds (or
    until `resume`) and answers once every request it has in flight got its reply."""

    hold: float = f((float, int), (0, 60), doc="seconds the guest holds new work at most (a lease)")
    drain: float = f((float, int), (0, 60), doc="seconds it waits for its requests in flight at most")


@message(
    "resume",
    flows=("control",),
    control=True,
    hop="orch -> guest",
    kernel="(QEMU cont)",
    reply={"released": f(int, U32, doc="held flow instances that go on now")},
)
class Resume(Message):
    """End the hold of `quiesce`: the held flow instances start."""


@message(
    "snapshot",
    flows=("control",),
    control=True,
    hop="orch -> any",
    kernel="(debugfs: the audit's view)",
    reply={"state": f(dict, doc="the actor's state")},
)
class Snapshot(Message):
    """The actor's state for the audit."""


@message(
    "pool_status",
    flows=("control",),
    control=True,
    hop="orch -> host",
    kernel="(debugfs: IOASID pool)",
    reply={
        "free_pool": f(int, U32),
        "reclaiming": f(int, U32),
        "quarantined": f(int, U32),
        "vms": f(list),
        "teardowns": f(list),
    },
)
class PoolStatus(Message):
    """A cheap view of the allocator and teardowns, for experiments polling a live host."""


@message(
    "pasid_bindings",
    flows=("control",),
    hop="kvm, vdcm -> host",
    kernel="(resync after a restart)",
    reply={
        "bindings": f(list, doc="the next bound (vm, gpasid, hpasid, dev, users), in (hpasid, dev) order"),
        "more": f(bool, doc="bindings follow this page: ask again after its last one"),
        "gen": f(
            int, U64, doc="bumped by every bind, unbind and free: pages of two generations are no one table"
        ),
    },
)
class PasidBindings(Message):
    """A restarted notifier subscriber rebuilds its tables from the host's bindings, by pages.

    They need not fit in one frame: each page lists the bindings after the cursor, in the
    host's (hpasid, dev) order, as many as fit BINDINGS_PAGE_BYTES, with the generation of
    the bindings it was taken from."""

    after_hpasid: int = f(
        int, (0, PASID_MAX - 1), doc="cursor: after this host PASID's binding (0, reserved: from the first)"
    )
    after_dev: str = f(str, doc="cursor: after this (virtual) device of after_hpasid's")


# Half a frame for a page's bindings; the other half is room for the envelope and the reply's
# other fields (actor names, flow tag, generation: well under a kilobyte in every topology).
BINDINGS_PAGE_BYTES = MAX_FRAME // 2


def binding_entry(vm: int, gpasid: int, hpasid: int, dev: str, users: int) -> dict[str, Any]:
    """One binding as a pasid_bindings page lists it (the one place its keys are spelt)."""
    return {"vm": vm, "gpasid": gpasid, "hpasid": hpasid, "dev": dev, "users": users}


# A listed binding's encoded size but its device's name, with every integer at msgpack's widest
_BINDING_FIXED = len(msgpack.packb(binding_entry(*(U64[1],) * 3, "", U64[1]))) - len(msgpack.packb(""))


@cache
def binding_bytes(dev: str) -> int:
    """The most bytes a binding of `dev` takes in a page (cached: a host has few devices)."""
    return _BINDING_FIXED + len(msgpack.packb(dev))


@message("ping", flows=("control",), control=True, hop="any -> any", kernel="(liveness)")
class Ping(Message):
    """Liveness probe; also the host's bounded back-off tick under PRQ overflow."""


@message("trace_sync", flows=("control",), control=True, hop="orch -> any", kernel="(a live trace read)")
class TraceSync(Message):
    """Put every trace record the actor's process holds on disk, then answer (like ping).

    The actor only answers; the process runtime writes its trace buffer, this reply's record
    included, before the reply leaves (vsva.runtime.loop), so the orchestrator that has the
    reply reads them all (vsva.ops.launcher `Launcher.trace`)."""


@message("shutdown", flows=("control",), control=True, hop="orch -> any", kernel="(process exit)")
class Shutdown(Message):
    """Stop the actor's process after the reply."""


# ---- boot ---------------------------------------------------------------------------------------------
@message(
    "vm_info",
    flows=("boot",),
    hop="guest -> vmm",
    kernel="(firmware tables: E820, DMAR)",
    reply={"ram_frames": f(list), "devices": f(list), "mdevs": f(list)},
)
class VmInfo(Message):
    """What the guest's firmware tables say: its RAM and its devices."""


@message(
    "vfio_open",
    flows=("boot",),
    hop="vmm -> host",
    kernel="vfio_iommu_type1 attach group + ioasid_alloc_set",
    reply={"ram_frames": f(list, doc="host frames of guest RAM, shuffled")},
)
class VfioOpen(Message):
    """Open the VM's devices: domain, second-level table over the VM's RAM, IOASID set."""

    vm: int = f(int, U32, doc="VM id (the IOASID set)")
    ram_pages: int = f(int, U32, doc="guest RAM in 4 KiB pages")
    devices: list[Any] = f(list, doc="device names assigned to the VM")  # names checked by vfio
    quota: int = f(int, PASID_RANGE, doc="IOASID set quota")


@message(
    "qi_submit",
    flows=("boot", "F2", "F3", "F4"),
    hop="guest -> vmm",
    kernel="qi_submit_sync (invalidation queue + wait descriptor)",
    reply={"done": f(list, doc="one result per descriptor")},
)
class QiSubmit(Message):
    """Descriptors of the guest's invalidation queue, processed in order, then the wait.

    Descriptor types: cc (context cache), pc (PASID cache: the vmm syncs its shadow, bind or
    unbind; never passed down), piotlb, dev_iotlb, wait; a descriptor names its device and
    guest PASID (`gpasid`)."""

    descs: list[Any] = f(list, doc="invalidation descriptors (maps with 'type')")


# ---- F1: allocation --------------------------------------------------------------------------------------
@message(
    "vcmd_alloc",
    flows=("F1",),
    hop="guest -> vmm",
    kernel="vcmd_alloc_pasid (VT-d virtual command)",
    reply={"gpasid": gpasid(), "hpasid": hpasid()},
)
class VcmdAlloc(Message):
    """The virtual command "allocate PASID" for a process that will use `dev`."""

    dev: str = f(str, doc="the (virtual) device the PASID is for")


@message(
    "ioasid_alloc",
    flows=("F1",),
    hop="vmm -> host",
    kernel="ioasid_alloc (the VM's IOASID set)",
    reply={"hpasid": hpasid()},
)
class IoasidAlloc(Message):
    """Allocate a host PASID in the caller VM's IOASID set, bounded by its quota."""


# ---- F2: bind --------------------------------------------------------------------------------------------
@message(
    "bind_gpasid",
    flows=("F2",),
    hop="vmm -> host",
    kernel="intel_svm_bind_gpasid",
    reply={"users": f(int, U32, doc="binds of this device to the PASID")},
)
class BindGpasid(Message):
    """Bind a guest first-level table to a host PASID for a device (nested translation)."""

    dev: str = f(str, doc="the (virtual) device being bound")
    data: dict[str, Any] = f(
        dict,
        doc="iommu_gpasid_bind_data: argsz, version, format, flags, hpasid, gpasid, gpgd, "
        "addr_width, vtd_flags (checked by the handler in the kernel's order)",
    )


@message(
    "ioasid_notify",
    flows=("F2", "F4", "F5", "F8"),
    hop="host -> kvm, vdcm",
    kernel="ioasid_notify (IOASID notifier chain)",
)
class IoasidNotify(Message):
    """The IOASID notifier: BIND/UNBIND per (virtual) device, FREE per PASID, FREE_SET per VM."""

    event: str = f(str, choices=NOTIFY_EVENTS)
    vm: int = f(int, U32, doc="the IOASID set")
    hpasid: int = f(int, (0, PASID_MAX - 1), doc="host PASID (0 for free_set)")
    gpasid: int = f(int, (0, PASID_MAX - 1), doc="guest PASID (0 for free_set)")
    dev: str = f(str, doc="the (virtual) device; empty for free and free_set")


# ---- F3: invalidation --------------------------------------------------------------------------------------
@message(
    "cache_invalidate",
    flows=("F3",),
    hop="vmm -> host",
    kernel="intel_iommu_sva_invalidate",
    reply={
        "flushed": f(
            list, doc="the flushes done: cache (iotlb, devtlb), pasid, addr (None: whole PASID), size_order"
        ),
        "skipped": f(
            list, doc="caches the VT-d driver's table does not flush at this granularity (ret stays 0)"
        ),
    },
)
class CacheInvalidate(Message):
    """Pass a guest's PASID-based IOTLB / device-TLB invalidation down for the host PASID
    (never a PASID-cache one: the vmm handles those itself, as bind and unbind)."""

    dev: str = f(str)
    info: dict[str, Any] = f(
        dict,
        doc="iommu_cache_invalidate_info: version, cache, granularity, pasid, addr, "
        "granule_size, nb_granules, flags (checked by the handler)",
    )


# ---- F4: unbind --------------------------------------------------------------------------------------------
@message(
    "unbind_gpasid",
    flows=("F4",),
    hop="vmm -> host",
    kernel="intel_svm_unbind_gpasid",
    reply={"users": f(int, U32, doc="binds of this device left")},
)
class UnbindGpasid(Message):
    """Undo one bind of a device to a host PASID; the last one tears the entry down."""

    dev: str = f(str)
    hpasid: int = f(int, U64, doc="host PASID (any value: ioasid_find answers for one not allocated)")


# ---- F5: free ----------------------------------------------------------------------------------------------
@message(
    "vcmd_free",
    flows=("F5",),
    hop="guest -> vmm",
    kernel="vcmd_free_pasid (VT-d virtual command)",
    reply={"state": f(str, doc="the host PASID's lifecycle state afterwards")},
)
class VcmdFree(Message):
    """The virtual command "free PASID"."""

    gpasid: int = gpasid()


@message(
    "ioasid_free",
    flows=("F5",),
    hop="vmm -> host",
    kernel="ioasid_free",
    reply={"state": f(str, doc="free, reclaiming, quarantined ...")},
)
class IoasidFree(Message):
    """Free a host PASID of the caller's set; a bound one goes through the cleanup policy."""

    hpasid: int = hpasid()


@message(
    "ioasid_cleanup",
    flows=("F5", "F8"),
    hop="host -> host",
    kernel="intel_pasid_tear_down_entry (the IOMMU's place in the FREE chain: after kvm, before vdcm)",
)
class IoasidCleanup(Message):
    """The IOMMU driver's teardown of a freed bound PASID: the FREE chain's middle link, after
    kvm and before vdcm (awaited under ordered and reclaim; deferred work, whenever it runs,
    under naive)."""

    hpasid: int = hpasid()
    vm: int = f(int, U32)
    devs: list[str] = f(list, doc="physical devices whose entries to tear down")


# ---- F6: page requests ---------------------------------------------------------------------------------------
@message(
    "page_request",
    flows=("F6",),
    hop="host -> vmm",
    one_way=True,
    kernel="prq_event_thread -> iommu_report_device_fault",
)
class PageRequest(Message):
    """A device's page request, as the host IOMMU reports it to the VMM owning the PASID."""

    dev: str = f(str, doc="the (virtual) device that faulted")
    hpasid: int = hpasid()
    grpid: int = f(int, (0, PRQ_GRPID_MAX - 1), doc="page request group index")
    addr: int = f(int, U64, doc="page address")
    perm: int = f(int, (0, 15), doc="IOMMU_FAULT_PERM_* bits")
    last: bool = f(bool, doc="last request of its group")


@message(
    "vpage_request",
    flows=("F6",),
    hop="vmm -> guest",
    one_way=True,
    kernel="vIOMMU page request descriptor -> guest intel_svm prq handler",
)
class VPageRequest(Message):
    """The same page request injected into the guest's virtual PRQ, with the guest PASID."""

    dev: str = f(str)
    gpasid: int = gpasid()
    grpid: int = f(int, (0, PRQ_GRPID_MAX - 1))
    addr: int = f(int, U64)
    perm: int = f(int, (0, 15))
    last: bool = f(bool)


@message(
    "vpage_response",
    flows=("F6",),
    hop="guest -> vmm",
    kernel="guest intel_svm_page_response (page group response descriptor)",
)
class VPageResponse(Message):
    """The guest's page group response for its guest PASID."""

    dev: str = f(str)
    gpasid: int = gpasid()
    grpid: int = f(int, (0, PRQ_GRPID_MAX - 1))
    code: int = f(int, choices=PAGE_RESP_CODES, doc="IOMMU_PAGE_RESP_SUCCESS/INVALID/FAILURE")


@message(
    "page_response", flows=("F6",), hop="vmm -> host", kernel="iommu_page_response -> intel_svm_page_response"
)
class PageResponse(Message):
    """The page group response passed down for the host PASID, matched to its request."""

    dev: str = f(str)
    hpasid: int = hpasid()
    grpid: int = f(int, (0, PRQ_GRPID_MAX - 1))
    code: int = f(int, choices=PAGE_RESP_CODES)


# ---- F7: work submission ---------------------------------------------------------------------------------------
_DMA_REPLY = {"status": f(int, doc="0 or the fault status"), "page_requests": f(int, U32)}


@message(
    "dev_submit",
    flows=("F7", "F6"),
    hop="guest, vdcm -> host",
    kernel="device work descriptor (portal write; DMA through the IOMMU)",
    reply=_DMA_REPLY,
)
class DevSubmit(Message):
    """A work descriptor for a device's DMA engine: the passthrough function's portal (the
    guest programs the host PASID, identity) or vdcm programming the parent for an mdev."""

    dev: str = f(str)
    hpasid: int = hpasid()
    op: str = f(str, choices=("copy", "fill"))
    src: int = f(int, U64, doc="source VA (copy)")
    dst: int = f(int, U64, doc="destination VA")
    len: int = f(int, (0, DMA_MAX_LEN), doc="bytes")
    pattern: int = f(int, (0, 255), doc="fill byte")


@message(
    "mdev_submit", flows=("F7",), hop="guest -> vdcm", kernel="mdev virtual portal (vdcm)", reply=_DMA_REPLY
)
class MdevSubmit(Message):
    """A work descriptor written into an mdev's virtual registers, with the guest PASID."""

    dev: str = f(str)
    gpasid: int = gpasid()
    op: str = f(str, choices=("copy", "fill"))
    src: int = f(int, U64)
    dst: int = f(int, U64)
    len: int = f(int, (0, DMA_MAX_LEN))
    pattern: int = f(int, (0, 255))


# ---- F8: teardown ----------------------------------------------------------------------------------------------
@message("vfio_close", flows=("F8",), hop="vmm -> host", kernel="vfio release -> ioasid_free_set")
class VfioClose(Message):
    """The VMM closes its VFIO fd: the VM's whole IOASID set is freed, then its domain."""
