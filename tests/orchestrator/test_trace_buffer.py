"""The process runtime's trace file: wire frames written in batches, read back as records."""

from __future__ import annotations

import json

import msgpack

from vsva.actors.messages import Envelope, encode
from vsva.analysis.trace import from_files, read_frames, record, trace_files
from vsva.runtime.trace_buffer import HEAD, TraceBuffer


def envelopes() -> list[Envelope]:
    return [
        Envelope(src="host", dst="kvm", kind="ioasid_notify", id=1, rr=True, clock=3, flow="F2#1",
                 body={"event": "bind", "hpasid": 9, "bindings": {7: [1, 2]}}),
        Envelope(src="host", dst="vm1.vmm", kind="bind_gpasid", id=2, corr=5, clock=4, body={"ret": 0}),
    ]  # fmt: skip


def test_records_read_back_as_their_json_lines_would(tmp_path):
    """What the reader returns is what a JSON line of `record` reads back (int map keys as
    strings), in send order, with the send times kept."""
    buf = TraceBuffer(str(tmp_path), "host")
    for i, env in enumerate(envelopes()):
        buf.add(0.5 + i, encode(env))
    assert buf.pending
    buf.close()
    want = [json.loads(json.dumps(record(env, 0.5 + i))) for i, env in enumerate(envelopes())]
    assert read_frames(buf.path) == want
    assert want[0]["body"]["bindings"] == {"7": [1, 2]}


def test_a_torn_last_record_and_a_garbage_frame_are_dropped(tmp_path):
    """A writer SIGKILLed in the middle of a record, or a frame that is no envelope map, costs
    that record only."""
    buf = TraceBuffer(str(tmp_path), "host")
    first, second = (encode(env) for env in envelopes())
    buf.add(1.0, first)
    buf.add(2.0, b"\xc1")  # never valid msgpack
    buf.close()
    with open(buf.path, "ab") as f:
        f.write(HEAD.pack(3.0, len(second)) + second[:-1])
    assert [r["id"] for r in read_frames(buf.path)] == [1]


def test_records_of_another_shape_are_skipped_and_the_rest_merged(tmp_path):
    """The run directory is the run's user's to write: a map with fields of other types, or a
    time that is no number, costs that record only, in a frames file and in a JSON lines file
    alike; the merge (which sorts on those fields) still orders the rest."""
    buf = TraceBuffer(str(tmp_path), "host")
    first, second = (encode(env) for env in envelopes())
    buf.add(1.0, first)
    hostile = {"v": 1, "id": "a", "src": 5, "dst": None, "kind": [], "body": 7, "clock": "z"}
    buf.add(1.5, msgpack.packb(hostile))
    buf.add(float("nan"), second)
    buf.add(2.0, second)
    buf.close()
    lines = [
        json.dumps(record(envelopes()[0], 0.7)),
        json.dumps(dict(record(envelopes()[1], 0.8), corr="x")),
        "[]",
    ]
    files = trace_files(str(tmp_path)) | {"trace-kvm.jsonl": "\n".join(lines).encode()}
    assert [(r["t"], r["id"]) for r in read_frames(buf.path)] == [(1.0, 1), (2.0, 2)]
    assert [(r["t"], r["src"], r["id"]) for r in from_files(files)] == [
        (0.7, "host", 1),
        (1.0, "host", 1),
        (2.0, "host", 2),
    ]


def test_due_after_enough_bytes_and_nothing_kept_after_write(tmp_path):
    buf = TraceBuffer(str(tmp_path), "host")
    frame = encode(envelopes()[0])
    assert not buf.due()
    while not buf.due():
        buf.add(0.0, frame)
    buf.write()
    assert not buf.pending
    assert len(read_frames(buf.path)) > 1
