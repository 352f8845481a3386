"""MeshNode on loopback sockets: convergence, bad input, join retry, DNS, events, metrics."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Sequence

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from meshmirror.mesh import wire
from meshmirror.mesh.config import MeshConfig
from meshmirror.mesh.events import Address, MemberJoined, MemberLeft
from meshmirror.mesh.keyring import Keyring
from meshmirror.mesh.messages import NodeState, Ping
from meshmirror.mesh.metrics import register_mesh_metrics
from meshmirror.mesh.transport import MeshError, MeshNode
from tests.support.ports import free_port, loopback_host
from tests.support.serf import wait_for

CONFIG = MeshConfig()




def start(nodes: list[MeshNode], name: str, *, host: str | None = None, port: int | None = None,
          meta: bytes = b"", keyring: Keyring | None = None, join: Sequence[Address] = (),
          join_dns: str | None = None) -> MeshNode:
    host = host or loopback_host()
    node = MeshNode(CONFIG, name=name, bind=(host, port if port is not None else free_port(host)),
                    meta=meta, keyring=keyring, join=join, join_dns=join_dns)
    nodes.append(node)
    node.start()
    return node


def alive(node: MeshNode) -> set[str]:
    return {m.name for m in node.members() if m.state == NodeState.ALIVE}


def test_three_nodes_converge_and_metrics(nodes: list[MeshNode]) -> None:
    a = start(nodes, "a")
    start(nodes, "b", join=[a.address])
    start(nodes, "c", join=[a.address])
    assert wait_for(lambda: all(alive(n) == {"a", "b", "c"} for n in nodes), 10)
    registry = CollectorRegistry()
    register_mesh_metrics(registry, a)
    assert wait_for(lambda: a._core is not None and a._core.stats.probe_rtt_count >= 2, 10)
    text = generate_latest(registry).decode()
    assert 'meshmirror_mesh_members{state="alive"} 3.0' in text
    assert 'meshmirror_mesh_probe_rtt_seconds_count' in text
    assert 'meshmirror_mesh_probe_rtt_seconds_bucket{le="+Inf"}' in text
    assert 'meshmirror_mesh_loop_lag_seconds_bucket{le="0.1"}' in text
    assert 'meshmirror_mesh_messages_total{direction="out",type="Ping"}' in text
    assert 'meshmirror_mesh_transport_bytes_total{direction="in",protocol="udp"}' in text
    assert "meshmirror_mesh_awareness_score 0.0" in text


def test_bad_input_is_dropped_and_counted(nodes: list[MeshNode]) -> None:
    a = start(nodes, "a", keyring=Keyring([os.urandom(16)]))
    b = start(nodes, "b", join=[a.address], keyring=a._keyring)
    assert wait_for(lambda: alive(a) == {"a", "b"}, 10)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for junk in (b"", b"\x00garbage", os.urandom(200), b"\x01" + os.urandom(40)):
            s.sendto(junk, a.address)
        # plaintext ping into an encrypted mesh
        s.sendto(wire.seal_packet(wire.encode(Ping(1, "a")), keyring=None), a.address)
    for junk in (os.urandom(300), b"\x06\x81\xa5Nodes\xce\x7f\x00\x00\x00",
                 wire.encode_stream(Ping(1, "a"), keyring=None)):
        with socket.create_connection(a.address, timeout=5) as c:
            c.sendall(junk)
            c.shutdown(socket.SHUT_WR)
            c.settimeout(5)
            reply = c.recv(65536)
            # memberlist answers a bad stream with an (encrypted) error response
            assert reply == b"" or reply[0] == 10
    registry = CollectorRegistry()
    register_mesh_metrics(registry, a)
    core = a._core
    assert core is not None, "a started node has a core"
    assert wait_for(lambda: sum(core.stats.dropped.values()) >= 4
                    and sum(a.transport_stats.dropped.values()) >= 3, 5)
    text = generate_latest(registry).decode()
    assert 'meshmirror_mesh_dropped_packets_total{reason="decrypt_failed"}' in text
    assert 'meshmirror_mesh_dropped_packets_total{reason="not_encrypted"}' in text
    # still healthy
    assert alive(a) == {"a", "b"} and alive(b) == {"a", "b"}


def test_join_retries_until_a_seed_appears(nodes: list[MeshNode]) -> None:
    host = loopback_host()
    port = free_port(host)
    late = start(nodes, "late", join=[(host, port)])
    assert not late.wait_joined(1.5)
    start(nodes, "seed", host=host, port=port)
    assert late.wait_joined(10)
    assert wait_for(lambda: alive(late) == {"late", "seed"}, 5)
    assert late.transport_stats.join_attempts >= 2


def test_join_by_dns_name(nodes: list[MeshNode]) -> None:
    port = free_port("127.0.0.1")
    seed = start(nodes, "seed", host="127.0.0.1", port=port)
    other = start(nodes, "other", join_dns=f"localhost:{port}")
    assert other.wait_joined(10)
    assert wait_for(lambda: alive(seed) == {"seed", "other"}, 5)


def test_bind_conflict_is_an_error(nodes: list[MeshNode]) -> None:
    a = start(nodes, "a")
    clash = MeshNode(CONFIG, name="b", bind=a.address)
    with pytest.raises(MeshError, match="cannot start"):
        clash.start()


async def test_subscribe_delivers_events_on_callers_loop(nodes: list[MeshNode]) -> None:
    a = start(nodes, "a")
    events = a.subscribe()
    b = start(nodes, "b", join=[a.address])
    loop = asyncio.get_running_loop()

    async def next_of(kind: type) -> object:
        while True:
            ev = await asyncio.wait_for(events.get(), 15)
            if isinstance(ev, kind):
                return ev

    joined = await next_of(MemberJoined)
    assert isinstance(joined, MemberJoined) and joined.node.name == "b"
    # b must know a before it leaves, or there is nobody to tell (as in memberlist).
    assert await loop.run_in_executor(None, lambda: wait_for(lambda: alive(b) == {"a", "b"}, 5))
    await loop.run_in_executor(None, lambda: b.stop(leave=True))
    left = await next_of(MemberLeft)
    assert isinstance(left, MemberLeft) and left.node.name == "b" and not left.dead


def test_update_meta_propagates(nodes: list[MeshNode]) -> None:
    a = start(nodes, "a", meta=b"one")
    b = start(nodes, "b", join=[a.address])
    assert wait_for(lambda: alive(b) == {"a", "b"}, 10)
    a.update_meta(b"two")
    assert wait_for(lambda: any(m.name == "a" and m.meta == b"two" for m in b.members()), 5)
