"""VDCM: the virtual device composition module that carves mediated devices from an accelerator.

The guest programs its mdev with *guest* PASIDs (virtual registers); vdcm translates them to
host PASIDs, learned from the IOASID notifier, before it programs the real device. A
submission whose guest PASID has no host PASID for that mdev fails back to the guest.
"""

from __future__ import annotations

from typing import Any

from vsva.actors import errno as E
from vsva.actors.base import Actor, Call, failed
from vsva.actors.kvm import PasidMap
from vsva.actors.messages import EV_FREE, EV_FREE_SET, Envelope


class Vdcm(Actor):
    """One per host, serving every mdev of the accelerator."""

    def __init__(self, name: str, env: Any):
        super().__init__(name, env)
        self.host: str = self.config.get("host", "host")
        self.mdevs: dict[str, int] = {d: c["vm"] for d, c in self.config["devices"].items() if "parent" in c}
        self.guests: dict[int, str] = {int(vm): n["guest"] for vm, n in self.config.get("vms", {}).items()}
        self.pasids = PasidMap()
        self.submitted = 0
        self.refused = 0
        self.aborted = 0
        self.epoch: dict[int, int] = {}  # host PASID -> how many times it was freed under us
        self.synced = not self.config.get("resync_on_start")
        self.resynced = 0

    def on_start(self):
        """First start or restart by the supervisor: rebuild the mdevs' translations from the
        host's current bindings before serving (see Kvm.on_start)."""
        if self.config.get("resync_on_start"):  # set by the supervisor (orchestrator/supervisor.py)
            yield from self.resync()

    def resync(self):
        reply = yield Call(self.host, "pasid_bindings", {}, flow="resync")
        if reply.get("ret") == 0:
            self.resynced = self.pasids.load(reply.get("bindings", []), set(self.mdevs))
            self.synced = True
        else:
            self.log("resync", f"resync from {self.host} failed: {E.name(reply.get('ret', 0))}")
        return reply

    def on_ioasid_notify(self, msg: Envelope) -> dict:
        if msg.src != self.host:
            return failed(-E.EPERM, error="only the host's notifier may change PASID translations")
        body = msg.body
        if body["event"] == EV_FREE_SET:
            for hpasid in self.pasids.hpasids(body["vm"]):
                self.epoch[hpasid] = self.epoch.get(hpasid, 0) + 1
        elif body["event"] == EV_FREE:
            self.epoch[body["hpasid"]] = self.epoch.get(body["hpasid"], 0) + 1
        ret = self.pasids.apply(body, set(self.mdevs))
        return failed(ret, error=f"cannot apply {msg.body['event']}") if ret else {"ret": 0}

    def on_mdev_submit(self, msg: Envelope):
        """A guest wrote a descriptor into its mdev's virtual portal (F7, mdev path)."""
        body = msg.body
        vm = self.mdevs.get(body["dev"])
        if vm is None or self.guests.get(vm) != msg.src:
            self.refused += 1
            return failed(-E.EPERM, error=f"{msg.src} does not own mdev {body['dev']}")
        if not self.synced:  # a submission that arrived before our resync answered
            yield from self.resync()
        hpasid = self.pasids.lookup(vm, body["pasid"], body["dev"])
        if hpasid is None:
            self.refused += 1
            return failed(-E.EINVAL, error=f"guest PASID {body['pasid']} has no host PASID on {body['dev']}")
        self.submitted += 1
        epoch = self.epoch.get(hpasid, 0)
        reply = yield Call(self.host, "dev_submit", {**body, "pasid": hpasid})
        if self.epoch.get(hpasid, 0) != epoch:  # the PASID was freed while the descriptor ran
            self.aborted += 1
            return failed(-E.ECANCELED, error=f"host PASID {hpasid} freed while the descriptor was in flight",
                          aborted=True)
        return reply

    def snapshot(self) -> dict[str, Any]:
        return {**super().snapshot(), "tables": self.pasids.dump(), "submitted": self.submitted,
                "refused": self.refused, "aborted": self.aborted, "synced": self.synced,
                "resynced": self.resynced}
