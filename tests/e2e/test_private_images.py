"""A private repository reaches no node through its peers; a public one still does.

Real containerd 1.6 nodes, each pulling through its own meshmirror first, and a
real Distribution as the upstream, of two kinds:

* ``auth: token`` with the test token server, which grants anonymous pull on
  ``pub/app`` and nothing on ``team/secret`` (Docker Hub's kind: a private
  repository answers a valid anonymous token with 401);
* ``auth: htpasswd``, whose ``401 Basic`` makes every repository private.

Node 1 pulls the private image with the pull secret (``ctr pull --user``). Node 2
without the secret fails exactly as it fails with no mirror at all; with it, it
gets the image from the upstream, and not one byte from node 1: its metrics
show no peer bytes and every mirror request for the repository refused, and
node 1's access log shows no request for the repository once its own pull is
done. The public repository of the token registry goes through the same nodes
and is shared (its bytes come from node 1).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import pytest

from meshmirror.oci.imagebuilder import BuiltImage, build_image
from tests.e2e.cluster import E2ENode, record_figures, wait_mesh, wait_summary_known
from tests.support.distribution import DistributionRegistry, HtpasswdAuth, TokenAuth
from tests.support.metrics import Metrics, metric
from tests.support.skopeo import push_layout
from tests.support.token_server import ISSUER, SERVICE, TokenServer

pytestmark = [pytest.mark.real, pytest.mark.slow]

MiB = 1024 * 1024
PRIVATE, PUBLIC, TAG = "team/secret", "pub/app", "1"
LAYERS = (3 * MiB, 2 * MiB)
USER = ("alice", "alice-secret")


def _peer_bytes(metrics: Metrics) -> float:
    return metric(metrics, "meshmirror_registry_response_bytes_total", source="peer")


def _two_nodes(extra_args: tuple[str, ...] = ()) -> list[E2ENode]:
    """Two nodes of one encrypted mesh, not started yet (the caller closes them)."""
    node1 = E2ENode("node-1", extra_args=extra_args)
    return [node1, E2ENode("node-2", join=node1.mesh_address, extra_args=extra_args)]


def _start(nodes: list[E2ENode], registry: DistributionRegistry) -> None:
    """Start each node, its containerd pulling from ``registry`` through its own mirror."""
    for node in nodes:
        node.start()
        node.configure(registry.url, [node.registry_url])
    wait_mesh(nodes)


def _repository(image: BuiltImage) -> str:
    """``host:port/team/secret:1`` -> ``team/secret``."""
    return image.name.split("/", 1)[1].rsplit(":", 1)[0]


def _refused_for_auth(output: str) -> bool:
    """containerd's words for a registry that wants credentials (401 Basic, or a token
    without the pull grant)."""
    text = output.lower()
    return any(word in text for word in ("401", "unauthorized", "authorization failed"))


def _private_stays_private(node1: E2ENode, node2: E2ENode, image: BuiltImage,
                           secret: str) -> dict[str, object]:
    """Node 1 pulls with ``secret``; node 2 fails without it, then pulls it from upstream."""
    first = node1.pull(image.name, user=secret)
    assert first.ok, first.output
    node1.verify_image(image)
    wait_summary_known(node1, [node2])  # node 2's router now names node 1 for every blob
    log_mark = len(node1.log_records())
    before = node2.metrics()

    anonymous = node2.pull(image.name)
    direct = node2.pull(image.name, direct=True)  # the same pull with no mirror at all
    assert not anonymous.ok and not direct.ok, (anonymous.output, direct.output)
    assert _refused_for_auth(anonymous.output) and _refused_for_auth(direct.output), \
        (anonymous.output, direct.output)
    assert node2.image_digest(image.name) is None

    secret_pull = node2.pull(image.name, user=secret)
    assert secret_pull.ok, secret_pull.output
    node2.verify_image(image)

    after = node2.metrics()
    assert _peer_bytes(after) == _peer_bytes(before), "bytes of a private image from a peer"
    hits = (metric(after, "meshmirror_mirror_outcomes_total", result="hit")
            - metric(before, "meshmirror_mirror_outcomes_total", result="hit"))
    refused = (metric(after, "meshmirror_mirror_outcomes_total", result="refused")
               - metric(before, "meshmirror_mirror_outcomes_total", result="refused"))
    assert hits == 0 and refused > 0, (hits, refused)
    asked = [r for r in node1.requests_logged(log_mark)
             if str(r.get("path", "")).startswith(f"/v2/{_repository(image)}/")]
    assert asked == [], f"node 2 asked node 1 for the private repository: {asked[:3]}"
    return {"private_pull_with_secret_s": round(secret_pull.seconds, 3),
            "private_refused_requests": refused}


def test_token_registry_private_repository_never_from_peers(tmp_path: Path) -> None:
    with TokenServer(tmp_path, public={PUBLIC}, pusher=USER) as tokens, \
            DistributionRegistry(auth=TokenAuth(tokens.realm, SERVICE, ISSUER,
                                                tokens.rootcertbundle)) as upstream:
        secret = build_image(f"{upstream.address}/{PRIVATE}:{TAG}", tmp_path / "secret",
                             LAYERS, seed=41)
        public = build_image(f"{upstream.address}/{PUBLIC}:{TAG}", tmp_path / "public",
                             LAYERS, seed=42)
        push_layout(secret.layout, TAG, upstream.address, PRIVATE, USER)
        push_layout(public.layout, TAG, upstream.address, PUBLIC, USER)
        # The token realm is on another loopback address than the registry: a private
        # host the node reaches only when listed.
        nodes = _two_nodes(("--upstream-allow-hosts", str(urlsplit(tokens.realm).hostname)))
        try:
            _start(nodes, upstream)
            node1, node2 = nodes
            figures = _private_stays_private(node1, node2, secret, ":".join(USER))

            # The public repository of the same registry is shared, anonymously.
            assert node1.pull(public.name).ok
            wait_summary_known(node1, [node2])
            before = _peer_bytes(node2.metrics())
            pulled = node2.pull(public.name)
            assert pulled.ok, pulled.output
            node2.verify_image(public)
            from_peer = _peer_bytes(node2.metrics()) - before
            layers = sum(layer.size for layer in public.platforms[0].layers)
            assert from_peer >= layers, (from_peer, layers)
            record_figures("private_images", {
                "kind": "token", **figures, "public_peer_bytes": from_peer,
                "public_pull_s": round(pulled.seconds, 3)})
        finally:
            for node in nodes:
                node.close()


def test_htpasswd_registry_is_private_throughout(tmp_path: Path) -> None:
    auth = HtpasswdAuth.write(tmp_path / "htpasswd", {USER[0]: USER[1]})
    with DistributionRegistry(auth=auth) as upstream:
        image = build_image(f"{upstream.address}/{PUBLIC}:{TAG}", tmp_path / "basic",
                            LAYERS, seed=43)
        push_layout(image.layout, TAG, upstream.address, PUBLIC, USER)
        nodes = _two_nodes()
        try:
            _start(nodes, upstream)
            figures = _private_stays_private(nodes[0], nodes[1], image, ":".join(USER))
            record_figures("private_images", {"kind": "htpasswd", **figures})
        finally:
            for node in nodes:
                node.close()
