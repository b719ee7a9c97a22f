"""The modelled components, one module each, as transport-independent state machines.

guest  the guest kernel: processes, first-level tables, guest vIOMMU driver, device drivers
vmm    the VMM: virtual IOMMU (VCMD, PASID-table shadow, invalidation trap) and VFIO user side
host   the host IOMMU driver: IOASID core, svm/sdev, PASID tables, qi, prq, devices, DMA
kvm    KVM's per-VM guest->host PASID translation (ENQCMD)
vdcm   the virtual device composition module serving mediated devices
"""

from __future__ import annotations

import importlib

from vsva.actors.base import Actor

_CLASSES = {
    "guest": "Guest",
    "vmm": "Vmm",
    "host": "Host",
    "kvm": "Kvm",
    "vdcm": "Vdcm",
    "controller": "vsva.ops.control:Controller",
}


def actor_class(kind: str) -> type[Actor]:
    """The class implementing actor kind `kind` (imported on first use).

    A kind of the form "package.module:Class" names its class directly (tests use it to run
    toy actors through the real launcher).
    """
    target = kind if ":" in kind else _CLASSES[kind]
    module, _, cls = target.rpartition(":") if ":" in target else (f"vsva.actors.{kind}", ":", target)
    found: type[Actor] = getattr(importlib.import_module(module), cls)
    return found
