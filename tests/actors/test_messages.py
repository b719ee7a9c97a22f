"""The envelope's wire form: `encode` gives the msgpack map of `to_wire` byte for byte (it keeps
one Packer per thread), also right after a body that cannot be encoded, and in other threads;
`decode` gives the envelope back."""

from __future__ import annotations

import threading

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vsva.actors.messages import Envelope, decode, encode

BODIES = st.dictionaries(
    st.text(max_size=6),
    st.recursive(
        st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
        max_leaves=8,
    ),
    max_size=4,
)
ENVELOPES = st.builds(
    Envelope,
    src=st.text(max_size=8),
    dst=st.text(max_size=8),
    kind=st.text(max_size=12),
    body=BODIES,
    id=st.integers(0, 1 << 62),
    corr=st.none() | st.integers(0, 1 << 62),
    rr=st.booleans(),
    clock=st.integers(0, 1 << 62),
    flow=st.text(max_size=8),
)


@given(ENVELOPES)
def test_encode_is_the_msgpack_map_of_the_envelope(env):
    frame = encode(env)
    assert frame == msgpack.packb(env.to_wire(), use_bin_type=True)
    assert decode(frame) == env


@given(ENVELOPES)
def test_a_body_that_cannot_be_encoded_leaves_the_next_frame_whole(env):
    with pytest.raises(TypeError):
        encode(Envelope("a", "b", "k", {"x": [1, object()]}))
    assert encode(env) == msgpack.packb(env.to_wire(), use_bin_type=True)


def test_threads_encode_with_their_own_packer():
    envs = [Envelope("a", "b", "k", {"n": n, "pad": "x" * n}, id=n) for n in range(200)]
    frames: dict[int, list[bytes]] = {}

    def run(slot: int) -> None:
        frames[slot] = [encode(e) for e in envs for _ in range(20)]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    want = [msgpack.packb(e.to_wire(), use_bin_type=True) for e in envs for _ in range(20)]
    assert all(frames[i] == want for i in range(4))
