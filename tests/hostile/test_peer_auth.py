"""A pod that sends the peer marker gets no peer's privileges (issue 23).

A marked request may take one of a node's ``--rollout-fanout`` reader slots, and a
tree request makes a node join a blob's tree. Pods that hold the slots (never reading)
would make honest members' tree requests answer ``busy`` and send them to the
upstream: the rollout's saving gone. So a marker is believed only from an alive
member's advertised address and, with a gossip key, with a valid HMAC
(`meshmirror.mirror.marker.PeerAuth`).

Real ``meshmirror run`` nodes joined in a mesh, a real Distribution upstream. The
hostile clients connect before any honest pull and never read; the honest pulls on
every node then still make exactly one upstream fetch of the blob.
"""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshmirror.mirror.marker import (
    AUTH_HEADER,
    PEER_HEADER,
    TREE_HEADER,
    MemberAddresses,
    PeerAuth,
)
from meshmirror.oci.imagebuilder import BuiltImage, build_image
from tests.hostile.clients import sha256_of_get, unread_get
from tests.support.distribution import DistributionRegistry
from tests.support.metrics import Metrics, metric, scrape
from tests.support.node import RunningNode, start_node
from tests.support.ports import loopback_host
from tests.support.processes import stop, wait_until
from tests.support.skopeo import push_layout

pytestmark = [pytest.mark.real]

MiB = 1024 * 1024
REPO, TAG = "pub/app", "1"
NODES = 3
FANOUT = 1  # one reader slot each: a single hostile reader would take it
HOSTILE_PER_KIND = 2


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    return build_image(f"example.com/{REPO}:{TAG}", tmp_path_factory.mktemp("image"),
                       (8 * MiB,), seed=83)


def _metrics(node: RunningNode) -> Metrics:
    return scrape(node.metrics)


def _sum(nodes: list[RunningNode], name: str, **labels: str) -> float:
    return sum(metric(_metrics(n), name, **labels) for n in nodes)


@contextlib.contextmanager
def _cluster(tmp: Path, upstream: str, key: bytes | None) -> Iterator[list[RunningNode]]:
    key_args: tuple[str, ...] = ()
    if key is not None:
        key_file = tmp / "gossip.key"
        key_file.write_text(base64.b64encode(key).decode())
        key_args = ("--gossip-key-file", str(key_file))
    nodes: list[RunningNode] = []
    try:
        for i in range(NODES):
            store = tmp / f"node-{i}"
            store.mkdir()
            join = ("--join", nodes[0].mesh) if nodes else ()
            nodes.append(start_node(
                f"oci:{store}", tmp / f"node-{i}.log",
                ("--node-name", f"node-{i}", "--mirrored-registries", upstream,
                 "--resolve-tags", "upstream-first", "--private-images", "upstream-only",
                 "--rollout-fanout", str(FANOUT), "--client-send-timeout", "60s",
                 *join, *key_args)))

        def converged() -> bool:
            return all(metric(_metrics(n), "meshmirror_mesh_members", state="alive") == NODES
                       and metric(_metrics(n), "meshmirror_peer_summaries_share") >= 1.0
                       for n in nodes)

        wait_until(converged, 30, "the nodes to see each other", 0.1)
        yield nodes
    finally:
        for node in nodes:
            stop(node.proc)


def _hostile_headers(path: str, key: bytes | None, name: str) -> list[dict[str, str]]:
    """The markers a pod can send: none, a made-up HMAC, and (it cannot have the key,
    but to show the clock bound) a real one signed ten minutes ago."""
    marker = {PEER_HEADER: "1", TREE_HEADER: name}
    kinds = [marker, {**marker, AUTH_HEADER: f"v1 {int(time.time())} {'0' * 64} {name}"}]
    if key is not None:
        stale = PeerAuth(name, MemberAddresses(), lambda: [key],
                         clock=lambda: time.time() - 600).sign("GET", path)
        assert stale is not None
        kinds.append({**marker, AUTH_HEADER: stale})
    return kinds


@pytest.mark.parametrize("keyed", [True, False], ids=["gossip-key", "no-key"])
def test_forged_markers_take_no_reader_slot_and_the_blob_is_fetched_once(
        keyed: bool, image: BuiltImage, tmp_path: Path) -> None:
    layer = image.platforms[0].layers[0]
    data_digest = str(layer.digest)
    path = f"/v2/{REPO}/blobs/{layer.digest}"
    key = os.urandom(32) if keyed else None
    with DistributionRegistry(access_log=True) as upstream:
        push_layout(image.layout, TAG, upstream.address, REPO)
        with _cluster(tmp_path, upstream.address, key) as nodes:
            query = f"{path}?ns={upstream.address}"
            pod = loopback_host()  # no member's address
            member = nodes[0].address.rsplit(":", 1)[0]
            sources = [pod, member] if keyed else [pod]  # a keyless mesh believes members
            hostile: list[socket.socket] = []
            try:
                for node in nodes:
                    host, port = node.address.rsplit(":", 1)
                    for source in sources:
                        for headers in _hostile_headers(path, key, "node-0"):
                            for _ in range(HOSTILE_PER_KIND):
                                hostile.append(unread_get(host, int(port), query,
                                                          headers=headers, source=source))

                def refusals() -> float:
                    return _sum(nodes, "meshmirror_peer_markers_refused_total")

                # Every hostile request reached a node and was refused its marker.
                wait_until(lambda: refusals() >= len(hostile), 30,
                           "the hostile markers to be refused")
                # Honest pulls on every node, while the hostile clients hold on.
                digests = [sha256_of_get(f"http://{n.address}{query}", 60) for n in nodes]
                assert digests == [data_digest] * NODES
                # Honest members still read from each other: no reader was refused a
                # slot, peers served readers, and the upstream saw one fetch of the blob.
                assert _sum(nodes, "meshmirror_rollout_readers_refused_total") == 0
                assert _sum(nodes, "meshmirror_rollout_readers_served_total") >= NODES - 1
                assert upstream.requests_seen("GET", path) == 1
                reasons = {reason: _sum(nodes, "meshmirror_peer_markers_refused_total",
                                        reason=reason)
                           for reason in ("not_member", "unsigned", "bad_signature", "stale")}
                assert reasons["not_member"] > 0
                if keyed:
                    assert reasons["unsigned"] > 0 and reasons["bad_signature"] > 0
                    assert reasons["stale"] > 0
            finally:
                for sock in hostile:
                    sock.close()
