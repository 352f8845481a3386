"""An upstream outage adds at most one ``--upstream-timeout`` to a tag lookup, then nothing.

Three ``meshmirror run`` nodes in one encrypted mesh on loopback: a holder
serving ``out/app:1`` from an OCI-layout store, a node with
``--resolve-tags=upstream-first`` and, for comparison, one with
``--resolve-tags=peers`` that never asks the upstream. The registry the tag
belongs to (``?ns=``) is on loopback and down, in two ways: a socket that
accepts and never answers (every question waits out the timeout) and a
closed port (refused at once).

Each lookup is a manifest HEAD on a node's registry port, as containerd makes
it. Until ``--upstream-failure-threshold`` failures open the breaker, each
upstream-first lookup opens exactly one connection to the upstream (the tag
question; the visibility check that follows must not ask again) and answers
from the peer; after that the upstream sees no connection at all and lookups
cost what peers-only lookups cost. Counts are asserted; times are reported,
bounded only generously (three timeouts).
"""

from __future__ import annotations

import statistics
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from meshmirror.oci.imagebuilder import build_image
from tests.e2e.cluster import GOSSIP_KEY, record_figures
from tests.support.metrics import metric, scrape
from tests.support.node import RunningNode, start_node
from tests.support.processes import stop, wait_until
from tests.support.scripted_http import Blackhole, refused_url

pytestmark = [pytest.mark.real, pytest.mark.slow]

REPO, TAG = "out/app", "1"
TIMEOUT = 1.0  # --upstream-timeout
THRESHOLD = 3  # --upstream-failure-threshold
LOOKUPS = 43  # 40 with the breaker open


@contextmanager
def _upstream(kind: str) -> Iterator[tuple[str, Callable[[], int | None]]]:
    """The down registry's ``host:port`` and a count of connections it accepted
    (None where the port is closed and nothing can be accepted)."""
    if kind == "blackhole":
        with Blackhole() as hole:
            yield hole.address, lambda: hole.accepted
    else:
        yield refused_url().removeprefix("http://"), lambda: None


def _lookup(node: RunningNode, registry: str) -> tuple[float, str | None]:
    """One tag lookup on the node's registry port: its duration and the digest answered."""
    request = urllib.request.Request(
        f"http://{node.address}/v2/{REPO}/manifests/{TAG}?ns={registry}", method="HEAD",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=4 * TIMEOUT) as response:
            digest: str | None = response.headers["Docker-Content-Digest"]
    except urllib.error.HTTPError:
        digest = None
    return time.monotonic() - started, digest


def _metrics(node: RunningNode) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return scrape(node.metrics)


@pytest.mark.parametrize("kind", ["blackhole", "refused"])
def test_outage_costs_one_timeout_per_lookup_until_the_breaker_opens(
        tmp_path: Path, kind: str) -> None:
    key = tmp_path / "gossip-key"
    key.write_text(GOSSIP_KEY)
    nodes: list[RunningNode] = []
    with _upstream(kind) as (registry, accepted):
        image = build_image(f"{registry}/{REPO}:{TAG}", tmp_path / "held", seed=5)
        try:
            holder = start_node(f"oci:{image.layout}", tmp_path / "holder.log",
                                ("--node-name", "holder", "--gossip-key-file", str(key)))
            nodes.append(holder)
            common = ("--join", holder.mesh, "--gossip-key-file", str(key),
                      # No hosts.toml sends this registry's pulls here: name it.
                      "--mirrored-registries", registry,
                      # Neither node has met the repository before the outage.
                      "--private-images-unknown", "share",
                      "--upstream-timeout", str(TIMEOUT), "--upstream-connect-timeout", "0.5",
                      "--upstream-failure-threshold", str(THRESHOLD),
                      "--upstream-cooldown", "600")
            # The baseline never asks the upstream at all (peers resolve the tag, the
            # repository is shared), so every connection the upstream sees is the
            # upstream-first node's.
            for name, mode, private in (("first", "upstream-first", "upstream-only"),
                                        ("peers", "peers", "share")):
                layout = tmp_path / name
                build_image(f"{registry}/other/{name}:1", layout, seed=6)
                nodes.append(start_node(f"oci:{layout}", tmp_path / f"{name}.log",
                                        ("--node-name", name, *common, "--resolve-tags", mode,
                                         "--private-images", private)))
            _scenario(kind, registry, accepted, str(image.digest), *nodes)
        finally:
            for node in nodes:
                stop(node.proc)


def _scenario(kind: str, registry: str, accepted: Callable[[], int | None], digest: str,
              holder: RunningNode, first: RunningNode, peers: RunningNode) -> None:
    def sees_holder(node: RunningNode) -> bool:
        m = _metrics(node)
        return (metric(m, "meshmirror_mesh_members", state="alive") == 3
                and metric(m, "meshmirror_peer_summaries_share") >= 1.0)

    wait_until(lambda: sees_holder(first) and sees_holder(peers), 30,
               "both nodes to hold the holder's summary", 0.1)

    times: list[float] = []
    peer_times: list[float] = []
    connections: list[int | None] = []
    for i in range(LOOKUPS):
        seconds, answered = _lookup(first, registry)
        assert answered == digest, f"lookup {i + 1} answered {answered}"
        assert seconds < 3 * TIMEOUT, (i + 1, seconds)
        times.append(seconds)
        connections.append(accepted())
        if i >= THRESHOLD:  # interleaved, so load on the machine hits both alike
            seconds, answered = _lookup(peers, registry)
            assert answered == digest
            peer_times.append(seconds)
    if kind == "blackhole":
        # One connection per lookup until the breaker opens, then none at all.
        assert connections == [min(i, THRESHOLD) for i in range(1, LOOKUPS + 1)], connections
    m = _metrics(first)
    failed = "timeout" if kind == "blackhole" else "connection"
    assert metric(m, "meshmirror_upstream_answers_total", result=failed) == THRESHOLD
    # Each later lookup was answered by the open breaker, once (no second question).
    assert metric(m, "meshmirror_upstream_answers_total",
                  result="circuit_open") == LOOKUPS - THRESHOLD
    assert metric(m, "meshmirror_tag_resolutions_total", source="peer") == LOOKUPS
    open_median = statistics.median(times[THRESHOLD:])
    peers_median = statistics.median(peer_times)
    record_figures("outage_latency", {
        "upstream": kind, "upstream_timeout_s": TIMEOUT,
        "before_breaker_s": [round(t, 3) for t in times[:THRESHOLD]],
        "breaker_open_median_ms": round(open_median * 1e3, 2),
        "peers_mode_median_ms": round(peers_median * 1e3, 2),
        "upstream_connections": connections[-1]})
