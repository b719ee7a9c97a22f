"""A run's configuration as typed data, with every default written once, here.

`RunConfig` is what holds for the whole run (seed, cleanup policy, allocator, timeouts,
transport); `VmConfig` is one VM (its workload, memory, quota, devices, and what the
supervisor does when its guest dies). The topology builder, topology files, the CLI's
options and the demo all take their defaults from these two classes, so a default changes
in one place. Fixed-value fields are enumerated types (`Policy`, `Allocator`, `Transport`,
`GuestDeath`): a string from outside is validated where it enters (`parse` of each enum).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from vsva.actors.policy import DEFAULT_POLICY, Policy
from vsva.actors.semantics import DEFAULT_KERNEL, Kernel
from vsva.runtime.endpoints import Transport

# `vsva demo` and `vsva explore` run the looping workloads for a few rounds only (a topology
# file's VMs default to VmConfig.iterations).
DEMO_ITERATIONS = 6


class Runtime(StrEnum):
    """Which runtime drives a `vsva demo` session."""

    PROCESSES = "processes"  # one OS process per actor over ZeroMQ
    SIM = "sim"  # every actor in this process, deterministic (vsva.runtime.sim)


class Allocator(StrEnum):
    """Which PASID the host's allocator hands out next."""

    REUSE_FIRST = "reuse-first"  # a freed PASID first
    FRESH = "fresh"  # a never-used PASID while any is left


class GuestDeath(StrEnum):
    """The supervisor's recovery of a crashed guest."""

    STOP = "stop"  # vm_stop (F8); the VM stays off
    RESTART = "restart"  # vm_stop, then the guest is started again and its workload rerun


@dataclass(frozen=True)
class RunConfig:
    """What holds for the whole run."""

    seed: int = 1
    policy: Policy = DEFAULT_POLICY
    kernel: Kernel = DEFAULT_KERNEL  # whose bind/unbind/invalidate answers the host gives
    allocator: Allocator = Allocator.REUSE_FIRST
    request_timeout: float = 5.0  # s: a request without a reply fails (indefinite) after this
    dead_peer_interval: float = 0.5  # s: the supervisor's heartbeat (ping) period and timeout
    transport: Transport = Transport.IPC


@dataclass(frozen=True)
class VmConfig:
    """One VM: a guest and its vmm, one passthrough function and `mediated` mdevs."""

    vm: int
    workload: str = "demo"  # a key of vsva.actors.guest.WORKLOADS
    iterations: int = 100
    ram_pages: int = 1024
    quota: int = 64  # PASIDs the VM may hold at once
    non_identity: bool = True  # mdevs get vmm-chosen guest PASIDs (not equal to the host's)
    mediated: int = 2
    on_guest_death: GuestDeath = GuestDeath.STOP


RUN = RunConfig()
VM = VmConfig(vm=0)
