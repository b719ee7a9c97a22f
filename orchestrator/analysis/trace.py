"""The run's trace: one record per message, one file per actor, merged in causal order.

Both runtimes record the same record shape, so the timeline, the sequence diagram and the
Perfetto export work on either. The process runtime's files hold wire frames
(`trace-N.frames`, vsva.runtime.trace_buffer); `read_frames` turns them into records, the
same as a JSON line of `record` reads back (JSON's map keys are strings, tuples lists,
unknown values their repr).
"""

from __future__ import annotations

import bisect
import glob
import heapq
import itertools
import json
import math
import os
from collections.abc import Iterable
from typing import IO, Any

import msgpack

from vsva.actors.messages import Envelope
from vsva.runtime.trace_buffer import HEAD, SUFFIX

_JSON = json.JSONEncoder(default=repr)


def record(env: Envelope, t: float) -> dict[str, Any]:
    """The trace record of a message at the moment it is sent (t in seconds since run start)."""
    return {
        "t": round(t, 6),
        "clock": env.clock,
        "id": env.id,
        "src": env.src,
        "dst": env.dst,
        "kind": env.kind,
        "corr": env.corr,
        "rr": env.rr,
        "flow": env.flow,
        "body": env.body,
    }


class TraceWriter:
    """Appends records to `<run_dir>/trace-<actor>.jsonl`, line-buffered so a kill loses little."""

    def __init__(self, run_dir: str, actor: str):
        self.path = os.path.join(run_dir, f"trace-{actor}.jsonl")
        self._file: IO[str] = open(self.path, "a", buffering=1)

    def write(self, rec: dict[str, Any]) -> None:
        self._file.write(json.dumps(rec, default=repr) + "\n")

    def close(self) -> None:
        self._file.close()


SCAN_LIMIT = 256  # records of one actor looked at to place one message received (a bound)


def merge(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Order records by send time, but never against causality (a topological merge).

    Every actor's records are stamped with one host clock, yet a stamp is taken around the
    send, not at it, so by a little (measured here as `skew`: the most any reply is stamped
    before its request) a wall-time order can put an effect before its cause. The order
    returned is the send-time order with three kinds of precedence enforced:
    - each actor's own records keep their order (its times, then its Lamport clocks);
    - a reply comes after its request;
    - a message to actor A comes before the first record A sent, stamped later than the
      message minus `skew`, whose Lamport clock is higher: the earliest send that the message
      can have caused (a receive raises the receiver's clock above the message's).
    A cycle among these (only possible after a restarted actor's clock started again from 0)
    is broken by releasing the earliest waiting record.
    """
    recs = list(records)
    n = len(recs)
    own = _own_order(recs)
    preds = [0] * n
    succs: list[list[int]] = [[] for _ in range(n)]

    def edge(a: int, b: int) -> None:
        succs[a].append(b)
        preds[b] += 1

    for chain in own.values():
        for a, b in itertools.pairwise(chain):
            edge(a, b)
    skew = 0.0
    for q, r in request_reply_pairs(recs):
        edge(q, r)
        skew = max(skew, recs[q]["t"] - recs[r]["t"])
    times = {src: [recs[i]["t"] for i in chain] for src, chain in own.items()}
    for i, rec in enumerate(recs):
        receiver = own.get(rec["dst"])
        if not receiver:
            continue
        start = bisect.bisect_left(times[rec["dst"]], rec["t"] - skew)
        for j in receiver[start : start + SCAN_LIMIT]:
            if j != i and recs[j]["clock"] > rec["clock"]:
                edge(i, j)
                break
    return [recs[i] for i in _topological(recs, preds, succs)]


def _key(rec: dict[str, Any]) -> tuple[Any, ...]:
    return (rec["t"], rec["clock"], rec["src"], rec["id"])


def _own_order(recs: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Each sender's record indices in the order it sent them."""
    own: dict[str, list[int]] = {}
    for i, rec in enumerate(recs):
        own.setdefault(rec["src"], []).append(i)
    for chain in own.values():
        chain.sort(key=lambda i: (recs[i]["t"], recs[i]["clock"], recs[i]["id"]))
    return own


def request_reply_pairs(recs: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """(request, reply) index pairs. A restarted actor numbers its messages from 1 again, so a
    reply goes to the request of that number with the highest Lamport clock below its own."""
    requests: dict[tuple[str, int], list[int]] = {}
    for i, rec in enumerate(recs):
        if rec.get("rr"):
            requests.setdefault((rec["src"], rec["id"]), []).append(i)
    pairs = []
    for i, rec in enumerate(recs):
        if rec.get("corr") is None:
            continue
        cands = requests.get((rec["dst"], rec["corr"]), [])
        before = [q for q in cands if recs[q]["clock"] < rec["clock"]]
        if before:
            pairs.append((max(before, key=lambda q: recs[q]["clock"]), i))
    return pairs


def _topological(recs: list[dict[str, Any]], preds: list[int], succs: list[list[int]]) -> list[int]:
    """Kahn's algorithm, earliest send key first among the records whose predecessors are out."""
    ready = [(_key(recs[i]), i) for i in range(len(recs)) if preds[i] == 0]
    heapq.heapify(ready)
    done = [False] * len(recs)
    out: list[int] = []
    while len(out) < len(recs):
        if not ready:  # a cycle: release the earliest record still waiting
            i = min((i for i in range(len(recs)) if not done[i]), key=lambda i: _key(recs[i]))
            preds[i] = 0
            heapq.heappush(ready, (_key(recs[i]), i))
        _, i = heapq.heappop(ready)
        if done[i]:
            continue
        done[i] = True
        out.append(i)
        for j in succs[i]:
            preds[j] -= 1
            if preds[j] == 0 and not done[j]:
                heapq.heappush(ready, (_key(recs[j]), j))
    return out


def load(run_dir: str) -> list[dict[str, Any]]:
    """Read and merge every actor's trace file of a run directory (a line cut short by a
    kill is skipped)."""
    return from_files(trace_files(run_dir))


def trace_files(run_dir: str) -> dict[str, bytes]:
    """The bytes of every trace file of a run directory, by file name: what a run keeps when
    its directory goes, so that stopping a long run does not wait for its trace to be parsed
    and merged (`from_files` does that when somebody asks for the trace)."""
    out = {}
    for path in glob.glob(os.path.join(run_dir, "trace-*.jsonl")) + glob.glob(
        os.path.join(run_dir, f"trace-*{SUFFIX}")
    ):
        with open(path, "rb") as f:
            out[os.path.basename(path)] = f.read()
    return out


# A record's fields and what each must be (what `record` writes; `rr` any value, read as a flag)
_FIELDS: dict[str, type | tuple[type, ...]] = {
    "t": (int, float), "clock": int, "id": int, "src": str, "dst": str, "kind": str,
    "corr": (int, type(None)), "flow": str, "body": dict,
}  # fmt: skip


def well_formed(rec: Any) -> bool:
    """Whether `rec` is a record the merge and the exports can order and draw: each field
    of the type `record` gives it, a finite time. The run directory is the run's user's to
    write, so a trace file may hold anything; one record of another shape used to stop the
    whole export (a TypeError in the merge's sort)."""
    if not isinstance(rec, dict):
        return False
    for key, kind in _FIELDS.items():
        value = rec.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            return False
    return math.isfinite(rec["t"])


def from_files(files: dict[str, bytes]) -> list[dict[str, Any]]:
    """The merged records of trace files given as bytes (see `trace_files`); a line or frame
    that is no record (`well_formed`) is skipped."""
    records: list[dict[str, Any]] = []
    for name, data in files.items():
        if name.endswith(".jsonl"):
            for line in data.decode(errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:  # the torn last line of a writer that was SIGKILLed
                    continue
                if well_formed(rec):
                    records.append(rec)
        else:
            records.extend(frame_records(data))
    return merge(records)


def read_frames(path: str) -> list[dict[str, Any]]:
    """The records of one runtime's trace file (see vsva.runtime.trace_buffer), in file order;
    the last record of a writer that was SIGKILLed in the middle of it is dropped, and so is
    a frame that does not decode into a record (`well_formed`)."""
    with open(path, "rb") as f:
        return frame_records(f.read())


def frame_records(data: bytes) -> list[dict[str, Any]]:
    """The records of one trace file's bytes (see `read_frames`)."""
    out = []
    pos = 0
    while pos + HEAD.size <= len(data):
        t, size = HEAD.unpack_from(data, pos)
        pos += HEAD.size
        if pos + size > len(data):
            break
        try:
            w = msgpack.unpackb(data[pos : pos + size], raw=False, strict_map_key=False)
        except Exception:  # msgpack raises several unrelated types for garbage
            w = None
        pos += size
        if isinstance(w, dict):
            rec = {k: w.get(k) for k in ("clock", "id", "src", "dst", "kind", "corr", "rr", "flow", "body")}
            rec = json.loads(_JSON.encode({"t": round(t, 6), **rec}))
            if well_formed(rec):
                out.append(rec)
    return out
