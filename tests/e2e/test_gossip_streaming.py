"""Gossip keeps its timing while blobs stream at full speed.

Three real nodes (containerd 1.6 + meshmirror). Node 1 alone holds a 200 MiB
layer; for 30 s, nodes 2 and 3 each fetch it through their own mirror in a loop
(curl, reading as fast as it can), so node 1 serves two streams and nodes 2 and
3 each verify and forward one, all while the three gossip with default timing.
No node may start suspecting another, and every member must stay alive.
"""

from __future__ import annotations

import functools
import subprocess
import time
from collections.abc import Iterator

import pytest

from meshmirror.oci.imagebuilder import BuiltImage
from tests.e2e.cluster import E2ENode, record_figures, wait_mesh
from tests.support.metrics import Metrics, metric
from tests.support.processes import spawn, stop, wait_until

pytestmark = [pytest.mark.real, pytest.mark.slow]

STREAM_SECONDS = 30.0
WATCHED = ("meshmirror_mesh_suspicions_total", "meshmirror_mesh_deaths_total",
           "meshmirror_mesh_refutations_total")


def _bucket_quantile(metrics: Metrics, name: str, q: float) -> float:
    """The upper bound of the histogram bucket that holds quantile ``q`` (inf if none)."""
    buckets = sorted((float(dict(labels)["le"]), value)
                     for (sample, labels), value in metrics.items() if sample == name + "_bucket")
    total = buckets[-1][1] if buckets else 0.0
    return next((le for le, count in buckets if total and count >= q * total), float("inf"))


@pytest.fixture(scope="module")
def nodes(big_image: BuiltImage) -> Iterator[list[E2ENode]]:
    started: list[E2ENode] = []
    try:
        # No hosts.toml here: name the one registry whose blobs are asked for.
        mirrored = ("--mirrored-registries", big_image.registry)
        first = E2ENode("gossip-1", extra_args=mirrored).start()
        started.append(first)
        for i in (2, 3):
            started.append(E2ENode(f"gossip-{i}", join=first.mesh_address,
                                   extra_args=mirrored).start())
        assert big_image.archive is not None
        first.import_archive(big_image.archive)
        wait_mesh(started)
        yield started
    finally:
        for node in started:
            node.close()


def _blob_size(image: BuiltImage) -> int:
    return image.platforms[0].layers[0].size


def _blob_url(node: E2ENode, image: BuiltImage) -> str:
    layer = image.platforms[0].layers[0].digest
    return f"{node.registry_url}/v2/{image.repository}/blobs/{layer}?ns={image.registry}"


def _fetch_size(url: str) -> int:
    done = subprocess.run(["curl", "-sf", "-o", "/dev/null", "-w", "%{size_download}", url],
                          capture_output=True, text=True, timeout=60)
    return int(done.stdout or 0) if done.returncode == 0 else -1


def _fetches_whole(url: str, size: int) -> bool:
    return _fetch_size(url) == size


def test_no_suspicion_while_streaming(nodes: list[E2ENode], big_image: BuiltImage) -> None:
    n1, n2, n3 = nodes
    for puller in (n2, n3):
        wait_until(functools.partial(_fetches_whole, _blob_url(puller, big_image),
                                     _blob_size(big_image)),
                   30, f"{puller.name} to mirror the blob from {n1.name}")
    before: dict[str, Metrics] = {n.name: n.metrics() for n in nodes}
    # A shell loop per puller: curl reads at full speed, the loop counts whole blobs.
    loops: list[subprocess.Popen[bytes]] = []
    logs = []
    started = time.monotonic()
    try:
        for puller in (n2, n3):
            log = puller.dir / "stream.log"
            logs.append(log)
            script = (f'end=$(( $(date +%s) + {int(STREAM_SECONDS)} )); '
                      f'while [ $(date +%s) -lt $end ]; do '
                      f'curl -sf -o /dev/null -w "%{{size_download}}\\n" '
                      f'"{_blob_url(puller, big_image)}" || echo fail; done')
            loops.append(spawn(["sh", "-c", script], log))
        for proc in loops:
            proc.wait(STREAM_SECONDS + 60)
    finally:
        for proc in loops:
            stop(proc)
    elapsed = time.monotonic() - started
    after: dict[str, Metrics] = {n.name: n.metrics() for n in nodes}

    lines = [line for log in logs for line in log.read_text().split()]
    complete = sum(1 for line in lines if line == str(_blob_size(big_image)))
    served = (metric(after[n1.name], "meshmirror_registry_response_bytes_total",
                     source="local")
              - metric(before[n1.name], "meshmirror_registry_response_bytes_total",
                       source="local"))
    figures: dict[str, object] = {
        "seconds": round(elapsed, 1), "complete_blobs": complete,
        "incomplete_or_failed": len(lines) - complete,
        "node1_served_GB_per_s": round(served / elapsed / 1e9, 3),
    }
    for node in nodes:
        a, b = after[node.name], before[node.name]
        figures[node.name] = {
            **{name.removeprefix("meshmirror_mesh_"): metric(a, name) - metric(b, name)
               for name in WATCHED},
            "alive": metric(a, "meshmirror_mesh_members", state="alive"),
            "probes_failed": metric(a, "meshmirror_mesh_probes_total", outcome="failed")
            - metric(b, "meshmirror_mesh_probes_total", outcome="failed"),
            "probe_rtt_p99_le_ms": 1000 * _bucket_quantile(a, "meshmirror_mesh_probe_rtt_seconds",
                                                           0.99),
            "loop_lag_p99_le_ms": 1000 * _bucket_quantile(a, "meshmirror_mesh_loop_lag_seconds",
                                                          0.99),
        }
    record_figures("gossip_while_streaming", figures)

    # The load was real: several whole 200 MiB blobs went through two mirror hops.
    assert complete >= 4, figures
    for node in nodes:
        a, b = after[node.name], before[node.name]
        for name in WATCHED[:2]:
            assert metric(a, name) == metric(b, name), (node.name, name, figures)
        assert metric(a, "meshmirror_mesh_members", state="alive") == 3, figures
        assert metric(a, "meshmirror_mesh_members", state="suspect") == 0, figures
