"""A client cannot pull whole blobs into the node with requests that cost it nothing.

A HEAD, a one-byte Range and a GET all start the same whole-blob fetch into the cache
(so that the blob is verified and then reused). Each HEAD or Range fetch a client
starts takes one of its tokens of new upstream questions
(``--upstream-client-rate``/``-burst``); a GET of the whole blob, a request that joins
a fetch in flight and one that reads the cache take none, so containerd pulling many
layers at once is never turned away. Issue 23: 20 HEADs of distinct large blobs would
otherwise pull them all and churn the cache.

Real processes: a holder node with the blobs, and the node under test joined to it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meshmirror.oci.imagebuilder import build_image
from tests.support.http import http_status
from tests.support.metrics import metric, scrape
from tests.support.node import RunningNode, start_node
from tests.support.processes import stop, wait_until

pytestmark = [pytest.mark.real]

BURST = 2
BLOBS = 5


def _blob_requests_served(holder: RunningNode) -> int:
    return sum(1 for line in holder.log.read_text().splitlines()
               if line.startswith("{") and "/blobs/" in str(json.loads(line).get("path", ""))
               and json.loads(line).get("logger") == "meshmirror.access")


def test_each_partial_fetch_a_client_starts_takes_its_pace_and_a_whole_get_none(
        tmp_path: Path) -> None:
    seeded, empty = tmp_path / "seeded", tmp_path / "empty"
    seeded.mkdir()
    empty.mkdir()
    image = build_image("docker.io/library/paced:1", seeded,
                        [64 * 1024 + i for i in range(BLOBS)], seed=9)
    layers = image.platforms[0].layers
    holder = start_node(f"oci:{seeded}", tmp_path / "holder.log", ("--node-name", "holder"))
    node = None
    try:
        node = start_node(f"oci:{empty}", tmp_path / "node.log",
                          ("--node-name", "node", "--join", holder.mesh,
                           "--upstream-client-burst", str(BURST),
                           "--upstream-client-rate", "0.001"))

        def summary_held() -> bool:
            metrics = scrape(node.metrics)
            return metric(metrics, "meshmirror_peer_summaries_share") >= 1.0

        wait_until(summary_held, 30, "the node to hold the holder's summary")
        served_before = _blob_requests_served(holder)

        def url(i: int) -> str:
            return f"http://{node.address}/v2/library/paced/blobs/{layers[i].digest}?ns=docker.io"

        # The first BURST fetches go through, by HEAD and by a one-byte Range ...
        assert http_status(url(0), "HEAD") == 200
        assert http_status(url(1), "GET", {"Range": "bytes=0-0"}) == 206
        # ... then neither starts another; a whole GET, which takes what it fetched, does.
        assert [http_status(url(2), "HEAD"), http_status(url(3), "GET", {"Range": "bytes=0-0"}),
                http_status(url(4), "GET")] == [404, 404, 200]
        # What is cached costs nothing, however often it is asked for.
        assert all(http_status(url(i), m) == 200 for i in (0, 1) for m in ("HEAD", "GET") * 3)
        # The holder served the BURST fetches and the whole GET only.
        assert _blob_requests_served(holder) - served_before == BURST + 1
    finally:
        if node is not None:
            stop(node.proc)
        stop(holder.proc)
