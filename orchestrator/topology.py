"""What a run consists of: which actors exist, how they are configured, how memory is sized.

A topology is plain data, the same for both runtimes: the deterministic scheduler builds the
actors in one process, the ZeroMQ runtime starts one OS process per ActorSpec.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hotpath.layout import PASID_DIR_FRAMES, PASID_MAX

POLICIES = ("naive", "ordered", "reclaim")
HOST = "host"
KVM = "kvm"
VDCM = "vdcm"
ORCH = "orch"
ACCEL = "dsa0"  # the SIOV-style accelerator whose mediated devices vdcm composes


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
    seed: int = 0
    request_timeout: float = 5.0

    def spec(self, name: str) -> ActorSpec:
        return next(a for a in self.actors if a.name == name)

    def names(self, kind: str | None = None) -> list[str]:
        return [a.name for a in self.actors if kind is None or a.kind == kind]

    @property
    def vms(self) -> list[int]:
        return [a.config["vm"] for a in self.actors if a.kind == "vmm"]


def host_devices(vms: list[int], extra: dict[str, dict] | None = None) -> dict[str, dict]:
    """Physical devices and mediated devices the host knows, with their assignment.

    Each VM gets a passthrough function (pfN, programmed with host PASIDs) and two mediated
    devices of the shared accelerator (two mdevs of one parent: binding both to one PASID
    gives that parent's sdev users == 2, the case the seed's users++ is for).
    """
    devices: dict[str, dict] = {ACCEL: {"id": 1, "pci": True, "max_pasids": PASID_MAX, "ats": True,
                                        "vm": 0}}
    for vm in vms:
        devices[pf_name(vm)] = {"id": 1 + vm, "pci": True, "max_pasids": PASID_MAX, "ats": True, "vm": vm}
        for i in range(2):
            devices[f"vm{vm}.mdev{i}"] = {"parent": ACCEL, "vm": vm}
    devices.update(extra or {})
    return devices


def vm_devices(vm: int, devices: dict[str, dict]) -> list[str]:
    """The devices assigned to VM `vm` (what its VMM opens through VFIO)."""
    return [name for name, d in devices.items() if d.get("vm") == vm]


def default_topology(vms: int = 2, *, seed: int = 1, ram_pages: int = 1024, quota: int = 64,
                     workload: str = "demo", iterations: int = 100, non_identity: bool = True,
                     policy: str = "reclaim", allocator: str = "reuse-first",
                     request_timeout: float = 5.0, extra_devices: dict[str, dict] | None = None,
                     ) -> Topology:
    """One host (host, kvm, vdcm) and `vms` VMs (guest + vmm each), as `vsva demo` runs it."""
    vm_ids = list(range(1, vms + 1))
    devices = host_devices(vm_ids, extra_devices)
    common = {"request_timeout": request_timeout}
    vm_names = {vm: {"guest": guest_name(vm), "vmm": vmm_name(vm)} for vm in vm_ids}
    actors = [
        ActorSpec(HOST, "host", {**common, "devices": devices, "subscribers": [KVM, VDCM],
                                 "vms": vm_names, "policy": policy, "allocator": allocator}),
        ActorSpec(KVM, "kvm", {**common, "vms": vm_names}),
        ActorSpec(VDCM, "vdcm", {**common, "host": HOST, "devices": devices, "vms": vm_names}),
    ]
    for vm in vm_ids:
        mine = vm_devices(vm, devices)
        actors.append(ActorSpec(vmm_name(vm), "vmm", {
            **common, "vm": vm, "host": HOST, "guest": guest_name(vm), "devices": mine,
            "ram_pages": ram_pages, "quota": quota, "non_identity": non_identity,
            "mdevs": [d for d in mine if "parent" in devices[d]]}))
        actors.append(ActorSpec(guest_name(vm), "guest", {
            **common, "vm": vm, "vmm": vmm_name(vm), "host": HOST, "vdcm": VDCM, "devices": mine,
            "mdevs": [d for d in mine if "parent" in devices[d]], "workload": workload,
            "iterations": iterations}))
    physical = sum(1 for d in devices.values() if "parent" not in d)
    # RAM and second-level tables per VM; a PASID directory plus its tables per physical device.
    frames = 1 + vms * (ram_pages + 16) + physical * (PASID_DIR_FRAMES + vms + 8) + 256
    return Topology(actors=actors, mem_frames=frames, seed=seed, request_timeout=request_timeout)
