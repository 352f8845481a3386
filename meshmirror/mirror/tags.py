"""What a tag means right now, and who may say so.

Peers can only tell what a tag meant when they pulled it: a reused tag
(``latest``) resolves stale through them, and since a tag carries no digest to
verify, any member could answer with a manifest of its own. So with
``--resolve-tags=upstream-first`` the upstream is asked anonymously for the
tag's current digest every time, and peers serve only the manifest of that
digest, verified against it. Peers resolve a tag themselves only while the
upstream cannot answer (refused, timed out, 5xx, breaker open), and then only
when the mesh is encrypted, unless ``--outage-peer-tags`` says otherwise.

Before any peer, in an outage, the node's own store: a tag this node pulled is
what this node's containerd itself last saw it mean, and a node trusts itself
(`UseOwn`). It is no fresher than a peer's answer, but it cannot be a member's lie.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from meshmirror.mirror.options import (
    MirrorConfig,
    OutagePeerTags,
    PrivateImages,
    TagResolution,
)
from meshmirror.mirror.upstream_questions import UpstreamQuestions
from meshmirror.mirror.visibility import RepositoryAccess
from meshmirror.oci.digest import Digest
from meshmirror.registry.fallback import MissReason
from meshmirror.upstream import AuthRequired, NotFound, TagDigest

log = logging.getLogger(__name__)

# How the node's own store resolves a tag: its digest, or None when it holds no such tag.
OwnTags = Callable[[str, str, str], Awaitable[Digest | None]]


@dataclass(frozen=True, slots=True)
class UseDigest:
    """The upstream says the tag is this digest: serve that manifest from a peer."""

    digest: Digest


@dataclass(frozen=True, slots=True)
class UseOwn:
    """The upstream cannot answer and this node's store holds the tag: serve it from there."""

    digest: Digest


@dataclass(frozen=True, slots=True)
class AskPeers:
    """Resolve the tag through peers (``--resolve-tags=peers``, or an upstream outage)."""

    outage: bool


@dataclass(frozen=True, slots=True)
class Refuse:
    """404 at once; ``reason`` is for the log and the misses metric."""

    reason: MissReason


TagDecision = UseDigest | UseOwn | AskPeers | Refuse


class TagPolicy:
    """Turns ``--resolve-tags`` and the upstream's answer into a `TagDecision`."""

    def __init__(self, upstream: UpstreamQuestions | None, options: MirrorConfig,
                 access: RepositoryAccess, *, mesh_encrypted: bool,
                 own_tags: OwnTags | None = None) -> None:
        self._upstream = upstream
        self._own_tags = own_tags
        self._options = options
        self._access = access
        self._mesh_encrypted = mesh_encrypted

    @property
    def upstream_first(self) -> bool:
        """Whether the upstream decides tags (there is one, and the mode says so)."""
        return (self._upstream is not None
                and self._options.resolve_tags is TagResolution.UPSTREAM_FIRST)

    @property
    def peers_may_resolve_in_outage(self) -> bool:
        """Whether a tag lookup answered by a peer is accepted while the upstream is down."""
        rule = self._options.outage_peer_tags
        return rule is OutagePeerTags.ALWAYS or (
            rule is OutagePeerTags.ENCRYPTED and self._mesh_encrypted)

    async def decide(self, registry: str, repository: str, tag: str) -> TagDecision:
        mode = self._options.resolve_tags
        if mode is TagResolution.OFF:
            return Refuse(MissReason.TAGS_OFF)
        if not self.upstream_first:
            return AskPeers(outage=False)
        assert self._upstream is not None
        answer = await self._upstream.resolve_tag(registry, repository, tag)
        if isinstance(answer, TagDigest):
            # Answered anonymously, so anyone may pull the repository.
            self._access.learned(registry, repository, public=True)
            return UseDigest(answer.digest)
        if isinstance(answer, NotFound):
            return Refuse(MissReason.TAG_NOT_FOUND)
        if isinstance(answer, AuthRequired):
            self._access.learned(registry, repository, public=False)
            if self._options.private_images is PrivateImages.UPSTREAM_ONLY:
                return Refuse(MissReason.PRIVATE_REPOSITORY)
            # Shared private images: their tags can only be resolved by peers.
            return self._outage()
        # Unreachable: refused, timed out, 5xx, breaker open... The node's own store first.
        own = await self._own(registry, repository, tag)
        if own is not None:
            log.info("upstream unreachable; tag %s/%s:%s served from this node's store",
                     registry, repository, tag, extra={"fields": {
                         "registry": registry, "repository": repository, "tag": tag,
                         "digest": str(own), "source": "local"}})
            return UseOwn(own)
        # The visibility check that follows must not ask the same upstream again and
        # add a second timeout.
        decision = self._outage()
        if isinstance(decision, AskPeers):
            self._access.unanswered(registry, repository)
        return decision

    async def _own(self, registry: str, repository: str, tag: str) -> Digest | None:
        if self._own_tags is None:
            return None
        try:
            return await self._own_tags(registry, repository, tag)
        except Exception:  # an unreadable store is no answer, not a failed lookup
            log.warning("the store could not resolve %s/%s:%s", registry, repository, tag,
                        exc_info=True)
            return None

    def _outage(self) -> TagDecision:
        if self.peers_may_resolve_in_outage:
            return AskPeers(outage=True)
        return Refuse(MissReason.TAG_OUTAGE_UNTRUSTED)
