"""What kvm and vdcm share as IOASID notifier subscribers: the guest -> host PASID map and
the resync from the host after a restart.

Both learn guest PASID -> host PASID translations from the host's notifier (BIND, UNBIND,
FREE, FREE_SET) and, after a restart by the supervisor, rebuild them from the host's
current bindings (the events sent while they were dead are lost), page after page, loaded
only once the last page is in and every page was of one generation of the host's bindings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from vsva.actors import errno as E
from vsva.actors.base import DEFAULT_TIMEOUT, Actor, ActorEnv, Body, Call, Steps, Wait, failed
from vsva.actors.catalogue import IoasidNotify, PasidBindings
from vsva.actors.messages import Envelope
from vsva.actors.uapi import EV_BIND, EV_FREE, EV_FREE_SET, EV_UNBIND

# The resync after a restart: a host that is slow to answer, or whose reply was lost with a
# dead connection, is asked again, RESYNC_ATTEMPTS times in all, RESYNC_BACKOFF_S before the
# second attempt and twice as long before each next one; a definite refusal is not retried,
# bindings that changed between the pages of an attempt (-EAGAIN) are.
RESYNC_ATTEMPTS = 4
RESYNC_BACKOFF_S = 0.1
RESYNC_TRANSIENT = (-E.ETIMEDOUT, -E.EHOSTDOWN, -E.ECONNRESET, -E.EBUSY, -E.EAGAIN)


def resync_timeout(config: dict[str, Any]) -> float:
    """How long one resync attempt waits for the host, all its pages (the actor's
    pasid_bindings timeout)."""
    base = float(config.get("request_timeout", DEFAULT_TIMEOUT))
    return float(config.get("timeouts", {}).get(PasidBindings.KIND, base))


def resync_budget(config: dict[str, Any]) -> float:
    """The longest a subscriber with `config` takes to end its resync (synced, or given up
    with `resync_error`): every attempt timing out, plus the back-offs between them. The
    supervisor waits that long for a restarted kvm or vdcm, and a little more."""
    backoffs = RESYNC_BACKOFF_S * (2.0 ** (RESYNC_ATTEMPTS - 1) - 1)  # 0.1 + 0.2 + 0.4
    return RESYNC_ATTEMPTS * resync_timeout(config) + backoffs


class PasidMap:
    """guest PASID -> host PASID per VM, with the devices each mapping is bound through.

    Each device carries its number of outstanding binds: the host notifies BIND for every
    bind (users++ included) and UNBIND for every unbind, so the mapping must outlive all
    but the last UNBIND of a device bound several times.
    """

    def __init__(self) -> None:
        self.maps: dict[int, dict[int, tuple[int, dict[str, int]]]] = {}

    def apply(self, note: IoasidNotify, devices: set[str] | None = None) -> int:
        """Apply one notifier event; `devices` limits which devices this subscriber tracks."""
        event, vm, gpasid, hpasid, dev = note.event, note.vm, note.gpasid, note.hpasid, note.dev
        if event == EV_FREE_SET:
            self.maps.pop(vm, None)
            return 0
        table = self.maps.setdefault(vm, {})
        if event == EV_FREE:
            if gpasid in table and table[gpasid][0] == hpasid:
                del table[gpasid]
            return 0
        if event not in (EV_BIND, EV_UNBIND):
            return -E.EINVAL
        if devices is not None and dev not in devices:
            return 0
        current = table.get(gpasid)
        if event == EV_BIND:
            if current is not None and current[0] != hpasid:
                return -E.EEXIST
            devs = table.setdefault(gpasid, (hpasid, {}))[1]
            devs[dev] = devs.get(dev, 0) + 1
        elif current is not None and current[0] == hpasid and dev in current[1]:
            current[1][dev] -= 1
            if not current[1][dev]:
                del current[1][dev]
            if not current[1]:
                del table[gpasid]
        return 0

    def load(self, bindings: list[dict[str, Any]], devices: set[str] | None = None) -> int:
        """Merge the host's current bindings (a resync after a restart): each listed
        (vm, gpasid, dev) takes the host's hpasid and bind count; nothing else changes."""
        n = 0
        for b in bindings:
            if devices is not None and b["dev"] not in devices:
                continue
            table = self.maps.setdefault(b["vm"], {})
            current = table.get(b["gpasid"])
            if current is None or current[0] != b["hpasid"]:
                current = table[b["gpasid"]] = (b["hpasid"], {})
            current[1][b["dev"]] = max(1, int(b.get("users", 1)))
            n += 1
        return n

    def hpasids(self, vm: int) -> list[int]:
        """Every host PASID the VM's table maps to."""
        return [h for h, _ in self.maps.get(vm, {}).values()]

    def lookup(self, vm: int, gpasid: int, dev: str | None = None) -> int | None:
        entry = self.maps.get(vm, {}).get(gpasid)
        if entry is None or (dev is not None and dev not in entry[1]):
            return None
        return entry[0]

    def dump(self) -> dict[str, dict[str, dict[str, Any]]]:
        return {
            str(vm): {str(g): {"hpasid": h, "devs": sorted(d)} for g, (h, d) in t.items()}
            for vm, t in self.maps.items()
            if t
        }


@dataclass
class NotifierStats:
    """What a subscriber counted: notifier events applied and refused (not from the host, or
    not applicable to its map), resyncs from the host, and the bindings the last one took."""

    events: int = 0
    refused: int = 0
    resyncs: int = 0
    resynced: int = 0
    resync_failures: int = 0  # attempts the host did not answer with the bindings


class Subscriber(Actor):
    """An IOASID notifier subscriber: its PasidMap, fed by the notifier and the resync.

    `tracked` limits the devices it keeps translations for (None: all of them)."""

    tracked: set[str] | None = None

    def __init__(self, name: str, env: ActorEnv):
        super().__init__(name, env)
        self.host: str = self.config.get("host", "host")
        self.pasids = PasidMap()
        self.synced = not self.config.get("resync_on_start")
        self.resync_error: str | None = None  # why the resync on start gave up (one line)
        self.resync_timeouts: list[dict[str, Any]] = []  # the last attempts' timeout records
        self.notifier = NotifierStats()

    def on_start(self) -> Steps[None]:
        """First start or restart by the supervisor: rebuild the tables from the host's current
        bindings before serving (the notifier events sent while we were dead are lost)."""
        if self.config.get("resync_on_start"):  # set by the supervisor
            yield from self.resync_until_synced()

    def resync_until_synced(self) -> Steps[None]:
        """Resync, retrying what may pass (the host slow, its reply lost with a connection)
        with a doubling back-off, RESYNC_ATTEMPTS times at most (bounded: resync_budget).
        Giving up leaves one line in `resync_error` (the snapshot's), which the supervisor
        reports; each failed attempt is counted, none is retried silently."""
        backoff = RESYNC_BACKOFF_S
        for attempt in range(1, RESYNC_ATTEMPTS + 1):
            if self.synced:  # a submission's resync (vdcm) got there first
                return
            reply = yield from self.resync()
            ret = reply.get("ret", 0)
            if ret == 0:
                return
            if ret not in RESYNC_TRANSIENT or attempt == RESYNC_ATTEMPTS:
                self.resync_error = (
                    f"pasid_bindings to {self.host} failed {attempt} time(s), last {E.name(ret)}"
                    + (f" ({reply['error']})" if reply.get("error") else "")
                )
                self.log("resync", f"gave up the resync: {self.resync_error}")
                return
            yield Wait(("resync backoff", attempt), backoff)
            backoff *= 2

    def resync(self) -> Steps[Body]:
        """One resync attempt: merge the host's current bindings into the tables."""
        reply = yield from self.list_bindings()
        if reply.get("ret") == 0:
            self.notifier.resynced = self.pasids.load(reply["bindings"], self.tracked)
            self.notifier.resyncs += 1
            self.synced = True
            self.resync_error = None
        else:
            self.notifier.resync_failures += 1
            if isinstance(reply.get("timed_out"), dict):  # for the reports' timeouts
                self.resync_timeouts = [*self.resync_timeouts, reply["timed_out"]][-RESYNC_ATTEMPTS:]
            self.log("resync", f"resync from {self.host} failed: {E.name(reply.get('ret', 0))}")
        return reply

    def list_bindings(self) -> Steps[Body]:
        """Every page of the host's bindings, as one reply: its bindings, or the first failed
        page's reply. The pages share one attempt's timeout, so that `resync_budget` bounds
        the whole resync. Pages of two generations would make a table that never was (a
        binding gone before its page, listed on an earlier one, would come back): that fails
        the attempt with -EAGAIN, and the next attempt lists them again."""
        deadline = self.now + resync_timeout(self.config)
        bindings: list[dict[str, Any]] = []
        gen: int | None = None
        while True:
            last: dict[str, Any] = bindings[-1] if bindings else {"hpasid": 0, "dev": ""}
            page = PasidBindings(after_hpasid=last["hpasid"], after_dev=last["dev"])
            reply: Body = yield Call(self.host, page, flow="resync", timeout=max(0.0, deadline - self.now))
            if reply.get("ret") != 0:
                return reply
            if gen is not None and reply["gen"] != gen:
                why = f"the host's bindings changed during the resync (generation {gen}, then {reply['gen']})"
                return failed(-E.EAGAIN, error=why)
            gen = reply["gen"]
            bindings += reply["bindings"]
            if not reply["more"]:
                return {"ret": 0, "bindings": bindings}

    def on_ioasid_notify(self, msg: Envelope, req: IoasidNotify) -> dict[str, Any]:
        if msg.src != self.host:
            self.notifier.refused += 1
            return failed(-E.EPERM, error="only the host's notifier may change PASID translations")
        self.notified(req)
        ret = self.pasids.apply(req, self.tracked)
        if ret:
            self.notifier.refused += 1
            return failed(ret, error=f"cannot apply {req.event}")
        self.notifier.events += 1
        return {"ret": 0}

    def notified(self, note: IoasidNotify) -> None:
        """What a subscriber does with an event besides its map (vdcm counts frees)."""

    def snapshot(self) -> dict[str, Any]:
        return {
            **super().snapshot(),
            "tables": self.pasids.dump(),
            "synced": self.synced,
            "resync_error": self.resync_error,
            "resync_timeouts": self.resync_timeouts,
            "notifier": asdict(self.notifier),
        }
