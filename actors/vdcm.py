"""VDCM: the virtual device composition module that carves mediated devices from an accelerator.

The guest programs its mdev with *guest* PASIDs (virtual registers); vdcm translates them to
host PASIDs, learned from the IOASID notifier (vsva.actors.subscriber), before it programs
the real device. A submission whose guest PASID has no host PASID for that mdev fails back
to the guest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from vsva.actors import errno as E
from vsva.actors.base import ActorEnv, Body, Call, Handler, failed
from vsva.actors.catalogue import DevSubmit, IoasidNotify, MdevSubmit
from vsva.actors.messages import Envelope
from vsva.actors.subscriber import Subscriber
from vsva.actors.uapi import EV_FREE, EV_FREE_SET


@dataclass
class PortalStats:
    """The mdevs' virtual portals: descriptors passed to the device, submissions refused (not
    the guest's mdev, or a guest PASID with no host PASID), and descriptors aborted because
    their PASID was freed while they ran."""

    submitted: int = 0
    refused: int = 0
    aborted: int = 0


class Vdcm(Subscriber):
    """One per host, serving every mdev of the accelerator."""

    def __init__(self, name: str, env: ActorEnv):
        super().__init__(name, env)
        self.mdevs: dict[str, int] = {d: c["vm"] for d, c in self.config["devices"].items() if "parent" in c}
        self.tracked = set(self.mdevs)
        self.guests: dict[int, str] = {int(vm): n["guest"] for vm, n in self.config.get("vms", {}).items()}
        self.portal = PortalStats()
        self.epoch: dict[int, int] = {}  # host PASID -> how many times it was freed under us

    def notified(self, note: IoasidNotify) -> None:
        """A freed PASID (or a whole set) bumps its epoch: descriptors in flight under it abort."""
        freed = (
            self.pasids.hpasids(note.vm)
            if note.event == EV_FREE_SET
            else [note.hpasid]
            if note.event == EV_FREE
            else []
        )
        for hpasid in freed:
            self.epoch[hpasid] = self.epoch.get(hpasid, 0) + 1

    def on_mdev_submit(self, msg: Envelope, req: MdevSubmit) -> Handler:
        """A guest wrote a descriptor into its mdev's virtual portal (F7, mdev path)."""
        vm = self.mdevs.get(req.dev)
        if vm is None or self.guests.get(vm) != msg.src:
            self.portal.refused += 1
            return failed(-E.EPERM, error=f"{msg.src} does not own mdev {req.dev}")
        if not self.synced:  # a submission that arrived before our resync answered
            yield from self.resync()
        hpasid = self.pasids.lookup(vm, req.gpasid, req.dev)
        if hpasid is None:
            self.portal.refused += 1
            return failed(-E.EINVAL, error=f"guest PASID {req.gpasid} has no host PASID on {req.dev}")
        self.portal.submitted += 1
        epoch = self.epoch.get(hpasid, 0)
        reply: Body = yield Call(
            self.host,
            DevSubmit(
                dev=req.dev,
                hpasid=hpasid,
                op=req.op,
                src=req.src,
                dst=req.dst,
                len=req.len,
                pattern=req.pattern,
            ),
        )
        if self.epoch.get(hpasid, 0) != epoch:  # the PASID was freed while the descriptor ran
            self.portal.aborted += 1
            return failed(
                -E.ECANCELED,
                error=f"host PASID {hpasid} freed while the descriptor was in flight",
                aborted=True,
            )
        return reply

    def snapshot(self) -> dict[str, Any]:
        return {
            **super().snapshot(),
            "portal": asdict(self.portal),
        }
