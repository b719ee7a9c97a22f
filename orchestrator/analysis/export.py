"""Views of a run's trace: the readable timeline, Perfetto/Chrome trace events, sequence diagram."""

from __future__ import annotations

import json
from typing import Any, Iterable

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
        parts.append(f"cache={i.get('cache')} granu={i.get('granularity')} pasid={i.get('pasid')}"
                     + (f" addr={_short(i['addr'])}x{i.get('nb_granules')}" if "addr" in i else ""))
    if "descs" in body and isinstance(body["descs"], list):
        parts.append("descs=[" + ",".join(str(d.get("type")) for d in body["descs"] if isinstance(d, dict)) + "]")
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
    "boot": "guest boot: firmware tables, context entries", "F1": "PASID allocation (VCMD)",
    "F2": "bind (PASID-cache invalidation trapped -> bind_gpasid -> notifier)",
    "F3": "guest IOTLB + device-TLB flush", "F4": "unbind", "F5": "free (VCMD)",
    "F6": "I/O page fault", "F7": "work submission + DMA", "F8": "VM teardown",
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
            f"{rec['t'] * 1000:9.3f} ms  {peer_a:>10} {arrow} {peer_b:<10} {rec['kind']:<16} {summary(rec)}")
    return list(groups.items())


def perfetto(records: list[Record]) -> dict[str, Any]:
    """Chrome/Perfetto trace events: one track per actor, a slice per request, flow arrows."""
    pids = {name: i + 1 for i, name in enumerate(sorted({r["src"] for r in records} | {r["dst"] for r in records}))}
    events: list[dict[str, Any]] = [{"ph": "M", "name": "process_name", "pid": p, "args": {"name": n}}
                                    for n, p in pids.items()]
    sent = {(r["src"], r["id"]): r for r in records if r.get("corr") is None}
    for rec in records:
        if rec.get("corr") is None:
            events.append({"ph": "s", "id": f"{rec['src']}:{rec['id']}", "name": rec["kind"], "cat": "msg",
                           "pid": pids[rec["src"]], "tid": 1, "ts": rec["t"] * 1e6})
            continue
        req = sent.get((rec["dst"], rec["corr"]))
        if req is None:
            continue
        events.append({"ph": "X", "name": rec["kind"], "cat": flow_of(rec), "pid": pids[rec["src"]], "tid": 1,
                       "ts": req["t"] * 1e6, "dur": max(1.0, (rec["t"] - req["t"]) * 1e6),
                       "args": {"flow": rec.get("flow"), "ret": rec["body"].get("ret"), "from": rec["dst"]}})
        events.append({"ph": "f", "bp": "e", "id": f"{req['src']}:{req['id']}", "name": rec["kind"],
                       "cat": "msg", "pid": pids[rec["src"]], "tid": 1, "ts": req["t"] * 1e6})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def mermaid(records: Iterable[Record], flows: set[str] | None = None) -> str:
    """A Mermaid sequence diagram of the messages (optionally of some flows only)."""
    lines = ["sequenceDiagram"]
    for rec in records:
        if flows is not None and flow_of(rec) not in flows:
            continue
        arrow = "-->>" if rec.get("corr") is not None else "->>"
        label = rec["kind"] + (f" {E.name(rec['body'].get('ret', 0))}" if rec.get("corr") is not None else "")
        lines.append(f"    {_mm(rec['src'])}{arrow}{_mm(rec['dst'])}: {label} [{rec.get('flow') or '-'}]")
    return "\n".join(lines) + "\n"


def _mm(name: str) -> str:
    return name.replace(".", "_")


def write_all(records: list[Record], out_dir: str) -> dict[str, str]:
    """Write trace.jsonl, trace.perfetto.json and sequence.mmd into out_dir; return the paths."""
    import os

    os.makedirs(out_dir, exist_ok=True)
    paths = {"trace": os.path.join(out_dir, "trace.jsonl"),
             "perfetto": os.path.join(out_dir, "trace.perfetto.json"),
             "sequence": os.path.join(out_dir, "sequence.mmd")}
    with open(paths["trace"], "w") as f:
        f.writelines(json.dumps(r, default=repr) + "\n" for r in records)
    with open(paths["perfetto"], "w") as f:
        json.dump(perfetto(records), f)
    with open(paths["sequence"], "w") as f:
        f.write(mermaid(records))
    return paths
