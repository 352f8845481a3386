"""Reused tags resolve fresh, survive an outage, and cannot be forged by a member.

Real containerd 1.6 nodes, real Distribution behind a counting proxy. Node 1
pulls ``fresh/app:latest`` (v1); v2, sharing v1's first two layers, is pushed
as ``latest``; node 2 pulls ``latest`` and must get v2, with the shared layers
from node 1. A rogue member holding its own image under the same tag joins
(with the gossip key) and is never believed while the upstream answers; after
the upstream stops, node 3 pulls ``latest`` through its peers, and a rogue
without the key cannot join, so no lookup returns its digest either.
"""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import pytest

from meshmirror.oci.imagebuilder import BuiltImage, build_image
from tests.e2e.cluster import GOSSIP_KEY, E2ENode, record_figures, wait_mesh, wait_summary_known
from tests.support.distribution import DistributionRegistry
from tests.support.metrics import metric
from tests.support.node import RunningNode, start_node
from tests.support.processes import stop
from tests.support.proxy import CountingProxy
from tests.support.skopeo import push_layout

pytestmark = [pytest.mark.real, pytest.mark.slow]

MiB = 1024 * 1024
V1_LAYERS = (4 * MiB, 6 * MiB)
V2_LAYERS = (4 * MiB, 6 * MiB, 3 * MiB)  # layers 0 and 1 are v1's, byte for byte
LOOKUPS = 100


def _head_digest(node: E2ENode, repository: str, tag: str, registry: str) -> str | None:
    request = urllib.request.Request(
        f"{node.registry_url}/v2/{repository}/manifests/{tag}?ns={registry}", method="HEAD",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return str(response.headers["Docker-Content-Digest"])
    except urllib.error.HTTPError:
        return None


def _rogue(tmp: Path, name: str, registry: str, join: str, key: str | None) -> tuple[
        RunningNode, BuiltImage]:
    layout = tmp / name
    image = build_image(f"{registry}/fresh/app:latest", layout, layer_sizes=(1024,), seed=666)
    extra: tuple[str, ...] = ("--node-name", name, "--join", join)
    if key is not None:
        key_file = tmp / f"{name}.key"
        key_file.write_text(key)
        extra += ("--gossip-key-file", str(key_file))
    return start_node(f"oci:{layout}", tmp / f"{name}.log", extra), image


def test_fresh_tag_outage_and_forged_tag(tmp_path: Path) -> None:
    with DistributionRegistry() as upstream, \
            CountingProxy(upstream.host, upstream.port) as proxy:
        registry = proxy.address
        v1 = build_image(f"{registry}/fresh/app:latest", tmp_path / "v1", V1_LAYERS, seed=7)
        v2 = build_image(f"{registry}/fresh/app:latest", tmp_path / "v2", V2_LAYERS, seed=7)
        shared = {str(layer.digest) for layer in v1.platforms[0].layers}
        assert shared <= {str(layer.digest) for layer in v2.platforms[0].layers}
        push_layout(v1.layout, "latest", upstream.address, "fresh/app")

        nodes: list[E2ENode] = []
        rogues: list[RunningNode] = []
        try:
            nodes.append(E2ENode("node-1").start())
            nodes.append(E2ENode("node-2", join=nodes[0].mesh_address).start())
            # Node 3 has never seen the repository before the outage: an unknown
            # repository is shared only with --private-images-unknown=share.
            nodes.append(E2ENode("node-3", join=nodes[0].mesh_address,
                                 extra_args=("--private-images-unknown", "share")).start())
            for node in nodes:
                node.configure(proxy.url, [node.registry_url])
            wait_mesh(nodes)
            _scenario(nodes, rogues, v1, v2, upstream, proxy, tmp_path)
        finally:
            for rogue in rogues:
                stop(rogue.proc)
            for node in nodes:
                node.close()


def _scenario(nodes: list[E2ENode], rogues: list[RunningNode], v1: BuiltImage,
              v2: BuiltImage, upstream: DistributionRegistry, proxy: CountingProxy,
              tmp: Path) -> None:
    node1, node2, node3 = nodes
    registry = proxy.address
    assert node1.pull(v1.name).ok
    assert node1.image_digest(v1.name) == str(v1.digest)

    push_layout(v2.layout, "latest", upstream.address, "fresh/app")
    wait_mesh(nodes)
    wait_summary_known(node1, [node2])  # node 2's router names node 1 for v1's layers
    before = proxy.bytes_to_clients
    pulled = node2.pull(v2.name)
    assert pulled.ok, pulled.output
    node2.verify_image(v2)  # v2, not the v1 node 1 holds under the same tag
    upstream_bytes = proxy.bytes_to_clients - before
    m2 = node2.metrics()
    shared_bytes = sum(layer.size for layer in v1.platforms[0].layers)
    new_bytes = v2.platforms[0].layers[2].size
    peer_bytes = metric(m2, "meshmirror_registry_response_bytes_total", source="peer")
    # The upstream named v2, which no peer held yet: 404, and containerd asked upstream.
    assert metric(m2, "meshmirror_upstream_answers_total", result="answered") >= 1
    assert metric(m2, "meshmirror_tag_resolutions_total", source="peer") == 0
    assert peer_bytes >= shared_bytes, peer_bytes
    assert upstream_bytes < shared_bytes, upstream_bytes  # only v2's own layer and small docs

    # A member holding its own image under the same tag, with the key: never believed
    # while the upstream answers.
    rogue, forged = _rogue(tmp, "rogue-keyed", registry, node1.mesh_address, GOSSIP_KEY)
    rogues.append(rogue)
    time.sleep(2.0)  # its summary spreads
    answers = [_head_digest(node2, "fresh/app", "latest", registry) for _ in range(LOOKUPS)]
    assert str(forged.digest) not in answers
    assert set(answers) <= {str(v2.digest), None}, set(answers)
    stop(rogue.proc)
    rogues.remove(rogue)

    upstream.stop()
    started = time.monotonic()
    outage_pull = node3.pull(v2.name)
    outage_seconds = time.monotonic() - started
    assert outage_pull.ok, outage_pull.output
    assert node3.image_digest(v2.name) in {str(v1.digest), str(v2.digest)}
    m3 = node3.metrics()
    assert metric(m3, "meshmirror_tag_resolutions_total", source="peer") >= 1

    # Without the key a rogue cannot join, so it cannot answer even in an outage.
    keyless, forged2 = _rogue(tmp, "rogue-keyless", registry, node1.mesh_address, None)
    rogues.append(keyless)
    time.sleep(2.0)
    assert metric(node2.metrics(), "meshmirror_mesh_members", state="alive") == 3
    outage_answers = [_head_digest(node2, "fresh/app", "latest", registry)
                      for _ in range(LOOKUPS)]
    assert str(forged2.digest) not in outage_answers
    assert str(forged.digest) not in outage_answers
    record_figures("fresh_tags", {
        "node2_pull_s": round(pulled.seconds, 3), "node2_upstream_bytes": upstream_bytes,
        "node2_peer_bytes": peer_bytes, "v2_new_layer_bytes": new_bytes,
        "node3_outage_pull_s": round(outage_seconds, 3),
        "outage_lookup_digests": sorted({a or "404" for a in outage_answers})})
