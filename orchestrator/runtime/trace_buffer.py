"""One actor's trace, kept in memory on the send path and written in batches.

Time: `now` given to the actor is `time.monotonic()` minus the runtime's creation time; the
trace time is wall time since the run's start epoch `t0`. Every envelope handed to ZeroMQ is
recorded in the actor's trace `<run_dir>/trace-N.jsonl`: the send keeps only (time, frame) in
memory (the frame is what went on the wire: a body the actor changes later cannot change the
record); after the round's sends have left, the records are turned into JSON lines (off the
hop's critical path), and the lines are written with one `write` when the loop has been idle
for `TRACE_IDLE`, when the oldest unwritten line is `TRACE_MAX_AGE` old or `TRACE_MAX_BYTES`
have piled up, and whenever `run_actor` returns or the runtime closes. So a clean exit
(SIGTERM, shutdown, an exception in the loop) loses nothing, and a reader of a live child's
trace sees every record of a child that has been quiet for `TRACE_IDLE`; a SIGKILLed process
loses its unwritten records (at most `TRACE_MAX_AGE` s / `TRACE_MAX_BYTES` of them). A send
that fails is logged, not traced.
"""

from __future__ import annotations

import json
import os
import time

import msgpack

TRACE_IDLE = 0.005  # s: write the trace once the loop has been idle this long
TRACE_MAX_AGE = 0.1  # s: ... and at the latest when the oldest unwritten line is this old
TRACE_MAX_BYTES = 64 * 1024  # ... or when this much is waiting
_JSON = json.JSONEncoder(default=repr)  # one encoder: json.dumps(default=...) builds one per call


class TraceBuffer:
    """One actor's trace file `<run_dir>/trace-<name>.jsonl`, written in batches (the record
    shape of `vsva.analysis.trace.record`, one JSON line per message).

    `add` (on the send path) keeps the wall time and the wire frame; `encode` turns them into
    JSON lines (called after a round's sends); `write` appends the lines with one syscall.
    """

    def __init__(self, run_dir: str, name: str):
        self.path = os.path.join(run_dir, f"trace-{name}.jsonl")
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._frames: list[tuple[float, bytes]] = []
        self._lines: list[str] = []
        self._bytes = 0
        self.since = 0.0  # time.monotonic() of the oldest unwritten record

    def add(self, t: float, frame: bytes) -> None:
        if not self._frames and not self._lines:
            self.since = time.monotonic()
        self._frames.append((t, frame))

    @property
    def pending(self) -> bool:
        return bool(self._frames or self._lines)

    def due(self) -> bool:
        """Unwritten lines that should not wait for the loop to go idle."""
        return bool(self._lines) and (
            self._bytes >= TRACE_MAX_BYTES or time.monotonic() - self.since >= TRACE_MAX_AGE
        )

    def encode(self) -> None:
        frames, self._frames = self._frames, []
        lines = self._lines
        for t, frame in frames:
            w = msgpack.unpackb(frame, raw=False, strict_map_key=False)
            line = _JSON.encode(
                {
                    "t": round(t, 6),
                    "clock": w.get("clock"),
                    "id": w.get("id"),
                    "src": w.get("src"),
                    "dst": w.get("dst"),
                    "kind": w.get("kind"),
                    "corr": w.get("corr"),
                    "rr": w.get("rr"),
                    "flow": w.get("flow"),
                    "body": w.get("body"),
                }
            )
            lines.append(line)
            self._bytes += len(line) + 1

    def write(self) -> None:
        self.encode()
        if not self._lines:
            return
        data = memoryview(("\n".join(self._lines) + "\n").encode("utf-8", "backslashreplace"))
        self._lines = []
        self._bytes = 0
        while data:
            data = data[os.write(self._fd, data) :]

    def close(self) -> None:
        if self._fd < 0:
            return
        try:
            self.write()
        finally:
            os.close(self._fd)
            self._fd = -1
