"""The upstream's word before peers: fresh tags, private repositories, outages, forged tags.

Peers are real HTTP servers on loopback (`peers.FakePeer`); the upstream is a
scripted `UpstreamQuestions`, so each answer (digest, absent, private,
unreachable) is exact and every question it was asked is counted.
"""

from __future__ import annotations

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from meshmirror.mirror.marker import refuse_private
from meshmirror.mirror.metrics import MirrorMetrics
from meshmirror.mirror.options import (
    MirrorConfig,
    OutagePeerTags,
    PrivateImages,
    TagResolution,
    UnknownVisibility,
)
from meshmirror.mirror.peer_mirror import PeerMirror
from meshmirror.mirror.visibility import BLOB_PROBE_REFERENCE
from meshmirror.oci.digest import Digest
from meshmirror.registry.fallback import FallbackContent, Miss, MissReason
from meshmirror.routing.router import InMemoryRouter
from meshmirror.upstream import (
    AuthRequired,
    FailureKind,
    NotFound,
    Private,
    Public,
    Unknown,
)
from tests.mirror.peers import FakePeer
from tests.mirror.upstreams import (
    BLOB,
    BLOB_D,
    DOWN,
    HONEST_D,
    REGISTRY,
    REPO,
    STALE,
    TAG_KEY,
    ScriptedUpstream,
    peer,
)

__all__ = ["peer"]  # a fixture

def build(session: aiohttp.ClientSession, peer: FakePeer, upstream: ScriptedUpstream, *,
          encrypted: bool = True, **options: object) -> tuple[PeerMirror, MirrorMetrics]:
    registry = CollectorRegistry()
    router = InMemoryRouter(registry=registry, seed=1)
    router.set_keys(peer.peer, [str(HONEST_D), str(Digest.of(STALE)), str(BLOB_D), TAG_KEY])
    metrics = MirrorMetrics(registry)
    opts = MirrorConfig(connect_timeout=0.4, first_byte_timeout=0.5, **options)  # type: ignore[arg-type]
    return PeerMirror(router, session, options=opts, metrics=metrics, upstream=upstream,
                      mesh_encrypted=encrypted), metrics


def resolutions(metrics: MirrorMetrics, source: str) -> float:
    value = metrics.registry.get_sample_value(
        "meshmirror_tag_resolutions_total", {"registry": REGISTRY, "source": source})
    return value or 0.0


def peer_paths(peer: FakePeer) -> list[str]:
    return [path for path, _, _ in peer.behaviour.requests]


async def test_a_tag_means_the_upstreams_digest_served_by_a_peer(
        session: aiohttp.ClientSession, peer: FakePeer) -> None:
    mirror, metrics = build(session, peer, ScriptedUpstream())
    content = await mirror.open_manifest(REGISTRY, REPO, "latest", want_body=False)
    assert isinstance(content, FallbackContent) and content.digest == HONEST_D
    # The peer was asked for the digest, never for its own idea of the tag.
    assert peer_paths(peer) == [f"/v2/{REPO}/manifests/{HONEST_D}"]
    assert resolutions(metrics, "upstream") == 1
    mirror.close()


async def test_an_absent_tag_is_a_404_never_a_stale_copy(
        session: aiohttp.ClientSession, peer: FakePeer) -> None:
    mirror, metrics = build(session, peer, ScriptedUpstream(tag=NotFound()))
    miss = await mirror.open_manifest(REGISTRY, REPO, "latest", want_body=True)
    assert miss == Miss(MissReason.TAG_NOT_FOUND)
    assert peer_paths(peer) == []
    assert resolutions(metrics, "none") == 1
    mirror.close()


@pytest.mark.parametrize(("encrypted", "rule", "from_peers"), [
    (True, OutagePeerTags.ENCRYPTED, True),
    (False, OutagePeerTags.ENCRYPTED, False),
    (False, OutagePeerTags.ALWAYS, True),
    (True, OutagePeerTags.NEVER, False),
])
async def test_in_an_outage_peers_resolve_tags_only_where_trusted(
        session: aiohttp.ClientSession, peer: FakePeer, encrypted: bool,
        rule: OutagePeerTags, from_peers: bool) -> None:
    upstream = ScriptedUpstream(tag=DOWN, visibility=Unknown(FailureKind.CONNECTION, "refused"))
    mirror, metrics = build(session, peer, upstream, encrypted=encrypted,
                            outage_peer_tags=rule, private_images_unknown=UnknownVisibility.SHARE)
    content = await mirror.open_manifest(REGISTRY, REPO, "latest", want_body=True)
    if from_peers:
        assert isinstance(content, FallbackContent) and content.digest == Digest.of(STALE)
        assert resolutions(metrics, "peer") == 1
    else:
        assert isinstance(content, Miss) and peer_paths(peer) == []
        assert resolutions(metrics, "none") == 1
    mirror.close()


async def test_peers_mode_resolves_through_peers_without_asking_for_the_digest(
        session: aiohttp.ClientSession, peer: FakePeer) -> None:
    upstream = ScriptedUpstream()
    mirror, metrics = build(session, peer, upstream, resolve_tags=TagResolution.PEERS)
    content = await mirror.open_manifest(REGISTRY, REPO, "latest", want_body=True)
    assert isinstance(content, FallbackContent) and content.digest == Digest.of(STALE)
    assert [kind for kind, _ in upstream.asked] == ["visibility"]
    assert resolutions(metrics, "peer") == 1
    mirror.close()


async def test_private_repository_is_refused_at_once_and_remembered(
        session: aiohttp.ClientSession, peer: FakePeer) -> None:
    upstream = ScriptedUpstream(tag=AuthRequired("401 Basic"), visibility=Private("401 Basic"))
    mirror, _ = build(session, peer, upstream)
    private = Miss(MissReason.PRIVATE_REPOSITORY)
    assert await mirror.open_manifest(REGISTRY, REPO, "latest", want_body=False) == private
    assert await mirror.open_manifest(REGISTRY, REPO, str(HONEST_D), want_body=True) == private
    assert await mirror.open_blob(REGISTRY, REPO, BLOB_D, None, want_body=True) == private
    assert peer_paths(peer) == []
    # The tag's 401 said "private": nothing after it needed another question.
    assert upstream.asked == [("tag", f"{REPO}:latest")]
    assert mirror.access.refuses_peers(REGISTRY, REPO)
    mirror.close()


async def test_public_repository_blob_is_shared_after_one_question(
        session: aiohttp.ClientSession, peer: FakePeer) -> None:
    upstream = ScriptedUpstream(visibility=Public(found=False))
    mirror, _ = build(session, peer, upstream)
    for _ in range(3):
        content = await mirror.open_blob(REGISTRY, REPO, BLOB_D, None, want_body=False)
        assert isinstance(content, FallbackContent) and content.size == len(BLOB)
    # Asked once, with a digest naming nothing rather than the blob's (see visibility).
    assert upstream.asked == [("visibility", f"{REPO}@{BLOB_PROBE_REFERENCE}")]
    mirror.close()


async def test_in_an_outage_known_public_stays_shared_and_unknown_follows_the_policy(
        session: aiohttp.ClientSession, peer: FakePeer) -> None:
    clock = [0.0]
    upstream = ScriptedUpstream(visibility=Public(found=True))
    registry = CollectorRegistry()
    router = InMemoryRouter(registry=registry, seed=1)
    router.set_keys(peer.peer, [str(BLOB_D)])
    mirror = PeerMirror(router, session, options=MirrorConfig(public_ttl=10),
                        metrics=MirrorMetrics(registry), upstream=upstream,
                        clock=lambda: clock[0])
    content = await mirror.open_blob(REGISTRY, REPO, BLOB_D, None, want_body=False)
    assert isinstance(content, FallbackContent)
    upstream.visibility = Unknown(FailureKind.TIMEOUT, "blackholed")
    clock[0] = 1000.0  # long past the TTL: asked again, no answer, last verdict holds
    content = await mirror.open_blob(REGISTRY, REPO, BLOB_D, None, want_body=False)
    assert isinstance(content, FallbackContent)
    assert len(upstream.asked) == 2
    # A repository never seen is denied by default while the upstream cannot say.
    miss = await mirror.open_blob(REGISTRY, "other/app", BLOB_D, None, want_body=False)
    assert miss == Miss(MissReason.UNKNOWN_REPOSITORY_OUTAGE)
    mirror.close()


async def test_share_mode_asks_nothing_about_visibility(
        session: aiohttp.ClientSession, peer: FakePeer) -> None:
    upstream = ScriptedUpstream(visibility=Private("401"))
    mirror, _ = build(session, peer, upstream, private_images=PrivateImages.SHARE)
    content = await mirror.open_blob(REGISTRY, REPO, BLOB_D, None, want_body=False)
    assert isinstance(content, FallbackContent)
    assert upstream.asked == []
    mirror.close()


async def _call(app: object, path: str, query: bytes) -> int:
    statuses: list[int] = []

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, object]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(int(message["status"]))  # type: ignore[call-overload]

    scope = {"type": "http", "method": "GET", "path": path, "query_string": query,
             "headers": []}
    await app(scope, receive, send)  # type: ignore[operator]
    return statuses[0]


async def test_peer_requests_for_a_known_private_repository_get_404() -> None:
    async def inner(scope: object, receive: object, send: object) -> None:
        await send({"type": "http.response.start", "status": 200,  # type: ignore[operator]
                    "headers": []})
        await send({"type": "http.response.body", "body": b""})  # type: ignore[operator]

    app = refuse_private(inner, lambda registry, repo: (registry, repo) == (REGISTRY, REPO),
                         "docker.io")
    blob = f"/v2/{REPO}/blobs/{BLOB_D}"
    assert await _call(app, blob, f"ns={REGISTRY}".encode()) == 404
    assert await _call(app, blob, b"ns=docker.io") == 200
    assert await _call(app, f"/v2/other/app/manifests/{HONEST_D}",
                       f"ns={REGISTRY}".encode()) == 200
    assert await _call(app, "/_mesh/v1/summary", b"") == 200
