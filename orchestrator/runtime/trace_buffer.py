"""One actor's trace, kept in memory on the send path and written in batches, as wire frames.

Time: `now` given to the actor is `time.monotonic()` minus the runtime's creation time; the
trace time is wall time since the run's start epoch `t0`. Every envelope handed to ZeroMQ is
recorded in the actor's trace `<run_dir>/trace-N.frames`: the send keeps only (time, frame)
in memory (the frame is what went on the wire: a body the actor changes later cannot change
the record), and the file holds exactly that, one record per message: `HEAD` (the time as a
little-endian double, the frame's length as a 32-bit unsigned) and the msgpack frame. Turning
frames into the JSON-shaped records the analysis works on is the reader's job
(`vsva.analysis.trace.read_frames`), after the run or in a test, never the hot process's: it
cost the host ~9 us of CPU per message (unpack, record, JSON), a sixth of its loop.

The records are written with one `write` when the loop has been idle for `TRACE_IDLE`, when
the oldest unwritten one is `TRACE_MAX_AGE` old or `TRACE_MAX_BYTES` have piled up,
whenever `run_actor` returns or the runtime closes, and before an answer to `trace_sync`
leaves (that answer recorded first: vsva.runtime.loop `_write_ahead`). So a clean exit
(SIGTERM, shutdown, an exception in the loop) loses nothing, and a reader of a live child's
trace asks for it (trace_sync: vsva.ops.launcher `Launcher.trace`) and has, with the answer,
every record the child sent up to it; a SIGKILLed process loses its unwritten records (at
most `TRACE_MAX_AGE` s / `TRACE_MAX_BYTES` of them), and a record it was cut in the middle of
is dropped by the reader. A send that fails is logged, not traced (but for a trace_sync
answer that never leaves after all: it was recorded before its first try).
"""

from __future__ import annotations

import os
import struct
import time

TRACE_IDLE = 0.005  # s: write the trace once the loop has been idle this long
TRACE_MAX_AGE = 0.1  # s: ... and at the latest when the oldest unwritten record is this old
TRACE_MAX_BYTES = 64 * 1024  # ... or when this much is waiting
HEAD = struct.Struct("<dI")  # a record's head: send time (s since the run's start), frame bytes
SUFFIX = ".frames"


def trace_path(run_dir: str, name: str) -> str:
    return os.path.join(run_dir, f"trace-{name}{SUFFIX}")


class TraceBuffer:
    """One actor's trace file `<run_dir>/trace-<name>.frames`, written in batches.

    `add` (on the send path) keeps the wall time and the wire frame; `write` appends every
    record kept with one syscall.
    """

    def __init__(self, run_dir: str, name: str):
        self.path = trace_path(run_dir, name)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._chunks: list[bytes] = []
        self._bytes = 0
        self.since = 0.0  # time.monotonic() of the oldest unwritten record

    def add(self, t: float, frame: bytes) -> None:
        if not self._chunks:
            self.since = time.monotonic()
        self._chunks.append(HEAD.pack(t, len(frame)))
        self._chunks.append(frame)
        self._bytes += HEAD.size + len(frame)

    @property
    def pending(self) -> bool:
        return bool(self._chunks)

    def due(self) -> bool:
        """Unwritten records that should not wait for the loop to go idle."""
        return bool(self._chunks) and (
            self._bytes >= TRACE_MAX_BYTES or time.monotonic() - self.since >= TRACE_MAX_AGE
        )

    def write(self) -> None:
        if not self._chunks:
            return
        data = memoryview(b"".join(self._chunks))
        self._chunks = []
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
