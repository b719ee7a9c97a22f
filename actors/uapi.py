"""Kernel user-API constants the messages carry (include/uapi/linux/iommu.h, merged form).

The bind record (`iommu_gpasid_bind_data`), the cache invalidation info
(`iommu_cache_invalidate_info`), the I/O page fault and page response codes, and the IOASID
notifier events. Values are the kernel's, so a record on the wire reads like the C struct.
"""

from __future__ import annotations

# Bind record (uapi iommu_gpasid_bind_data).
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
IOMMU_INV_ADDR_FLAGS_ARCHID = 1 << 1
IOMMU_INV_ADDR_FLAGS_LEAF = 1 << 2
IOMMU_INV_PASID_FLAGS_PASID = 1 << 0
IOMMU_INV_PASID_FLAGS_ARCHID = 1 << 1

# IOASID notifier events.
EV_BIND = "bind"
EV_UNBIND = "unbind"
EV_FREE = "free"
EV_FREE_SET = "free_set"  # ioasid_free_set(): every PASID of one VM's set
NOTIFY_EVENTS = (EV_BIND, EV_UNBIND, EV_FREE, EV_FREE_SET)

# I/O page faults (uapi iommu_fault_page_request / iommu_page_response).
IOMMU_FAULT_PERM_READ = 1 << 0
IOMMU_FAULT_PERM_WRITE = 1 << 1
IOMMU_FAULT_PERM_EXEC = 1 << 2
IOMMU_FAULT_PERM_PRIV = 1 << 3
IOMMU_PAGE_RESP_SUCCESS = 0  # page tables populated: retry
IOMMU_PAGE_RESP_INVALID = 1  # do not retry: the access fails
IOMMU_PAGE_RESP_FAILURE = 2  # drop further faults from the device
PAGE_RESP_CODES = (IOMMU_PAGE_RESP_SUCCESS, IOMMU_PAGE_RESP_INVALID, IOMMU_PAGE_RESP_FAILURE)
PRQ_GRPID_MAX = 1 << 9  # the page request group index is 9 bits
