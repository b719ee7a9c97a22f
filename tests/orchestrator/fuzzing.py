"""A bounded fuzzer against a live topology over real sockets (tests/orchestrator/hostile.py
is the attacker: raw pyzmq and msgpack, the wire format, kinds and field names from the
documentation: docs/flows.md's message table, actors/messages.py's envelope).

Inputs (hypothesis, generation only): garbage bytes, msgpack values that are not maps,
msgpack headers that promise huge lengths, frames beyond the 1 MiB limit, multi-part frames,
envelopes with wrong or extreme fields (versions, ids, clocks, src/dst lies, forged replies),
and well-formed requests of every documented kind with hostile bodies (huge, negative,
mistyped and nested values), including the control kinds only the orchestrator may send.
Each envelope goes to every actor at once (host, kvm, vdcm, a vmm, a guest), each through
its own stranger ("mallory-<target>", a socket of its own in the run directory), so every
one of them must be refused; hostile control requests go to the supervisor's control socket.
Over tcp the strangers hold CURVE keys of the run (`keyed_strangers`), so their frames pass
the handshake and reach the runtime and the actors as over ipc.

The oracle, per input: an answer comes back exactly when the protocol says one does
(`expects_answer`: everything but replies and one-way messages is answered, by the runtime
or by the actor), and it is a refusal. At checkpoints (every `every` inputs, and at the end):
every actor process is alive (none restarted) and answers its snapshot; no snapshot differs
from the one taken before the first input except in the counters of refused input
(DIAGNOSTIC); no actor holds more file descriptors than at the first checkpoint. A checkpoint
first waits for a barrier per target and way back (a request behind everything sent, answered
last by the actor, and a frame the runtime refuses, answered last by the runtime), so the
snapshots are never queued behind a burst and every answer is counted.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack
import zmq
from hostile import Raw
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as fixed_seed
from hypothesis import strategies as st

from vsva.actors import errno as E
from vsva.actors.base import Call, Gather

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
with open(os.path.join(ROOT, "docs", "flows.md")) as _doc:
    _FLOWS_MD = _doc.read()
DOCUMENTED = sorted(set(re.findall(r"^\| [^|]+ \| `([a-z_]+)` \|", _FLOWS_MD, re.M)))


def _documented_bodies(text: str) -> dict[str, list[tuple[str, str, list[Any]]]]:
    """kind -> its body fields as docs/flows.md documents them: (name, type, the values at
    and beyond its range or choices)."""
    out: dict[str, list[tuple[str, str, list[Any]]]] = {}
    for section in re.split(r"^### ", text, flags=re.M)[1:]:
        kind = re.match(r"`([a-z_]+)`", section)
        body = section.split("- body:\n", 1)
        if kind is None or len(body) == 1:
            continue
        body[1] = body[1].split("- reply", 1)[0]
        fields = []
        for m in re.finditer(
            r"^  - `(\w+)`: ([a-z|]+)(?: (-?\d+)\.\.(-?\d+))?(?: in ([^—\n]+))?", body[1], re.M
        ):
            name, typ, lo, hi, choices = m.groups()
            edges: list[Any] = []
            if lo is not None:
                edges = [int(lo), int(hi), int(lo) - 1, int(hi) + 1, (int(lo) + int(hi)) // 2]
            elif choices:
                items = [c.strip() for c in choices.split(",")]
                edges = [int(c) if typ == "int" else c for c in items] + (["x"] if typ == "str" else [-1, 3])
            fields.append((name, typ.split("|")[0], edges))
        out[kind.group(1)] = fields
    return out


BODIES = _documented_bodies(_FLOWS_MD)
KINDS = [*DOCUMENTED, "frobnicate", "", "x" * 100]
FIELDS = sorted(
    {
        *("dev", "hpasid", "gpasid", "vm", "event", "data", "info", "descs", "op", "src", "dst"),
        *("len", "pattern", "flow", "nth", "grpid", "addr", "perm", "last", "code", "ram_pages"),
        *("devices", "quota", "hold", "drain", "argsz", "version", "format", "flags", "gpgd"),
    }
)
TARGETS = ["host", "kvm", "vdcm", "vm1.vmm", "vm1.guest"]
CTL = "ctl"  # the supervisor's control socket
STRANGER = {t: f"mallory-{t}" for t in TARGETS}
MAX_FRAME = 1 << 20  # actors/messages.py: larger frames are refused (-EMSGSIZE)
BLOB = 2048  # bytes hypothesis draws per example (its buffer holds 8 KiB at most)
DRAWS = 24  # inputs drawn from each (~55 bytes a draw): each goes to every target
# Counters of refused input, not state: a forged reply is counted where it lands (dropped),
# a notifier event from a stranger by the subscriber that refused it, a submission to an
# mdev it does not own by vdcm's portal.
DIAGNOSTIC = [("dropped_replies",), ("notifier", "refused"), ("portal", "refused")]

_EDGES = [0, 1, -1, 7, 63, 64, 2**20 - 1, 2**20, 2**31, 2**62, 2**62 + 1, 2**63, 2**64 - 1, -(2**63)]
_JUNK = [
    *("", "x" * 300, "pf1", "dsa0", "vm1.mdev0", "vm1.vmm", "host", "orch", "free_set", "copy"),
    *("\x00", "..", b"", b"\xff" * 8, None, True, False, 1.5, -0.0, float("inf"), float("nan")),
    *([], [1, "a"], {}, {"a": 1}, [[[[]]]], {"hpasid": 1, "gpasid": 1}, [{"type": "wait"}]),
]
# msgpack headers announcing far more than follows: bin32, str32, array32, map32, ext32
_HUGE = [bytes([tag]) + (0xFFFFFFF0).to_bytes(4, "big") for tag in (0xC6, 0xDB, 0xDD, 0xDF, 0xC9)]
_BIG = [b"\x00" * (MAX_FRAME + 1), msgpack.packb({"v": 1, "body": {"data": b"x" * (MAX_FRAME + 16)}})]
_ENVELOPE_KEYS = ["v", "id", "src", "dst", "kind", "corr", "rr", "clock", "flow", "body"]
_SHAPES = ["bytes", "value", "huge", "big", *["envelope"] * 3, *["request"] * 2, *["typed"] * 4]
_CTL_SHAPES = ["bytes", "value", "huge", "parts", *["map"] * 6]
_OPS = ["ps", "status", "kill", "audit", "down", "x"]


class Draw:
    """Structure from the bytes hypothesis draws (as a fuzzer's data provider does): every
    choice reads the next bytes, and an exhausted buffer reads zeros, so any blob decodes.
    One blob gives DRAWS inputs; drawing each field as a hypothesis strategy of its own
    cost far more per input (hypothesis's per-draw bookkeeping: ~40 inputs/s here)."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk.ljust(n, b"\x00")

    def below(self, n: int) -> int:
        return int.from_bytes(self.take(1 if n <= 256 else 2), "big") % n

    def pick(self, seq: list[Any]) -> Any:
        return seq[self.below(len(seq))]

    def chance(self, one_in: int) -> bool:
        return self.below(one_in) == 0

    def integer(self, lo: int = -(2**63), hi: int = 2**64 - 1) -> int:
        if self.chance(2):
            return min(max(self.pick(_EDGES), lo), hi)
        return lo + int.from_bytes(self.take(8), "big") % (hi - lo + 1)

    def leaf(self) -> Any:
        return self.integer() if self.chance(2) else self.pick(_JUNK)

    def value(self) -> Any:
        shape = self.below(4)
        if shape == 0:
            return [self.leaf() for _ in range(self.below(4))]
        if shape == 1:
            return {self.pick(FIELDS): self.leaf() for _ in range(self.below(4))}
        return self.leaf()

    def body(self) -> dict[str, Any]:
        return {self.pick(FIELDS): self.value() for _ in range(self.below(7))}

    def binary(self, most: int) -> bytes:
        return self.take(self.below(most + 1))

    def typed(self, typ: str, edges: list[Any]) -> Any:
        """A value of the documented type (at or beyond its documented range), now and then not."""
        if self.chance(8):
            return self.value()
        if edges and self.chance(2):
            return self.pick(edges)
        if typ == "int":
            return self.integer()
        if typ == "float":
            return self.pick([0.0, 0.001, 59.9, 60.0, 60.5, -1.0, 1e300])
        if typ == "str":
            return self.pick(["pf1", "dsa0", "vm1.mdev0", "vm1.mdev1", "pf2", "", "x" * 80])
        if typ == "list":
            return [self.typed("int", []) if self.chance(2) else self.body() for _ in range(self.below(4))]
        if typ == "dict":
            return {k: self.integer() for k in FIELDS if self.chance(3)}
        return self.leaf()

    def documented_body(self, kind: str) -> dict[str, Any]:
        """Every field the kind documents, typed as documented (hostile values within)."""
        body = {name: self.typed(typ, edges) for name, typ, edges in BODIES.get(kind, [])}
        if body and self.chance(6):
            body.pop(self.pick(list(body)))
        return body


def envelope_input(d: Draw) -> dict[str, Any] | bytes | list[bytes]:
    """One input for the actors: an envelope map (its "src"/"dst" filled in per target when
    they are the placeholder None), or raw frame bytes, or a list of frames (multi-part)."""
    shape = d.pick(_SHAPES)
    if shape == "bytes":
        return d.binary(64)
    if shape == "value":
        return msgpack.packb(d.value(), use_bin_type=True)
    if shape == "huge":
        return d.pick(_HUGE) + d.binary(8)
    if shape == "big" and d.chance(50):  # rarely: 1 MiB each
        return d.pick(_BIG)
    env: dict[str, Any] = {
        "v": 1,
        "id": d.integer(),
        "src": None,  # the stranger's own name
        "dst": None,  # the target's
        "kind": d.pick(KINDS),
        "corr": None,
        "rr": True,
        "clock": d.integer(0, 2**62),
        "flow": "",
        "body": d.body(),
    }
    if shape == "typed":
        env["kind"] = d.pick(DOCUMENTED)
        env["body"] = d.documented_body(env["kind"])
    if shape == "envelope":
        for _ in range(d.below(4)):
            env[d.pick(_ENVELOPE_KEYS)] = d.value()
        if d.chance(2):
            env["corr"] = d.integer()  # a forged reply
        for _ in range(d.below(3)):
            env.pop(d.pick(_ENVELOPE_KEYS), None)
        if d.chance(10):
            return [msgpack.packb(env, use_bin_type=True, default=repr)] * (2 + d.below(3))
    return env


def control_input(d: Draw) -> bytes | list[bytes]:
    """One input for the supervisor's control socket (a msgpack map {"op": ...}, or not)."""
    shape = d.pick(_CTL_SHAPES)
    if shape == "bytes":
        return b"\x00" + d.binary(63)
    if shape == "value":
        return msgpack.packb(d.value(), use_bin_type=True)
    if shape == "huge":
        return d.pick(_HUGE)
    req = {"op": d.pick(_OPS) if d.chance(2) else d.leaf()}
    req.update({d.pick(["name", *FIELDS]): d.value() for _ in range(d.below(4))})
    if req["op"] in ("down", "audit") and set(req) == {"op"}:
        req["please"] = True  # the owner's own operations stay the owner's: refused as malformed
    if req["op"] == "kill" and isinstance(req.get("name"), str) and set(req) == {"op", "name"}:
        req["name"] = "no-such-" + req["name"]
    frame = msgpack.packb(req, use_bin_type=True, default=repr)
    return [frame, b"junk"] if shape == "parts" else frame


def expects_answer(parts: list[bytes], target: str) -> bool:
    """Whether the protocol answers this message to `target`'s stranger (actors/messages.py,
    vsva.runtime.loop, actors/base.py): a reply (`corr` set) never is; a one-way message
    (`rr` false) is not when it passes every check (the runtime answers what it refuses: a
    malformed frame, or a src or dst that is not the connection's); anything else is."""
    if len(parts) != 1 or len(parts[0]) > MAX_FRAME:
        return True
    try:
        raw = msgpack.unpackb(parts[0], raw=False, strict_map_key=True)
    except Exception:
        return True
    if not isinstance(raw, dict):
        return True
    if raw.get("corr") is not None:
        return False
    wire = {"id": int, "src": str, "dst": str, "kind": str, "clock": int, "body": dict}
    well_formed = raw.get("v") == 1 and all(
        isinstance(raw.get(k), t) and not (t is int and isinstance(raw.get(k), bool)) for k, t in wire.items()
    )
    routed = well_formed and raw["src"] == STRANGER[target] and raw["dst"] == target
    return not routed or not 0 <= raw["clock"] <= 2**62 or bool(raw.get("rr"))


def wire_parts(item: dict[str, Any] | bytes | list[bytes], target: str) -> list[bytes]:
    """The frames one input is for `target` (a placeholder src/dst becomes the stranger's/target's)."""
    if isinstance(item, bytes):
        return [item]
    if isinstance(item, list):
        return item
    env = dict(item)
    if "src" in env and env["src"] is None:
        env["src"] = STRANGER[target]
    if "dst" in env and env["dst"] is None:
        env["dst"] = target
    return [msgpack.packb(env, use_bin_type=True, default=repr)]


def without_diagnostics(state: dict[str, Any]) -> dict[str, Any]:
    """A snapshot without the DIAGNOSTIC counters (a copy)."""
    out = dict(state)
    for path in DIAGNOSTIC:
        node = out
        for key in path[:-1]:
            if not isinstance(node.get(key), dict):
                break
            node[key] = node = dict(node[key])
        else:
            node.pop(path[-1], None)
    return out


@dataclass
class Tally:
    """What one target was sent and what came back."""

    sent: int = 0
    expected: int = 0
    answers: int = 0
    accepted: list[Any] = field(default_factory=list)  # answers with ret 0: none may exist


@contextlib.contextmanager
def keyed_strangers() -> Iterator[None]:
    """tcp: the launcher also creates a CURVE key pair for every stranger (as if a local user
    had been lent one), so their frames pass the handshake and reach the runtime."""
    import vsva.ops.launcher as launcher

    real = launcher.create_keys

    def with_strangers(run_dir: str, names: list[str]) -> None:
        real(run_dir, [*names, *STRANGER.values()])

    launcher.create_keys = with_strangers
    try:
        yield
    finally:
        launcher.create_keys = real


def _keys(run_dir: str, name: str) -> tuple[bytes, bytes]:
    with open(os.path.join(run_dir, "keys", f"{name}.key"), "rb") as f:
        public, secret = f.read().split()[:2]
    return public, secret


class Fuzzer:
    """The strangers of one live topology (a started Supervisor) and what they counted."""

    def __init__(self, sup: Any):
        self.sup = sup
        self.run_dir = sup.launcher.run_dir
        self.tcp = sup.run.topology.transport == "tcp"
        self.ctx = zmq.Context.instance()
        self.clients: dict[str, Raw] = {}
        for target in TARGETS:
            curve = None
            if self.tcp:
                curve = (*_keys(self.run_dir, STRANGER[target]), _keys(self.run_dir, target)[0])
            self.clients[target] = Raw(self.run_dir, target, STRANGER[target], curve=curve, ctx=self.ctx)
        self.ctl = self.ctx.socket(zmq.DEALER)
        self.ctl.setsockopt(zmq.LINGER, 0)
        self.ctl.connect(f"ipc://{os.path.join(self.run_dir, 'ctl.sock')}")
        self.tally = {t: Tally() for t in [*TARGETS, CTL]}
        self.barriers = 0
        self.deaths = 0  # of the supervisor's death records, those already reported
        self.baseline: dict[str, Any] | None = None
        self.fds: dict[str, int] | None = None
        self.findings: list[str] = []
        self.refusals: Counter[str] = Counter()  # answers by who refused and the errno

    def close(self) -> None:
        for c in self.clients.values():
            c.close()
        self.ctl.close(0)

    # ---- sending and collecting -------------------------------------------------------------
    def send(self, target: str, parts: list[bytes], expected: bool) -> None:
        sock = self.ctl if target == CTL else self.clients[target].dealer
        if not sock.poll(5000, zmq.POLLOUT):
            raise AssertionError(f"{target} stopped taking input after {self.tally[target].sent} inputs")
        sock.send_multipart(parts)
        tally = self.tally[target]
        tally.sent += 1
        tally.expected += expected

    def collect(self, timeout_ms: int = 0) -> set[str]:
        """Count the answers waiting (at most `timeout_ms` for the first); returns the
        barrier flows among them."""
        poller = zmq.Poller()
        owner = {}
        for target, c in self.clients.items():
            for sock in (c.dealer, c.router):
                poller.register(sock, zmq.POLLIN)
                owner[sock] = target
        poller.register(self.ctl, zmq.POLLIN)
        owner[self.ctl] = CTL
        seen: set[str] = set()
        for sock, _ in poller.poll(timeout_ms):
            by = "actor" if any(sock is c.router for c in self.clients.values()) else "runtime"
            while sock.poll(0):
                seen |= self._answer(owner[sock], sock.recv_multipart()[-1], by)
        return seen

    def _answer(self, target: str, payload: bytes, by: str) -> set[str]:
        msg = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        if target == CTL:
            if "'barrier-" in str(msg.get("error", "")):
                return {f"{CTL}:barrier"}
            refused = msg.get("ok") is False or "processes" in msg  # ps / status: a read, allowed
            self.refusals["supervisor"] += 1
        else:
            if str(msg.get("flow", "")).startswith("barrier-"):
                return {f"{target}:barrier by {by}"}
            ret = msg.get("body", {}).get("ret", 0)
            refused = ret < 0
            self.refusals[f"{by} {E.name(ret)}"] += 1
        tally = self.tally[target]
        tally.answers += 1
        if not refused:
            tally.accepted.append(msg)
        return set()

    def barrier(self, timeout: float = 30.0) -> None:
        """Wait until every target has taken in everything sent so far: a request each,
        answered after all of it (same connections, in order)."""
        self.barriers += 1
        flow = f"barrier-{self.barriers}"
        for c in self.clients.values():  # one for each way answers come back: the actor's
            # reply (to our ROUTER) and the runtime's refusal (to our DEALER), here of a frame
            # addressed to another actor; each comes after the earlier answers on its way
            c.dealer.send(msgpack.packb(c.envelope("ping", flow=flow, id=-self.barriers)))
            c.dealer.send(msgpack.packb(c.envelope("ping", flow=flow, id=-self.barriers, dst="nobody")))
        self.ctl.send(msgpack.packb({"op": "kill", "name": flow}))  # refused: no such actor
        want = {f"{t}:barrier by {by}" for t in TARGETS for by in ("actor", "runtime")} | {f"{CTL}:barrier"}
        end = time.monotonic() + timeout
        while want and time.monotonic() < end:
            self.sup.step(0.0)
            want -= self.collect(20)
        if want:
            raise AssertionError(f"no answer to the barrier from {sorted(want)} within {timeout} s")

    # ---- the oracle ---------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Every actor's snapshot (orchestrator-side), without the DIAGNOSTIC counters."""
        names = [p["name"] for p in self.sup.launcher.processes()]

        def ask():
            return (yield Gather([Call(n, "snapshot", {}, timeout=5.0) for n in names]))

        replies = self.sup.run_step(ask, timeout=30.0)
        if replies is None:
            raise AssertionError("the checkpoint's snapshots did not come back")
        out = {}
        for n, r in zip(names, replies):
            if r.get("ret") != 0:
                self.findings.append(f"{n} did not answer its snapshot: {r}")
            out[n] = without_diagnostics(r.get("state", {}))
        return out

    def open_fds(self) -> dict[str, int]:
        out = {}
        for p in self.sup.launcher.processes():
            with contextlib.suppress(OSError):
                out[p["name"]] = len(os.listdir(f"/proc/{p['pid']}/fd"))
        return out

    def checkpoint(self) -> None:
        self.barrier()
        dead = [p["name"] for p in self.sup.launcher.processes() if p["state"] != "running"]
        self.findings += [f"{n} is not running" for n in dead]
        records = self.sup.recovery.records
        self.findings += [f"{r['actor']} died (exit {r['exitcode']})" for r in records[self.deaths :]]
        self.deaths = len(records)
        now = self.state()
        if self.baseline is None:
            self.baseline = now
        elif now != self.baseline:
            self.findings.append(
                "state changed: "
                + ", ".join(
                    f"{n}.{k}"
                    for n in now
                    for k in set(now[n]) | set(self.baseline.get(n, {}))
                    if now[n].get(k) != self.baseline.get(n, {}).get(k)
                )
            )
            self.baseline = now
        fds = self.open_fds()
        if self.fds is None:
            self.fds = fds
        for n, count in fds.items():
            if count > self.fds.get(n, count):
                self.findings.append(f"{n} holds {count} fds, {self.fds[n]} at the first checkpoint")
        for target, tally in self.tally.items():
            if tally.answers != tally.expected:
                self.findings.append(
                    f"{target}: {tally.answers} answers to {tally.expected} inputs that expect one"
                )
                tally.answers = tally.expected  # report each discrepancy once
            if tally.accepted:
                self.findings.append(f"{target} accepted {len(tally.accepted)}: {tally.accepted[0]!r:.200}")
                tally.accepted.clear()

    def sent(self) -> int:
        return sum(t.sent for t in self.tally.values())

    def stats(self) -> dict[str, Any]:
        return {
            "inputs": sum(t.sent for t in self.tally.values()),
            "per_target": {n: t.sent for n, t in self.tally.items()},
            "answered": sum(t.answers for t in self.tally.values()),
            "checkpoints": self.barriers,
            "refusals": dict(self.refusals.most_common()),
            "fds": dict(self.fds or {}),  # per actor at the first checkpoint (none may grow)
            "findings": list(self.findings),
        }


def fuzz(sup: Any, n: int, seed: int = 0, every: int = 2000) -> dict[str, Any]:
    """Send about `n` inputs (each drawn envelope to every actor, one control request per
    draw) with checkpoints every `every` inputs; returns the counts and the findings (every
    finding is a failure: a crash, an unanswered or accepted input, a changed state, a leak)."""
    f = Fuzzer(sup)
    try:
        f.checkpoint()  # the baseline: state, fds, and the strangers' peers in place
        next_check = every

        @fixed_seed(seed)
        @settings(
            max_examples=-(-n // (DRAWS * (len(TARGETS) + 1))),
            database=None,
            deadline=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(st.binary(min_size=BLOB, max_size=BLOB))
        def send(blob: bytes) -> None:
            nonlocal next_check
            d = Draw(blob)
            for _ in range(DRAWS):
                if f.sent() >= n or f.findings:  # a finding ends the run: it is a failure
                    return
                item, ctl = envelope_input(d), control_input(d)
                for target in TARGETS:
                    parts = wire_parts(item, target)
                    f.send(target, parts, expects_answer(parts, target))
                f.send(CTL, ctl if isinstance(ctl, list) else [ctl], True)
            sup.step(0.0)
            f.collect(0)
            if f.sent() >= next_check and not f.findings:
                f.checkpoint()
                next_check += every

        started = time.monotonic()
        send()
        f.checkpoint()
        out = f.stats()
        out["elapsed_s"] = time.monotonic() - started
        return out
    finally:
        f.close()
