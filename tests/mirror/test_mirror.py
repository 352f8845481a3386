"""PeerMirror against real HTTP peers on loopback: hits, misses, faults, verification."""

from __future__ import annotations

import asyncio
import gc
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Protocol, TypedDict, Unpack

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from meshmirror.mirror.cache import CacheEntry
from meshmirror.mirror.errors import VerificationError
from meshmirror.mirror.fetch import StreamBody
from meshmirror.mirror.metrics import MirrorMetrics
from meshmirror.mirror.options import MirrorConfig, TagResolution
from meshmirror.mirror.peer_mirror import PeerMirror
from meshmirror.oci.digest import Digest
from meshmirror.oci.mediatypes import OCI_MANIFEST
from meshmirror.registry.fallback import FallbackContent, Miss, MissReason
from meshmirror.registry.ranges import RangeSpec
from meshmirror.routing.router import InMemoryRouter
from tests.mirror.peers import Behaviour, FakePeer

SMALL = os.urandom(300_000)
LARGE = os.urandom(3 * 1024 * 1024 + 17)
SMALL_D = str(Digest.of(SMALL))
LARGE_D = str(Digest.of(LARGE))
MANIFEST = b'{"schemaVersion":2,"mediaType":"%s","layers":[]}' % OCI_MANIFEST.encode()
MANIFEST_D = str(Digest.of(MANIFEST))


class Faults(TypedDict, total=False):
    """The scripted faults of a Behaviour a test may ask a peer for."""

    corrupt: bool
    break_after: int | None
    stall_after: int | None
    header_delay: float
    not_found: bool


class MakePeer(Protocol):
    def __call__(self, name: str, **faults: Unpack[Faults]) -> Awaitable[FakePeer]: ...


@pytest.fixture
async def make_peer() -> AsyncIterator[MakePeer]:
    started: list[FakePeer] = []

    async def make(name: str, **faults: Unpack[Faults]) -> FakePeer:
        behaviour = Behaviour(
            blobs={SMALL_D: SMALL, LARGE_D: LARGE},
            manifests={"1.0": (OCI_MANIFEST, MANIFEST), MANIFEST_D: (OCI_MANIFEST, MANIFEST)},
            **faults,
        )
        peer = await FakePeer(name, behaviour).start()
        started.append(peer)
        return peer

    yield make
    for peer in started:
        await peer.stop()


class Settings(TypedDict, total=False):
    """Keyword arguments of ``MirrorConfig``, as ``mirror_for`` passes them on."""

    connect_timeout: float
    first_byte_timeout: float
    peers_tried: int
    verify_before_send_limit: int
    spool_dir: Path | None
    spool_limit: int
    upstream_cache_limit: int
    chunk_size: int
    stall_timeout: float
    body_threads: int
    read_ahead: int
    resolve_tags: TagResolution
    registry_filters: tuple[re.Pattern[str], ...]
    mirrored_registries: frozenset[str]


def mirror_for(
    session: aiohttp.ClientSession, peers: list[FakePeer], **options: Unpack[Settings]
) -> tuple[PeerMirror, InMemoryRouter, CollectorRegistry]:
    registry = CollectorRegistry()
    router = InMemoryRouter(registry=registry, seed=1)
    for peer in peers:
        router.set_keys(peer.peer, [SMALL_D, LARGE_D, MANIFEST_D, "docker.io/library/x:1.0"])
    settings: Settings = {
        "first_byte_timeout": 0.5,
        "connect_timeout": 0.4,  # hedges after 0.2 s
        "verify_before_send_limit": 1 << 20,
        "chunk_size": 64 * 1024,
    }
    settings.update(options)
    opts = MirrorConfig(**settings)
    return (
        PeerMirror(router, session, options=opts, metrics=MirrorMetrics(registry)),
        router,
        registry,
    )


async def read(body: AsyncIterator[bytes] | None) -> bytes:
    assert body is not None
    return b"".join([chunk async for chunk in body])


def metric(metrics: CollectorRegistry, name: str, **labels: str) -> float:
    return metrics.get_sample_value(name, labels) or 0.0


async def test_small_blob_from_a_peer_is_verified_and_marked(
    make_peer: MakePeer, session: aiohttp.ClientSession
) -> None:
    peer = await make_peer("a")
    mirror, _, registry = mirror_for(session, [peer])
    content = await mirror.open_blob("docker.io", "library/x", Digest.parse(SMALL_D), None, True)
    assert isinstance(content, FallbackContent) and content.size == len(SMALL)
    assert await read(content.body) == SMALL
    assert peer.behaviour.requests[0][2] == "1", "peer requests must carry the peer marker"
    assert (
        metric(
            registry,
            "meshmirror_mirror_outcomes_total",
            registry="docker.io",
            kind="blob",
            result="hit",
        )
        == 1
    )


async def test_no_candidate_is_a_fast_miss(session: aiohttp.ClientSession) -> None:
    mirror, _, registry = mirror_for(session, [])
    started = time.monotonic()
    miss = await mirror.open_blob("docker.io", "r", Digest.parse(SMALL_D), None, True)
    assert miss == Miss(MissReason.NO_PEER)
    assert time.monotonic() - started < 0.5
    assert (
        metric(
            registry,
            "meshmirror_mirror_outcomes_total",
            registry="docker.io",
            kind="blob",
            result="miss",
        )
        == 1
    )


async def test_false_positive_moves_on_and_is_counted(
    make_peer: MakePeer, session: aiohttp.ClientSession
) -> None:
    liar = await make_peer("fp", not_found=True)
    good = await make_peer("good")
    mirror, router, registry = mirror_for(session, [liar, good])
    router.report("good", ok=True, latency_s=5.0)  # rank the 404 peer first
    content = await mirror.open_blob("docker.io", "r", Digest.parse(SMALL_D), None, True)
    assert isinstance(content, FallbackContent) and await read(content.body) == SMALL
    assert metric(registry, "meshmirror_mirror_peer_false_positives_total") == 1


async def test_corrupt_small_blob_is_never_passed_on(
    make_peer: MakePeer, session: aiohttp.ClientSession
) -> None:
    bad = await make_peer("bad", corrupt=True)
    good = await make_peer("good")
    mirror, router, _ = mirror_for(session, [bad, good])
    router.report("good", ok=True, latency_s=5.0)
    content = await mirror.open_blob("docker.io", "r", Digest.parse(SMALL_D), None, True)
    assert isinstance(content, FallbackContent) and await read(content.body) == SMALL
    assert next(p.name for p in router.candidates(SMALL_D, 2)) == "good", "liar is penalised"


async def test_large_blob_resumes_on_next_peer_after_a_break(
    make_peer: MakePeer, session: aiohttp.ClientSession
) -> None:
    broken = await make_peer("broken", break_after=1024 * 1024 + 5)
    good = await make_peer("good")
    mirror, router, _ = mirror_for(session, [broken, good])
    router.report("good", ok=True, latency_s=5.0)
    content = await mirror.open_blob("docker.io", "r", Digest.parse(LARGE_D), None, True)
    assert isinstance(content, FallbackContent) and content.size == len(LARGE)
    assert await read(content.body) == LARGE
    resumed = [r for r in good.behaviour.requests if r[1] is not None]
    assert resumed and re.fullmatch(r"bytes=\d+-", resumed[0][1] or "")
    assert int((resumed[0][1] or "=0-")[6:-1]) > 0


async def test_streamed_corrupt_blob_aborts_before_the_last_chunk(
    make_peer: MakePeer, session: aiohttp.ClientSession
) -> None:
    bad = await make_peer("bad", corrupt=True)
    mirror, _, registry = mirror_for(session, [bad], spool_limit=0)  # no spool: streamed
    content = await mirror.open_blob("docker.io", "r", Digest.parse(LARGE_D), None, True)
    assert isinstance(content, FallbackContent) and content.body is not None
    received = bytearray()
    with pytest.raises(VerificationError):
        async for chunk in content.body:
            received += chunk
    assert len(received) < len(LARGE), "a blob that failed verification must arrive short"
    assert metric(registry, "meshmirror_mirror_blob_bodies_total", mode="stream") == 1


async def test_client_range_is_served_after_hashing_the_prefix(
    make_peer: MakePeer, session: aiohttp.ClientSession
) -> None:
    peer = await make_peer("a")
    mirror, _, _ = mirror_for(session, [peer])
    spec = RangeSpec(first=1_000_000)
    content = await mirror.open_blob("docker.io", "r", Digest.parse(LARGE_D), spec, True)
    assert isinstance(content, FallbackContent)
    assert await read(content.body) == LARGE[1_000_000:]


async def test_slow_peer_is_hedged(make_peer: MakePeer, session: aiohttp.ClientSession) -> None:
    slow = await make_peer("slow", header_delay=2.0)
    fast = await make_peer("fast")
    mirror, router, _ = mirror_for(session, [slow, fast], first_byte_timeout=3.0,
                                   connect_timeout=0.1)
    router.report("fast", ok=True, latency_s=5.0)
    started = time.monotonic()
    content = await mirror.open_blob("docker.io", "r", Digest.parse(SMALL_D), None, True)
    assert isinstance(content, FallbackContent) and await read(content.body) == SMALL
    assert time.monotonic() - started < 1.5, "the hedged request must win over the slow peer"


async def test_unresponsive_peers_are_bounded(
    make_peer: MakePeer, session: aiohttp.ClientSession
) -> None:
    slow = [await make_peer(f"s{i}", header_delay=5.0) for i in range(3)]
    mirror, _, _ = mirror_for(session, slow, first_byte_timeout=0.1, connect_timeout=0.06)
    started = time.monotonic()
    miss = await mirror.open_blob("docker.io", "r", Digest.parse(SMALL_D), None, True)
    assert miss == Miss(MissReason.PEERS_FAILED)
    assert time.monotonic() - started < 1.0


async def test_manifest_by_tag_is_checked_against_its_digest(
    make_peer: MakePeer, session: aiohttp.ClientSession
) -> None:
    bad = await make_peer("bad", corrupt=True)
    good = await make_peer("good")
    mirror, router, _ = mirror_for(session, [bad, good])
    router.report("good", ok=True, latency_s=5.0)
    content = await mirror.open_manifest("docker.io", "library/x", "1.0", True)
    assert isinstance(content, FallbackContent) and str(content.digest) == MANIFEST_D
    assert content.media_type == OCI_MANIFEST
    assert await read(content.body) == MANIFEST


async def test_tags_not_resolved_when_disabled_or_filtered(
    make_peer: MakePeer, session: aiohttp.ClientSession
) -> None:
    peer = await make_peer("a")
    mirror, _, _ = mirror_for(session, [peer], resolve_tags=TagResolution.OFF)
    assert isinstance(await mirror.open_manifest("docker.io", "library/x", "1.0", True), Miss)
    mirror, _, _ = mirror_for(session, [peer], registry_filters=(re.compile(r":1\.0$"),))
    assert isinstance(await mirror.open_manifest("docker.io", "library/x", "1.0", True), Miss)
    assert not peer.behaviour.requests, "filtered requests must not reach a peer"
    by_digest = await mirror.open_manifest("docker.io", "library/x", MANIFEST_D, True)
    assert isinstance(by_digest, FallbackContent)


async def test_unmirrored_registry_is_a_miss(
    make_peer: MakePeer, session: aiohttp.ClientSession
) -> None:
    peer = await make_peer("a")
    mirror, _, _ = mirror_for(session, [peer], mirrored_registries=frozenset({"ghcr.io"}))
    miss = await mirror.open_blob("docker.io", "r", Digest.parse(SMALL_D), None, True)
    assert miss == Miss(MissReason.NOT_MIRRORED)
    assert not peer.behaviour.requests


def idle(mirror: PeerMirror) -> Callable[[], bool]:
    """Whether no body of ``mirror``'s is being read on body threads."""
    return lambda: mirror.client.pumps_running == 0


async def wait_for(condition: Callable[[], bool], within: float) -> bool:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


@pytest.mark.parametrize("threads", [64, 0], ids=["body-threads", "event-loop"])
@pytest.mark.parametrize("spool_limit", [1 << 30, 0], ids=["spooled", "streamed"])
async def test_large_blob_resumes_with_or_without_body_threads(
    make_peer: MakePeer, session: aiohttp.ClientSession, threads: int, spool_limit: int
) -> None:
    broken = await make_peer("broken", break_after=1024 * 1024 + 5)
    good = await make_peer("good")
    mirror, router, _ = mirror_for(
        session, [broken, good], body_threads=threads, spool_limit=spool_limit
    )
    router.report("good", ok=True, latency_s=5.0)
    for _ in range(2):  # the second one starts on the good peer and never breaks
        content = await mirror.open_blob("docker.io", "r", Digest.parse(LARGE_D), None, True)
        assert isinstance(content, FallbackContent)
        assert await read(content.body) == LARGE
    assert bool(mirror.client.pumps_started) == bool(threads), "read on body threads"
    assert await wait_for(idle(mirror), 2.0), "every body thread has finished"
    mirror.close()


async def test_stalled_peer_is_abandoned_and_the_next_resumes(
    make_peer: MakePeer, session: aiohttp.ClientSession
) -> None:
    stalled = await make_peer("stalled", stall_after=1024 * 1024 + 3)
    good = await make_peer("good")
    mirror, router, registry = mirror_for(session, [stalled, good], stall_timeout=0.3)
    router.report("good", ok=True, latency_s=5.0)
    started = time.monotonic()
    content = await mirror.open_blob("docker.io", "r", Digest.parse(LARGE_D), None, True)
    assert isinstance(content, FallbackContent) and await read(content.body) == LARGE
    assert time.monotonic() - started < 3.0
    assert metric(registry, "meshmirror_mirror_peer_failures_total", reason="stalled") == 1
    resumed = [r for r in good.behaviour.requests if r[1] is not None]
    assert resumed and int((resumed[0][1] or "=0-")[6:-1]) > 0
    assert await wait_for(stalled.behaviour.client_gone.is_set, 2.0), "stalled socket closed"


async def test_client_going_away_stops_the_body_thread_and_closes_the_peer(
    make_peer: MakePeer, session: aiohttp.ClientSession
) -> None:
    threads_before = set(threading.enumerate())
    stalled = await make_peer("stalled", stall_after=1024 * 1024 + 3)
    # A long stall bound: only the cancellation may end the blocked read. Streamed
    # (no spool), so the client has a body to walk away from mid-stream.
    mirror, _, _ = mirror_for(session, [stalled], stall_timeout=30.0, spool_limit=0)
    content = await mirror.open_blob("docker.io", "r", Digest.parse(LARGE_D), None, True)
    assert isinstance(content, FallbackContent) and content.body is not None
    body = content.body
    assert isinstance(body, StreamBody), "a streamed body can be closed early"
    assert len(await anext(body)) > 0
    await wait_for(lambda: mirror.client.pumps_running > 0, 1.0)
    started = time.monotonic()
    await body.aclose()
    assert await wait_for(idle(mirror), 2.0), "body threads must return"
    assert await wait_for(stalled.behaviour.client_gone.is_set, 2.0), "peer socket closed"
    assert time.monotonic() - started < 2.0
    threads = [t for t in threading.enumerate()
               if t not in threads_before and t.name.startswith("meshmirror-peer-body")]
    assert threads, "the body was read on the mirror's named body threads"
    mirror.close()
    assert await wait_for(lambda: not any(t.is_alive() for t in threads), 2.0)


# -- large blobs held in a spool file until verified ------------------------------


async def test_large_corrupt_blob_is_never_passed_on(
    make_peer: MakePeer, session: aiohttp.ClientSession
) -> None:
    """The whole point of the spool: the client sees only the good peer's bytes."""
    bad = await make_peer("bad", corrupt=True)
    good = await make_peer("good")
    mirror, router, registry = mirror_for(session, [bad, good])
    router.report("good", ok=True, latency_s=5.0)  # rank the liar first
    content = await mirror.open_blob("docker.io", "r", Digest.parse(LARGE_D), None, True)
    assert isinstance(content, FallbackContent)
    assert await read(content.body) == LARGE
    assert [r[1] for r in bad.behaviour.requests] == [None], "the liar was asked once"
    assert next(p.name for p in router.candidates(LARGE_D, 2)) == "good", "liar is penalised"
    assert metric(registry, "meshmirror_mirror_peer_failures_total", reason="digest_mismatch") == 1
    assert metric(registry, "meshmirror_mirror_blob_bodies_total", mode="spool") == 1
    assert metric(registry, "meshmirror_mirror_spool_bytes") == 0, "spool released"
    mirror.close()


async def test_large_blob_only_a_liar_has_is_a_miss_with_nothing_sent(
    make_peer: MakePeer, session: aiohttp.ClientSession
) -> None:
    bad = await make_peer("bad", corrupt=True)
    mirror, _, registry = mirror_for(session, [bad])
    miss = await mirror.open_blob("docker.io", "r", Digest.parse(LARGE_D), None, True)
    assert miss == Miss(MissReason.PEERS_FAILED)
    assert metric(registry, "meshmirror_mirror_outcomes_total",
                  registry="docker.io", kind="blob", result="error") == 1
    assert metric(registry, "meshmirror_mirror_spool_bytes") == 0
    mirror.close()


async def test_client_range_is_served_from_the_spool(
    make_peer: MakePeer, session: aiohttp.ClientSession
) -> None:
    peer = await make_peer("a")
    mirror, _, registry = mirror_for(session, [peer])
    spec = RangeSpec(first=1_000_000, last=2_000_000)
    content = await mirror.open_blob("docker.io", "r", Digest.parse(LARGE_D), spec, True)
    assert isinstance(content, FallbackContent) and content.size == len(LARGE)
    assert metric(registry, "meshmirror_mirror_spool_bytes") == len(LARGE), "held while unsent"
    assert await read(content.body) == LARGE[1_000_000:2_000_001]
    assert metric(registry, "meshmirror_mirror_spool_bytes") == 0
    mirror.close()


async def test_a_blob_beyond_the_spool_limit_is_streamed(
    make_peer: MakePeer, session: aiohttp.ClientSession
) -> None:
    peer = await make_peer("a")
    mirror, _, registry = mirror_for(session, [peer], spool_limit=len(LARGE) - 1)
    content = await mirror.open_blob("docker.io", "r", Digest.parse(LARGE_D), None, True)
    assert isinstance(content, FallbackContent) and await read(content.body) == LARGE
    assert metric(registry, "meshmirror_mirror_blob_bodies_total", mode="stream") == 1
    assert metric(registry, "meshmirror_mirror_flights_total", result="refused") == 1
    assert metric(registry, "meshmirror_mirror_cache_bytes") == 0
    mirror.close()


async def test_a_verified_blob_is_served_again_from_the_cache(
    make_peer: MakePeer, session: aiohttp.ClientSession
) -> None:
    peer = await make_peer("a")
    mirror, _, registry = mirror_for(session, [peer])
    for _ in range(3):
        content = await mirror.open_blob("docker.io", "r", Digest.parse(LARGE_D), None, True)
        assert isinstance(content, FallbackContent) and await read(content.body) == LARGE
    assert len(peer.behaviour.requests) == 1, "the peer was asked once"
    assert metric(registry, "meshmirror_mirror_blob_bodies_total", mode="spool") == 3
    assert metric(registry, "meshmirror_mirror_cache_bytes") == len(LARGE)
    assert metric(registry, "meshmirror_mirror_spool_bytes") == 0, "nothing pinned"
    mirror.close()


async def test_cache_limit_evicts_the_least_recently_used_blob(
    make_peer: MakePeer, session: aiohttp.ClientSession
) -> None:
    peer = await make_peer("a")
    mirror, _, registry = mirror_for(session, [peer], upstream_cache_limit=len(LARGE) + 10)
    for digest in (LARGE_D, SMALL_D, LARGE_D):
        content = await mirror.open_blob("docker.io", "r", Digest.parse(digest), None, True)
        assert isinstance(content, FallbackContent)
        await read(content.body)
        assert metric(registry, "meshmirror_mirror_cache_bytes") <= len(LARGE) + 10
    assert metric(registry, "meshmirror_mirror_cache_evictions_total") == 2
    assert len(peer.behaviour.requests) == 3
    mirror.close()


async def test_unsent_spool_is_released_when_dropped(
    make_peer: MakePeer, session: aiohttp.ClientSession
) -> None:
    """A client that leaves before its first byte: the body is never iterated."""
    peer = await make_peer("a")
    mirror, _, registry = mirror_for(session, [peer])
    content = await mirror.open_blob("docker.io", "r", Digest.parse(LARGE_D), None, True)
    assert isinstance(content, FallbackContent)
    assert metric(registry, "meshmirror_mirror_spool_bytes") == len(LARGE)
    del content
    assert await wait_for(idle(mirror), 2.0), "body threads must return"
    gc.collect()
    assert metric(registry, "meshmirror_mirror_spool_bytes") == 0
    mirror.close()


@pytest.mark.parametrize("threads", [64, 0], ids=["body-threads", "event-loop"])
async def test_spool_write_failure_is_a_miss_not_a_peer_fault(
    make_peer: MakePeer, session: aiohttp.ClientSession, threads: int,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(self: CacheEntry, chunk: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(CacheEntry, "write", disk_full)
    peer = await make_peer("a")
    other = await make_peer("b")
    mirror, _, registry = mirror_for(session, [peer, other], body_threads=threads)
    miss = await mirror.open_blob("docker.io", "r", Digest.parse(LARGE_D), None, True)
    assert isinstance(miss, Miss) and miss.reason is MissReason.BUSY
    assert len(peer.behaviour.requests) + len(other.behaviour.requests) == 1, "no peer blamed"
    assert metric(registry, "meshmirror_mirror_spool_bytes") == 0
    assert await wait_for(idle(mirror), 2.0), "body threads must return"
    mirror.close()


async def test_unwritable_spool_directory_falls_back_to_streaming(
    make_peer: MakePeer, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    peer = await make_peer("a")
    mirror, _, registry = mirror_for(session, [peer], spool_dir=tmp_path / "missing")
    content = await mirror.open_blob("docker.io", "r", Digest.parse(LARGE_D), None, True)
    assert isinstance(content, FallbackContent) and await read(content.body) == LARGE
    assert metric(registry, "meshmirror_mirror_blob_bodies_total", mode="stream") == 1
    mirror.close()
