"""The deterministic runtime's timers: which actors fire, when, and in what order, against the
spec, a scan of every actor's next deadline after each delivery (what the runtime did before
it kept the actors' deadlines in one heap). Same seed, same actors: the same trace, the same
virtual times, the same outcomes, with actors that time out, die, join late and are held."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zmqrt_toys import Echo, Mute, ToyPing

from vsva.actors.base import Actor, ActorEnv, Call, Gather, Wait
from vsva.ops.topology import Topology
from vsva.runtime import sim
from vsva.runtime.sim import SimRuntime


class ScanSim(SimRuntime):
    """The spec: every actor asked for its next deadline each time."""

    def _fire_due(self) -> None:
        for actor in list(self.actors.values()):
            d = actor.next_deadline()
            if d is not None and d <= self.now:
                self._post(actor, actor.expire(self.now))

    def _expire_due(self) -> bool:
        deadlines = [d for a in self.actors.values() if (d := a.next_deadline()) is not None]
        if not deadlines:
            return False
        self.now = max(self.now, min(deadlines))
        self._fire_due()
        return True


class Player(Actor):
    """Runs its scripts side by side from the start; what each step got goes to `got`."""

    def __init__(self, name: str, env: ActorEnv, scripts: list[list[tuple[Any, ...]]]):
        super().__init__(name, env)
        self.scripts, self.got = scripts, []

    def on_start(self) -> None:
        for n, script in enumerate(self.scripts):
            self.spawn(lambda n=n, script=script: self.play(n, script))

    def play(self, n: int, script: list[tuple[Any, ...]]) -> Any:
        for peers, timeout in script:
            if not peers:
                got = yield Wait((self.name, n), timeout)
            elif len(peers) == 1:
                got = yield Call(peers[0], ToyPing.KIND, {}, timeout=timeout)
            else:
                got = yield Gather([Call(p, ToyPing.KIND, {}, timeout=timeout) for p in peers])
            self.got.append((n, got if isinstance(got, list) else [got]))


# Virtual time steps 20 us per delivery: timeouts of a few steps fire while messages fly
timeouts = st.sampled_from((0.0, 20e-6, 40e-6, 100e-6, 200e-6, 1e-3))
script = st.lists(
    st.tuples(st.lists(st.sampled_from(("echo", "mute", "gone")), max_size=3), timeouts), max_size=5
)
runs = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**16),
        "players": st.lists(st.lists(script, max_size=3), min_size=1, max_size=4),
        "kill": st.sampled_from((None, "echo", "mute", "p0")),
        "kill_after": st.integers(0, 30),
        "hold": st.booleans(),
        "late": st.booleans(),  # a probe joins late and calls (an actor added while timers run)
    }
)


def run(runtime: type[SimRuntime], spec: dict[str, Any]) -> list[Any]:
    rt = runtime(Topology(actors=[], mem_frames=16), seed=spec["seed"])
    rt.add(Echo("echo", rt.env({})))
    rt.add(Mute("mute", rt.env({})))
    players = [rt.add(Player(f"p{n}", rt.env({}), scripts)) for n, scripts in enumerate(spec["players"])]
    if spec["hold"]:
        rt.hold("p0", "echo")
    rt.start()
    rt.run(until=lambda: rt.delivered >= spec["kill_after"])
    if spec["kill"] is not None:
        rt.kill(spec["kill"])
    rt.release("p0", "echo")
    late = rt.call("mute", ToyPing.KIND, {}, timeout=150e-6) if spec["late"] else None
    rt.run()
    outcome = [(p.name, p.got, p.timeouts, p.dropped_replies, p.busy) for p in players]
    return [rt.trace, rt.now, rt.delivered, outcome, late]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])  # loaded machines
@given(runs)
def test_actors_fire_at_the_same_times_and_in_the_same_order_as_the_scan(spec):
    assert run(SimRuntime, spec) == run(ScanSim, spec)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])  # loaded machines
@given(runs)
def test_the_same_with_the_heap_compacted_at_every_delivery(spec):
    slack, sim.TIMER_SLACK = sim.TIMER_SLACK, 0
    try:
        assert run(SimRuntime, spec) == run(ScanSim, spec)
    finally:
        sim.TIMER_SLACK = slack


def test_answered_requests_do_not_pile_up_in_the_runtime():
    """One request of 1,000 s stays pending while 3,000 short ones are answered: the runtime's
    heap stays bounded by its actors, and the long one still fires when nothing else is left."""
    rt = SimRuntime(Topology(actors=[], mem_frames=16))
    rt.add(Echo("echo", rt.env({})))
    rt.add(Mute("mute", rt.env({})))
    player = rt.add(Player("p0", rt.env({}), [[(("mute",), 1000.0)], [(("echo",), 5.0)] * 3000]))
    rt.start()
    most = 0
    while rt.step():
        most = max(most, len(rt._timers))
    assert len(player.got) == 3000 and rt.now < 1.0
    assert most <= 2 * len(rt.actors) + sim.TIMER_SLACK + 1
    rt.run()
    assert rt.now == 1000.0 and player.got[-1][1][0]["ret"] < 0 and player.timeouts[0]["kind"] == "toy_ping"
