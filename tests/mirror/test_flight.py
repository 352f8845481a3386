"""The flight table and the blob cache with in-memory sources: no sockets, no peers.

A `FakeSource` hands out the blob's bytes when the test says so, so every
interleaving (readers attaching mid-download, a restart, a drop) is deterministic.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from meshmirror.mirror.budget import MemoryBudget
from meshmirror.mirror.cache import BlobCache
from meshmirror.mirror.errors import FailureReason, PeerFailure, VerificationError
from meshmirror.mirror.fetch import Sink
from meshmirror.mirror.flight import Flights, RangeSink, Reader, State, StreamSource
from meshmirror.oci.digest import Digest

BLOB = os.urandom(300_000)
DIGEST = Digest.of(BLOB)
OTHER = os.urandom(200_000)
OTHER_DIGEST = Digest.of(OTHER)


class Events:
    def __init__(self) -> None:
        self.joined = self.restarted = 0
        self.ended: list[str] = []

    def flight_joined(self) -> None:
        self.joined += 1

    def flight_restarted(self) -> None:
        self.restarted += 1

    def flight_ended(self, result: str) -> None:
        self.ended.append(result)


class FakeSource:
    """Writes what the test `feed`s; ``attempts`` are the bodies it writes from byte 0."""

    def __init__(self, attempts: list[bytes], digest: Digest = DIGEST) -> None:
        self.attempts = attempts
        self.digest = digest
        self.opened = 0
        self.closed = False
        self.go: asyncio.Queue[int] = asyncio.Queue()
        self.origin = "fake"

    def feed(self, size: int) -> None:
        self.go.put_nowait(size)

    async def open(self) -> int | None:
        self.opened += 1
        return len(self.attempts[0]) if self.attempts else None

    async def fill(self, sink: Sink) -> bool:
        for body in self.attempts:
            sink.reset()
            position = 0
            while position < len(body):
                step = await self.go.get()
                sink.write(body[position:position + step])
                position += step
            if Digest.of(body) == self.digest:
                return True
        return False

    def close(self) -> None:
        self.closed = True


def flights_for(tmp_path: Path, limit: int = 10_000_000,
                held: int = 10_000_000) -> tuple[Flights, Events]:
    events = Events()
    cache = BlobCache(tmp_path, limit, held)
    return Flights(cache, events, budget=MemoryBudget(1 << 20), piece=64 * 1024,
                   stall=2.0), events


async def drain(reader: Reader, start: int = 0, end: int | None = None) -> bytes:
    size = reader.flight.size
    return b"".join([piece async for piece in reader.body(start, size if end is None else end)])


def cache_files(tmp_path: Path) -> int:
    return sum(path.stat().st_size for path in tmp_path.rglob("*") if path.is_file())


async def test_concurrent_readers_share_one_fetch(tmp_path: Path) -> None:
    flights, events = flights_for(tmp_path)
    source = FakeSource([BLOB])
    readers = [flights.attach(DIGEST, lambda: source) for _ in range(20)]
    assert events.joined == 19
    sizes = await asyncio.gather(*(reader.opened() for reader in readers))
    assert sizes == [len(BLOB)] * 20
    assert flights.readers == 20
    waiting = [asyncio.create_task(reader.wait_verified()) for reader in readers]
    source.feed(len(BLOB))
    assert await asyncio.gather(*waiting) == [True] * 20
    bodies = await asyncio.gather(*(drain(reader) for reader in readers))
    assert all(body == BLOB for body in bodies)
    assert source.opened == 1 and source.closed
    assert events.ended == ["verified"]
    assert flights.readers == 0 and flights.cache.held == 0
    assert flights.cache.total == len(BLOB) == cache_files(tmp_path)
    # Later readers come from the cache, with no source at all.
    later = flights.attach(DIGEST, lambda: pytest.fail("no new fetch"))
    assert await later.opened() == len(BLOB) and await later.wait_verified()
    assert later.flight.origin == "fake", "a cached blob remembers where it came from"
    assert await drain(later, 10, 20) == BLOB[10:20]
    flights.cache.close()


async def test_a_following_reader_gets_bytes_as_they_arrive(tmp_path: Path) -> None:
    flights, _ = flights_for(tmp_path)
    source = FakeSource([BLOB])
    reader = flights.attach(DIGEST, lambda: source, verified=False)
    assert await reader.opened() == len(BLOB)
    body = reader.body(1000, len(BLOB))
    source.feed(100_000)
    first = await anext(body)
    assert first == BLOB[1000:1000 + len(first)]
    assert reader.flight.state is State.FETCHING, "served before the blob verified"
    got = [first]
    source.feed(len(BLOB) - 100_000)
    got += [piece async for piece in body]
    assert b"".join(got) == BLOB[1000:]
    flights.cache.close()


class BurstSource(FakeSource):
    """Writes each fed size as 1,000-byte writes from a thread, as a body thread does,
    while the loop is busy (it waits for the thread); ``wrote`` has each burst's end."""

    def __init__(self, attempts: list[bytes]) -> None:
        super().__init__(attempts)
        self.wrote: asyncio.Queue[int] = asyncio.Queue()

    async def fill(self, sink: Sink) -> bool:
        body = self.attempts[0]
        sink.reset()
        position = 0
        while position < len(body):
            step = await self.go.get()

            def burst(start: int = position, end: int = position + step) -> None:
                for at in range(start, end, 1000):
                    sink.write(body[at:min(end, at + 1000)])

            writer = threading.Thread(target=burst)
            writer.start()
            writer.join(10)  # blocking the loop: a busy loop runs no wake meanwhile
            assert not writer.is_alive()
            position += step
            self.wrote.put_nowait(position)
        return Digest.of(body) == self.digest


async def test_writes_wake_only_followers_and_a_burst_of_them_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A body thread writes thousands of times per GB: the loop is woken for them only
    when a follower waits for bytes, and once per burst, not once per write."""
    flights, _ = flights_for(tmp_path)
    source = BurstSource([BLOB])
    verified = flights.attach(DIGEST, lambda: source)
    flight = verified.flight
    await verified.opened()
    scheduled: list[object] = []
    loop = asyncio.get_running_loop()
    real = loop.call_soon_threadsafe

    def counted(callback: object, *args: object, **kwargs: object) -> asyncio.Handle:
        if getattr(callback, "__self__", None) is flight:  # not the file reads' own
            scheduled.append(callback)
        return real(callback, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(loop, "call_soon_threadsafe", counted)
    waiting = asyncio.create_task(flight.changed())
    source.feed(100_000)
    assert await asyncio.wait_for(source.wrote.get(), 10) == flight.written == 100_000
    await asyncio.sleep(0.01)
    assert not waiting.done(), "no follower: a write wakes nobody"
    assert not scheduled
    follower = flights.attach(DIGEST, lambda: source, verified=False)
    body = follower.body(0, len(BLOB))
    source.feed(100_000)
    got = [piece async for piece in _take(body, 200_000)]
    assert b"".join(got) == BLOB[:200_000]
    assert waiting.done(), "the follower's bytes woke the loop"
    assert len(scheduled) == 1, f"{len(scheduled)} wakes for 100 writes"
    source.feed(len(BLOB) - 200_000)
    assert await verified.wait_verified()
    got += [piece async for piece in body]
    assert b"".join(got) == BLOB
    await body.aclose()
    monkeypatch.undo()
    flights.cache.close()


async def _take(body: AsyncIterator[bytes], size: int) -> AsyncIterator[bytes]:
    """Pieces of ``body`` until ``size`` bytes came."""
    taken = 0
    while taken < size:
        piece = await anext(body)
        taken += len(piece)
        yield piece


async def test_a_restart_aborts_followers_and_verified_readers_get_good_bytes(
    tmp_path: Path
) -> None:
    flights, events = flights_for(tmp_path)
    lie = bytes(len(BLOB))
    source = FakeSource([lie, BLOB])
    follower = flights.attach(DIGEST, lambda: source, verified=False)
    waiter = flights.attach(DIGEST, lambda: source)
    assert await follower.opened() == len(BLOB)
    await waiter.opened()
    body = follower.body(0, len(BLOB))
    source.feed(len(BLOB) - 1)
    first = await anext(body)
    assert first == lie[: len(first)], "a follower gets bytes before they verify"
    source.feed(1)  # the lie is complete and does not verify: the source starts over
    with pytest.raises(VerificationError):
        async for _ in body:
            pass
    source.feed(len(BLOB))
    assert await waiter.wait_verified()
    assert await drain(waiter) == BLOB
    assert events.restarted == 1
    flights.cache.close()


async def test_a_failed_fetch_fails_every_reader_and_leaves_no_file(tmp_path: Path) -> None:
    flights, events = flights_for(tmp_path)
    source = FakeSource([bytes(len(BLOB))])
    readers = [flights.attach(DIGEST, lambda: source) for _ in range(3)]
    await readers[0].opened()
    source.feed(len(BLOB))
    assert [await reader.wait_verified() for reader in readers] == [False] * 3
    for reader in readers:
        reader.close()
    assert events.ended == ["failed"]
    assert flights.cache.total == 0 and cache_files(tmp_path) == 0
    flights.cache.close()


async def test_the_last_reader_leaving_cancels_the_fetch(tmp_path: Path) -> None:
    flights, events = flights_for(tmp_path)
    source = FakeSource([BLOB])
    first = flights.attach(DIGEST, lambda: source)
    second = flights.attach(DIGEST, lambda: source)
    await first.opened()
    source.feed(10_000)
    await asyncio.sleep(0)
    first.close()
    assert not source.closed, "another reader still wants it"
    second.close()
    for _ in range(5):
        await asyncio.sleep(0)
    assert source.closed and events.ended == ["failed"]
    assert flights.flying(DIGEST) is None
    assert flights.cache.total == 0 and cache_files(tmp_path) == 0
    # The next request starts a new fetch.
    again = FakeSource([BLOB])
    reader = flights.attach(DIGEST, lambda: again)
    await reader.opened()
    again.feed(len(BLOB))
    assert await reader.wait_verified() and await drain(reader) == BLOB
    flights.cache.close()


async def test_a_dropped_body_lets_go_of_its_pin(tmp_path: Path) -> None:
    flights, _ = flights_for(tmp_path)
    source = FakeSource([BLOB])
    reader = flights.attach(DIGEST, lambda: source)
    await reader.opened()
    source.feed(len(BLOB))
    assert await reader.wait_verified()
    body = reader.body(0, len(BLOB))
    assert flights.cache.held == len(BLOB)
    del body
    assert flights.cache.held == 0
    flights.cache.close()


async def test_a_verified_body_is_its_file_for_sendfile_and_keeps_its_pin(
        tmp_path: Path) -> None:
    """The server sends a verified body from the entry's file (no piece in memory); the
    entry stays pinned until the body is closed, and a follower's body is never a file."""
    flights, _ = flights_for(tmp_path)
    source = FakeSource([BLOB])
    follower = flights.attach(DIGEST, lambda: source, verified=False)
    reader = flights.attach(DIGEST, lambda: source)
    await reader.opened()
    assert follower.body(0, 10).file_span() is None
    source.feed(len(BLOB))
    assert await reader.wait_verified()
    body = reader.body(100, 5000)
    span = body.file_span()
    assert span is not None and (span.offset, span.end) == (100, 5000)
    assert os.pread(span.fd, span.count, span.offset) == BLOB[100:5000]
    assert flights.cache.held == len(BLOB)
    await body.aclose()
    assert body.file_span() is None and flights.cache.held == 0
    flights.cache.close()


async def test_a_blob_the_cache_cannot_hold_is_refused(tmp_path: Path) -> None:
    flights, events = flights_for(tmp_path, limit=len(BLOB) - 1)
    reader = flights.attach(DIGEST, lambda: FakeSource([BLOB]))
    assert await reader.opened() is None and reader.refused
    reader.close()
    flights, events = flights_for(tmp_path, held=len(BLOB) - 1)
    reader = flights.attach(DIGEST, lambda: FakeSource([BLOB]))
    assert await reader.opened() is None and reader.refused
    assert events.ended == ["refused"]
    missing = flights.attach(OTHER_DIGEST, lambda: FakeSource([]))
    assert await missing.opened() is None and not missing.refused
    assert cache_files(tmp_path) == 0


def test_cache_never_exceeds_its_limit_and_never_evicts_pinned_entries(tmp_path: Path) -> None:
    evicted: list[int] = []
    cache = BlobCache(tmp_path, 250, 1000, on_evict=lambda: evicted.append(1))
    a = cache.reserve("sha256:a", 100)
    b = cache.reserve("sha256:b", 100)
    assert a is not None and b is not None
    for entry in (a, b):
        entry.write(b"x" * 100)
        cache.complete(entry)
    assert cache.reserve("sha256:c", 100) is None, "both pinned: nothing may go"
    cache.unpin(a)
    assert cache.total == 200 and cache.held == 100
    c = cache.reserve("sha256:c", 100)
    assert c is not None and evicted == [1], "a, unpinned, made room"
    assert cache.open("sha256:a") is None and cache.total == 200 <= cache.limit
    assert cache.reserve("sha256:d", 300) is None, "larger than the limit"
    cache.unpin(b)
    reopened = cache.open("sha256:b")
    assert reopened is b
    cache.unpin(b)
    cache.discard(c)
    cache.unpin(c)
    assert cache.total == 100 and cache_files(tmp_path) == 100
    cache.close()
    assert cache_files(tmp_path) == 0


def test_cache_held_limit_bounds_pinned_bytes(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path, 1000, 150)
    a = cache.reserve("sha256:a", 100)
    assert a is not None and cache.reserve("sha256:b", 100) is None
    cache.complete(a)
    cache.unpin(a)
    assert cache.reserve("sha256:b", 100) is not None
    cache.close()


def test_a_new_cache_removes_what_a_dead_process_left(tmp_path: Path) -> None:
    dead = tmp_path / "meshmirror-cache-dead"
    dead.mkdir()
    (dead / ".lock").write_bytes(b"")
    (dead / "sha256-x.0").write_bytes(b"left behind")
    alive = tmp_path / "meshmirror-cache-alive"
    alive.mkdir()
    with open(alive / ".lock", "wb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        cache = BlobCache(tmp_path, 1000, 1000)
        assert cache.reserve("sha256:a", 10) is not None
        assert not dead.exists() and alive.exists()
        cache.close()


class Broken:
    """A chunk stream that breaks at ``breaks`` offsets, resumable from any offset."""

    def __init__(self, body: bytes, breaks: list[int]) -> None:
        self.body = body
        self.breaks = breaks
        self.offsets: list[int] = []
        self.closed = False
        self.origin = "broken"

    async def open(self) -> int | None:
        return len(self.body)

    async def chunks(self, offset: int) -> AsyncIterator[bytes]:
        self.offsets.append(offset)
        stop = next((b for b in self.breaks if b > offset), None)
        end = len(self.body) if stop is None else stop
        for position in range(offset, end, 50_000):
            yield self.body[position:min(end, position + 50_000)]
        if stop is not None:
            raise PeerFailure(FailureReason.BROKEN, f"at {stop}")

    def close(self) -> None:
        self.closed = True


async def test_a_stream_source_resumes_from_where_it_broke(tmp_path: Path) -> None:
    flights, _ = flights_for(tmp_path)
    stream = Broken(BLOB, [120_000, 250_000])
    reader = flights.attach(DIGEST, lambda: StreamSource(stream, DIGEST))
    assert await reader.opened() == len(BLOB)
    assert await reader.wait_verified()
    assert await drain(reader) == BLOB
    assert stream.offsets == [0, 120_000, 250_000] and stream.closed
    flights.cache.close()


async def test_a_stream_source_that_lies_fails_the_flight(tmp_path: Path) -> None:
    flights, events = flights_for(tmp_path)
    reader = flights.attach(DIGEST, lambda: StreamSource(Broken(OTHER + BLOB[:100_000], []),
                                                         DIGEST))
    assert await reader.opened() == len(BLOB)
    assert not await reader.wait_verified()
    assert events.ended == ["failed"]
    reader.close()
    flights.cache.close()


async def test_readers_in_step_share_each_piece_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flights, _ = flights_for(tmp_path)
    source = FakeSource([BLOB])
    first = flights.attach(DIGEST, lambda: source)
    await first.opened()
    source.feed(len(BLOB))
    assert await first.wait_verified()
    readers = [first, *(flights.attach(DIGEST, lambda: source) for _ in range(9))]
    reads: list[int] = []
    pread = os.pread

    def counted(fd: int, length: int, offset: int) -> bytes:
        reads.append(offset)
        return pread(fd, length, offset)

    monkeypatch.setattr(os, "pread", counted)
    bodies = await asyncio.gather(*(drain(reader) for reader in readers))
    assert all(body == BLOB for body in bodies)
    pieces = -(-len(BLOB) // flights.piece)
    assert len(reads) < 10 * pieces, "ten readers in step do not read ten copies"
    assert flights.cache.held == 0
    entry = flights.cache.open(str(DIGEST))
    assert entry is not None and not entry._recent, "nothing kept once the readers left"
    flights.cache.unpin(entry)
    flights.cache.close()


class StripedSource:
    """Writes BLOB as three ranges at once, the last range first and one piece at a time
    (a `RangeSink` source, as `rollout.TreeSource` is), when told to."""

    def __init__(self) -> None:
        self.bounds = [(0, 100_000), (100_000, 200_000), (200_000, len(BLOB))]
        self.go = asyncio.Event()

    @property
    def origin(self) -> str | None:
        return "stripes"

    async def open(self) -> int | None:
        return len(BLOB)

    async def fill(self, sink: Sink) -> bool:
        assert isinstance(sink, RangeSink)
        sink.reset()
        sink.split(self.bounds)
        for index in (2, 0, 1):
            start, end = self.bounds[index]
            for low in range(start, end, 25_000):
                sink.write_at(index, BLOB[low:min(end, low + 25_000)])
                await asyncio.sleep(0)
            if index == 2:
                assert sink.available(0) == 0 and sink.available(200_000) == len(BLOB)
                await self.go.wait()
        return sink.available(0) == len(BLOB)

    def close(self) -> None:
        pass


async def test_stripes_fill_one_entry_and_a_reader_follows_its_range(tmp_path: Path) -> None:
    flights, _ = flights_for(tmp_path)
    source = StripedSource()
    whole = flights.attach(DIGEST, lambda: source)
    last = flights.attach(DIGEST, lambda: source, verified=False)
    assert await last.opened() == len(BLOB)
    # The last stripe is all there while the prefix is empty: its reader has it already.
    async with asyncio.timeout(5):
        assert await drain(last, 200_000) == BLOB[200_000:]
    first = flights.attach(DIGEST, lambda: source, verified=False)
    following = asyncio.create_task(drain(first, 0, 150_000))
    source.go.set()
    async with asyncio.timeout(5):
        assert await following == BLOB[:150_000]
        assert await whole.wait_verified()
        assert await drain(whole) == BLOB
