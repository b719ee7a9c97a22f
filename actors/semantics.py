"""Which kernel's answers the host gives: the seed's (v11 of the series) or what was merged.

`v11`   the seed's intel_svm_bind_gpasid / intel_svm_unbind_gpasid: a device bound again to
        the same PASID counts another user (several mdevs of one parent share an sdev); with
        the record checks of the merged uapi.
`v5.9`  the merged driver (drivers/iommu/intel/svm.c, v5.9, "Disable multiple GPASID-dev
        bind"): a second bind of the same device is -EBUSY; unbind of an allocated but unbound
        PASID, or of a device never bound, returns 0 (pasid_to_svm_sdev); misaligned
        invalidation addresses are accepted ("Handle non-page aligned address").
The choice enters once (topology key `kernel`, CLI option `--kernel`) and is parsed here.
"""

from __future__ import annotations

from vsva.actors.policy import Choice


class Kernel(Choice):
    """The kernel whose bind, unbind and invalidate answers the host reproduces."""

    V11 = "v11"
    V5_9 = "v5.9"


DEFAULT_KERNEL = Kernel.V11
