"""The core stepped by hand, one protocol state at a time, with no sockets."""

from __future__ import annotations

import random

import pytest

from meshmirror.mesh import wire
from meshmirror.mesh.config import MeshConfig
from meshmirror.mesh.events import (
    JoinResult,
    MemberJoined,
    MemberLeft,
    MemberUpdated,
    SendPacket,
    UserMessage,
)
from meshmirror.mesh.messages import (
    AckResp,
    Alive,
    Dead,
    IndirectPing,
    Message,
    NackResp,
    NodeState,
    Ping,
    PushNodeState,
    PushPull,
    Suspect,
    User,
)
from meshmirror.mesh.state import Memberlist, push_pull_scale, suspicion_timeout
from meshmirror.mesh.suspicion import remaining_suspicion_time

from .helpers import (
    addr,
    deliver,
    introduce,
    make,
    member,
    mesh,
    messages,
    of_type,
    opened,
    push_pull,
    sent,
    state_of,
    step,
    until_ping,
)


def packet(*msgs: Message) -> bytes:
    parts = [wire.encode(m) for m in msgs]
    payload = parts[0] if len(parts) == 1 else wire.compound(parts)
    return wire.seal_packet(payload, keyring=None, crc=False)


# ---------------------------------------------------------------- start and join


def test_new_node_knows_only_itself_and_announces_its_own_join() -> None:
    a = make("a", 1, meta=b"m")
    effects = a.drain()
    assert [type(e) for e in effects] == [MemberJoined]
    assert [m.name for m in a.members()] == ["a"]
    me = a.member("a")
    assert me is not None and me.state == NodeState.ALIVE and me.incarnation == 1
    assert me.meta == b"m"


def test_join_push_pulls_with_the_seed_and_both_sides_learn_each_other() -> None:
    a, b = make("a", 1), make("b", 2)
    a.drain(), b.drain()
    a.join([addr(b)], 0.0)
    streams = opened(a.drain())
    assert len(streams) == 1 and streams[0].addr == addr(b)
    request = wire.StreamDecoder(None).feed(streams[0].data)
    assert isinstance(request, PushPull) and request.join
    push_pull(a, b, streams[0], 0.01)
    assert {m.name for m in a.members()} == {"a", "b"}
    assert {m.name for m in b.members()} == {"a", "b"}
    a_effects = a.drain()
    assert JoinResult(1, ()) in a_effects
    assert any(isinstance(e, MemberJoined) and e.node.name == "b" for e in a_effects)
    assert any(isinstance(e, MemberJoined) and e.node.name == "a" for e in b.drain())


def test_join_reports_each_seed_that_failed() -> None:
    a, b = make("a", 1), make("b", 2)
    a.join([addr(b), ("127.50.0.99", 7946)], 0.0)
    ok, bad = opened(a.drain())
    a.stream_reply(bad.stream_id, None, 0.5)
    assert not [e for e in a.drain() if isinstance(e, JoinResult)], "waits for every seed"
    push_pull(a, b, ok, 0.6)
    results = [e for e in a.drain() if isinstance(e, JoinResult)]
    assert len(results) == 1 and results[0].contacted == 1
    assert "127.50.0.99:7946" in results[0].errors[0]


def test_join_with_no_addresses_is_an_immediate_failure() -> None:
    a = make("a", 1)
    a.join([], 0.0)
    assert JoinResult(0, ("no addresses to join",)) in a.drain()


def test_join_refuses_a_cluster_speaking_an_incompatible_protocol() -> None:
    a = make("a", 1)
    a.join([("127.50.0.2", 7946)], 0.0)
    (stream,) = opened(a.drain())
    alien = PushNodeState("x", bytes([127, 50, 0, 2]), 7946, b"", 1, NodeState.ALIVE,
                          (1, 5, 2, 6, 7, 6))  # needs delegate protocol >= 6, we speak 4
    a.stream_reply(stream.stream_id, PushPull(False, (alien,)), 0.1)
    (result,) = [e for e in a.drain() if isinstance(e, JoinResult)]
    assert result.contacted == 0 and "incompatible" in result.errors[0]
    assert a.member("x") is None
    assert a.stats.dropped["incompatible_version"] == 1


def test_bad_construction_is_rejected_with_clear_errors() -> None:
    with pytest.raises(ValueError, match="512"):
        make("a", 1, meta=b"x" * 513)
    with pytest.raises(ValueError, match="IP address"):
        Memberlist(MeshConfig(), name="a", addr="node-a.local", port=7946, meta=b"",
                   rng=random.Random(1), now=0.0)
    with pytest.raises(ValueError, match="name"):
        make("", 1)


# ---------------------------------------------------------------- probing


def test_probe_is_answered_by_ack_and_records_rtt() -> None:
    a, b = make("a", 1), make("b", 2)
    mesh([a, b])
    t, effects = until_ping(a)
    (ping,) = of_type(effects, Ping)
    assert isinstance(ping, Ping) and ping.node == "b" and ping.source_node == "a"
    replies = deliver(effects, [b], t + 0.001, a)
    (ack,) = of_type(replies, AckResp)
    assert isinstance(ack, AckResp) and ack.seq_no == ping.seq_no
    deliver(replies, [a], t + 0.002, b)
    assert a.stats.probe_rtt_count == 1
    assert a.stats.probe_rtt_sum == pytest.approx(0.002)
    later = step(a, t + 0.99)
    assert not of_type(later, IndirectPing) and not opened(later)
    assert member(a, "b").state == NodeState.ALIVE
    assert a.awareness.score == 0


def test_ping_for_another_node_name_is_dropped() -> None:
    a = make("a", 1)
    a.drain()
    a.packet_received(packet(Ping(7, "somebody-else")), ("127.50.0.2", 7946), 0.0)
    assert not sent(a.drain())
    assert a.stats.dropped["wrong_node"] == 1


def test_missed_probe_goes_indirect_then_suspects_and_nack_less_silence_hurts_awareness() -> None:
    cores = [make(n, i + 1) for i, n in enumerate("abcde")]
    a = cores[0]
    mesh(cores)
    t, effects = until_ping(a)
    (ping,) = of_type(effects, Ping)
    assert isinstance(ping, Ping)
    target = ping.node
    later = step(a, t + 0.5)
    indirect = [(dst, m) for dst, m in messages(later) if isinstance(m, IndirectPing)]
    assert len(indirect) == 3
    assert all(m.node == target and m.nack and m.seq_no == ping.seq_no for _, m in indirect)
    target_addr = addr(next(c for c in cores if c.name == target))
    assert target_addr not in {dst for dst, _ in indirect}
    (tcp,) = opened(later)
    assert tcp.addr == target_addr
    step(a, t + 1.0)
    assert member(a, target).state == NodeState.ALIVE
    a.stream_reply(tcp.stream_id, None, t + 1.0)  # the TCP fallback failed too
    assert member(a, target).state == NodeState.SUSPECT
    assert a.stats.suspicions == 1 and a.stats.probe_failures == 1
    # Three nacks were expected and none came: we may be the broken one.
    assert a.awareness.score == 3


def test_intermediary_forwards_the_ack_or_sends_a_nack() -> None:
    cores = [make(n, i + 1) for i, n in enumerate("abc")]
    a, b, c = cores
    mesh(cores)
    ind = IndirectPing(42, bytes([127, 50, 0, 2]), 7946, "b", True, bytes([127, 50, 0, 1]), 7946,
                       "a")
    c.packet_received(packet(ind), addr(a), 10.0)
    out = c.drain()
    (to_b,) = sent(out)
    assert to_b.addr == addr(b)
    (ping,) = of_type(out, Ping)
    assert isinstance(ping, Ping) and ping.node == "b" and ping.source_node == "c"
    back = deliver(out, [b], 10.001, c)
    forwarded = deliver(back, [c], 10.002, b)
    (ack,) = of_type(forwarded, AckResp)
    assert isinstance(ack, AckResp) and ack.seq_no == 42
    assert [p.addr for p in sent(forwarded)] == [addr(a)]
    assert not of_type(step(c, 10.6), NackResp), "answered: no nack"
    # Now a target that never answers: a nack after the probe timeout.
    c.packet_received(packet(IndirectPing(43, bytes([127, 50, 0, 2]), 7946, "b", True,
                                          bytes([127, 50, 0, 1]), 7946, "a")), addr(a), 20.0)
    c.drain()
    nacks = [(dst, m) for dst, m in messages(step(c, 20.51)) if isinstance(m, NackResp)]
    assert nacks == [(addr(a), NackResp(43))]


def test_nacks_from_intermediaries_keep_our_awareness_healthy() -> None:
    cores = [make(n, i + 1) for i, n in enumerate("abcde")]
    a = cores[0]
    mesh(cores)
    t, _ = until_ping(a)
    later = step(a, t + 0.5)
    for _, m in messages(later):
        if isinstance(m, IndirectPing):
            a.packet_received(packet(NackResp(m.seq_no)), ("127.50.0.9", 7946), t + 0.8)
    (tcp,) = opened(later)
    step(a, t + 1.0)
    a.stream_reply(tcp.stream_id, None, t + 1.0)
    assert a.stats.suspicions == 1
    assert a.awareness.score == 0


def test_tcp_fallback_ping_saves_a_node_whose_udp_is_broken() -> None:
    a, b = make("a", 1), make("b", 2)
    mesh([a, b])
    t, _ = until_ping(a)
    (tcp,) = opened(step(a, t + 0.5))
    request = wire.StreamDecoder(None).feed(tcp.data)
    assert isinstance(request, Ping) and request.node == "b"
    reply = b.stream_received(request, addr(a), t + 0.6)
    assert reply is not None
    a.stream_reply(tcp.stream_id, wire.StreamDecoder(None).feed(reply), t + 0.6)
    step(a, t + 1.0)
    assert member(a, "b").state == NodeState.ALIVE
    assert a.stats.tcp_fallback_rescues == 1 and a.stats.suspicions == 0


def test_awareness_stretches_the_probe_before_suspecting() -> None:
    a, b = make("a", 1), make("b", 2)
    mesh([a, b])
    a.awareness.apply_delta(2)  # three times the probe interval
    t, _ = until_ping(a)
    (tcp,) = opened(step(a, t + 0.5))
    assert tcp.timeout == pytest.approx(2.5)
    a.stream_reply(tcp.stream_id, None, t + 0.6)
    step(a, t + 2.99)
    assert member(a, "b").state == NodeState.ALIVE
    step(a, t + 3.0)
    assert member(a, "b").state == NodeState.SUSPECT
    assert a.awareness.score == 3  # no nacks expected from nobody: +1


def test_buddy_system_tells_the_suspect_which_refutes_on_the_spot() -> None:
    a, b = make("a", 1), make("b", 2)
    mesh([a, b])
    a.packet_received(packet(Suspect(1, "b", "a")), addr(b), 0.0)
    assert member(a, "b").state == NodeState.SUSPECT
    t, effects = until_ping(a)
    probe = [p for p in sent(effects) if p.addr == addr(b)]
    kinds = {type(m) for p in probe for m in wire.open_packet(p.data, keyring=None)}
    assert {Ping, Suspect} <= kinds
    replies = deliver(effects, [b], t + 0.001, a)
    assert b.incarnation == 2 and b.stats.refutations == 1
    deliver(replies, [a], t + 0.002, b)
    # The ack left before the suspect part was read; the refutation follows by gossip.
    gossip = step(b, t + 0.3)
    alive = [m for m in of_type(gossip, Alive) if isinstance(m, Alive) and m.node == "b"]
    assert alive and alive[0].incarnation == 2
    deliver(gossip, [a], t + 0.3, b)
    view = a.member("b")
    assert view is not None and view.state == NodeState.ALIVE and view.incarnation == 2


# ---------------------------------------------------------------- suspicion and death


def test_lone_suspicion_in_a_tiny_cluster_becomes_death_after_the_minimum_timeout() -> None:
    a, b = make("a", 1), make("b", 2)
    mesh([a, b])
    a.drain()
    a.packet_received(packet(Suspect(1, "b", "a")), addr(b), 0.0)
    timeout = suspicion_timeout(4, 2, 1.0)
    assert timeout == 4.0  # k = 0 with two nodes: nobody could confirm
    step(a, timeout - 0.01)
    assert member(a, "b").state == NodeState.SUSPECT
    effects = step(a, timeout + 0.01)
    assert member(a, "b").state == NodeState.DEAD
    left = [e for e in effects if isinstance(e, MemberLeft)]
    assert len(left) == 1 and left[0].dead and left[0].node.name == "b"


def test_independent_confirmations_shrink_the_suspicion_timeout() -> None:
    cores = [make(n, i + 1) for i, n in enumerate("abcde")]
    a = cores[0]
    mesh(cores)
    a.packet_received(packet(Suspect(1, "b", "a")), addr(cores[2]), 0.0)
    lo = suspicion_timeout(4, 5, 1.0)
    hi = 6 * lo
    assert (lo, hi) == (4.0, 24.0)
    a.packet_received(packet(Suspect(1, "b", "c")), addr(cores[2]), 1.0)
    one = remaining_suspicion_time(1, 2, 0.0, lo, hi)
    assert lo < one < hi
    a.packet_received(packet(Suspect(1, "b", "c")), addr(cores[2]), 1.5)  # same peer again
    assert a.broadcasts.contains("b")
    a.packet_received(packet(Suspect(1, "b", "d")), addr(cores[3]), 2.0)
    step(a, lo - 0.01)
    assert member(a, "b").state == NodeState.SUSPECT
    step(a, lo + 0.01)
    assert member(a, "b").state == NodeState.DEAD


def test_unconfirmed_suspicion_waits_for_the_maximum_timeout() -> None:
    cores = [make(n, i + 1) for i, n in enumerate("abcde")]
    a = cores[0]
    mesh(cores)
    a.packet_received(packet(Suspect(1, "b", "a")), addr(cores[1]), 0.0)
    step(a, 23.9)
    assert member(a, "b").state == NodeState.SUSPECT
    step(a, 24.01)
    assert member(a, "b").state == NodeState.DEAD


def test_alive_with_higher_incarnation_cancels_the_suspicion() -> None:
    a, b = make("a", 1), make("b", 2)
    mesh([a, b])
    a.packet_received(packet(Suspect(1, "b", "a")), addr(b), 0.0)
    stale = Alive(1, "b", bytes([127, 50, 0, 2]), 7946, b"", a.config.vsn)
    a.packet_received(packet(stale), addr(b), 0.5)
    assert member(a, "b").state == NodeState.SUSPECT
    fresh = Alive(2, "b", bytes([127, 50, 0, 2]), 7946, b"", a.config.vsn)
    a.packet_received(packet(fresh), addr(b), 1.0)
    assert member(a, "b").state == NodeState.ALIVE
    step(a, 4.5)  # past the cancelled suspicion's 4 s; a fresh one would need 4 s more
    assert member(a, "b").state != NodeState.DEAD


def test_suspicion_and_death_of_ourselves_are_refuted_with_a_higher_incarnation() -> None:
    a, b = make("a", 1), make("b", 2)
    mesh([a, b])
    a.packet_received(packet(Suspect(1, "a", "b")), addr(b), 0.0)
    assert a.incarnation == 2 and a.stats.refutations == 1
    assert member(a, "a").state == NodeState.ALIVE
    a.packet_received(packet(Dead(7, "a", "b")), addr(b), 0.1)
    assert a.incarnation == 8, "outbids the accusation"
    assert a.awareness.score == 2, "being accused is a sign we are slow"
    gossip = step(a, 0.5)
    alive = [m for m in of_type(gossip, Alive) if isinstance(m, Alive) and m.node == "a"]
    assert alive and alive[-1].incarnation == 8
    deliver(gossip, [b], 0.5, a)
    assert member(b, "a").incarnation == 8


def test_dead_nodes_are_forgotten_after_gossip_to_the_dead_time() -> None:
    a, b, c = make("a", 1), make("b", 2), make("c", 3)
    mesh([a, b, c])
    a.packet_received(packet(Dead(1, "b", "c")), addr(c), 0.0)
    assert member(a, "b").state == NodeState.DEAD
    step(a, 29.0)
    assert a.member("b") is not None
    step(a, 35.0)
    assert a.member("b") is None
    # (c never answered a's probes either, so it may be dead by now: counts must agree.)
    dead = [m for m in a.members(include_dead=True) if m.state == NodeState.DEAD]
    assert a.stats.members_by_state[NodeState.DEAD] == len(dead)
    assert sum(a.stats.members_by_state.values()) == a.num_members()


def test_dead_node_may_come_back_at_a_new_address_only_after_reclaim_time() -> None:
    cfg = MeshConfig(dead_node_reclaim_time=10.0)
    a, b = make("a", 1, cfg=cfg), make("b", 2, cfg=cfg)
    mesh([a, b])
    a.packet_received(packet(Dead(1, "b", "a")), addr(b), 0.0)
    moved = Alive(2, "b", bytes([127, 50, 0, 77]), 7946, b"", cfg.vsn)
    a.packet_received(packet(moved), ("127.50.0.77", 7946), 5.0)
    assert member(a, "b").addr == "127.50.0.2"
    assert a.stats.dropped["address_conflict"] == 1
    a.packet_received(packet(moved), ("127.50.0.77", 7946), 11.0)
    view = a.member("b")
    assert view is not None and view.addr == "127.50.0.77" and view.state == NodeState.ALIVE


def test_restarted_node_rejoins_with_a_higher_incarnation() -> None:
    a, b = make("a", 1), make("b", 2)
    mesh([a, b])
    a.packet_received(packet(Dead(1, "b", "a")), addr(b), 0.0)
    a.drain()
    b2 = make("b", 2, now=5.0, seed=99)  # same name and address, fresh process
    b2.join([addr(a)], 5.0)
    (stream,) = opened(b2.drain())
    push_pull(b2, a, stream, 5.01)
    assert b2.incarnation == 2, "learned it was dead and refuted"
    gossip = step(b2, 5.5)
    out = deliver(gossip, [a], 5.5, b2)
    view = a.member("b")
    assert view is not None and view.state == NodeState.ALIVE and view.incarnation == 2
    assert any(isinstance(e, MemberJoined) and e.node.name == "b" for e in out)


# ---------------------------------------------------------------- leave and metadata


def _leave_done(core: Memberlist) -> bool:
    return core.leave_broadcast_done


def test_graceful_leave_is_gossiped_as_left_not_dead() -> None:
    a, b = make("a", 1), make("b", 2)
    mesh([a, b])
    a.leave(1.0)
    assert a.has_left and member(a, "a").state == NodeState.LEFT
    assert not _leave_done(a)
    mine = [e for e in a.drain() if isinstance(e, MemberLeft)]
    assert mine and not mine[0].dead
    gossip = step(a, 1.3)
    dead = [m for m in of_type(gossip, Dead) if isinstance(m, Dead)]
    assert dead and dead[0].node == dead[0].from_node == "a"
    out = deliver(gossip, [b], 1.3, a)
    assert member(b, "a").state == NodeState.LEFT
    assert any(isinstance(e, MemberLeft) and not e.dead for e in b.drain() + out)
    step(a, 3.0)
    assert _leave_done(a)
    # A left node does not rejoin on stale gossip about itself.
    a.packet_received(packet(Suspect(1, "a", "b")), addr(b), 3.1)
    assert member(a, "a").state == NodeState.LEFT


def test_metadata_update_raises_incarnation_and_reaches_peers() -> None:
    a, b = make("a", 1), make("b", 2)
    mesh([a, b])
    a.update_meta(b"role=mirror", 1.0)
    assert a.incarnation == 2
    assert any(isinstance(e, MemberUpdated) for e in a.drain())
    gossip = step(a, 1.3)
    out = deliver(gossip, [b], 1.3, a)
    updates = [e for e in out if isinstance(e, MemberUpdated)]
    assert updates and updates[0].node.meta == b"role=mirror"
    with pytest.raises(ValueError, match="512"):
        a.update_meta(b"x" * 513, 2.0)
    a.update_meta(b"x" * 512, 2.0)


# ---------------------------------------------------------------- push-pull


class _Delegate:
    def __init__(self) -> None:
        self.merged: list[tuple[bytes, bool]] = []
        self.user: list[bytes] = []

    def local_state(self, join: bool) -> bytes:
        return b"JOIN" if join else b"SYNC"

    def merge_remote_state(self, data: bytes, join: bool) -> None:
        self.merged.append((data, join))

    def notify_user(self, payload: bytes) -> None:
        self.user.append(payload)


def test_push_pull_merges_alive_left_and_dead_and_carries_user_state() -> None:
    cores = [make(n, i + 1) for i, n in enumerate("bcde")]
    delegate = _Delegate()
    b = make("b", 1, delegate=delegate)
    c, d, e = cores[1:]
    introduce(b, [c, d, e])
    remote = PushPull(False, (
        state_of(c, 3, meta=b"new"),
        state_of(d, 2, NodeState.DEAD),
        state_of(e, 1, NodeState.LEFT),
    ), b"THEIRS")
    reply = b.stream_received(remote, addr(c), 1.0)
    assert reply is not None
    mine = wire.StreamDecoder(None).feed(reply)
    assert isinstance(mine, PushPull) and mine.user_state == b"SYNC"
    assert {n.name for n in mine.nodes} == {"b", "c", "d", "e"}
    assert member(b, "c").meta == b"new" and member(b, "c").incarnation == 3
    # A remote "dead" is only a suspicion here: the node gets its chance to refute.
    assert member(b, "d").state == NodeState.SUSPECT
    assert member(b, "e").state == NodeState.LEFT
    assert delegate.merged == [(b"THEIRS", False)]


def test_periodic_push_pull_targets_an_alive_peer_and_scales_with_cluster_size() -> None:
    cfg = MeshConfig(push_pull_interval=0.5)  # before b, which never answers, is suspected
    a, b = make("a", 1, cfg=cfg), make("b", 2, cfg=cfg)
    mesh([a, b])
    streams = [s for s in opened(step(a, 0.5))
               if isinstance(wire.StreamDecoder(None).feed(s.data), PushPull)]
    assert [s.addr for s in streams] == [addr(b)]
    assert push_pull_scale(30.0, 32) == 30.0
    assert push_pull_scale(30.0, 33) == 60.0
    assert push_pull_scale(30.0, 1000) == 180.0


# ---------------------------------------------------------------- gossip and user messages


def test_gossip_packs_broadcasts_into_packets_under_the_udp_limit() -> None:
    a, b = make("a", 1), make("b", 2)
    mesh([a, b])
    for i in range(200):
        a.packet_received(packet(Alive(1, f"x{i:03d}", bytes([127, 60, 0, i % 250 + 1]),
                                       7000 + i, b"m" * 40, a.config.vsn)), addr(b), 0.0)
    queued = len(a.broadcasts)
    assert queued == 200
    packets = sent(step(a, 0.2))
    assert packets
    assert all(len(p.data) <= a.config.udp_buffer_size for p in packets)
    parts = [m for p in packets for m in wire.open_packet(p.data, keyring=None)]
    assert 10 < len(parts) < 200


def test_gossip_sends_nothing_when_there_is_no_news() -> None:
    a, b = make("a", 1), make("b", 2)
    mesh([a, b])
    a.drain()
    effects = step(a, 0.9)
    assert not of_type(effects, Alive) and not of_type(effects, User)


def test_user_broadcast_and_direct_user_messages_reach_the_delegate() -> None:
    delegate = _Delegate()
    a, b = make("a", 1), make("b", 2, delegate=delegate)
    mesh([a, b])
    a.broadcast_user(b"hello all")
    out = deliver(step(a, 0.3), [b], 0.3, a)
    assert delegate.user and set(delegate.user) == {b"hello all"}
    assert UserMessage(b"hello all", "127.50.0.1:7946") in out
    a.send_user("b", b"just you")
    direct = a.drain()
    assert len(sent(direct)) == 1
    deliver(direct, [b], 0.4, a)
    assert delegate.user[-1] == b"just you"
    assert b.stream_received(User(b"reliable"), addr(a), 0.5) is None
    assert delegate.user[-1] == b"reliable"
    with pytest.raises(KeyError):
        a.send_user("nobody", b"x")


# ---------------------------------------------------------------- hostile input


@pytest.mark.parametrize("data", [b"", b"\xff", b"\x00\x81", b"\x07\x05\x00", b"\x0c\x00\x00"])
def test_garbage_packets_are_counted_never_raised(data: bytes) -> None:
    a = make("a", 1)
    a.packet_received(data, ("127.50.0.9", 1), 0.0)
    assert sum(a.stats.dropped.values()) == 1
    assert not sent(a.drain())


def test_stream_messages_of_the_wrong_kind_are_dropped() -> None:
    a = make("a", 1)
    assert a.stream_received(Suspect(1, "a", "x"), ("127.50.0.9", 1), 0.0) is None
    assert a.stats.dropped["unexpected_stream"] == 1
    a.stream_reply(12345, None, 0.0)  # unknown stream id: ignored


def test_alive_with_impossible_versions_is_dropped() -> None:
    a = make("a", 1)
    a.packet_received(packet(Alive(1, "x", bytes([127, 0, 0, 9]), 1, b"", (3, 1, 2, 0, 0, 0))),
                      ("127.0.0.9", 1), 0.0)
    assert a.member("x") is None and a.stats.dropped["bad_version"] == 1


def test_bad_parts_of_a_compound_are_counted_and_the_rest_handled() -> None:
    from meshmirror.mesh import wire
    from meshmirror.mesh.config import MeshConfig
    from meshmirror.mesh.messages import Ping
    from meshmirror.mesh.state import Memberlist

    core = Memberlist(MeshConfig(), name="a", addr="127.0.0.1", port=7946, meta=b"",
                      rng=random.Random(1), now=0.0)
    good = wire.encode(Ping(seq_no=7, node="a"))
    packet = wire.seal_packet(wire.compound([good, b"\xfe garbage"]), keyring=None)
    core.packet_received(packet, ("127.0.0.2", 7946), 0.0)
    assert sum(core.stats.dropped.values()) == 1
    assert any(isinstance(e, SendPacket) and e.addr == ("127.0.0.2", 7946)
               for e in core.drain()), "the good ping in the compound is still acked"
