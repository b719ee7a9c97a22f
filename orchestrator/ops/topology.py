"""What a run consists of: which actors exist, how they are configured, how memory is sized.

A topology is plain data, the same for both runtimes: the deterministic scheduler builds the
actors in one process, the ZeroMQ runtime starts one OS process per ActorSpec.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from vsva.actors.catalogue import ORCHESTRATOR, binding_bytes
from vsva.actors.guest.kernel import reserved_frames
from vsva.actors.guest.workloads import tables_kept
from vsva.actors.memory import radix_tables
from vsva.actors.messages import MAX_FRAME
from vsva.actors.policy import Policy
from vsva.actors.semantics import Kernel
from vsva.hotpath.layout import PASID_DIR_FRAMES, PASID_MAX
from vsva.ops.config import RUN, VM, Allocator, RunConfig, VmConfig
from vsva.ops.pacing import request_timeouts, resync_pages
from vsva.runtime.endpoints import Transport

POLICIES = tuple(p.value for p in Policy)
HOST = "host"
KVM = "kvm"
VDCM = "vdcm"
ORCH = ORCHESTRATOR
PER_VM_KINDS = ("guest", "vmm")  # one of each per VM; the other kinds serve every VM
ACCEL = "dsa0"  # the SIOV-style accelerator whose mediated devices vdcm composes
# The most guest pages a workload maps beyond the PASID directories (measured on the
# deterministic runtime at the default iterations: demo 47, fault_loop 47, churn 10).
WORKLOAD_PAGES = 64
# The guest's RAM is a list of host frames that travels whole in one message (vm_start's
# reply, vm_info), each frame number up to 5 bytes of msgpack, and no frame exceeds
# MAX_FRAME (1 MiB): 131072 pages (512 MiB) take at most 640 KiB, leaving room for the rest.
MAX_RAM_PAGES = MAX_FRAME // 8


def min_ram_pages(devices: int, workload: str = "", iterations: int = 0) -> int:
    """The fewest guest RAM pages a VM with `devices` devices (its passthrough function and
    mediated devices) boots and runs `iterations` rounds of `workload` in: the guest keeps
    one PASID directory per device at the bottom of its RAM (reserved_frames), the workload's
    processes map the rest, and some keep page tables that grow with the rounds (tables_kept)."""
    return reserved_frames(devices) + WORKLOAD_PAGES + tables_kept(workload, iterations)


def guest_name(vm: int) -> str:
    return f"vm{vm}.guest"


def vmm_name(vm: int) -> str:
    return f"vm{vm}.vmm"


def pf_name(vm: int) -> str:
    return f"pf{vm}"


@dataclass
class ActorSpec:
    """One actor: its unique name, its kind (a key of actors.ACTOR_KINDS) and configuration."""

    name: str
    kind: str
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class Topology:
    actors: list[ActorSpec]
    mem_frames: int
    seed: int = RUN.seed
    request_timeout: float = RUN.request_timeout
    transport: str = RUN.transport  # see vsva.runtime.endpoints.Transport
    timeouts: dict[str, float] = field(default_factory=dict)  # per kind, every actor's (pacing)

    def spec(self, name: str) -> ActorSpec:
        return next(a for a in self.actors if a.name == name)

    def names(self, kind: str | None = None) -> list[str]:
        return [a.name for a in self.actors if kind is None or a.kind == kind]

    def peers_of(self, name: str) -> list[str]:
        """The actors `name` talks to: every actor named in its configuration (a guest its
        vmm, the host and vdcm; the host every VM). Connections to these are made at start;
        any other peer is connected on first use, so a topology of N VMs costs O(N)
        connections, not O(N^2)."""
        known = set(self.names())
        found: list[str] = []

        def scan(value: Any) -> None:
            if isinstance(value, str):
                if value in known and value != name and value not in found:
                    found.append(value)
            elif isinstance(value, dict):
                for item in value.values():
                    scan(item)
            elif isinstance(value, (list, tuple)):
                for item in value:
                    scan(item)

        scan(self.spec(name).config)
        return found

    @property
    def vms(self) -> list[int]:
        return [a.config["vm"] for a in self.actors if a.kind == "vmm"]


def host_devices(
    per_vm: Sequence[VmConfig], extra: dict[str, dict[str, Any]] | None = None
) -> dict[str, dict[str, Any]]:
    """Physical devices and mediated devices the host knows, with their assignment.

    Each VM gets a passthrough function (pfN, programmed with host PASIDs) and `mediated`
    (default two) mediated devices of the shared accelerator: binding two mdevs of one parent
    to one PASID gives that parent's sdev users == 2, the case the bind's users count is for (docs/design.md §3, F2).
    """
    devices: dict[str, dict[str, Any]] = {
        ACCEL: {"id": 1, "pci": True, "max_pasids": PASID_MAX, "ats": True, "vm": 0}
    }
    for v in per_vm:
        devices[pf_name(v.vm)] = {
            "id": 1 + v.vm,
            "pci": True,
            "max_pasids": PASID_MAX,
            "ats": True,
            "vm": v.vm,
        }
        for i in range(v.mediated):
            devices[f"vm{v.vm}.mdev{i}"] = {"parent": ACCEL, "vm": v.vm}
    devices.update(extra or {})
    return devices


def vm_devices(vm: int, devices: dict[str, dict[str, Any]]) -> list[str]:
    """The devices assigned to VM `vm` (what its VMM opens through VFIO)."""
    return [name for name, d in devices.items() if d.get("vm") == vm]


def build_topology(
    per_vm: Sequence[VmConfig], run: RunConfig = RUN, extra_devices: dict[str, dict[str, Any]] | None = None
) -> Topology:
    """One host (host, kvm, vdcm) and these VMs (guest + vmm each)."""
    devices = host_devices(per_vm, extra_devices)
    # each PASID of a VM's quota bound at most once per device of the VM (a rebind counts users)
    bindings = sum(v.quota * len(vm_devices(v.vm, devices)) for v in per_vm)
    pages = resync_pages(bindings, max((binding_bytes(dev) for dev in devices), default=1))
    timeouts = request_timeouts(len(per_vm), run.request_timeout, bindings, pages)
    common = {"request_timeout": run.request_timeout, "timeouts": timeouts}
    vm_names = {v.vm: {"guest": guest_name(v.vm), "vmm": vmm_name(v.vm)} for v in per_vm}
    actors = [
        ActorSpec(
            HOST,
            "host",
            {
                **common,
                "devices": devices,
                "subscribers": {KVM: "cpu", VDCM: "device"},  # notifier priorities
                "vms": vm_names,
                "policy": run.policy,
                "kernel": run.kernel,
                "allocator": run.allocator,
            },
        ),
        ActorSpec(KVM, "kvm", {**common, "vms": vm_names}),
        ActorSpec(VDCM, "vdcm", {**common, "host": HOST, "devices": devices, "vms": vm_names}),
    ]
    for v in per_vm:
        mine = vm_devices(v.vm, devices)
        mdevs = [d for d in mine if "parent" in devices[d]]
        actors.append(
            ActorSpec(
                vmm_name(v.vm),
                "vmm",
                {
                    **common,
                    "vm": v.vm,
                    "host": HOST,
                    "guest": guest_name(v.vm),
                    "devices": mine,
                    "ram_pages": v.ram_pages,
                    "quota": v.quota,
                    "non_identity": v.non_identity,
                    "mdevs": mdevs,
                },
            )
        )
        actors.append(
            ActorSpec(
                guest_name(v.vm),
                "guest",
                {
                    **common,
                    "vm": v.vm,
                    "vmm": vmm_name(v.vm),
                    "host": HOST,
                    "vdcm": VDCM,
                    "devices": mine,
                    "mdevs": mdevs,
                    "workload": v.workload,
                    "iterations": v.iterations,
                },
            )
        )
    physical = sum(1 for d in devices.values() if "parent" not in d)
    # RAM, the second-level tables mapping it and 16 spare per VM (a fixed 16 held ~8 MiB of
    # RAM's tables; a larger RAM's ate the next VM's frames: its vfio_open failed); a PASID
    # directory plus its tables per physical device.
    ram = sum(v.ram_pages + radix_tables(v.ram_pages) + 16 for v in per_vm)
    frames = 1 + ram + physical * (PASID_DIR_FRAMES + len(per_vm) + 8) + 256
    return Topology(
        actors=actors,
        mem_frames=frames,
        seed=run.seed,
        request_timeout=run.request_timeout,
        transport=run.transport,
        timeouts=timeouts,
    )


def default_topology(
    vms: int = 2,
    *,
    seed: int = RUN.seed,
    ram_pages: int = VM.ram_pages,
    quota: int = VM.quota,
    workload: str = VM.workload,
    iterations: int = VM.iterations,
    non_identity: bool = VM.non_identity,
    policy: Policy | str = RUN.policy,
    kernel: Kernel | str = RUN.kernel,
    allocator: Allocator | str = RUN.allocator,
    request_timeout: float = RUN.request_timeout,
    transport: Transport | str = RUN.transport,
    extra_devices: dict[str, dict[str, Any]] | None = None,
) -> Topology:
    """`vms` identical VMs, as `vsva demo` runs them."""
    run = RunConfig(
        seed=seed,
        policy=Policy.parse(policy),
        kernel=Kernel.parse(kernel),
        allocator=Allocator(allocator),
        request_timeout=request_timeout,
        transport=Transport(transport),
    )
    per_vm = [
        VmConfig(
            vm=vm,
            ram_pages=ram_pages,
            quota=quota,
            non_identity=non_identity,
            workload=workload,
            iterations=iterations,
        )
        for vm in range(1, vms + 1)
    ]
    return build_topology(per_vm, run, extra_devices)
