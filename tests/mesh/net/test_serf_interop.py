"""Interop with the real Serf agent (Debian ``serf``): the mesh speaks memberlist's protocol.

Serf runs with memberlist's LAN defaults and so do our nodes; the detection
bound is the worst case those defaults allow (a full probe round, the longest
Lifeguard suspicion, gossip), computed from the config rather than tuned.
"""

from __future__ import annotations

import base64
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshmirror.mesh import wire
from meshmirror.mesh.config import MeshConfig
from meshmirror.mesh.keyring import Keyring
from meshmirror.mesh.messages import NodeState, PushPull
from meshmirror.mesh.tags import decode_tags, encode_tags
from meshmirror.mesh.transport import MeshNode
from tests.support.ports import free_port, loopback_host
from tests.support.serf import SerfCluster, serf_cluster, wait_for

pytestmark = [
    pytest.mark.real,
    pytest.mark.slow,
]

CONFIG = MeshConfig()


def detection_bound(config: MeshConfig, n: int) -> float:
    """Worst-case failure detection under ``config`` in an ``n``-node cluster."""
    import math

    scale = max(1.0, math.log10(max(1, n)))
    suspicion_max = (config.suspicion_mult * config.suspicion_max_timeout_mult * scale
                     * config.probe_interval)
    return n * config.probe_interval + suspicion_max + 2.0


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[SerfCluster]:
    with serf_cluster(tmp_path) as c:
        yield c




def new_node(nodes: list[MeshNode], name: str, *, key: bytes | None,
             join: list[tuple[str, int]], tags: dict[str, str] | None = None) -> MeshNode:
    host = loopback_host()
    node = MeshNode(CONFIG, name=name, bind=(host, free_port(host)), join=join,
                    keyring=Keyring([key]) if key else None,
                    meta=encode_tags(tags or {"http": f"{host}:5000", "epoch": "1"}))
    nodes.append(node)
    node.start()
    return node


def alive_names(node: MeshNode) -> set[str]:
    return {m.name for m in node.members() if m.state == NodeState.ALIVE}


@pytest.fixture(params=[False, True], ids=["plain", "encrypted"])
def key(request: pytest.FixtureRequest) -> bytes | None:
    return os.urandom(32) if request.param else None


def b64(key: bytes | None) -> str | None:
    return base64.b64encode(key).decode() if key else None


def test_meshmirror_joins_serf_cluster_and_failure_both_ways(
        cluster: SerfCluster, nodes: list[MeshNode], key: bytes | None) -> None:
    s1 = cluster.start("s1", encrypt=b64(key))
    s2 = cluster.start("s2", encrypt=b64(key), join=[s1.bind])
    mm = new_node(nodes, "mm1", key=key, join=[(s1.host, s1.port)],
                  tags={"http": "127.0.0.9:5000", "epoch": "7", "keys": "12"})
    assert mm.wait_joined(10)

    def serf_sees_us() -> bool:
        for agent in (s1, s2):
            me = {m["name"]: m for m in agent.members()}.get("mm1")
            if me is None or me["status"] != "alive":
                return False
            assert me["tags"] == {"http": "127.0.0.9:5000", "epoch": "7", "keys": "12"}
        return True

    assert wait_for(serf_sees_us, 15), s1.members()
    assert wait_for(lambda: alive_names(mm) == {"mm1", "s1", "s2"}, 15)
    # Serf's tags (none set) and protocol versions arrive intact on our side.
    s1_info = next(m for m in mm.members() if m.name == "s1")
    assert decode_tags(s1_info.meta) == {}

    bound = detection_bound(CONFIG, 3)
    # Serf dies: we detect it.
    s2.kill()
    assert wait_for(lambda: "s2" not in alive_names(mm), bound), mm.members()
    # We die (no leave): Serf marks us failed.
    mm.stop(leave=False)
    assert wait_for(lambda: s1.member_status().get("mm1") == "failed", bound), s1.members()
    for agent in (s1,):
        log = agent.log()
        assert "Failed to decode" not in log and "checksum" not in log, log[-2000:]


def test_serf_joins_meshmirror_mesh(cluster: SerfCluster, nodes: list[MeshNode],
                                    key: bytes | None) -> None:
    first = new_node(nodes, "mm1", key=key, join=[])
    for i in (2, 3):
        new_node(nodes, f"mm{i}", key=key, join=[first.address])
    assert wait_for(lambda: all(alive_names(n) == {"mm1", "mm2", "mm3"} for n in nodes), 15)
    s1 = cluster.start("s1", encrypt=b64(key), join=[f"{first.address[0]}:{first.address[1]}"])
    everyone = {"mm1", "mm2", "mm3", "s1"}
    assert wait_for(lambda: all(alive_names(n) == everyone for n in nodes), 15), [
        n.members() for n in nodes]
    assert wait_for(lambda: set(s1.member_status()) == everyone
                    and set(s1.member_status().values()) == {"alive"}, 15), s1.members()
    tags = {m["name"]: m["tags"] for m in s1.members()}
    assert tags["mm2"]["epoch"] == "1" and tags["mm2"]["http"].endswith(":5000")

    s1.kill()
    bound = detection_bound(CONFIG, 4)
    assert wait_for(lambda: all("s1" not in alive_names(n) for n in nodes), bound)


def test_wrong_key_is_kept_out(cluster: SerfCluster, nodes: list[MeshNode]) -> None:
    key, other = os.urandom(32), os.urandom(32)
    s1 = cluster.start("s1", encrypt=b64(key))
    intruder = new_node(nodes, "intruder", key=other, join=[(s1.host, s1.port)])
    assert not intruder.wait_joined(3)
    assert "intruder" not in s1.member_status()
    assert alive_names(intruder) == {"intruder"}

    mm = new_node(nodes, "mm1", key=key, join=[(s1.host, s1.port)])
    assert mm.wait_joined(10)
    bad_serf = cluster.start("s-bad", encrypt=b64(other))
    result = bad_serf.join(f"{mm.address[0]}:{mm.address[1]}")
    assert result.returncode != 0
    assert not wait_for(lambda: "s-bad" in alive_names(mm), 3)
    assert mm._core is not None
    assert mm.transport_stats.dropped.get("decrypt_failed", 0) >= 1
    # A plaintext agent cannot join an encrypted mesh either.
    plain = cluster.start("s-plain")
    assert plain.join(f"{mm.address[0]}:{mm.address[1]}").returncode != 0
    assert "s-plain" not in alive_names(mm)


def test_serf_push_pull_decodes_including_go_lzw(cluster: SerfCluster) -> None:
    """Capture the push-pull Serf sends to a join target and decode it with our codec.

    Serf enables memberlist compression, so this is Go's LZW writer checked
    against our reader on real bytes.
    """
    s1 = cluster.start("s1", extra=["-tag", "role=web", "-tag", "zone=a"])
    host = loopback_host()
    port = free_port(host)
    listener = socket.create_server((host, port))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((host, port))
    listener.settimeout(10)
    captured: list[bytes] = []

    def accept() -> None:
        conn, _ = listener.accept()
        conn.settimeout(5)
        data = b""
        decoder = wire.StreamDecoder(None)
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
            if decoder.feed(chunk) is not None:
                break
        captured.append(data)
        conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        s1.join(f"{host}:{port}")
        thread.join(10)
    finally:
        listener.close()
        udp.close()
    assert captured, "serf did not connect"
    raw = captured[0]
    assert raw[0] == 9, f"expected a compressed stream, got type {raw[0]}"
    msg = wire.StreamDecoder(None).feed(raw)
    assert isinstance(msg, PushPull) and msg.join
    (node,) = [n for n in msg.nodes if n.name == "s1"]
    assert node.port == s1.port and node.state == NodeState.ALIVE
    assert decode_tags(node.meta) == {"role": "web", "zone": "a"}
    assert node.vsn[:3] == (1, 5, 2) and len(node.vsn) == 6
    assert msg.user_state[:1] == b"\x02"  # Serf's messagePushPullType

