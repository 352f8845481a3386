"""The small pieces: config validation, broadcast queue, Lifeguard arithmetic."""

from __future__ import annotations

import math
from typing import TypedDict

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshmirror.mesh.awareness import Awareness
from meshmirror.mesh.config import MeshConfig
from meshmirror.mesh.queue import TransmitLimitedQueue, retransmit_limit
from meshmirror.mesh.state import suspicion_timeout
from meshmirror.mesh.suspicion import Suspicion, remaining_suspicion_time

from .helpers import make


class ConfigOptions(TypedDict, total=False):
    """The ``MeshConfig`` fields the rejection cases below set."""

    probe_interval: float
    probe_timeout: float
    gossip_nodes: int
    retransmit_mult: int
    udp_buffer_size: int
    protocol_version: int
    label: str


def test_defaults_are_memberlists_lan_profile() -> None:
    c = MeshConfig()
    assert (c.probe_interval, c.probe_timeout, c.indirect_checks) == (1.0, 0.5, 3)
    assert (c.retransmit_mult, c.suspicion_mult, c.suspicion_max_timeout_mult) == (4, 4, 6)
    assert (c.gossip_nodes, c.gossip_interval, c.gossip_to_the_dead_time) == (3, 0.2, 30.0)
    assert (c.push_pull_interval, c.tcp_timeout, c.udp_buffer_size) == (30.0, 10.0, 1400)
    assert c.awareness_max_multiplier == 8 and c.enable_compression
    assert c.vsn == (1, 5, 2, 2, 5, 4)


BAD_CONFIGS: list[tuple[ConfigOptions, str]] = [
    ({"probe_interval": 0}, "probe_interval must be > 0"),
    ({"probe_timeout": 2.0}, "must not exceed"),
    ({"gossip_nodes": -1}, "gossip_nodes must be >= 0"),
    ({"retransmit_mult": 0}, "retransmit_mult must be >= 1"),
    ({"udp_buffer_size": 100}, "udp_buffer_size"),
    ({"protocol_version": 9}, "protocol_version"),
    ({"label": "x" * 300}, "label"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_CONFIGS)
def test_bad_config_is_rejected_with_the_reason(kwargs: ConfigOptions, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MeshConfig(**kwargs)


def test_transmit_limit_grows_with_log_of_cluster_size() -> None:
    assert retransmit_limit(4, 1) == 4
    assert retransmit_limit(4, 9) == 4
    assert retransmit_limit(4, 10) == 8
    assert retransmit_limit(4, 1000) == 16


def test_each_broadcast_is_sent_exactly_the_transmit_limit() -> None:
    q = TransmitLimitedQueue(4)
    q.queue(b"x" * 10, "n1")
    sends = 0
    while q.get_broadcasts(2, 1400, num_nodes=50):
        sends += 1
        assert sends < 100
    assert sends == retransmit_limit(4, 50) == 8
    assert len(q) == 0 and not q.contains("n1")


def test_newer_message_about_a_node_replaces_the_older() -> None:
    q = TransmitLimitedQueue(4)
    q.queue(b"suspect n1", "n1")
    q.queue(b"alive n1", "n1")
    q.queue(b"user", None)
    q.queue(b"user", None)  # unnamed: never replaced
    assert sorted(q.get_broadcasts(2, 1400, 10)) == sorted([b"alive n1", b"user", b"user"])


def test_least_sent_first_then_largest_and_packets_stay_under_the_limit() -> None:
    q = TransmitLimitedQueue(4)
    q.queue(b"a" * 30, "a")
    q.get_broadcasts(2, 1400, 10)  # "a" now sent once
    q.queue(b"b" * 20, "b")
    q.queue(b"c" * 40, "c")
    assert q.get_broadcasts(2, 1400, 10) == [b"c" * 40, b"b" * 20, b"a" * 30]
    # Only 64 bytes: the two largest that fit, by priority.
    q2 = TransmitLimitedQueue(4)
    for name, size in (("a", 30), ("b", 30), ("c", 30)):
        q2.queue(name.encode() * size, name)
    assert len(q2.get_broadcasts(2, 64, 10)) == 2
    assert q2.get_broadcasts(2, 10, 10) == []


@given(st.lists(st.integers(min_value=1, max_value=300), min_size=1, max_size=60),
       st.integers(min_value=40, max_value=1400))
def test_taken_broadcasts_always_fit(sizes: list[int], limit: int) -> None:
    q = TransmitLimitedQueue(4)
    for i, size in enumerate(sizes):
        q.queue(bytes(size), f"n{i}")
    taken = q.get_broadcasts(2, limit, 100)
    assert sum(len(m) + 2 for m in taken) <= limit


def test_prune_drops_the_most_sent() -> None:
    q = TransmitLimitedQueue(4)
    q.queue(b"old", "old")
    q.get_broadcasts(2, 1400, 10)
    q.queue(b"new", "new")
    q.prune(1)
    assert q.get_broadcasts(2, 1400, 10) == [b"new"]


def test_awareness_is_bounded_and_scales_timeouts() -> None:
    a = Awareness(8)
    a.apply_delta(-3)
    assert a.score == 0 and a.scale(1.0) == 1.0
    a.apply_delta(3)
    assert a.scale(0.5) == 2.0
    a.apply_delta(100)
    assert a.score == 7 and a.scale(1.0) == 8.0
    with pytest.raises(ValueError):
        Awareness(0)


def test_suspicion_timeout_matches_memberlists_formula() -> None:
    assert suspicion_timeout(4, 1, 1.0) == 4.0
    assert suspicion_timeout(4, 100, 1.0) == 8.0
    assert suspicion_timeout(4, 1000, 1.0) == 12.0
    assert suspicion_timeout(4, 50, 1.0) == pytest.approx(4 * 1.698)


def test_suspicion_shrinks_logarithmically_with_confirmations() -> None:
    s = Suspicion("a", k=3, min_timeout=2.0, max_timeout=30.0, start=0.0)
    assert s.deadline == 30.0
    assert not s.confirm("a", 1.0), "the accuser does not confirm itself"
    assert s.confirm("b", 1.0)
    expected = 30.0 - math.log(2) / math.log(4) * 28.0
    assert s.deadline == pytest.approx(math.floor(expected * 1000) / 1000)
    assert s.confirm("c", 2.0) and s.confirm("d", 3.0)
    assert s.deadline == 3.0, "min timeout (2 s) already passed at the third: fires now"
    assert not s.confirm("e", 3.0), "no more than k confirmations count"
    late = Suspicion("a", k=3, min_timeout=2.0, max_timeout=30.0, start=0.0)
    for i, who in enumerate("bcd"):
        late.confirm(who, 10.0 + i)
    assert late.deadline == 12.0, "already overdue: fires at once"
    assert remaining_suspicion_time(3, 3, 5.0, 2.0, 30.0) == -3.0
    assert Suspicion("a", k=0, min_timeout=2.0, max_timeout=30.0, start=1.0).deadline == 3.0


def test_wire_module_satisfies_the_codec_protocol() -> None:
    from meshmirror.mesh import wire
    from meshmirror.mesh.state import Codec

    codec: Codec = wire  # checked by mypy too
    core = make("a", 1, codec=codec)
    assert core.members()
