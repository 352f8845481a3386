"""The scripted upstream and the peer that holds a stale tag, shared by the mirror's
upstream-policy, outage-trust and visibility tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from meshmirror.oci.digest import Digest
from meshmirror.oci.mediatypes import OCI_MANIFEST
from meshmirror.upstream import (
    BreakerHealth,
    BreakerState,
    FailureKind,
    Public,
    TagDigest,
    TagResult,
    Unreachable,
    Visibility,
)
from tests.mirror.peers import Behaviour, FakePeer

REGISTRY = "registry.test"
REPO = "team/app"
HONEST = b'{"schemaVersion":2,"mediaType":"%s","layers":[],"v":2}' % OCI_MANIFEST.encode()
STALE = b'{"schemaVersion":2,"mediaType":"%s","layers":[],"v":1}' % OCI_MANIFEST.encode()
HONEST_D = Digest.of(HONEST)
BLOB = b"layer bytes" * 1000
BLOB_D = Digest.of(BLOB)
TAG_KEY = f"{REGISTRY}/{REPO}:latest"
DOWN = Unreachable(FailureKind.CONNECTION, "refused")


@dataclass
class ScriptedUpstream:
    """Answers each question as scripted and records it."""

    tag: TagResult = field(default_factory=lambda: TagDigest(HONEST_D, OCI_MANIFEST, None))
    visibility: Visibility = field(default_factory=lambda: Public(found=True))
    asked: list[tuple[str, str]] = field(default_factory=list)

    mirrored: bool = True

    async def resolve_tag(self, registry: str, repository: str, tag: str, *,
                          client: str | None = None) -> TagResult:
        self.asked.append(("tag", f"{repository}:{tag}"))
        return self.tag

    async def check_public(self, registry: str, repository: str, reference: str, *,
                           client: str | None = None) -> Visibility:
        self.asked.append(("visibility", f"{repository}@{reference}"))
        return self.visibility

    def health(self, registry: str) -> BreakerHealth:
        return BreakerHealth(BreakerState.CLOSED, 0, None, None)

    def mirrors(self, registry: str) -> bool:
        return self.mirrored


@pytest.fixture
async def peer() -> AsyncIterator[FakePeer]:
    """Holds the current manifest by digest and a stale one under the tag, and a blob."""
    behaviour = Behaviour(blobs={str(BLOB_D): BLOB},
                          manifests={"latest": (OCI_MANIFEST, STALE),
                                     str(HONEST_D): (OCI_MANIFEST, HONEST)})
    started = await FakePeer("holder", behaviour).start()
    yield started
    await started.stop()
