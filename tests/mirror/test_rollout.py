"""The owner's side of a rollout against a real Distribution: one upstream fetch, bounded misses.

The tree between real nodes is covered end to end (tests/e2e/test_rollout.py);
here one mirror alone is the owner of everything it is asked for.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from meshmirror.mirror.metrics import MirrorMetrics
from meshmirror.mirror.options import MirrorConfig
from meshmirror.mirror.peer_mirror import PeerMirror
from meshmirror.mirror.rollout import Rollout, RolloutMetrics
from meshmirror.oci.digest import Digest
from meshmirror.oci.imagebuilder import BuiltImage, build_image
from meshmirror.registry.fallback import FallbackContent, Miss, MissReason
from meshmirror.registry.ranges import parse_range
from meshmirror.routing.router import InMemoryRouter
from meshmirror.upstream import UpstreamClient, UpstreamEndpoints
from meshmirror.upstream.blobs import UpstreamContent
from tests.support.distribution import DistributionRegistry
from tests.support.scripted_http import refused_url
from tests.support.skopeo import push_layout

pytestmark = pytest.mark.real

REPO = "pub/app"
MiB = 1024 * 1024


@dataclass(frozen=True)
class Upstream:
    name: str
    url: str
    image: BuiltImage


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    with DistributionRegistry() as registry:
        image = build_image(f"{registry.address}/{REPO}:1", tmp_path_factory.mktemp("layout"),
                            (3 * MiB, 1 * MiB), seed=71)
        push_layout(image.layout, "1", registry.address, REPO)
        yield Upstream(registry.address, registry.url, image)


@dataclass
class Owner:
    mirror: PeerMirror
    rollout: Rollout
    metrics: CollectorRegistry

    def fetched(self, result: str) -> float:
        return self.metrics.get_sample_value(
            "meshmirror_rollout_upstream_fetches_total", {"result": result}) or 0.0

    @property
    def upstream_bytes(self) -> float:
        return self.metrics.get_sample_value("meshmirror_rollout_upstream_bytes_total") or 0.0


@pytest.fixture
async def owner(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Owner]:
    if hasattr(request, "param"):
        overrides: dict[str, str] = dict([request.param])
    else:
        upstream: Upstream = request.getfixturevalue("upstream")
        overrides = {upstream.name: upstream.url}
    registry = CollectorRegistry()
    router = InMemoryRouter(registry=registry, seed=1)  # no peer: this node owns everything
    options = MirrorConfig(upstream_cache_dir=tmp_path)
    async with aiohttp.ClientSession() as session, \
            UpstreamClient(UpstreamEndpoints(overrides=overrides)) as client:
        content = UpstreamContent(client, first_byte_timeout=2.0, stall_timeout=2.0)
        mirror_metrics = MirrorMetrics(registry)
        rollout = Rollout("me", router, session, content, options, RolloutMetrics(registry),
                          mirror_metrics)
        mirror = PeerMirror(router, session, options=options, metrics=mirror_metrics,
                            rollout=rollout)
        try:
            yield Owner(mirror, rollout, registry)
        finally:
            mirror.close()
            rollout.close()


async def read(mirror: PeerMirror, registry: str, digest: Digest) -> bytes | Miss:
    content = await mirror.open_blob(registry, REPO, digest, None, True)
    if isinstance(content, Miss):
        return content
    assert content.body is not None
    return b"".join([chunk async for chunk in content.body])


async def test_many_requests_one_upstream_fetch(owner: Owner, upstream: Upstream) -> None:
    layer = max(upstream.image.platforms[0].layers, key=lambda b: b.size)
    data = upstream.image.blob_path(layer.digest).read_bytes()
    bodies = await asyncio.gather(*(read(owner.mirror, upstream.name, layer.digest)
                                    for _ in range(20)))
    assert all(body == data for body in bodies)
    assert owner.fetched("opened") == 1 and owner.fetched("completed") == 1
    assert owner.upstream_bytes == len(data)
    # A peer's plain request gets it from the cache, Range included, with no fetch.
    fallback = owner.mirror.peers_fallback
    assert fallback is not None
    part = await fallback.open_blob(upstream.name, REPO, layer.digest,
                                    parse_range("bytes=100-199"), True)
    assert isinstance(part, FallbackContent) and part.body is not None
    assert b"".join([c async for c in part.body]) == data[100:200]
    assert owner.fetched("opened") == 1 and owner.rollout.serving == 0


async def test_a_manifest_no_peer_holds_comes_from_the_upstream(owner: Owner,
                                                                upstream: Upstream) -> None:
    content = await owner.mirror.open_manifest(upstream.name, REPO, str(upstream.image.digest),
                                               True)
    assert isinstance(content, FallbackContent) and content.body is not None
    body = b"".join([c async for c in content.body])
    assert Digest.of(body) == upstream.image.digest
    assert owner.fetched("manifest") == 1


async def test_an_absent_blob_is_a_miss(owner: Owner, upstream: Upstream) -> None:
    missed = await read(owner.mirror, upstream.name, Digest.of(b"absent"))
    assert missed == Miss(MissReason.UPSTREAM_FAILED)
    assert owner.fetched("not_found") >= 1


@pytest.mark.parametrize("owner", [("down.test", refused_url())], indirect=True)
async def test_an_upstream_that_is_down_is_a_quick_miss(owner: Owner) -> None:
    async with asyncio.timeout(10):
        missed = await read(owner.mirror, "down.test", Digest.of(b"x"))
    assert missed == Miss(MissReason.UPSTREAM_FAILED)
    assert owner.fetched("failed") >= 1
    assert owner.upstream_bytes == 0
