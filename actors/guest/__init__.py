"""The guest: its kernel's memory management (kernel.py), the vIOMMU and device drivers of
the actor (actor.py), and the workloads its processes run (workloads.py)."""

from vsva.actors.guest.actor import DmaCounts, Guest
from vsva.actors.guest.kernel import GuestKernel, Process
from vsva.actors.guest.workloads import WORKLOADS, demo_passthrough

__all__ = ["DmaCounts", "Guest", "GuestKernel", "Process", "WORKLOADS", "demo_passthrough"]
