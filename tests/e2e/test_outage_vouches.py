"""A node that joins during an upstream outage pulls from its peers, on their word.

Real containerd 1.6 nodes, each pulling through its own meshmirror with default
flags, and a real Distribution upstream with the test token server (anonymous
pull on ``pub/app`` only, so ``team/secret`` is private).

Encrypted mesh (the chart's default gossip key): node A pulls the public image,
and the private one with the pull secret, while the upstream is up. A rogue
member (with the key) vouches, falsely, that ``team/secret`` is public. The
upstream stops; node B, started after the stop and never having seen either
repository, pulls the public image through CRI (containerd's own pull, as the
kubelet asks for it) from A, on A's vouch. B's CRI pull of the private image
fails: B believes the rogue, but A, which knows the repository is private,
refuses it to peers, so not one byte of it reaches B.

Unencrypted mesh: vouches are not trusted, B refuses the repository and says
why (``vouch_not_trusted``) in its log and metrics; A itself still serves its
own tag from its store (``ctr pull`` through its mirror succeeds in the outage).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import pytest

from meshmirror.mirror.visibility import VISIBILITY_FILE
from meshmirror.oci.imagebuilder import BuiltImage, build_image
from tests.e2e.cluster import GOSSIP_KEY, E2ENode, record_figures, wait_summary_known
from tests.support.distribution import DistributionRegistry, TokenAuth
from tests.support.metrics import Metrics, metric
from tests.support.node import RunningNode, start_node
from tests.support.processes import stop, wait_until
from tests.support.skopeo import push_layout
from tests.support.token_server import ISSUER, SERVICE, TokenServer

pytestmark = [pytest.mark.real, pytest.mark.slow]

MiB = 1024 * 1024
PRIVATE, PUBLIC, TAG = "team/secret", "pub/app", "1"
LAYERS = (2 * MiB, 1 * MiB)
USER = ("alice", "alice-secret")


def _peer_bytes(metrics: Metrics) -> float:
    return metric(metrics, "meshmirror_registry_response_bytes_total", source="peer")


def _decisions(node: E2ENode, decision: str) -> float:
    return metric(node.metrics(), "meshmirror_outage_visibility_decisions_total",
                  decision=decision)


def _vouching(node: E2ENode) -> None:
    """Wait until ``node``'s published summary vouches for what it pulled."""
    wait_until(lambda: metric(node.metrics(), "meshmirror_summary_vouches") >= 1, 20,
               f"{node.name} to vouch for what it pulled")


def _joined(nodes: list[E2ENode], members: int) -> None:
    """Each node sees ``members`` alive members and holds every peer's summary."""
    def converged() -> bool:
        for node in nodes:
            m = node.metrics()
            if metric(m, "meshmirror_mesh_members", state="alive") != members:
                return False
            if metric(m, "meshmirror_peer_summaries_share") < 1.0:
                return False
        return True

    wait_until(converged, 30, f"{members} members alive, summaries held", 0.1)


def _rogue(tmp: Path, registry: str, join: str) -> RunningNode:
    """A member with the gossip key whose kept verdicts say ``team/secret`` is public:
    it vouches falsely. It holds an unrelated image of its own."""
    state = tmp / "rogue-state"
    state.mkdir()
    (state / VISIBILITY_FILE).write_text(json.dumps({"verdicts": [
        {"registry": registry, "repository": PRIVATE, "public": True,
         "checked_unix": time.time() - 60, "protected": True}]}))
    layout = tmp / "rogue-layout"
    build_image(f"{registry}/rogue/own:1", layout, layer_sizes=(1024,), seed=666)
    key = tmp / "rogue.key"
    key.write_text(GOSSIP_KEY)
    return start_node(f"oci:{layout}", tmp / "rogue.log", (
        "--node-name", "rogue", "--join", join, "--gossip-key-file", str(key),
        "--state-dir", str(state)))


def _refusals(metrics: Metrics) -> float:
    """Peers whose summary named them for a key but that answered 404."""
    return metric(metrics, "meshmirror_mirror_peer_false_positives_total")


def _images(tmp: Path, upstream: DistributionRegistry) -> tuple[BuiltImage, BuiltImage]:
    secret = build_image(f"{upstream.address}/{PRIVATE}:{TAG}", tmp / "secret", LAYERS,
                         seed=51)
    public = build_image(f"{upstream.address}/{PUBLIC}:{TAG}", tmp / "public", LAYERS,
                         seed=52)
    push_layout(secret.layout, TAG, upstream.address, PRIVATE, USER)
    push_layout(public.layout, TAG, upstream.address, PUBLIC, USER)
    return secret, public


def test_a_node_started_in_an_outage_pulls_on_a_members_vouch_never_a_private_image(
        tmp_path: Path) -> None:
    with TokenServer(tmp_path, public={PUBLIC}, pusher=USER) as tokens, \
            DistributionRegistry(auth=TokenAuth(tokens.realm, SERVICE, ISSUER,
                                                tokens.rootcertbundle)) as upstream:
        secret, public = _images(tmp_path, upstream)
        nodes: list[E2ENode] = []
        rogue: RunningNode | None = None
        try:
            # The token server is another loopback host: realms there need allowing.
            allow = ("--upstream-allow-hosts", str(urlsplit(tokens.realm).hostname))
            node_a = E2ENode("node-a", extra_args=allow).start()
            nodes.append(node_a)
            node_a.configure(upstream.url, [node_a.registry_url])
            assert node_a.pull(public.name).ok
            assert node_a.pull(secret.name, user=":".join(USER)).ok
            _vouching(node_a)
            rogue = _rogue(tmp_path, upstream.address, node_a.mesh_address)

            upstream.stop()
            node_b = E2ENode("node-b", join=node_a.mesh_address, cri=True,
                             extra_args=allow).start()
            nodes.append(node_b)
            node_b.configure(upstream.url, [node_b.registry_url])
            _joined(nodes, members=3)
            wait_summary_known(node_a, [node_b])

            # The public image, through CRI, from node A on its vouch.
            before = node_b.metrics()
            started = time.monotonic()
            assert node_b.containerd.cri_pull(public.name, timeout=60)
            pull_seconds = time.monotonic() - started
            node_b.verify_image(public)
            from_peers = _peer_bytes(node_b.metrics()) - _peer_bytes(before)
            assert from_peers >= sum(layer.size for layer in public.platforms[0].layers)
            assert _decisions(node_b, "vouch") >= 1

            # The private one: node B believes the rogue's vouch, node A refuses.
            vouched_before = _decisions(node_b, "vouch")
            bytes_before = _peer_bytes(node_b.metrics())
            refused_before = _refusals(node_b.metrics())
            with pytest.raises(grpc.RpcError):
                node_b.containerd.cri_pull(secret.name, timeout=60)
            assert node_b.image_digest(secret.name) is None
            assert _peer_bytes(node_b.metrics()) == bytes_before
            assert _decisions(node_b, "vouch") > vouched_before  # it took the rogue's word
            # Node B asked node A (its summary names A for the tag) and A said 404:
            # it holds the image, and refuses it to peers because it knows it private.
            refused = _refusals(node_b.metrics()) - refused_before
            assert refused >= 1, "node B never asked the holder: the refusal was not tested"
            answered = [r for r in node_b.requests_logged()
                        if str(r.get("path", "")).startswith(f"/v2/{PRIVATE}/")]
            assert answered and {r.get("status") for r in answered} == {404}, answered
            record_figures("outage_vouches", {
                "mesh": "encrypted", "cri_outage_pull_s": round(pull_seconds, 3),
                "public_peer_bytes": from_peers,
                "private_requests_refused_by_holder": refused})
        finally:
            if rogue is not None:
                stop(rogue.proc)
            for node in nodes:
                node.close()


def _get(url: str, method: str = "GET") -> tuple[int, str | None]:
    request = urllib.request.Request(url, method=method, headers={
        "Accept": "application/vnd.oci.image.manifest.v1+json"})
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, response.headers.get("Docker-Content-Digest")
    except urllib.error.HTTPError as err:
        return err.code, None


def test_an_unencrypted_mesh_does_not_trust_vouches_but_a_node_trusts_its_own_tags(
        tmp_path: Path) -> None:
    with DistributionRegistry() as upstream:
        image = build_image(f"{upstream.address}/{PUBLIC}:{TAG}", tmp_path / "public", LAYERS,
                            seed=53)
        push_layout(image.layout, TAG, upstream.address, PUBLIC, None)
        nodes: list[E2ENode] = []
        try:
            # No tag cache: the lookups below must meet the outage, not a remembered
            # answer from the pull before it.
            node_a = E2ENode("node-a", gossip_key=None,
                             extra_args=("--upstream-tag-ttl", "0")).start()
            nodes.append(node_a)
            node_a.configure(upstream.url, [node_a.registry_url])
            assert node_a.pull(image.name).ok
            _vouching(node_a)

            upstream.stop()
            node_b = E2ENode("node-b", join=node_a.mesh_address, gossip_key=None).start()
            nodes.append(node_b)
            node_b.configure(upstream.url, [node_b.registry_url])
            _joined(nodes, members=2)
            wait_summary_known(node_a, [node_b])

            # Node B: members vouch, but the mesh has no key; refused, and it says why.
            by_digest = f"{upstream.address}/{PUBLIC}@{image.digest}"
            assert not node_b.pull(by_digest, timeout=60).ok
            status, _ = _get(f"{node_b.registry_url}/v2/{PUBLIC}/manifests/{image.digest}"
                             f"?ns={upstream.address}")
            assert status == 404
            assert _decisions(node_b, "vouch_not_trusted") >= 1
            said = [r for r in node_b.log_records()
                    if r.get("reason") == "vouch_not_trusted" and "vouch" in str(r.get("msg"))]
            assert said, node_b.log_tail()

            # Node A: its own tag, from its own store, though peers' tags are not trusted.
            status, digest = _get(f"{node_a.registry_url}/v2/{PUBLIC}/manifests/{TAG}"
                                  f"?ns={upstream.address}", method="HEAD")
            assert (status, digest) == (200, str(image.digest))
            again = node_a.pull(image.name, timeout=60)
            assert again.ok, again.output
            assert metric(node_a.metrics(), "meshmirror_tag_resolutions_total",
                          source="local") >= 2
            assert any("served from this node's store" in str(r.get("msg"))
                       for r in node_a.log_records())
            record_figures("outage_vouches", {
                "mesh": "unencrypted", "own_tag_pull_s": round(again.seconds, 3),
                "vouch_not_trusted": _decisions(node_b, "vouch_not_trusted")})
        finally:
            for node in nodes:
                node.close()
