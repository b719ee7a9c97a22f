"""A reply is accepted only from the peer its request went to: anyone can guess a request id
(they count up from 1), so a reply matched by id alone would let any sender answer for kvm,
the host or a vmm."""

from __future__ import annotations

from vsva.actors.base import Actor, ActorEnv, Call
from vsva.actors.messages import Envelope


class Asker(Actor):
    def on_start(self):
        self.answer = yield Call("kvm", "ping", {})


def test_a_reply_from_another_sender_is_dropped_and_the_real_one_counts():
    asker = Asker("orch", ActorEnv())
    (request,) = asker.start(0.0)
    forged = Envelope(
        src="mallory",
        dst="orch",
        kind="ping",
        body={"ret": 0, "forged": True},
        id=1,
        corr=request.id,
        clock=1,
    )
    asker.deliver(forged, 0.1)
    assert asker.busy and asker.dropped_replies == 1
    real = Envelope(src="kvm", dst="orch", kind="ping", body={"ret": 0}, id=1, corr=request.id, clock=1)
    asker.deliver(real, 0.2)
    assert asker.answer == {"ret": 0} and not asker.busy
