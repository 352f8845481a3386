"""The pump's paths for kept bodies (a hop filling its cache), over real sockets.

A body kept in a cache entry is spliced from the socket into the entry's file and
hashed from there; any other kept body is received into buffers the pump reuses.
These tests hold both to the same rules as a fresh chunk per read: every byte
lands once and in order, a peer that closes early, stalls, sends more than it
announced or drips is found out, and the memory budget bounds what the pump holds
without two pumps waiting on each other.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshmirror.mirror.body import BodyItem, BodyPump, FileKeep
from meshmirror.mirror.budget import MemoryBudget
from meshmirror.mirror.cache import BlobCache, CacheEntry
from meshmirror.mirror.errors import FailureReason, PeerFailure
from tests.support.ports import loopback_host

CHUNK = 256 * 1024
DATA = os.urandom(5 * CHUNK + 1234)


class RawPeer:
    """A loopback TCP server that sends one scripted body to the first client, then
    closes: ``payload``, then ``drip`` one byte every ``drip`` seconds until the
    client leaves (bounded at ten seconds)."""

    def __init__(self, payload: bytes, drip: float | None = None) -> None:
        self._payload = payload
        self._drip = drip
        self._listener = socket.create_server((loopback_host(), 0))
        self._listener.settimeout(10)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def connect(self) -> socket.socket:
        return socket.create_connection(self._listener.getsockname()[:2], timeout=10)

    def _serve(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return
        with conn:
            try:
                conn.sendall(self._payload)
                deadline = time.monotonic() + 10
                while self._drip is not None and time.monotonic() < deadline:
                    conn.sendall(b"x")
                    time.sleep(self._drip)
            except OSError:
                pass  # the client left

    def close(self) -> None:
        self._listener.close()
        self._thread.join(timeout=15)
        assert not self._thread.is_alive()


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[BlobCache]:
    blobs = BlobCache(tmp_path, 1 << 30, 1 << 30)
    yield blobs
    blobs.close()


@pytest.fixture
def threads() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    pool = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="test-body")
    yield pool
    pool.shutdown(wait=True)


@pytest.fixture(params=["spliced", "received"])
def spliced(request: pytest.FixtureRequest) -> bool:
    """Each test runs on both paths: spliced into the entry's file, and received."""
    return bool(request.param == "spliced")


async def pump_into(entry: CacheEntry, peer: RawPeer, length: int, budget: MemoryBudget,
                    pool: concurrent.futures.Executor, *, spliced: bool, min_rate: float = 1.0,
                    stall: float = 5.0, prefix: bytes = b"", into: FileKeep | None = None
                    ) -> tuple[BodyItem, str, BodyPump]:
    """Run one kept pump as `PeerClient.pump` does: its last item, the sha256 of what
    it consumed, and the pump. ``prefix``: body bytes already read (as aiohttp's);
    ``into``: what a spliced pump splices into instead of ``entry`` itself."""
    loop = asyncio.get_running_loop()
    sock = peer.connect()
    hasher = hashlib.sha256()
    pump = BodyPump(loop, sock, prefix, length, chunk_size=CHUNK, stall_timeout=stall,
                    min_rate=min_rate, budget=budget, consume=hasher.update,
                    keep=entry.write, into=(into or entry) if spliced else None,
                    read_ahead=2)
    hashing = loop.run_in_executor(pool, pump.hash)
    reading = loop.run_in_executor(pool, pump.read)
    counted = 0
    try:
        async with asyncio.timeout(20):
            while True:
                item = await pump.items.get()
                if not isinstance(item, int):
                    break
                counted += item
    finally:
        pump.stop()
        pump.ended("loop")
        await asyncio.wait_for(asyncio.gather(hashing, reading), 10)
        sock.close()
    assert counted == entry.written, "the loop was told of every byte kept"
    return item, hasher.hexdigest(), pump


async def pump_from(cache: BlobCache, peer: RawPeer, budget: MemoryBudget,
                    pool: concurrent.futures.Executor, *, spliced: bool, prefix: bytes = b"",
                    min_rate: float = 1.0, stall: float = 5.0
                    ) -> tuple[BodyItem, str, BodyPump, CacheEntry]:
    """`pump_into` a fresh cache entry for `DATA` from ``peer``, closed afterwards."""
    entry = cache.reserve("k", len(DATA))
    assert entry is not None
    try:
        end, digest, pump = await pump_into(entry, peer, len(DATA), budget, pool,
                                            spliced=spliced, prefix=prefix, min_rate=min_rate,
                                            stall=stall)
    finally:
        peer.close()
    return end, digest, pump, entry


def held(entry: CacheEntry) -> bytes:
    return held_at(entry.path)


def held_at(path: Path) -> bytes:
    return path.read_bytes()


async def test_a_kept_body_lands_whole_through_two_reused_buffers(
    cache: BlobCache, threads: concurrent.futures.Executor
) -> None:
    budget = MemoryBudget(64 * CHUNK)
    end, digest, pump, entry = await pump_from(cache, RawPeer(DATA), budget, threads,
                                               spliced=False)
    assert end is None
    assert held(entry) == DATA and digest == hashlib.sha256(DATA).hexdigest()
    assert 1 <= pump.buffers_made <= 2, "buffers are reused, one per read-ahead slot at most"
    assert budget.used == 0, "the buffers' memory went back when the pump ended"


@pytest.mark.parametrize("prefix", [0, 1000])
async def test_a_body_kept_in_a_file_is_spliced_there_without_buffers(
    cache: BlobCache, threads: concurrent.futures.Executor, prefix: int
) -> None:
    """What aiohttp had buffered goes first, the rest straight from the socket."""
    budget = MemoryBudget(64 * CHUNK)
    end, digest, pump, entry = await pump_from(
        cache, RawPeer(DATA[prefix:]), budget, threads, spliced=True, prefix=DATA[:prefix])
    assert end is None
    assert held(entry) == DATA and digest == hashlib.sha256(DATA).hexdigest()
    assert pump.buffers_made == 0, "no byte was received into a buffer"
    assert budget.peak <= CHUNK + prefix, "one chunk for the pipe and the hashing"
    assert budget.used == 0


async def test_a_peer_that_closes_early_is_broken_and_only_its_bytes_are_kept(
    cache: BlobCache, threads: concurrent.futures.Executor, spliced: bool
) -> None:
    sent = DATA[: 3 * CHUNK + 77]
    budget = MemoryBudget(64 * CHUNK)
    end, _, _, entry = await pump_from(cache, RawPeer(sent), budget, threads,
                                       spliced=spliced)
    assert isinstance(end, PeerFailure) and end.reason is FailureReason.BROKEN
    assert held(entry) == sent, "what arrived is kept for a resume, nothing else"
    assert budget.used == 0


async def test_bytes_past_the_announced_length_are_never_kept(
    cache: BlobCache, threads: concurrent.futures.Executor, spliced: bool
) -> None:
    budget = MemoryBudget(64 * CHUNK)
    liar = RawPeer(DATA + b"trailing bytes a lying peer sent past its Content-Length")
    end, digest, _, entry = await pump_from(cache, liar, budget, threads, spliced=spliced)
    assert end is None
    assert held(entry) == DATA and digest == hashlib.sha256(DATA).hexdigest()


async def test_a_dripping_peer_fails_the_rate_check_on_the_kept_path(
    cache: BlobCache, threads: concurrent.futures.Executor, spliced: bool
) -> None:
    budget = MemoryBudget(64 * CHUNK)
    end, _, _, _ = await pump_from(cache, RawPeer(DATA[:CHUNK + 5], drip=0.02), budget,
                                   threads, spliced=spliced, min_rate=100_000.0, stall=0.3)
    assert isinstance(end, PeerFailure) and end.reason is FailureReason.SLOW, end
    assert budget.used == 0


async def test_a_peer_that_goes_quiet_is_stalled_and_what_it_sent_is_kept(
    cache: BlobCache, threads: concurrent.futures.Executor, spliced: bool
) -> None:
    """The splice waits on the socket's receive timeout as a receive does."""
    budget = MemoryBudget(64 * CHUNK)
    sent = DATA[: 2 * CHUNK + 11]
    end, _, _, entry = await pump_from(cache, RawPeer(sent, drip=1.0), budget, threads,
                                       spliced=spliced, stall=0.3)
    assert isinstance(end, PeerFailure) and end.reason is FailureReason.STALLED, end
    assert held(entry) == (sent + b"x")[:entry.written] and entry.written >= len(sent)
    assert budget.used == 0


async def test_a_spliced_body_never_lands_in_a_file_that_reused_its_descriptor(
    cache: BlobCache, threads: concurrent.futures.Executor, tmp_path: Path
) -> None:
    """A dropped fetch's entry closes its file while the pump's threads still run; a
    file opened next gets that descriptor number and must not receive the peer's bytes."""
    loop = asyncio.get_running_loop()
    peer = RawPeer(DATA[:CHUNK], drip=0.01)
    entry = cache.reserve("k", len(DATA))
    assert entry is not None
    sock = peer.connect()
    pump = BodyPump(loop, sock, b"", len(DATA), chunk_size=CHUNK, stall_timeout=5.0,
                    min_rate=1.0, budget=MemoryBudget(64 * CHUNK), consume=lambda _: None,
                    keep=entry.write, into=entry, read_ahead=2)
    hashing = loop.run_in_executor(threads, pump.hash)
    reading = loop.run_in_executor(threads, pump.read)
    other = tmp_path / "other"
    try:
        async with asyncio.timeout(20):
            while entry.written < CHUNK:
                assert isinstance(await pump.items.get(), int)
            number = entry.fileno()
            entry.close_file()
            reused = os.open(other, os.O_WRONLY | os.O_CREAT)
            try:
                assert reused == number, "the lowest free number is reused"
                dripped = entry.written
                while entry.written < dripped + 5:
                    item = await pump.items.get()
                    assert isinstance(item, int), item
            finally:
                os.close(reused)
    finally:
        pump.stop()
        pump.ended("loop")
        await asyncio.wait_for(asyncio.gather(hashing, reading), 10)
        sock.close()
        peer.close()
    assert held_at(other) == b"", "the peer's bytes went to the entry's own file"
    assert held(entry)[:CHUNK] == DATA[:CHUNK]


async def test_two_pumps_on_a_budget_of_one_buffer_both_finish(
    cache: BlobCache, threads: concurrent.futures.Executor, spliced: bool
) -> None:
    """Each pump may make its first buffer only when the budget has room and a second
    only if there is room now: neither holds a buffer while waiting for the other's."""
    budget = MemoryBudget(CHUNK + CHUNK // 2)
    peers = [RawPeer(DATA), RawPeer(DATA)]
    entries = [cache.reserve(f"k{i}", len(DATA)) for i in range(2)]
    try:
        results = await asyncio.gather(*(
            pump_into(entry, peer, len(DATA), budget, threads, spliced=spliced)
            for entry, peer in zip(entries, peers, strict=True) if entry is not None))
    finally:
        for peer in peers:
            peer.close()
    assert [end for end, _, _ in results] == [None, None]
    assert all(entry is not None and held(entry) == DATA for entry in entries)
    assert budget.peak <= budget.limit and budget.used == 0


# A file that refuses splice (some FUSE and overlay setups answer EINVAL) gets the body
# the received way, whole and hashed. The kernel refuses splice into any file opened
# with O_APPEND, so these tests hand the pump such a descriptor of the cache entry's
# file: the kernel's own refusal, over a real socket, with nothing faked.


class AppendOnly:
    """The entry as a `body.FileKeep` whose descriptor is the file opened O_APPEND."""

    def __init__(self, entry: CacheEntry) -> None:
        self._entry = entry
        self._fd = os.open(entry.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)

    @property
    def written(self) -> int:
        return self._entry.written

    def fileno(self) -> int:
        return self._fd

    def appended(self, size: int) -> None:
        self._entry.appended(size)

    def close(self) -> None:
        os.close(self._fd)


def test_the_kernel_refuses_splice_into_an_append_only_file(tmp_path: Path) -> None:
    """The premise: what these tests rely on for a refusing file."""
    target = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    pipe_out, pipe_in = os.pipe()
    try:
        os.write(pipe_in, b"abc")
        with pytest.raises(OSError) as raised:
            os.splice(pipe_out, target, 3, offset_dst=0)
        assert raised.value.errno == errno.EINVAL
    finally:
        for fd in (target, pipe_out, pipe_in):
            os.close(fd)


@pytest.mark.parametrize("prefix", [0, 1000])
async def test_a_file_that_refuses_splice_gets_the_body_received(
    tmp_path: Path, prefix: int
) -> None:
    cache = BlobCache(tmp_path, 1 << 30, 1 << 30)
    pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="test-body")
    budget = MemoryBudget(64 * CHUNK)
    peer = RawPeer(DATA[prefix:])
    try:
        entry = cache.reserve("k", len(DATA))
        assert entry is not None
        keep = AppendOnly(entry)
        try:
            end, digest, _ = await pump_into(entry, peer, len(DATA), budget, pool,
                                             spliced=True, prefix=DATA[:prefix], into=keep)
        finally:
            keep.close()
        assert end is None, f"the hop failed: {end!r}"
        assert entry.path.read_bytes() == DATA
        assert digest == hashlib.sha256(DATA).hexdigest()
        assert budget.used == 0
    finally:
        peer.close()
        pool.shutdown(wait=True)
        cache.close()
