"""The DEALERs a runtime sent to have their EVENTS read once every `DEALER_SWEEP` (0.1 s),
not before every wait (vsva.runtime.loop `_poll`): a frame that reached such a DEALER while its
signal was taken in (as libzmq's send does with the socket's commands) is still delivered, even
when the loop never goes idle (an idle wait would mark every socket for a read anyway)."""

from __future__ import annotations

import os
import time

import pytest
import zmq

from vsva.actors import errno as E
from vsva.actors.base import Actor, ActorEnv
from vsva.actors.messages import Envelope
from vsva.runtime.loop import ZmqRuntime
from vsva.runtime.peers import UP

BOUND = 5.0  # s: every wait below is bounded by this


class Recorder(Actor):
    """Keeps every envelope that reaches it."""

    def __init__(self, name: str) -> None:
        super().__init__(name, ActorEnv())
        self.seen: list[Envelope] = []

    def deliver(self, msg: Envelope, now: float) -> list[Envelope]:
        self.seen.append(msg)
        return []


def _rounds(runtimes: list[ZmqRuntime], cond) -> bool:
    end = time.monotonic() + BOUND
    while not cond():
        if time.monotonic() > end:
            return False
        for rt in runtimes:
            rt._round(0.01)
    return True


@pytest.fixture
def pair(tmp_path):
    os.chmod(tmp_path, 0o700)
    made: list[ZmqRuntime] = []
    try:
        for name in ("host", "peer"):
            rt = ZmqRuntime(name, str(tmp_path), trace=False, run_root=os.getpid())
            made.append(rt)
            rt.actor = Recorder(name)
        host, peer = made
        host.expect(["peer"])
        peer.expect(["host"])
        assert _rounds(made, lambda: host.peers["peer"].state == UP and peer.peers["host"].state == UP)
        yield host, peer
    finally:
        for rt in made:
            rt.close()


def test_a_refusal_on_a_dealer_whose_signal_was_taken_is_delivered_while_the_loop_is_busy(pair):
    host, peer = pair
    seen = host.actor.seen
    dealer = host.peers["peer"].sock
    pings = iter(range(1, 1 << 20))

    def busy_round() -> None:
        """A ping from the peer reaches the host's ROUTER, and the host takes it in: a round
        that does not wait idle (which would mark every socket for a read)."""
        n = next(pings)
        peer.send([Envelope("peer", "host", "ping", {}, id=n)])
        end = time.monotonic() + BOUND
        while not any(env.id == n and env.corr is None for env in seen):
            assert time.monotonic() < end
            host._round(BOUND)

    end = time.monotonic() + BOUND
    while dealer in host._dirty:  # its connection events are read
        assert time.monotonic() < end
        busy_round()
    # A frame the peer's runtime refuses (src is not the sender: -EPERM), answered to the
    # connection it came on: our DEALER to the peer
    host.send([Envelope("mallory", "peer", "ping", {}, id=7, rr=True)])
    assert _rounds([peer], lambda: peer.stats["rejected"] == 1)
    assert dealer in host._sent_to and dealer not in host._dirty
    # Wait for the answer on the DEALER the way libzmq's send takes in its commands: the
    # answer is queued there and the DEALER's fd will not fire for it
    poller = zmq.Poller()
    poller.register(dealer, zmq.POLLIN)
    assert poller.poll(BOUND * 1000)
    # The host never waits idle, and still takes the answer in
    end = time.monotonic() + BOUND
    while not any(env.corr == 7 for env in seen):
        assert time.monotonic() < end, "the refusal on the DEALER was never read"
        busy_round()
    answer = [env for env in seen if env.corr == 7]
    assert len(answer) == 1 and answer[0].body["ret"] == -E.EPERM
    assert host.stats["rejected"] == 0
