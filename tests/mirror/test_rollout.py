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

from meshmirror.mirror import rollout as rollout_module
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
from tests.support.scripted_http import Reply, Request, Responder, ScriptedHTTPServer, refused_url
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


@pytest.fixture
async def striped(owner: Owner) -> Owner:
    """The owner with stripes of 1 MiB, so the 3 MiB layer is cut into 3 (fan-out 8)."""
    owner.rollout.min_stripe = 1 * MiB
    return owner


async def test_a_large_blob_comes_as_stripes_assembled_and_verified_whole(
        striped: Owner, upstream: Upstream) -> None:
    layer = max(upstream.image.platforms[0].layers, key=lambda b: b.size)
    data = upstream.image.blob_path(layer.digest).read_bytes()
    bodies = await asyncio.gather(*(read(striped.mirror, upstream.name, layer.digest)
                                    for _ in range(5)))
    assert all(body == data for body in bodies)
    # No peer: this node is every stripe's root, one ranged upstream fetch per stripe.
    assert striped.fetched("opened") == 3 and striped.fetched("completed") == 3
    assert striped.upstream_bytes == len(data)


def _range_blind(data: bytes, digest: Digest, *, from_zero: bool) -> Responder:
    """An upstream that ignores a ``Range`` (a 200 with the whole blob); with
    ``from_zero`` it honours ranges from byte 0 only (the probe), so the node stripes
    and then learns."""

    def respond(request: Request) -> Reply:
        if request.path == "/v2/":
            return Reply(200, body=b"{}")
        if request.path != f"/v2/{REPO}/blobs/{digest}":
            return Reply(404)
        wanted = request.headers.get("range", "")
        if from_zero and wanted.startswith("bytes=0-"):
            last = min(int(wanted.removeprefix("bytes=0-") or len(data) - 1), len(data) - 1)
            return Reply(206, (("Content-Range", f"bytes 0-{last}/{len(data)}"),),
                         data[:last + 1])
        return Reply(200, body=data)

    return respond


def _ranged(data: bytes, digest: Digest) -> Responder:
    """An upstream that honours every ``Range`` (a 206 with just those bytes)."""

    def respond(request: Request) -> Reply:
        if request.path == "/v2/":
            return Reply(200, body=b"{}")
        if request.path != f"/v2/{REPO}/blobs/{digest}":
            return Reply(404)
        first, _, last = request.headers.get("range", "bytes=0-").removeprefix(
            "bytes=").partition("-")
        end = min(int(last) + 1 if last else len(data), len(data))
        return Reply(206, (("Content-Range", f"bytes {first}-{end - 1}/{len(data)}"),),
                     data[int(first):end])

    return respond


async def _read_once(tmp_path: Path, server: ScriptedHTTPServer, data: bytes) -> Rollout:
    """One node with stripes of 1 MiB reads ``data`` (its own tree's root for every
    stripe) from ``server``; its rollout, closed."""
    name = server.url.removeprefix("http://")
    registry = CollectorRegistry()
    router = InMemoryRouter(registry=registry, seed=1)
    options = MirrorConfig(upstream_cache_dir=tmp_path)
    async with aiohttp.ClientSession() as session, \
            UpstreamClient(UpstreamEndpoints(overrides={name: server.url})) as client:
        content = UpstreamContent(client, first_byte_timeout=2.0, stall_timeout=2.0)
        metrics = MirrorMetrics(registry)
        rollout = Rollout("me", router, session, content, options,
                          RolloutMetrics(registry), metrics)
        rollout.min_stripe = 1 * MiB
        mirror = PeerMirror(router, session, options=options, metrics=metrics,
                            rollout=rollout)
        try:
            mirror.access.learned(name, REPO, True)
            assert await read(mirror, name, Digest.of(data)) == data
        finally:
            mirror.close()
            rollout.close()
    return rollout


async def test_stripe_0_is_a_bounded_probe_then_the_rest_each_byte_asked_once(
        tmp_path: Path) -> None:
    data = bytes(range(256)) * (14 * 1024)  # 3.5 MiB: 3 stripes, stripe 0 past the probe
    with ScriptedHTTPServer(_ranged(data, Digest.of(data))) as server:
        await _read_once(tmp_path, server, data)
        ranges = [r.headers.get("range", "") for r in server.requests if "/blobs/" in r.path]
    step = len(data) // 3
    assert ranges[0] == f"bytes=0-{MiB - 1}"  # the probe: never past any stripe 0's end
    assert sorted(ranges[1:]) == sorted([f"bytes={MiB}-{step - 1}",  # stripe 0's rest
                                         f"bytes={step}-{2 * step - 1}",
                                         f"bytes={2 * step}-{len(data) - 1}"])


@pytest.mark.parametrize("from_zero", [False, True])
async def test_an_upstream_that_ignores_range_gives_the_whole_blob_through_one_tree(
        tmp_path: Path, from_zero: bool) -> None:
    data = bytes(range(256)) * (12 * 1024)  # 3 MiB
    digest = Digest.of(data)
    with ScriptedHTTPServer(_range_blind(data, digest, from_zero=from_zero)) as server:
        name = server.url.removeprefix("http://")
        rollout = await _read_once(tmp_path, server, data)
        # A 200 to the probe: the whole blob from that one answer, never striped. A 200
        # to a stripe's range only: the node falls back to the whole blob once and
        # stripes nothing more from there.
        assert (name in rollout.no_ranges) is from_zero
        ranges = [r.headers.get("range") for r in server.requests if "/blobs/" in r.path]
        assert ranges[0] == f"bytes=0-{MiB - 1}"  # the probe: bounded, whatever the size
        if from_zero:  # the probe, one or two stripes (the other may be cancelled first),
            # then the whole blob: its probe and the rest. A cancelled stripe's request
            # may still reach the server after the whole blob's probe: order aside.
            probe, rest = f"bytes=0-{MiB - 1}", f"bytes={MiB}-"
            later = ranges[1:]
            assert later.count(probe) == 1 and later.count(rest) == 1
            assert later.index(probe) < later.index(rest)
            stripes = [r for r in later if r not in (probe, rest)]
            assert 1 <= len(stripes) <= 2 and len(set(stripes)) == len(stripes)
        else:
            assert len(ranges) == 1


async def test_a_tree_reader_waits_briefly_for_a_slot_and_a_stripe_takes_a_share(
        owner: Owner) -> None:
    rollout = owner.rollout
    assert all(rollout.admit(1.0) for _ in range(rollout.fanout))
    assert not rollout.admit(1.0 / rollout.fanout)  # full, even for a stripe's share
    waiting = asyncio.create_task(rollout.admit_waiting(1.0 / rollout.fanout, 5.0))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    rollout.release(1.0)
    async with asyncio.timeout(5):
        assert await waiting  # a freed slot goes to the waiting reader...
    # ... and the rest of it to fanout - 1 more stripes' readers, then nobody.
    assert all(rollout.admit(1.0 / rollout.fanout) for _ in range(rollout.fanout - 1))
    assert not await rollout.admit_waiting(1.0 / rollout.fanout, 0.05)
    assert rollout.serving == pytest.approx(rollout.fanout)


@pytest.mark.parametrize("min_stripe, stripes", [(16 * MiB, 1), (1 * MiB, 3)])
async def test_the_probe_takes_a_whole_reader_slot_until_the_size_shows_stripes(
        owner: Owner, upstream: Upstream, min_stripe: int, stripes: int) -> None:
    """The bounded probe is a first request: for a blob too small to stripe its reader
    moves the whole blob, so it holds a whole slot, as an open-ended first request did."""
    owner.rollout.min_stripe = min_stripe
    layer = max(upstream.image.platforms[0].layers, key=lambda b: b.size)
    fallback = owner.mirror.peers_fallback
    assert fallback is not None
    token = rollout_module._requester.set("member-2")  # a tree request from member-2
    try:
        part = await fallback.open_blob(upstream.name, REPO, layer.digest,
                                        parse_range(f"bytes=0-{MiB - 1}"), True)
    finally:
        rollout_module._requester.reset(token)
    assert isinstance(part, FallbackContent) and part.body is not None
    assert owner.rollout.serving == pytest.approx(1.0 if stripes == 1
                                                  else 1.0 / owner.rollout.fanout)
    assert len(b"".join([c async for c in part.body])) == MiB
    assert owner.rollout.serving == 0
