"""The run's trace: one JSON line per message, one file per actor, merged by logical clock.

Both runtimes record the same record shape, so the timeline, the sequence diagram and the
Perfetto export work on either.
"""

from __future__ import annotations

import glob
import json
import os
from typing import IO, Any, Iterable

from vsva.actors.messages import Envelope


def record(env: Envelope, t: float) -> dict[str, Any]:
    """The trace record of a message at the moment it is sent (t in seconds since run start)."""
    return {"t": round(t, 6), "clock": env.clock, "id": env.id, "src": env.src, "dst": env.dst,
            "kind": env.kind, "corr": env.corr, "rr": env.rr, "flow": env.flow, "body": env.body}


class TraceWriter:
    """Appends records to `<run_dir>/trace-<actor>.jsonl`, line-buffered so a kill loses little."""

    def __init__(self, run_dir: str, actor: str):
        self.path = os.path.join(run_dir, f"trace-{actor}.jsonl")
        self._file: IO[str] = open(self.path, "a", buffering=1)

    def write(self, rec: dict[str, Any]) -> None:
        self._file.write(json.dumps(rec, default=repr) + "\n")

    def close(self) -> None:
        self._file.close()


def merge(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Order records by send time, then Lamport clock, then sender (a total, stable order).

    All actors of a run share one host clock, so send time already respects happens-before
    (a reply is sent after its request); the Lamport clock only breaks ties.
    """
    return sorted(records, key=lambda r: (r["t"], r["clock"], r["src"], r["id"]))


def load(run_dir: str) -> list[dict[str, Any]]:
    """Read and merge every actor's trace file of a run directory."""
    records = []
    for path in glob.glob(os.path.join(run_dir, "trace-*.jsonl")):
        with open(path) as f:
            records += [json.loads(line) for line in f if line.strip()]
    return merge(records)
