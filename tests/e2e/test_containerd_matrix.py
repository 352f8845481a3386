"""The pull every node does, on every containerd version: CRI, through a peer, upstream down.

Two nodes, each a private containerd (1.6, 1.7 or 2.x) with CRI on, reading the
hosts.toml `meshmirror configure` wrote, and a `meshmirror run` over its store.
Node 1 pulls through CRI (its mirror misses, containerd goes upstream); the
upstream is stopped; node 2 pulls the same image through CRI, as a kubelet
would, and gets every blob from node 1 through its own mirror.

This one scenario runs on all three versions because it is where versions
differ: how CRI resolves hosts.toml (2.x pulls through its transfer service), the
events and content records the store reads, what a pull leaves behind. The rest
of the end-to-end suite exercises meshmirror's own behaviour over the same
gRPC APIs and stays on the system's 1.6 to keep CI short.
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from meshmirror.oci.imagebuilder import build_image
from tests.e2e.cluster import E2ENode, wait_mesh, wait_summary_known
from tests.support.containerd import versions_or_skip
from tests.support.distribution import DistributionRegistry
from tests.support.metrics import metric
from tests.support.proxy import CountingProxy
from tests.support.skopeo import push_layout

pytestmark = [pytest.mark.real, pytest.mark.slow]

KiB = 1024
LAYERS = (300 * KiB, 700 * KiB)


def pull_with_retries(node: E2ENode, reference: str, attempts: int = 10) -> None:
    """CRI-pull, retrying a bounded number of times (node 2 may still be folding node 1's
    summary in); the last error is raised with the node's log."""
    for attempt in range(attempts):
        try:
            node.containerd.cri_pull(reference, timeout=20)
            return
        except grpc.RpcError as err:
            if attempt == attempts - 1:
                raise AssertionError(f"CRI pull on {node.name} failed: {err}\n"
                                     f"{node.log_tail(30)}") from err
            time.sleep(0.5)


@pytest.mark.parametrize("version", versions_or_skip())
def test_cri_pull_through_a_peer_with_upstream_stopped(version: str, tmp_path: Path) -> None:
    with DistributionRegistry() as upstream, \
            CountingProxy(upstream.host, upstream.port) as proxy:
        layout = tmp_path / "layout"
        image = build_image(f"{proxy.address}/matrix/app:1", layout, layer_sizes=LAYERS,
                            seed=20)
        push_layout(layout, "1", upstream.address, "matrix/app")
        nodes: list[E2ENode] = []
        try:
            first = E2ENode("node-1", containerd_version=version, cri=True).start()
            nodes.append(first)
            # Node 2 first sees the repository during the outage: shared only if
            # unknown repositories are (the default keeps them upstream-only).
            second = E2ENode("node-2", containerd_version=version, cri=True,
                             join=first.mesh_address,
                             extra_args=("--private-images-unknown", "share")).start()
            nodes.append(second)
            for node in nodes:
                node.configure(proxy.url, [node.registry_url])
            wait_mesh(nodes)

            first.containerd.cri_pull(image.name)
            first.verify_image(image)
            # Node 1's mirror was asked (its blobs' owners fetch them from the upstream
            # now, so its first pull is hits where it used to be misses).
            m1 = first.metrics()
            assert sum(metric(m1, "meshmirror_mirror_outcomes_total", result=result)
                       for result in ("hit", "miss")) >= 1
            wait_summary_known(first, [second])

            upstream.stop()
            proxy.reset()
            # Bounded retries: node 2 may still be folding node 1's summary in.
            pull_with_retries(second, image.name)
            second.verify_image(image)
            m = second.metrics()
            assert metric(m, "meshmirror_mirror_outcomes_total", result="hit") >= \
                len(image.blobs()) - 1  # every blob but the tag's manifest, from node 1
            assert metric(m, "meshmirror_registry_response_bytes_total", source="peer") >= \
                sum(LAYERS)
            assert proxy.bytes_to_clients == 0
        finally:
            for node in nodes:
                node.close()
