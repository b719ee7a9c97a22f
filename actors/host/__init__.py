"""The host: IOMMU driver (intel-svm), IOASID core, VFIO kernel side, and the devices.

One actor (`Host`, actor.py) whose handlers are the flows; its state in components:
    vfio.py        physical devices, host frames, each VM's container and the VFIO checks
    ioasid.py      the IOASID core: allocated PASIDs, the pool, reclaim and quarantine
    svm.py         svm/sdev, the bind record's checks, the nested PASID entry
    invalidate.py  cache invalidation passed down by a VMM
    prq.py         the page request queue and its statistics
    dma.py         the devices' DMA engines
"""

from vsva.actors.host.actor import Host

__all__ = ["Host"]
