"""One fetch per blob per node, against real processes: no amplification, a bounded
cache, and a lying peer whose bytes nobody receives as complete.

Real `meshmirror run` nodes on their own loopback addresses with ``oci:`` stores;
what the holder uploaded is read from its access log.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import pytest

from tests.support.metrics import read_metric
from tests.support.node import RunningNode, blob_requests, holder_and_puller
from tests.support.processes import wait_until

pytestmark = [pytest.mark.real]

MiB = 1024 * 1024
TIMEOUT_S = 90


@contextmanager
def nodes(tmp_path: Path, layers: list[int], *extra: str,
          seed: int = 5) -> Iterator[tuple[RunningNode, RunningNode, list[str]]]:
    """A holder of an image with ``layers`` and an empty node joined to it."""
    with holder_and_puller(tmp_path, "docker.io/library/flight:1", layers, *extra,
                           seed=seed) as (holder, node, image):
        yield holder, node, [str(layer.digest) for layer in image.platforms[0].layers]


def url(node: RunningNode, digest: str) -> str:
    return f"http://{node.address}/v2/library/flight/blobs/{digest}?ns=docker.io"


def wait_routed(node: RunningNode, digest: str) -> None:
    """Until the node's router knows the holder has ``digest`` (a 404 HEAD costs nothing)."""

    async def head() -> bool:
        async with aiohttp.ClientSession() as session, session.head(url(node, digest)) as r:
            return r.status == 200

    wait_until(lambda: asyncio.run(head()), 30, "the node to find the holder's blobs")


def uploaded(holder: RunningNode, digest: str) -> int:
    """Bytes of ``digest`` the holder sent to its peers (access log, all methods)."""
    return sum(int(str(line.get("bytes", 0))) for line in blob_requests(holder, digest))


async def ask(target: str, method: str, headers: dict[str, str] | None = None,
              count: int = 1) -> list[tuple[int, bytes]]:
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector,
                                     auto_decompress=False) as session:

        async def one() -> tuple[int, bytes]:
            async with session.request(method, target, headers=headers) as r:
                return r.status, await r.read()

        return await asyncio.gather(*(one() for _ in range(count)))


def test_heads_and_one_byte_ranges_fetch_the_blob_once(tmp_path: Path) -> None:
    size = 64 * MiB
    with nodes(tmp_path, [size, 1024]) as (holder, node, (layer, small)):
        wait_routed(node, small)
        heads = asyncio.run(ask(url(node, layer), "HEAD", count=20))
        assert {status for status, _ in heads} == {200}
        ranges = asyncio.run(ask(url(node, layer), "GET", {"Range": "bytes=0-0"}, count=20))
        assert {status for status, _ in ranges} == {206}
        assert all(body == ranges[0][1] and len(body) == 1 for _, body in ranges)
        pulled = read_metric(node.metrics, "meshmirror_mirror_peer_bytes_total")
        sent = uploaded(holder, layer)
        print(f"\n20 HEADs + 20 bytes=0-0 of 64 MiB: node pulled {pulled / MiB:.1f} MiB from "
              f"peers, holder sent {sent / MiB:.1f} MiB in {len(blob_requests(holder, layer))}"
              " requests")
        assert sent <= 2 * size and pulled <= 2 * size + 2 * MiB
        assert read_metric(node.metrics, "meshmirror_mirror_cache_bytes") >= size


def test_the_cache_never_exceeds_its_limit(tmp_path: Path) -> None:
    limit = 40 * MiB
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    layers = [12 * MiB] * 6 + [1024]
    with nodes(tmp_path, layers, "--upstream-cache-dir", str(cache_dir),
               "--upstream-cache-limit", str(limit)) as (_holder, node, digests):
        wait_routed(node, digests[-1])
        peak = [0]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                used = sum(path.stat().st_size for path in cache_dir.rglob("*")
                           if path.is_file())
                peak[0] = max(peak[0], used)
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            async def batch() -> list[list[tuple[int, bytes]]]:
                # Three blobs at a time, two requests each: more than the cache holds.
                got = []
                for group in (digests[0:3], digests[3:6], digests[0:3]):
                    got += await asyncio.gather(*(ask(url(node, d), "GET", count=2)
                                                  for d in group))
                return got

            results = asyncio.run(batch())
        finally:
            done.set()
            sampler.join()
        expected = [d for group in (digests[0:3], digests[3:6], digests[0:3]) for d in group]
        for digest, answers in zip(expected, results, strict=True):
            for status, body in answers:
                assert status == 200 and f"sha256:{hashlib.sha256(body).hexdigest()}" == digest
        evictions = read_metric(node.metrics, "meshmirror_mirror_cache_evictions_total")
        print(f"\ncache: peak {peak[0] / MiB:.1f} MiB of {limit / MiB:.0f}; "
              f"{evictions:.0f} evictions")
        assert peak[0] <= limit
        assert read_metric(node.metrics, "meshmirror_mirror_cache_bytes") <= limit
        assert evictions >= 3


def test_a_lying_peer_gets_no_reader_unverified_bytes(tmp_path: Path) -> None:
    size = 8 * MiB + 5
    with nodes(tmp_path, [size, 1024]) as (holder, node, (layer, small)):
        blob = tmp_path / "seeded" / "blobs" / "sha256" / layer.removeprefix("sha256:")
        data = bytearray(blob.read_bytes())
        data[size // 2] ^= 0xFF  # same size, one byte wrong: only the digest can tell
        blob.write_bytes(bytes(data))
        wait_routed(node, small)
        cached = read_metric(node.metrics, "meshmirror_mirror_cache_bytes")  # the small blob's
        answers = asyncio.run(ask(url(node, layer), "GET", count=10))
        # Every request waited on the one fetch; none got the corrupt body as complete.
        assert {status for status, _ in answers} == {404}
        assert read_metric(node.metrics, "meshmirror_mirror_peer_failures_total",
                           reason="digest_mismatch") >= 1
        assert read_metric(node.metrics, "meshmirror_mirror_flights_total", result="failed") >= 1
        assert read_metric(node.metrics, "meshmirror_mirror_cache_bytes") == cached, "nothing kept"
        asked = len(blob_requests(holder, layer))
        assert asked <= 2, "ten requests shared the failing fetch"


def test_a_request_that_leaves_stops_its_fetch(tmp_path: Path) -> None:
    """The client leaves while the node is still fetching: nobody else wants the blob,
    so the peer transfer stops short and nothing is kept. The blob is large and the
    wait for the request to attach polls fast, so that a quick hop (the fetch runs at
    about sha256's pace) is still moving when the client leaves."""
    size = 256 * MiB
    with nodes(tmp_path, [size, 1024]) as (holder, node, (layer, small)):
        wait_routed(node, small)
        cached = read_metric(node.metrics, "meshmirror_mirror_cache_bytes")

        async def leave_early() -> None:
            timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                request = asyncio.create_task(session.get(url(node, layer)))

                def attached() -> bool:
                    return read_metric(node.metrics, "meshmirror_mirror_flight_readers") >= 1

                await asyncio.to_thread(wait_until, attached, 30, "the request to attach",
                                        0.005)
                request.cancel()  # the client goes: its connection closes
                with contextlib.suppress(asyncio.CancelledError):
                    await request

        asyncio.run(leave_early())
        wait_until(lambda: len(blob_requests(holder, layer)) == 1, 30,
                   "the holder to log the abandoned transfer")
        (line,) = blob_requests(holder, layer)
        print(f"\nabandoned fetch: holder sent {int(str(line['bytes'])) / MiB:.1f} MiB of "
              f"{size / MiB:.0f}")
        assert line.get("aborted") is True and int(str(line["bytes"])) < size
        wait_until(lambda: read_metric(node.metrics, "meshmirror_mirror_flight_readers") == 0, 10,
                   "the flight to land")
        assert read_metric(node.metrics, "meshmirror_mirror_flights_total", result="failed") == 1
        assert read_metric(node.metrics, "meshmirror_mirror_cache_bytes") == cached, "nothing kept"
