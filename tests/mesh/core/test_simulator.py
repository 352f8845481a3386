"""Whole small clusters on the simulator's virtual clock, with real wire bytes."""

from __future__ import annotations

import pytest

from meshmirror.mesh.config import MeshConfig
from meshmirror.mesh.events import Effect, MemberJoined, MemberLeft, MemberUpdated
from meshmirror.mesh.messages import NodeState
from meshmirror.mesh.simulator import NetworkModel, Simulator

CFG = MeshConfig(enable_compression=False)


class Log:
    def __init__(self, sim: Simulator) -> None:
        self.events: list[tuple[float, str, Effect]] = []
        sim.observe(lambda t, n, e: self.events.append((t, n, e)))

    def deaths(self, of: str | None = None) -> list[tuple[float, str]]:
        return [(t, n) for t, n, e in self.events
                if isinstance(e, MemberLeft) and e.dead and (of is None or e.node.name == of)]


def test_crash_is_detected_by_every_live_node_within_the_lifeguard_bound() -> None:
    sim = Simulator(CFG, seed=7)
    names = sim.bootstrap(20)
    log = Log(sim)
    sim.run_until(5.0)
    sim.crash("n3")
    sim.run_until(60.0)
    deaths = log.deaths("n3")
    observers = {n for _, n in deaths}
    assert observers == set(names) - {"n3"}
    # Bound: a probe cycle to reach it, probe interval, then at most the max suspicion timeout.
    bound = 20 * CFG.probe_interval + 6 * 4 * 1.30103 + 2
    assert max(t for t, _ in deaths) - 5.0 < bound
    assert {n for t, n, e in log.events if isinstance(e, MemberLeft)
            and e.node.name != "n3"} == set()


def test_no_false_deaths_at_ten_percent_packet_loss() -> None:
    sim = Simulator(CFG, seed=11, network=NetworkModel(loss=0.10))
    sim.bootstrap(30)
    log = Log(sim)
    sim.run_until(60.0)
    assert log.deaths() == []
    assert sim.traffic.dropped_loss > 0


def test_join_and_metadata_change_reach_everyone() -> None:
    sim = Simulator(CFG, seed=5)
    names = sim.bootstrap(25)
    log = Log(sim)
    sim.run_until(2.0)
    sim.add_node("newcomer")
    sim.act("newcomer", lambda core, now: core.join([sim.nodes["n0"].addr], now))
    sim.run_until(10.0)
    joined = {n for _, n, e in log.events
              if isinstance(e, MemberJoined) and e.node.name == "newcomer"}
    assert joined >= set(names)
    sim.act("n4", lambda core, now: core.update_meta(b"epoch=2", now))
    sim.run_until(15.0)
    updated = {n for _, n, e in log.events
               if isinstance(e, MemberUpdated) and e.node.name == "n4"
               and e.node.meta == b"epoch=2"}
    assert updated >= set(names) | {"newcomer"}


def test_partition_is_detected_on_both_sides() -> None:
    sim = Simulator(CFG, seed=3)
    names = sim.bootstrap(10)
    log = Log(sim)
    left, right = names[:5], names[5:]
    sim.run_until(2.0)
    sim.partition([left, right])
    sim.run_until(25.0)  # before gossip_to_the_dead_time forgets them
    for name in left:
        view = {m.name: m.state for m in sim.nodes[name].core.members(include_dead=True)}
        assert all(view[r] == NodeState.DEAD for r in right), view
    assert {n for _, n in log.deaths()} == set(names)


def test_short_partition_heals_without_deaths() -> None:
    sim = Simulator(CFG, seed=4)
    names = sim.bootstrap(10)
    log = Log(sim)
    sim.run_until(2.0)
    sim.partition([names[:5], names[5:]])
    sim.run_until(4.0)
    sim.heal()
    sim.run_until(40.0)
    assert log.deaths() == []
    for name in names:
        assert len(sim.nodes[name].core.members()) == 10


def test_graceful_leave_is_seen_as_left() -> None:
    sim = Simulator(CFG, seed=9)
    names = sim.bootstrap(12)
    log = Log(sim)
    sim.run_until(1.0)
    sim.act("n2", lambda core, now: core.leave(now))
    sim.run_until(3.0)
    assert sim.nodes["n2"].core.leave_broadcast_done
    left = {n for _, n, e in log.events
            if isinstance(e, MemberLeft) and not e.dead and e.node.name == "n2"}
    assert left == set(names)
    assert log.deaths() == []


def test_duplicate_node_names_are_refused() -> None:
    sim = Simulator(CFG)
    sim.add_node("a")
    with pytest.raises(ValueError, match="already exists"):
        sim.add_node("a")
