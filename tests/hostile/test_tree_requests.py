"""The peer-facing tree path attacked by a pod: any client of the registry port can
send the peer marker and ``X-Meshmirror-Tree``, so that path must be no stronger a
lever on the upstream than a client's own request.

Real ``meshmirror run`` nodes and a real Distribution upstream.
"""

from __future__ import annotations

import contextlib
import http.client
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshmirror.mirror.marker import PEER_HEADER, TREE_HEADER
from meshmirror.oci.imagebuilder import BuiltImage, build_image
from tests.support.distribution import DistributionRegistry
from tests.support.http import http_status
from tests.support.metrics import metric, scrape
from tests.support.node import RunningNode, start_node
from tests.support.processes import stop
from tests.support.scripted_http import Reply, Request, ScriptedHTTPServer
from tests.support.skopeo import push_layout

pytestmark = pytest.mark.real

REPO, TAG = "honest/app", "1"
UPSTREAM_FIRST = ("--resolve-tags", "upstream-first", "--private-images", "upstream-only")


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    return build_image(f"example.com/{REPO}:{TAG}", tmp_path_factory.mktemp("image"),
                       (4096,), seed=29)


@pytest.fixture(scope="module")
def upstream(image: BuiltImage) -> Iterator[DistributionRegistry]:
    with DistributionRegistry(access_log=True) as registry:
        push_layout(image.layout, TAG, registry.address, REPO)
        yield registry


def _node(tmp: Path, name: str, *flags: str) -> RunningNode:
    store = tmp / name
    store.mkdir()
    return start_node(f"oci:{store}", tmp / f"{name}.log", extra=(*UPSTREAM_FIRST, *flags))


def _answers(node: RunningNode, registry: str, result: str) -> float:
    metrics = scrape(node.metrics)
    return metric(metrics, "meshmirror_upstream_answers_total", registry=registry, result=result)


def test_tree_requests_for_a_layer_on_the_manifests_endpoint_never_open_the_breaker(
        upstream: DistributionRegistry, image: BuiltImage, tmp_path: Path) -> None:
    """Distribution answers a manifest GET by a layer's digest with a 5xx. A pod that
    sends that as a tree request must not make the node count it as an outage."""
    layer = image.platforms[0].layers[0].digest
    node = _node(tmp_path, "tree", "--mirrored-registries", upstream.address,
                 "--upstream-tag-ttl", "0")
    try:
        base = f"http://{node.address}/v2"
        hostile = {PEER_HEADER: "1", TREE_HEADER: "a-pod"}
        for headers in (hostile, {}) * 3:  # a tree request, and a client's own
            assert http_status(f"{base}/{REPO}/manifests/{layer}?ns={upstream.address}",
                               headers=headers) == 404
        before = _answers(node, upstream.address, "answered")
        for _ in range(3):
            http_status(f"{base}/{REPO}/manifests/{TAG}?ns={upstream.address}", method="HEAD")
        # Honest tags are still the upstream's word, not peers'.
        assert _answers(node, upstream.address, "circuit_open") == 0
        assert _answers(node, upstream.address, "answered") - before == 3
    finally:
        stop(node.proc)


def test_manifests_by_digest_fetched_for_a_client_are_paced_per_client(
        upstream: DistributionRegistry, image: BuiltImage, tmp_path: Path) -> None:
    """A manifest nobody holds is fetched from the upstream for the client that asks;
    asked again and again (a registry may count every manifest GET against the
    node's pull quota), that is a new upstream question each time and takes the
    client's pace, tree request or not."""
    burst = 5
    node = _node(tmp_path, "paced", "--mirrored-registries", upstream.address,
                 "--upstream-client-rate", "0.01", "--upstream-client-burst", str(burst))
    try:
        digest = image.root.digest
        path = f"/v2/{REPO}/manifests/{digest}"
        url = f"http://{node.address}{path}?ns={upstream.address}"
        before = upstream.requests_seen("GET", path)
        statuses = [http_status(url, headers=headers) for headers in
                    ({PEER_HEADER: "1", TREE_HEADER: "a-pod"}, {}) * 10]
        assert statuses[0] == 200  # the first ones are served
        assert upstream.requests_seen("GET", path) - before <= burst
    finally:
        stop(node.proc)


def test_a_blob_redirect_to_another_private_host_gets_nothing_through(tmp_path: Path) -> None:
    """The designated blob fetch follows a registry's redirect (to object storage, say)
    only through the address guard: a mirrored registry that sends it to another
    loopback host reaches nobody."""
    digest = "sha256:" + "ab" * 32
    with ScriptedHTTPServer(lambda _r: Reply(200, body=b"secret")) as target:

        def registry(request: Request) -> Reply:
            if request.method == "GET" and "/blobs/" in request.path:
                return Reply(307, (("Location", f"{target.url}/internal/{digest}"),))
            return Reply(404 if "/manifests/" in request.path else 200)

        with ScriptedHTTPServer(registry) as evil:
            address = f"{evil.host}:{evil.port}"
            node = _node(tmp_path, "redirected", "--mirrored-registries", address)
            try:
                for headers in ({}, {PEER_HEADER: "1", TREE_HEADER: "a-pod"}):
                    assert http_status(f"http://{node.address}/v2/pub/app/blobs/{digest}"
                                       f"?ns={address}", headers=headers) == 404
            finally:
                stop(node.proc)
            assert any("/blobs/" in r.path for r in evil.requests)  # it was asked
            assert target.requests == []

            # With the target allowed, the same redirect does reach it: the test can see.
            allowed = _node(tmp_path, "allowed", "--mirrored-registries", address,
                            "--upstream-allow-hosts", target.host)
            try:
                # The owner's containerd follows the upstream's bytes: these fail their
                # digest, so the response ends short of its length.
                with contextlib.suppress(http.client.IncompleteRead):
                    http_status(f"http://{allowed.address}/v2/pub/app/blobs/{digest}?ns={address}")
            finally:
                stop(allowed.proc)
            assert [r.path for r in target.requests] == [f"/internal/{digest}"]
