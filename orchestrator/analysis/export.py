"""Views of a run's trace: the readable timeline, Perfetto/Chrome trace events, sequence diagram."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from vsva.actors import errno as E

Record = dict[str, Any]
_HIDDEN = {"ram_frames", "state", "steps", "done", "devices", "data", "info", "descs"}


def flow_of(rec: Record) -> str:
    """The flow id of a record ("F2"), or "setup" for messages outside any flow."""
    tag = rec.get("flow") or ""
    return tag.split(":")[0] if tag.startswith("F") else "setup"


def summary(rec: Record) -> str:
    """The key fields of one message, short enough for one line."""
    body = rec["body"]
    parts = [f"{k}={_short(v)}" for k, v in body.items() if k not in _HIDDEN and k != "ret" and k != "error"]
    if "data" in body and isinstance(body["data"], dict):
        d = body["data"]
        parts.append(f"hpasid={d.get('hpasid')} gpasid={d.get('gpasid')} gpgd={_short(d.get('gpgd'))}")
    if "info" in body and isinstance(body["info"], dict):
        i = body["info"]
        parts.append(
            f"cache={i.get('cache')} granu={i.get('granularity')} pasid={i.get('pasid')}"
            + (f" addr={_short(i['addr'])}x{i.get('nb_granules')}" if "addr" in i else "")
        )
    if "descs" in body and isinstance(body["descs"], list):
        parts.append(
            "descs=[" + ",".join(str(d.get("type")) for d in body["descs"] if isinstance(d, dict)) + "]"
        )
    if rec.get("corr") is not None:
        parts.insert(0, E.name(body.get("ret", 0)) if isinstance(body.get("ret"), int) else "?")
        if body.get("error"):
            parts.append(f"({body['error']})")
    return " ".join(parts)


def _short(value: Any) -> str:
    if isinstance(value, int) and value > 4096:
        return hex(value)
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


FLOW_TITLES = {
    "boot": "guest boot: firmware tables, context entries",
    "F1": "PASID allocation (VCMD)",
    "F2": "bind (PASID-cache invalidation trapped -> bind_gpasid -> notifier)",
    "F3": "guest IOTLB + device-TLB flush",
    "F4": "unbind",
    "F5": "free (VCMD)",
    "F6": "I/O page fault",
    "F7": "work submission + DMA",
    "F8": "VM teardown",
    "setup": "orchestrator: power on, workloads, snapshots, shutdown",
}


def title(tag: str) -> str:
    """'F2:vm1.3' -> 'F2 vm1 #3: bind (...)'."""
    flow, _, inst = tag.partition(":")
    vm, _, n = inst.partition(".")
    where = f" {vm} #{n}" if inst else ""
    return f"{flow}{where}: {FLOW_TITLES.get(flow, flow)}"


def timeline(records: Iterable[Record]) -> list[tuple[str, list[str]]]:
    """Messages grouped by flow instance, in order of first appearance: [(title, lines)]."""
    groups: dict[str, list[str]] = {}
    for rec in records:
        tag = title(rec.get("flow") or "setup")
        arrow = "<-" if rec.get("corr") is not None else "->"
        peer_a, peer_b = (rec["dst"], rec["src"]) if arrow == "<-" else (rec["src"], rec["dst"])
        groups.setdefault(tag, []).append(
            f"{rec['t'] * 1000:9.3f} ms  {peer_a:>10} {arrow} {peer_b:<10} {rec['kind']:<16} {summary(rec)}"
        )
    return list(groups.items())


@dataclass
class _Slice:
    """One answered request, drawn on the actor that served it."""

    actor: str
    start: float  # us: the request's send
    end: float  # us: the reply's send (at least 1 us later)
    q: int  # the request's index in the records
    r: int  # the reply's index
    lane: int = 1


def perfetto(records: list[Record]) -> dict[str, Any]:
    """Chrome/Perfetto trace events (open in ui.perfetto.dev).

    One process track per actor. Each answered request is a complete slice on the actor that
    served it, from the request's send to the reply's send. An actor serves several requests
    at once and Perfetto's importer needs the slices of one thread to nest, so each slice goes
    to the lowest-numbered thread ("lane") of its actor free at its start: slices of a lane
    never touch. A flow arrow goes from the slice in which the requester sent the request
    (of its slices open at that moment, the latest-started of the same flow instance, else the
    latest-started) into the request's slice; a request sent outside any slice (an actor's
    own start, the orchestrator's) has none. One-way messages (page requests) and requests
    never answered (a killed peer) are instants on the sender's thread 0.
    """
    names = sorted({r["src"] for r in records} | {r["dst"] for r in records})
    pids = {name: i + 1 for i, name in enumerate(names)}
    events: list[dict[str, Any]] = [
        {"ph": "M", "name": "process_name", "pid": p, "args": {"name": n}} for n, p in pids.items()
    ]
    events += [
        {"ph": "M", "name": "thread_name", "pid": p, "tid": 0, "args": {"name": "messages"}}
        for p in pids.values()
    ]
    slices = _slices(records)
    for actor, lane in sorted({(s.actor, s.lane) for s in slices}):
        events.append(
            {
                "ph": "M",
                "name": "thread_name",
                "pid": pids[actor],
                "tid": lane,
                "args": {"name": f"serving, lane {lane}"},
            }
        )
    for s, parent in _with_parents(slices, records):
        req, rep = records[s.q], records[s.r]
        events.append(
            {
                "ph": "X",
                "name": req["kind"],
                "cat": flow_of(req),
                "pid": pids[s.actor],
                "tid": s.lane,
                "ts": s.start,
                "dur": s.end - s.start,
                "args": {"flow": req.get("flow"), "ret": rep["body"].get("ret"), "from": req["src"]},
            }
        )
        if parent is None:
            continue
        flow_id = f"{s.q}:{req['src']}:{req['id']}"
        start = (
            s.start if s.start > parent.start else parent.start + min(0.5, (parent.end - parent.start) / 2)
        )
        events.append(
            {
                "ph": "s",
                "id": flow_id,
                "name": req["kind"],
                "cat": "msg",
                "pid": pids[req["src"]],
                "tid": parent.lane,
                "ts": start,
            }
        )
        events.append(
            {
                "ph": "f",
                "bp": "e",
                "id": flow_id,
                "name": req["kind"],
                "cat": "msg",
                "pid": pids[s.actor],
                "tid": s.lane,
                "ts": max(start, (s.start + s.end) / 2),
            }
        )
    answered = {s.q for s in slices}
    for i, rec in enumerate(records):
        if rec.get("corr") is None and i not in answered:
            events.append(
                {
                    "ph": "i",
                    "s": "t",
                    "name": f"{rec['kind']} -> {rec['dst']}",
                    "cat": flow_of(rec),
                    "pid": pids[rec["src"]],
                    "tid": 0,
                    "ts": rec["t"] * 1e6,
                    "args": {"flow": rec.get("flow"), "unanswered": bool(rec.get("rr"))},
                }
            )
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def _slices(records: list[Record]) -> list[_Slice]:
    """Every answered request as a slice, in start order, each on a lane of its actor: the
    lowest lane whose last slice ended strictly before this one starts (interval partitioning)."""
    from vsva.analysis.trace import request_reply_pairs

    slices = []
    for q, r in request_reply_pairs(records):
        start = records[q]["t"] * 1e6
        slices.append(_Slice(records[q]["dst"], start, max(records[r]["t"] * 1e6, start + 1.0), q, r))
    slices.sort(key=lambda s: (s.start, -s.end, s.q))
    lane_ends: dict[str, list[float]] = {}
    for s in slices:
        ends = lane_ends.setdefault(s.actor, [])
        free = next((k for k, end in enumerate(ends) if end < s.start), None)
        if free is None:
            ends.append(s.end)
            s.lane = len(ends)
        else:
            ends[free] = s.end
            s.lane = free + 1
    return slices


def _with_parents(slices: list[_Slice], records: list[Record]) -> list[tuple[_Slice, _Slice | None]]:
    """Each slice with the requester's slice it was sent from (a sweep in start order keeping
    each actor's open slices)."""
    open_by_actor: dict[str, list[_Slice]] = {}
    out = []
    for s in slices:
        req = records[s.q]
        live = [p for p in open_by_actor.get(req["src"], []) if p.end > s.start]
        open_by_actor[req["src"]] = live
        same_flow = [p for p in live if records[p.q].get("flow") == req.get("flow")]
        parent = max(same_flow or live, key=lambda p: p.start, default=None)
        out.append((s, parent))
        open_by_actor.setdefault(s.actor, []).append(s)
    return out


MERMAID_MAX = 50_000  # Mermaid's default maxTextSize: a longer diagram is not drawn


def mermaid_diagrams(records: Iterable[Record]) -> dict[str, str]:
    """Mermaid sequence diagrams, one per VM ("vm1": every message of that VM's flows and of
    its guest and vmm) plus "host" for the rest (the host side and the orchestrator's setup),
    each in message order. A diagram longer than MERMAID_MAX continues in "vm1.2", "vm1.3" ..."""
    lines: dict[str, list[str]] = {}
    for rec in records:
        arrow = "-->>" if rec.get("corr") is not None else "->>"
        label = rec["kind"] + (f" {E.name(rec['body'].get('ret', 0))}" if rec.get("corr") is not None else "")
        lines.setdefault(_diagram_of(rec), []).append(
            f"    {_mm(rec['src'])}{arrow}{_mm(rec['dst'])}: {label} [{rec.get('flow') or '-'}]"
        )
    out: dict[str, str] = {}
    for name, body in lines.items():
        parts = _split(body, MERMAID_MAX - len("sequenceDiagram\n"))
        for k, part in enumerate(parts, 1):
            out[name if len(parts) == 1 else f"{name}.{k}"] = "sequenceDiagram\n" + "".join(part)
    return out


def _diagram_of(rec: Record) -> str:
    """ "vmN" for a message of VM N (its flow tag names it, or it goes to or from its actors)."""
    _, _, inst = (rec.get("flow") or "").partition(":")
    if inst.startswith("vm"):
        return inst.partition(".")[0]
    ends: tuple[str, str] = (rec["src"], rec["dst"])
    for name in ends:
        if name.startswith("vm") and "." in name:
            return name.partition(".")[0]
    return "host"


def _split(lines: list[str], limit: int) -> list[list[str]]:
    parts: list[list[str]] = [[]]
    size = 0
    for line in lines:
        line += "\n"
        if parts[-1] and size + len(line) > limit:
            parts.append([])
            size = 0
        parts[-1].append(line)
        size += len(line)
    return parts


def _mm(name: str) -> str:
    return name.replace(".", "_")


class TraceWriteError(OSError):
    """A trace file that could not be written; the message names it and the OS error."""


def write_all(records: list[Record], out_dir: str) -> dict[str, Any]:
    """Write trace.jsonl, trace.perfetto.json and sequence-<diagram>.mmd (mermaid_diagrams)
    into out_dir; return the paths ("sequence": a list). A file that cannot be written does
    not keep the others from being written: then TraceWriteError names the first one."""
    import os

    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise TraceWriteError(f"--trace-out: cannot write into {out_dir}: {exc.strerror or exc}") from None
    paths: dict[str, Any] = {
        "trace": os.path.join(out_dir, "trace.jsonl"),
        "perfetto": os.path.join(out_dir, "trace.perfetto.json"),
        "sequence": [],
    }
    files = {
        paths["trace"]: "".join(json.dumps(r, default=repr) + "\n" for r in records),
        paths["perfetto"]: json.dumps(perfetto(records)),
    }
    for name, text in mermaid_diagrams(records).items():
        paths["sequence"].append(os.path.join(out_dir, f"sequence-{name}.mmd"))
        files[paths["sequence"][-1]] = text
    errors = [why for path, text in files.items() if (why := _write(path, text))]
    if errors:
        raise TraceWriteError(errors[0] + (f" (and {len(errors) - 1} more files)" if len(errors) > 1 else ""))
    return paths


def write_or_say(records: list[Record], out_dir: str) -> tuple[dict[str, Any] | None, str | None]:
    """write_all for a run whose report must not be lost to its trace: (the paths, None), or
    (None, the one line that says which file could not be written and why)."""
    try:
        return write_all(records, out_dir), None
    except TraceWriteError as exc:
        return None, str(exc)


def _write(path: str, text: str) -> str | None:
    """Write one export file; None, or why it could not be (a directory in its place, a full
    disk: that error may come only as the file is closed), naming the file."""
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as exc:
        return f"--trace-out: cannot write {path}: {exc.strerror or exc}"
    return None
