"""Who is believed while the upstream cannot answer: the node's own verdict and store
first, members' vouches only when trusted, the policy for the rest.

Peers are real HTTP servers on loopback (`peers.FakePeer`); the upstream is the
scripted one of `test_upstream_policy`, down for every question here.
"""

from __future__ import annotations

import logging

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from meshmirror.mirror.metrics import MirrorMetrics
from meshmirror.mirror.options import MirrorConfig, OutagePeerTags, UnknownVisibility
from meshmirror.mirror.peer_mirror import PeerMirror
from meshmirror.mirror.visibility import BLOB_PROBE_REFERENCE, Access, RepositoryAccess
from meshmirror.oci.imagebuilder import canonical_json
from meshmirror.oci.mediatypes import OCI_MANIFEST
from meshmirror.registry.fallback import FallbackContent, Miss, MissReason
from meshmirror.routing.router import InMemoryRouter
from meshmirror.routing.vouches import VouchBook, Vouches, vouch_key
from meshmirror.store.memory import MemoryStore
from meshmirror.upstream import FailureKind, Unknown
from tests.mirror.peers import FakePeer
from tests.mirror.upstreams import (
    BLOB,
    BLOB_D,
    DOWN,
    REGISTRY,
    REPO,
    ScriptedUpstream,
    peer,
)

__all__ = ["peer"]  # a fixture

NOW = 1_800_000_000.0
DOWN_VISIBILITY = Unknown(FailureKind.CONNECTION, "refused")


def vouched_by_a_member(registry: str = REGISTRY, repository: str = REPO) -> VouchBook:
    book = VouchBook()
    book.set_vouches("member", Vouches.of([(vouch_key(registry, repository), NOW - 120)]))
    return book


def access(*, vouches: VouchBook | None, trusted: bool,
           unknown: UnknownVisibility = UnknownVisibility.DENY,
           clock: list[float] | None = None) -> tuple[RepositoryAccess, list[str]]:
    decisions: list[str] = []
    now = clock if clock is not None else [0.0]
    checker = RepositoryAccess(
        ScriptedUpstream(tag=DOWN, visibility=DOWN_VISIBILITY),
        MirrorConfig(private_images_unknown=unknown), lambda: now[0],
        vouches=vouches, trust_vouches=trusted,
        on_outage=decisions.append, wall_clock=lambda: NOW)
    return checker, decisions


@pytest.mark.parametrize(("rule", "encrypted", "trusted"), [
    (OutagePeerTags.ENCRYPTED, True, True),
    (OutagePeerTags.ENCRYPTED, False, False),
    (OutagePeerTags.ALWAYS, False, True),
    (OutagePeerTags.NEVER, True, False),
])
def test_outage_vouches_mirrors_outage_peer_tags(rule: OutagePeerTags, encrypted: bool,
                                                 trusted: bool) -> None:
    assert RepositoryAccess.trusts_vouches(rule, encrypted) is trusted


async def test_a_trusted_vouch_shares_a_repository_the_node_never_saw() -> None:
    checker, decisions = access(vouches=vouched_by_a_member(), trusted=True)
    assert await checker.check(REGISTRY, REPO, BLOB_PROBE_REFERENCE) is Access.SHARE
    assert decisions == ["vouch"]
    # Learned from a member, not from the upstream: this node does not vouch for it.
    assert len(checker.cache.vouches()) == 0


async def test_the_nodes_own_private_verdict_beats_any_vouch() -> None:
    clock = [0.0]
    checker, decisions = access(vouches=vouched_by_a_member(), trusted=True, clock=clock)
    checker.learned(REGISTRY, REPO, public=False)
    clock[0] = 1e6  # stale: the upstream is asked, cannot answer, the old verdict decides
    decision = await checker.check(REGISTRY, REPO, BLOB_PROBE_REFERENCE)
    assert decision is Access.PRIVATE and decision.reason is MissReason.PRIVATE_REPOSITORY
    assert decisions == ["own_verdict"]


async def test_nobody_vouched_follows_private_images_unknown() -> None:
    checker, decisions = access(vouches=VouchBook(), trusted=True)
    decision = await checker.check(REGISTRY, REPO, BLOB_PROBE_REFERENCE)
    assert decision is Access.UNKNOWN_OUTAGE
    assert decision.reason is MissReason.UNKNOWN_REPOSITORY_OUTAGE
    sharing, _ = access(vouches=VouchBook(), trusted=True, unknown=UnknownVisibility.SHARE)
    assert await sharing.check(REGISTRY, REPO, BLOB_PROBE_REFERENCE) is Access.SHARE
    assert decisions == ["policy"]


async def test_an_untrusted_vouch_is_refused_and_the_log_says_why(
        caplog: pytest.LogCaptureFixture) -> None:
    checker, decisions = access(vouches=vouched_by_a_member(), trusted=False)
    with caplog.at_level(logging.INFO, logger="meshmirror.mirror.visibility"):
        first = await checker.check(REGISTRY, REPO, BLOB_PROBE_REFERENCE)
        again = await checker.check(REGISTRY, REPO, BLOB_PROBE_REFERENCE)
    assert first is again is Access.VOUCH_NOT_TRUSTED
    assert first.reason is MissReason.VOUCH_NOT_TRUSTED
    assert decisions == ["vouch_not_trusted"] * 2
    said = [r for r in caplog.records if "vouch_not_trusted" in r.getMessage()]
    assert len(said) == 1  # once a minute per repository, not per request
    assert "gossip key" in said[0].getMessage() and "--outage-vouches" in said[0].getMessage()


async def test_a_peer_serves_a_vouched_blob_in_an_encrypted_mesh(
        session: aiohttp.ClientSession, peer: FakePeer) -> None:
    registry = CollectorRegistry()
    router = InMemoryRouter(registry=registry, seed=1)
    router.set_keys(peer.peer, [str(BLOB_D)])
    metrics = MirrorMetrics(registry)
    upstream = ScriptedUpstream(tag=DOWN, visibility=DOWN_VISIBILITY)
    mirror = PeerMirror(router, session, options=MirrorConfig(connect_timeout=0.4),
                        metrics=metrics, upstream=upstream, mesh_encrypted=True,
                        vouches=vouched_by_a_member())
    content = await mirror.open_blob(REGISTRY, REPO, BLOB_D, None, want_body=True)
    assert isinstance(content, FallbackContent) and content.body is not None
    assert b"".join([part async for part in content.body]) == BLOB
    assert registry.get_sample_value("meshmirror_outage_visibility_decisions_total",
                                     {"decision": "vouch"}) == 1
    mirror.close()
    # The same in a mesh with no gossip key: nothing asked of peers.
    plain = PeerMirror(router, session, options=MirrorConfig(connect_timeout=0.4),
                       upstream=upstream, mesh_encrypted=False,
                       vouches=vouched_by_a_member())
    before = len(peer.behaviour.requests)
    miss = await plain.open_blob(REGISTRY, REPO, BLOB_D, None, want_body=True)
    assert isinstance(miss, Miss) and miss.reason is MissReason.VOUCH_NOT_TRUSTED
    assert len(peer.behaviour.requests) == before
    plain.close()


async def test_the_nodes_own_tag_is_served_from_its_store_in_an_outage(
        session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture) -> None:
    store = MemoryStore()
    config = store.add_blob(b"{}", "application/vnd.oci.image.config.v1+json")
    manifest = canonical_json({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": [],
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": str(config), "size": 2}})
    own = store.add_blob(manifest, OCI_MANIFEST)
    store.tag(REGISTRY, REPO, "v1", own)
    registry = CollectorRegistry()
    metrics = MirrorMetrics(registry)
    # No peer holds anything and peers' tags are not trusted (no gossip key): only the
    # node's own store can answer.
    mirror = PeerMirror(InMemoryRouter(registry=registry, seed=1), session,
                        options=MirrorConfig(connect_timeout=0.4), metrics=metrics,
                        upstream=ScriptedUpstream(tag=DOWN, visibility=DOWN_VISIBILITY),
                        mesh_encrypted=False, store=store)
    with caplog.at_level(logging.INFO, logger="meshmirror.mirror.tags"):
        content = await mirror.open_manifest(REGISTRY, REPO, "v1", want_body=True)
    assert isinstance(content, FallbackContent) and content.digest == own
    assert content.media_type == OCI_MANIFEST and content.body is not None
    assert b"".join([part async for part in content.body]) == manifest
    assert registry.get_sample_value("meshmirror_tag_resolutions_total",
                                     {"registry": REGISTRY, "source": "local"}) == 1
    assert any("served from this node's store" in r.getMessage() for r in caplog.records)
    # A tag the store does not hold is still refused (peers' tags are not trusted).
    assert isinstance(await mirror.open_manifest(REGISTRY, REPO, "v2", want_body=True), Miss)
    # While the upstream answers, the store's record is never used for a tag.
    mirror.tags._upstream = ScriptedUpstream()
    assert isinstance(await mirror.open_manifest(REGISTRY, REPO, "v1", want_body=False), Miss)
    assert registry.get_sample_value("meshmirror_tag_resolutions_total",
                                     {"registry": REGISTRY, "source": "local"}) == 1
    mirror.close()
