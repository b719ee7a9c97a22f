"""KVM: the per-VM PASID translation table used by ENQCMD-style work submission.

It subscribes to the IOASID notifier: BIND installs guest PASID -> host PASID for the VM,
the last UNBIND of it and FREE remove it. A translation exists only while the host has the
PASID bound to at least one of the VM's devices (vsva.actors.subscriber). Restarted by the
supervisor, it rebuilds the table from the host's bindings, retried with back-off for a
bounded time (`resync_budget`); a resync given up is `resync_error` in its snapshot.
"""

from __future__ import annotations

from vsva.actors.subscriber import Subscriber


class Kvm(Subscriber):
    """One per host: each VM's VMCS PASID translation table, for every device."""
