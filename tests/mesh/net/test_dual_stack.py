"""IPv6 by default: a port-only address listens on both families, memberlist-compatible.

A node started with ``--registry-addr :P --metrics-addr :P --mesh-addr :P`` answers on
``[::1]`` and ``127.0.0.1`` alike. Its mesh socket is one dual-stack IPv6 socket, so
IPv4 peers arrive as ``::ffff:a.b.c.d``: a real Serf agent joins it over IPv4 and
another over IPv6, and each side sees the other alive.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from meshmirror.mesh.config import MeshConfig
from meshmirror.mesh.messages import NodeState
from meshmirror.mesh.transport import MeshNode
from meshmirror.oci.imagebuilder import build_image
from tests.support.node import start_node
from tests.support.ports import free_dual_stack_port
from tests.support.processes import stop
from tests.support.serf import SerfCluster, serf_cluster, wait_for

pytestmark = [pytest.mark.real]


def get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as r:
        r.read()
        return int(r.status)


def test_node_with_port_only_addresses_serves_both_families(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    build_image("127.0.0.1:5000/team/app:1", layout, (1000,), seed=3)
    node = start_node(f"oci:{layout}", tmp_path / "node.log", port_only=True)
    try:
        port = node.address.rsplit(":", 1)[1]
        metrics = node.metrics.rsplit(":", 1)[1]
        for host in ("[::1]", "127.0.0.1"):
            assert get(f"http://{host}:{port}/v2/") == 200
            assert get(f"http://{host}:{metrics}/metrics") == 200
        with urllib.request.urlopen(f"http://[::1]:{metrics}/status", timeout=5) as r:
            status = json.loads(r.read())
        assert status["mesh"]["registry"] == f"http://127.0.0.1:{port}"
    finally:
        assert stop(node.proc) == 0
    listening = [r for r in node.log_lines() if r.get("msg") == "listening"]
    assert {r["address"] for r in listening} == {f"[::]:{port}", f"[::]:{metrics}"}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_serf_joins_a_port_only_mesh_node(tmp_path: Path, family: str) -> None:
    advertise = "127.0.0.1" if family == "ipv4" else "::1"
    port = free_dual_stack_port()
    node = MeshNode(MeshConfig(), name="mm", bind=("", port), advertise=(advertise, port))
    cluster: SerfCluster
    with serf_cluster(tmp_path) as cluster:
        node.start()
        try:
            agent = cluster.start("s1", host=None if family == "ipv4" else "::1")
            target = f"[{advertise}]:{port}" if ":" in advertise else f"{advertise}:{port}"
            joined = agent.join(target)
            assert joined.returncode == 0, joined.stderr
            assert wait_for(lambda: agent.member_status().get("mm") == "alive", 15), \
                agent.members()
            assert wait_for(lambda: {m.name for m in node.members()
                                     if m.state == NodeState.ALIVE} == {"mm", "s1"}, 15), \
                node.members()
            s1 = next(m for m in node.members() if m.name == "s1")
            assert s1.addr == agent.host  # IPv4 peers are not seen as ::ffff: addresses
            log = agent.log()
            assert "Failed to decode" not in log and "checksum" not in log, log[-2000:]
        finally:
            node.stop(leave=False, timeout=5)
