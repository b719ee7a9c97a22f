"""Topologies (and scenarios) described in TOML files: parse, validate, build a Topology.

    [run]                      # every key optional; defaults: RunConfig, VmConfig (ops/config.py)
    seed = 1
    policy = "reclaim"         # naive | ordered | reclaim
    kernel = "v11"             # v11 (the seed's bind/unbind) | v5.9 (what was merged)
    allocator = "reuse-first"  # reuse-first | fresh
    request_timeout = 5.0      # s: a request without a reply fails (indefinite) after this
    dead_peer_interval = 0.5   # s: the supervisor's heartbeat (ping) period and timeout
    transport = "ipc"          # ipc (private run directory) | tcp (127.0.0.1 only)

    [[hosts]]                  # one host for now; the list form leaves room for more
    name = "host"

    [[vms]]                    # VM ids are 1..N in order
    id = 1
    workload = "demo"          # a key of actors.guest.WORKLOADS
    iterations = 100
    ram_pages = 1024
    quota = 64
    non_identity = true        # mdevs get vmm-chosen guest PASIDs
    on_guest_death = "stop"    # stop | restart (the supervisor's recovery of a crashed guest)
    devices = { passthrough = 1, mediated = 2 }

    [[faults]]                 # scenarios only (`vsva run`): see vsva.ops.scenario
    kill = "vm2.vmm"
    at_flow = "F7"             # ... the nth time VM `vm`'s flow step starts (the guest reports it)
    vm = 2
    nth = 3
    # or: at_time = 1.5        # s (0 to 3600) after the workloads started
    # or: random = true        # a random actor at a random time in [0, window), from `seed`

    [scenario]                 # scenarios only
    timeout = 60.0             # s (0.1 to 86400): the run ends, and fails, after this; `vsva
                               # run` refuses an at_time not before it, a window past it

A file that defines nothing (empty, or only comments) is refused: the defaults are what no
file gives. Every unknown key, wrong type or out-of-range value is an error naming its place in the
file (`vms[2].workload: unknown workload 'x'; valid: ...`). `transport = "tcp"` binds every
actor's ROUTER at `tcp://127.0.0.1:<port>` (a kernel-chosen free port, published in the run
directory; see vsva.runtime.loop); nothing listens beyond loopback.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

from vsva.actors.guest.workloads import tables_kept
from vsva.actors.messages import MAX_FRAME
from vsva.actors.policy import Policy
from vsva.actors.semantics import Kernel
from vsva.hotpath.layout import PASID_DIR_FRAMES, PASID_MAX
from vsva.ops.capacity import MAX_VMS, CapacityError, check
from vsva.ops.config import RUN, VM, Allocator, GuestDeath, RunConfig, VmConfig
from vsva.ops.topology import HOST, MAX_RAM_PAGES, WORKLOAD_PAGES, Topology, build_topology, min_ram_pages
from vsva.ops.userfiles import UserFileError, parse_toml, read_toml_text
from vsva.runtime.endpoints import Transport

E = TypeVar("E", bound=StrEnum)
MAX_ITERATIONS = 1_000_000  # a guest keeps every step of its workload (~1 KB a round)
# PASIDs the VMs' workloads keep bound (KEEPS_PASIDS) in all: the host's snapshot of every
# binding (what the audit checks) travels in one message of at most MAX_FRAME, ~60 bytes a
# binding (measured: 482 KB for 8192); beyond ~17000 the audit had no snapshot.
MAX_KEPT_PASIDS = MAX_FRAME // 128

RUN_KEYS = {
    "seed": int,
    "policy": str,
    "kernel": str,
    "allocator": str,
    "request_timeout": (int, float),
    "dead_peer_interval": (int, float),
    "transport": str,
    "name": str,
}
HOST_KEYS = {"name": str}
VM_KEYS = {
    "id": int,
    "workload": str,
    "iterations": int,
    "ram_pages": int,
    "quota": int,
    "non_identity": bool,
    "on_guest_death": str,
    "devices": dict,
}
DEVICE_KEYS = {"passthrough": int, "mediated": int}
FAULT_KEYS = {
    "kill": str,
    "at_flow": str,
    "vm": int,
    "nth": int,
    "at_time": (int, float),
    "random": bool,
    "seed": int,
    "window": (int, float),
    "signal": str,
}
SCENARIO_KEYS = {"timeout": (int, float), "audit": bool}
TOP_KEYS = {"run", "hosts", "vms", "faults", "scenario"}
FLOWS = ("F1", "F2", "F3", "F4", "F5", "F6", "F7", "F8", "boot")


class TopologyError(ValueError):
    """A topology or scenario file that cannot be used; the message says where and why."""


@dataclass
class Fault:
    kill: str | None  # None with random: the scenario's rng picks the actor
    at_flow: str | None = None
    vm: int | None = None
    nth: int = 1
    at_time: float | None = None
    random: bool = False
    seed: int = 0
    window: float = 1.0
    signal: str = "KILL"


@dataclass
class RunFile:
    """What a file describes: the Topology plus what the supervisor needs beside it."""

    topology: Topology
    name: str = "vsva"
    transport: str = RUN.transport
    dead_peer_interval: float = RUN.dead_peer_interval
    on_guest_death: dict[int, GuestDeath] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    timeout: float = 60.0
    source: str = "<default>"


def _type_name(t: Any) -> str:
    if isinstance(t, tuple):
        return "number"
    return {int: "integer", str: "string", bool: "boolean", dict: "table", float: "number"}[t]


def _check_table(where: str, table: Any, keys: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise TopologyError(f"{where}: expected a table, got {type(table).__name__}")
    for key, value in table.items():
        if key not in keys:
            raise TopologyError(f"{where}: unknown key {key!r}; valid: {', '.join(sorted(keys))}")
        want = keys[key]
        ok = isinstance(value, want) and not (isinstance(value, bool) and want in (int, (int, float)))
        if not ok:
            raise TopologyError(f"{where}.{key}: expected {_type_name(want)}, got {value!r}")
    return table


def _choice(where: str, value: str, valid: tuple[str, ...], what: str) -> str:
    if value not in valid:
        raise TopologyError(f"{where}: unknown {what} {value!r}; valid: {', '.join(valid)}")
    return value


def _member(where: str, value: str, enum: type[E], what: str) -> E:
    """`value` as a member of `enum`, or the error naming `where` and the valid values."""
    return enum(_choice(where, value, tuple(e.value for e in enum), what))


def _range(where: str, value: float, lo: float, hi: float, why: str = "") -> None:
    """TopologyError unless lo <= value <= hi; `why` (e.g. "; at least ... because ...")
    ends the message where a bound is not self-evident."""
    if not lo <= value <= hi:
        raise TopologyError(f"{where}: {value} out of range [{lo}, {hi}]{why}")


def _workload_fits(where: str, workload: str, mediated: int, iterations: int, quota: int) -> None:
    """The VM gives its workload what it needs (vsva.actors.guest.workloads: MEDIATED_NEEDED,
    KEEPS_PASIDS); else the workload would fail at its first step that lacks it."""
    from vsva.actors.guest.workloads import KEEPS_PASIDS, MEDIATED_NEEDED

    need = MEDIATED_NEEDED.get(workload, 0)
    if mediated < need:
        raise TopologyError(f"{where}: workload {workload!r} needs devices.mediated >= {need}")
    if workload in KEEPS_PASIDS and iterations > quota:
        raise TopologyError(
            f"{where}: workload {workload!r} keeps the PASID of every round: iterations ({iterations}) "
            f"must be at most quota ({quota})"
        )


def _kept_pasids_fit(per_vm: list[VmConfig]) -> None:
    """The PASIDs the workloads keep bound fit the host's snapshot (MAX_KEPT_PASIDS)."""
    from vsva.actors.guest.workloads import KEEPS_PASIDS

    kept = sum(v.iterations for v in per_vm if v.workload in KEEPS_PASIDS)
    if kept > MAX_KEPT_PASIDS:
        raise TopologyError(
            f"vms: the workloads keep {kept} PASIDs bound in all (iterations of {', '.join(sorted(KEEPS_PASIDS))}); "
            f"at most {MAX_KEPT_PASIDS}: the host's snapshot of every binding (the audit's) travels in one "
            f"message of at most {MAX_FRAME} bytes"
        )


def _seconds(where: str, value: float) -> float:
    """A fault's time (at_time, window): seconds after the workloads started, up to an hour."""
    _range(where, value, 0, 3600)
    return float(value)


def _fire_before(faults: list[Fault], timeout: float) -> None:
    """Every timed fault can fire before the run ends at `timeout`: an at_time at or after
    it, or a random one's window reaching past it, would be reported 'not fired' at the end."""
    ends = f"scenario.timeout ({timeout:g} s), when the run has ended"
    for i, f in enumerate(faults):
        if f.random and f.window > timeout:
            raise TopologyError(
                f"faults[{i}].window: the random time in [0, {f.window:g}) s may fall after {ends}"
            )
        if f.at_time is not None and f.at_time >= timeout:
            raise TopologyError(f"faults[{i}].at_time: {f.at_time:g} s is not before {ends}")


def _ram_pages(where: str, ram: int, mediated: int, workload: str, iterations: int) -> int:
    """`ram` if a VM with `mediated` mediated devices runs `iterations` rounds of `workload`
    in that many guest pages; else the error says which bound and why (neither is visible
    from the file)."""
    lo = min_ram_pages(1 + mediated, workload, iterations)
    if ram < lo:
        kept = tables_kept(workload, iterations)
        why = (
            f"; the guest keeps a PASID directory ({PASID_DIR_FRAMES} pages) per device "
            f"(1 passthrough + {mediated} mediated) and a workload maps up to {WORKLOAD_PAGES} pages"
        ) + (f", and {workload!r} keeps {kept} table pages for {iterations} iterations" if kept else "")
    else:
        why = f"; the guest's RAM frame list (up to 5 bytes a page) travels in one message of at most {MAX_FRAME} bytes"
    _range(where, ram, lo, MAX_RAM_PAGES, why)
    return ram


def load(path: str, timed: bool = False) -> RunFile:
    """Read and validate a topology or scenario file (a regular file of at most TOML_LIMIT);
    `timed`: it runs until its scenario.timeout (`vsva run`; see parse)."""
    try:
        text = read_toml_text(path)
    except UserFileError as exc:
        raise TopologyError(str(exc)) from None
    try:
        run = loads(text, timed)
    except TopologyError as exc:
        raise TopologyError(f"{path}: {exc}") from None
    run.source = path
    return run


def loads(text: str, timed: bool = False) -> RunFile:
    try:
        data = parse_toml(text)
    except UserFileError as exc:
        raise TopologyError(str(exc)) from None
    return parse(data, timed)


def parse(data: dict[str, Any], timed: bool = False) -> RunFile:
    """The RunFile the data describes. `timed`: the run ends at its scenario.timeout (`vsva
    run`), so a fault timed at or after it could never fire and is refused; a live topology
    (`vsva up`) runs until `down`, and any time of a fault is reachable."""
    from vsva.actors.guest import WORKLOADS

    if not data:  # the defaults are what no file gives: a file has to say something
        raise TopologyError(
            f"defines nothing (no {', '.join(sorted(TOP_KEYS))}); omit the file for the default topology"
        )
    for key in data:
        if key not in TOP_KEYS:
            raise TopologyError(f"unknown section {key!r}; valid: {', '.join(sorted(TOP_KEYS))}")
    run = _check_table("run", data.get("run", {}), RUN_KEYS)
    seed = run.get("seed", RUN.seed)
    timeout = float(run.get("request_timeout", RUN.request_timeout))
    _range("run.request_timeout", timeout, 0.01, 3600)
    interval = float(run.get("dead_peer_interval", RUN.dead_peer_interval))
    _range("run.dead_peer_interval", interval, 0.01, 60)
    config = RunConfig(
        seed=seed,
        request_timeout=timeout,
        dead_peer_interval=interval,
        policy=_member("run.policy", run.get("policy", RUN.policy), Policy, "policy"),
        kernel=_member("run.kernel", run.get("kernel", RUN.kernel), Kernel, "kernel"),
        allocator=_member("run.allocator", run.get("allocator", RUN.allocator), Allocator, "allocator"),
        transport=_member("run.transport", run.get("transport", RUN.transport), Transport, "transport"),
    )

    hosts = data.get("hosts", [{"name": HOST}])
    if not isinstance(hosts, list) or not hosts:
        raise TopologyError("hosts: expected a non-empty array of tables ([[hosts]])")
    for i, h in enumerate(hosts):
        _check_table(f"hosts[{i}]", h, HOST_KEYS)
    if len(hosts) != 1:
        raise TopologyError(f"hosts: {len(hosts)} hosts given; this version runs exactly one")
    if hosts[0].get("name", HOST) != HOST:
        raise TopologyError(f"hosts[0].name: must be {HOST!r} in this version")

    vms = data.get("vms", [{"id": 1}, {"id": 2}])
    if not isinstance(vms, list) or not vms:
        raise TopologyError("vms: expected a non-empty array of tables ([[vms]])")
    if len(vms) > MAX_VMS:
        raise TopologyError(f"vms: {len(vms)} VMs; at most {MAX_VMS}")
    per_vm = []
    guest_death = {}
    for i, vm in enumerate(vms):
        where = f"vms[{i}]"
        _check_table(where, vm, VM_KEYS)
        vid = vm.get("id", i + 1)
        if vid != i + 1:
            raise TopologyError(f"{where}.id: VM ids must be 1..N in order; expected {i + 1}, got {vid}")
        devs = _check_table(f"{where}.devices", vm.get("devices", {}), DEVICE_KEYS)
        if devs.get("passthrough", 1) != 1:
            raise TopologyError(
                f"{where}.devices.passthrough: exactly 1 passthrough function per VM "
                f"in this version, got {devs['passthrough']}"
            )
        mediated = devs.get("mediated", VM.mediated)
        _range(f"{where}.devices.mediated", mediated, 0, 8)
        workload = _choice(f"{where}.workload", vm.get("workload", VM.workload), tuple(WORKLOADS), "workload")
        iterations = vm.get("iterations", VM.iterations)
        _range(f"{where}.iterations", iterations, 1, MAX_ITERATIONS)
        ram = _ram_pages(
            f"{where}.ram_pages", vm.get("ram_pages", VM.ram_pages), mediated, workload, iterations
        )
        quota = vm.get("quota", VM.quota)
        _range(f"{where}.quota", quota, 1, PASID_MAX - 1)
        _workload_fits(where, workload, mediated, iterations, quota)
        guest_death[vid] = _member(
            f"{where}.on_guest_death",
            vm.get("on_guest_death", VM.on_guest_death),
            GuestDeath,
            "on_guest_death",
        )
        per_vm.append(
            VmConfig(
                vm=vid,
                workload=workload,
                iterations=iterations,
                ram_pages=ram,
                quota=quota,
                non_identity=vm.get("non_identity", VM.non_identity),
                mediated=mediated,
                on_guest_death=guest_death[vid],
            )
        )
    _kept_pasids_fit(per_vm)
    topology = build_topology(per_vm, config)
    try:
        check(topology)
    except CapacityError as exc:
        raise TopologyError(f"vms: {exc}") from None

    names = set(topology.names())
    faults = []
    raw_faults = data.get("faults", [])
    if not isinstance(raw_faults, list):
        raise TopologyError("faults: expected an array of tables ([[faults]])")
    for i, fl in enumerate(raw_faults):
        where = f"faults[{i}]"
        _check_table(where, fl, FAULT_KEYS)
        # a key given is a trigger (at_time = 0 is one: 0 == False), but random only when true
        triggers = [k for k in ("at_flow", "at_time") if k in fl] + (["random"] if fl.get("random") else [])
        if len(triggers) != 1:
            raise TopologyError(
                f"{where}: give exactly one trigger of at_flow, at_time, random = true"
                f" (got {triggers or 'none'})"
            )
        kill = fl.get("kill")
        if kill is None and not fl.get("random"):
            raise TopologyError(f"{where}.kill: which actor to kill (e.g. 'vm1.vmm')")
        if kill is not None and kill not in names:
            raise TopologyError(f"{where}.kill: no actor {kill!r}; actors: {', '.join(sorted(names))}")
        fault = Fault(
            kill=kill,
            nth=fl.get("nth", 1),
            random=fl.get("random", False),
            seed=fl.get("seed", seed),
            window=_seconds(f"{where}.window", fl.get("window", 1.0)),
            signal=_choice(f"{where}.signal", fl.get("signal", "KILL"), ("KILL", "TERM"), "signal"),
        )
        if "at_flow" in fl:
            fault.at_flow = _choice(f"{where}.at_flow", fl["at_flow"], FLOWS, "flow step")
            vm = fl.get("vm")
            if vm is None or vm not in guest_death:
                raise TopologyError(f"{where}.vm: at_flow needs the VM whose flow it is (1..{len(per_vm)})")
            fault.vm = vm
            _range(f"{where}.nth", fault.nth, 1, 1_000_000)
        if "at_time" in fl:
            fault.at_time = _seconds(f"{where}.at_time", fl["at_time"])
        faults.append(fault)
    scen = _check_table("scenario", data.get("scenario", {}), SCENARIO_KEYS)
    _range("scenario.timeout", scen.get("timeout", 60.0), 0.1, 86400)
    if timed:
        _fire_before(faults, float(scen.get("timeout", 60.0)))
    return RunFile(
        topology=topology,
        name=run.get("name", "vsva"),
        transport=config.transport,
        dead_peer_interval=interval,
        on_guest_death=guest_death,
        faults=faults,
        timeout=float(scen.get("timeout", 60.0)),
    )


def default_run(vms: int = 2, **kw: Any) -> RunFile:
    """`vsva up` without a file: default_topology's two VMs (as `vsva demo`)."""
    from vsva.ops.topology import default_topology

    topo = default_topology(vms, **kw)
    return RunFile(
        topology=topo, transport=topo.transport, on_guest_death={vm: VM.on_guest_death for vm in topo.vms}
    )
