"""Error numbers as the kernel's callers see them (negative on return, like the kernel).

Standard values come from the C library's errno; ENOTSUPP is kernel-internal (524) and is
what intel_svm_bind_gpasid returns for a non-PCI device.
"""

from __future__ import annotations

import errno as _errno

EPERM = _errno.EPERM
EAGAIN = _errno.EAGAIN
EACCES = _errno.EACCES
ENOENT = _errno.ENOENT
EIO = _errno.EIO
ENOMEM = _errno.ENOMEM
EBUSY = _errno.EBUSY
EEXIST = _errno.EEXIST
ENODEV = _errno.ENODEV
EINVAL = _errno.EINVAL
ENOSPC = _errno.ENOSPC
EFAULT = _errno.EFAULT
EPROTO = _errno.EPROTO
EBADMSG = _errno.EBADMSG
EMSGSIZE = _errno.EMSGSIZE
ERANGE = _errno.ERANGE
EPROTONOSUPPORT = _errno.EPROTONOSUPPORT
EOPNOTSUPP = _errno.EOPNOTSUPP
ECONNRESET = _errno.ECONNRESET
ETIMEDOUT = _errno.ETIMEDOUT
EHOSTDOWN = _errno.EHOSTDOWN
EDQUOT = _errno.EDQUOT
ECANCELED = _errno.ECANCELED
ENOTSUPP = 524

_NAMES = {v: k for k, v in globals().items() if k.startswith("E") and isinstance(v, int)}


def name(ret: int) -> str:
    """'0' for success, '-EINVAL' style for an error return."""
    if ret == 0:
        return "0"
    return f"-{_NAMES.get(-ret, str(-ret))}" if ret < 0 else str(ret)
