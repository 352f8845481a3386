"""End to end, all real: upstream Distribution, three containerd 1.6 + meshmirror nodes.

Node 1 pulls an image through its own mirror (nobody has it yet, so each blob's
owner fetches it from the upstream once, see `meshmirror.mirror.rollout`); the
upstream is then stopped and nodes 2 and 3 pull the same image through their
mirrors, which stream it from node 1 (or their own cache of what they owned).
The counting proxy in front of the upstream shows that the cluster fetched
about one copy of the image.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from meshmirror.oci.imagebuilder import BuiltImage, build_image
from tests.e2e.cluster import E2ENode, image_bytes, record_figures, wait_mesh
from tests.support.distribution import DistributionRegistry
from tests.support.metrics import metric
from tests.support.proxy import CountingProxy
from tests.support.skopeo import push_layout

pytestmark = [pytest.mark.real, pytest.mark.slow]

MiB = 1024 * 1024
LAYERS = (6 * MiB, 10 * MiB, 14 * MiB)
SPREAD_DEADLINE_S = 5.0


def test_cluster_shares_one_upstream_copy(tmp_path: Path) -> None:
    with DistributionRegistry() as upstream, \
            CountingProxy(upstream.host, upstream.port) as proxy:
        layout = tmp_path / "layout"
        image = build_image(f"{proxy.address}/e2e/app:1", layout, layer_sizes=LAYERS, seed=51)
        push_layout(layout, "1", upstream.address, "e2e/app")
        proxy.reset()

        nodes: list[E2ENode] = []
        try:
            first = E2ENode("node-1").start()
            nodes.append(first)
            for i in (2, 3):
                # They first see the repository during the outage: shared only if
                # unknown repositories are (the default keeps them upstream-only).
                nodes.append(E2ENode(f"node-{i}", join=first.mesh_address,
                                     extra_args=("--private-images-unknown", "share")).start())
            for node in nodes:
                node.configure(proxy.url, [node.registry_url])
            wait_mesh(nodes)
            _run_scenario(nodes, image, upstream, proxy)
        finally:
            for node in nodes:
                node.close()


def _run_scenario(nodes: list[E2ENode], image: BuiltImage, upstream: DistributionRegistry,
                  proxy: CountingProxy) -> None:
    first, others = nodes[0], nodes[1:]
    pulled = first.pull(image.name)
    assert pulled.ok, pulled.output
    first.verify_image(image)
    m1 = first.metrics()
    # Nobody held the image: node 1's mirror got it through each blob's owner, which
    # fetched it from the upstream once (see mirror.rollout).
    assert metric(m1, "meshmirror_mirror_outcomes_total", result="hit") >= 1
    fetched = sum(metric(n.metrics(), "meshmirror_rollout_upstream_bytes_total") for n in nodes)
    assert fetched <= 1.05 * image_bytes(image), fetched

    upstream.stop()
    connections_before = proxy.connections

    # Both pull at once, as two nodes scheduling the same pod would.
    results: dict[str, subprocess.Popen[bytes]] = {}
    started = time.monotonic()
    finish: dict[str, float] = {}
    attempts: dict[str, int] = {n.name: 0 for n in others}
    logs: dict[str, Path] = {}
    deadline = pulled.finished + SPREAD_DEADLINE_S + 15.0  # retry past 5 s to measure it
    pending = {n.name: n for n in others}
    while pending and time.monotonic() < deadline:
        for name, node in list(pending.items()):
            proc = results.get(name)
            if proc is None:
                logs[name] = node.dir / f"pull-{attempts[name]}.log"
                results[name] = node.start_pull(image.name, logs[name])
                attempts[name] += 1
                continue
            code = proc.poll()
            if code is None:
                continue
            if code == 0:
                finish[name] = time.monotonic()
                del pending[name]
            else:
                del results[name]  # failed (summary not there yet?): try again
                time.sleep(0.1)
        time.sleep(0.02)
    for proc in results.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert not pending, {n: logs[n].read_text()[-2000:] for n in pending}

    for node in others:
        node.verify_image(image)
    total = image_bytes(image)
    served = proxy.bytes_to_clients
    after = {n.name: round(finish[n.name] - pulled.finished, 3) for n in others}
    propagation = {}
    for node in others:
        m = node.metrics()
        count = metric(m, "meshmirror_summary_propagation_seconds_count")
        total_s = metric(m, "meshmirror_summary_propagation_seconds_sum")
        propagation[node.name] = round(total_s / count, 3) if count else None
        assert metric(m, "meshmirror_mirror_outcomes_total", result="hit") >= len(image.blobs())
        assert metric(m, "meshmirror_registry_response_bytes_total", source="peer") >= \
            total - image.root.size
    record_figures("cluster", {
        "image_bytes": total, "proxy_bytes_to_clients": served,
        "proxy_ratio": round(served / total, 4),
        "node1_pull_s": round(pulled.seconds, 3),
        "others_done_after_node1_s": after,
        "others_started_after_node1_s": round(started - pulled.finished, 3),
        "attempts": attempts,
        "upstream_connections_after_stop": proxy.connections - connections_before,
        "summary_propagation_mean_s": propagation,
    })
    # How soon after node 1 the others had it is a figure (recorded above), not an
    # assertion: the wait is bounded, and a loaded machine must not fail a pull test.
    # One upstream copy, plus at most one extra fetch of a blob when nodes briefly
    # disagree on its owner (docs/rollout.md); a loaded CI run once read 1.12x.
    assert served <= 1.05 * total + max(LAYERS), (served, total)
