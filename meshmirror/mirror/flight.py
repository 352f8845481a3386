"""One fetch per blob per node: a table of fetches in flight that readers attach to.

A burst of requests for one blob used to make one peer fetch each, queued at
the peer: 200 clients of a 64 MiB layer cost the peer 169 uploads and most of
them a minute. Here the first request for a digest starts a `Flight`; every
request for it while it is in flight attaches a `Reader` to it. The flight
pulls the blob once from its `BlobSource` into a cache entry (see `cache`),
and readers are served from that file at any offset, Range included:

- a verified reader (the default, for containerd) waits until the digest has
  checked out, then reads the file: every waiting request gets its headers at
  the same moment, none waits for the requests ahead of it;
- a following reader (``verified=False``) gets bytes as they arrive, for a
  consumer that verifies on its own (another mirror).

Failure modes. The source starting over from byte 0 (a digest mismatch, a size
disagreement: `BlobFetch` does this to find the liar) is counted as a restart
and aborts every following reader (their response ends short of its length,
so no client takes it as complete); verified readers keep waiting for the next
attempt. A source that gives up fails the flight: every reader gets a miss or
an aborted body. A flight nobody reads any more is cancelled at once, so a
dropped request stops its fetch within the source's read-ahead (a few chunks);
a later request starts again and the cache keeps only what verified.

Bounds. A flight holds one cache entry, reserved whole up front, so the cache
never exceeds its limit; a blob the cache cannot admit is refused (`refused`)
and the caller streams it without a flight. Readers read the file in
``piece``-sized pieces taken from the node's `MemoryBudget`, so memory per
request is a piece or two whatever the client does. Waits are bounded: for
verification by the flight's source (its deadline), for the next bytes by
``stall``.

Adding a source: implement `BlobSource` (open, fill, close), or, for a plain
offset-resumable stream of chunks, `ChunkStream` wrapped in `StreamSource`,
which hashes and resumes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import threading
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Protocol, runtime_checkable

from meshmirror.fileio import FileSpan
from meshmirror.mirror.body import Chunk
from meshmirror.mirror.budget import MemoryBudget
from meshmirror.mirror.cache import BlobCache, CacheEntry
from meshmirror.mirror.errors import FailureReason, PeerFailure, SinkFailure, VerificationError
from meshmirror.mirror.fetch import Sink
from meshmirror.oci.digest import Digest

log = logging.getLogger(__name__)


class BlobSource(Protocol):
    """Where a flight's bytes come from (a peer fetch, the upstream, a mirror that is
    itself downloading). A flight calls `open` once, then `fill` once, then `close`."""

    @property
    def origin(self) -> str | None:
        """Where the bytes came from, for request records (a peer's name, "upstream");
        read once `fill` verified."""
        ...

    async def open(self) -> int | None:
        """Find the blob; its size, or None when this source cannot serve it (a miss)."""
        ...

    async def fill(self, sink: Sink) -> bool:
        """Write the whole blob into ``sink`` in order from byte 0, resuming or failing
        over as the source can; call ``sink.reset()`` before starting over from byte 0
        and ``sink.resize`` before writing another size than `open` said. True once the
        bytes written match the digest; False when the source gave up. A `SinkFailure`
        from the sink propagates (nobody's fault but the node's)."""
        ...

    def close(self) -> None:
        """Release whatever is still open; safe on any path, more than once."""
        ...


class ChunkStream(Protocol):
    """The simplest source: a stream of the blob's bytes that can start at any offset."""

    @property
    def origin(self) -> str | None:
        """As `BlobSource.origin`."""
        ...

    async def open(self) -> int | None:
        """The blob's size, or None when it is not there."""
        ...

    def chunks(self, offset: int) -> AsyncIterator[bytes]:
        """The blob's bytes from ``offset`` to its end; raise `PeerFailure` on a break
        (the caller resumes from where it got to)."""
        ...

    def close(self) -> None: ...


class StreamSource:
    """A `BlobSource` over a `ChunkStream`: hashed in order, resumed after a break
    (at most ``resumes`` times), never started over: a mismatch is a failure."""

    def __init__(self, stream: ChunkStream, digest: Digest, *, resumes: int = 3,
                 size: int = 0) -> None:
        """``size``: of a ``stream`` already open (then `open` is not called)."""
        self._stream = stream
        self._digest = digest
        self._resumes = resumes
        self._size = size

    @property
    def origin(self) -> str | None:
        return self._stream.origin

    async def open(self) -> int | None:
        size = await self._stream.open()
        self._size = size or 0
        return size

    async def fill(self, sink: Sink) -> bool:
        hasher = self._digest.hasher()
        position, breaks = 0, 0
        sink.reset()
        while position < self._size:
            try:
                async for chunk in self._stream.chunks(position):
                    if position + len(chunk) > self._size:
                        raise PeerFailure(FailureReason.BAD_BODY, "more bytes than announced")
                    await asyncio.to_thread(_keep_and_hash, sink, hasher.update, chunk)
                    position += len(chunk)
                if position < self._size:
                    raise PeerFailure(FailureReason.BROKEN, f"body ended at byte {position}")
            except PeerFailure as failure:
                breaks += 1
                if breaks > self._resumes:
                    log.info("%s: giving up after %d breaks: %s", self._digest, breaks,
                                failure)
                    return False
        return hasher.hexdigest() == self._digest.hex

    def close(self) -> None:
        self._stream.close()


def _keep_and_hash(sink: Sink, consume: Callable[[bytes], None], chunk: bytes) -> None:
    try:
        sink.write(chunk)
    except Exception as err:
        raise SinkFailure.of(err) from err
    consume(chunk)


@runtime_checkable
class RangeSink(Sink, Protocol):
    """A `Sink` that also takes a blob as byte ranges written at once (stripes, see
    `rollout`): what a flight gives its source."""

    def split(self, bounds: list[tuple[int, int]]) -> None:
        """From here on the blob arrives as the ranges ``bounds`` (after a `reset`)."""
        ...

    def write_at(self, index: int, chunk: bytes) -> None:
        """Append ``chunk`` to range ``index`` (one thread per range at a time)."""
        ...

    def available(self, position: int) -> int:
        """Where the bytes written from ``position`` on end."""
        ...

    def read_at(self, offset: int, size: int) -> bytes:
        """Written bytes back, to hash them in order."""
        ...


class State(enum.Enum):
    OPENING = "opening"  # the source is looking for the blob
    FETCHING = "fetching"  # bytes are arriving in the cache entry
    VERIFIED = "verified"  # complete and checked: readers may have it all
    FAILED = "failed"  # the source gave up, or nobody wanted it any more
    MISSING = "missing"  # the source does not have it
    REFUSED = "refused"  # the cache cannot hold it: the caller streams it itself


class FlightEvents(Protocol):
    """What a flight reports, for metrics (`MirrorMetrics` implements it)."""

    def flight_joined(self) -> None: ...

    def flight_restarted(self) -> None: ...

    def flight_ended(self, result: str) -> None:
        """A flight landed; ``result`` is its final `State`'s value."""
        ...


class Flight:
    """One blob being fetched into one cache entry, and the readers attached to it."""

    def __init__(self, flights: Flights, key: str, source: BlobSource | None,
                 entry: CacheEntry | None = None) -> None:
        self.key = key
        self.size = entry.size if entry is not None else 0
        self.entry = entry
        self.state = State.VERIFIED if entry is not None else State.OPENING
        # Which attempt from byte 0 the entry holds; a following reader aborts on a change.
        self.attempt = 0
        # Set when the node could not keep the bytes (a full disk): nobody else's fault.
        self.sink_failure: str | None = None
        self.readers: set[Reader] = set()
        # Readers that follow the bytes as they arrive: only they need waking per write
        # (counted on the loop, read by body threads; see `progressed`).
        self._following = 0
        self._wake_due = False
        self._flights = flights
        self._source = source
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        if source is not None:
            self._task = asyncio.create_task(self._run(source), name=f"flight {key}")

    @property
    def source(self) -> BlobSource | None:
        return self._source

    @property
    def origin(self) -> str | None:
        """Where the verified bytes came from (see `BlobSource.origin`)."""
        if self.entry is not None and self.entry.origin is not None:
            return self.entry.origin
        return self._source.origin if self._source is not None else None

    @property
    def written(self) -> int:
        """Bytes of the current attempt in the entry (all of them once verified)."""
        return self.entry.written if self.entry is not None else 0

    def available(self, position: int) -> int:
        """Where the current attempt's bytes from ``position`` on end."""
        return self.entry.available(position) if self.entry is not None else position

    @property
    def landed(self) -> bool:
        return self.state not in (State.OPENING, State.FETCHING)

    def attach(self, *, verified: bool = True) -> Reader:
        reader = Reader(self, verified=verified)
        self.readers.add(reader)
        if not verified:
            self._following += 1
        if self.entry is not None and self.state in (State.FETCHING, State.VERIFIED):
            reader.pin(self.entry)
        return reader

    def detach(self, reader: Reader) -> None:
        if reader in self.readers and not reader.verified:
            self._following -= 1
        self.readers.discard(reader)
        if not self.readers and not self.landed:
            self._abandon()

    async def changed(self) -> None:
        """Wait for the next change: bytes, attempt or state."""
        await self._event.wait()

    def _wake(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    def progressed(self) -> None:
        """Bytes arrived; safe from any thread.

        Only following readers wait for bytes (the others wait for the state, which
        wakes them itself), and one wake pending on the loop serves every write
        before it runs: a body thread writes thousands of times per GB, and a loop
        woken for each spent CPU that the hop's hash needed.
        """
        if not self._following or self._wake_due:
            return
        self._wake_due = True
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody to tell
            self._loop.call_soon_threadsafe(self._progress_wake)

    def _progress_wake(self) -> None:
        self._wake_due = False  # before waking: a write from now on schedules another
        self._wake()

    def restarted(self) -> None:
        self.attempt += 1
        self._flights.events.flight_restarted()
        self._wake()

    def _abandon(self) -> None:
        if not self.landed:
            self.state = State.FAILED  # also when the task is cancelled before it ran
        if self._task is not None:
            self._task.cancel()
        self._flights.landed(self)

    async def _run(self, source: BlobSource) -> None:
        state = State.FAILED
        try:
            size = await source.open()
            if size is None:
                state = State.MISSING
                return
            entry = self._flights.cache.reserve(self.key, size)
            if entry is None:
                state = State.REFUSED
                return
            self.entry, self.size, self.state = entry, size, State.FETCHING
            for reader in self.readers:
                reader.pin(entry)
            self._wake()
            if await source.fill(_FlightSink(self, entry)):
                self.size = entry.size
                entry.origin = source.origin
                self._flights.cache.complete(entry)
                state = State.VERIFIED
        except SinkFailure as err:
            log.warning("could not hold %s in the cache: %s", self.key, err)
            self.sink_failure = str(err)
        except asyncio.CancelledError:
            state = State.FAILED
            raise
        except Exception:
            log.exception("fetch of %s failed", self.key)
        finally:
            source.close()
            self.state = state
            if self.entry is not None:
                if state is not State.VERIFIED:
                    self._flights.cache.discard(self.entry)
                self._flights.cache.unpin(self.entry)  # the flight's own pin
            self._flights.landed(self)
            self._flights.events.flight_ended(state.value)
            self._wake()


class _FlightSink:
    """The flight's entry as a `Sink`: writes wake readers, resets count as restarts."""

    def __init__(self, flight: Flight, entry: CacheEntry) -> None:
        self._flight = flight
        self._entry = entry
        self._started = False

    def write(self, chunk: Chunk) -> None:
        self._entry.write(chunk)
        self._flight.progressed()

    # `body.FileKeep`: a peer's body is spliced into the entry's file.
    @property
    def written(self) -> int:
        return self._entry.written

    def fileno(self) -> int:
        return self._entry.fileno()

    def appended(self, size: int) -> None:
        self._entry.appended(size)
        self._flight.progressed()

    def reset(self) -> None:
        if self._started:
            self._flight.restarted()
        self._started = True
        self._entry.reset()

    def release(self) -> None:
        self.reset()
        self._entry.release()

    def split(self, bounds: list[tuple[int, int]]) -> None:
        self._entry.split(bounds)

    def write_at(self, index: int, chunk: bytes) -> None:
        self._entry.write_at(index, chunk)
        self._flight.progressed()

    def available(self, position: int) -> int:
        return self._entry.available(position)

    def read_at(self, offset: int, size: int) -> bytes:
        return self._entry.read_at(offset, size)

    def resize(self, size: int) -> bool:
        if not self._entry.resize(size):
            return False
        self._flight.size = size
        return True


class Reader:
    """One request's view of a flight; `close` it (or its body does) when done."""

    def __init__(self, flight: Flight, *, verified: bool) -> None:
        self.flight = flight
        self.verified = verified
        self._entry: CacheEntry | None = None
        self._closed = False

    def pin(self, entry: CacheEntry) -> None:
        if self._entry is None and not self._closed:
            self._entry = entry
            self.flight._flights.cache.pin(entry)

    @property
    def refused(self) -> bool:
        """The cache could not take the blob: the caller must fetch it another way."""
        return self.flight.state is State.REFUSED

    async def opened(self) -> int | None:
        """The blob's size once the source has found it; None for a miss (see `refused`)."""
        flight = self.flight
        while flight.state is State.OPENING:
            await flight.changed()
        if flight.state in (State.FETCHING, State.VERIFIED):
            return flight.size
        return None

    async def wait_verified(self) -> bool:
        """Whether the blob verified (bounded by the flight's source)."""
        flight = self.flight
        while not flight.landed:
            await flight.changed()
        return flight.state is State.VERIFIED

    def body(self, start: int, end: int) -> Body:
        """Bytes [start, end); the body owns this reader and closes it (also when it is
        dropped unread). A verified reader's body must only be asked for once
        `wait_verified` said True."""
        span = None
        if self.verified and self._entry is not None and self._entry.complete:
            span = FileSpan(self._entry.fileno(), start, end)
        return Body(self._bytes(start, end), self.close, self.flight._loop, span)

    async def _bytes(self, start: int, end: int) -> AsyncGenerator[bytes, None]:
        flights = self.flight._flights
        if self.verified:
            assert self._entry is not None and self.flight.state is State.VERIFIED
            async for piece in self._entry.read(start, end, flights.piece, flights.budget):
                yield piece
            return
        async for piece in self._follow(start, end):
            yield piece

    async def _follow(self, start: int, end: int) -> AsyncGenerator[bytes, None]:
        """Bytes as they arrive; aborted when the flight starts over or fails."""
        flight = self.flight
        flights = flight._flights
        attempt = flight.attempt
        position = start
        while position < end:
            while (flight.available(position) <= position
                   and flight.state is not State.VERIFIED):
                if flight.landed or flight.attempt != attempt:
                    raise VerificationError(f"{flight.key}: fetch failed at byte {position}")
                try:
                    async with asyncio.timeout(flights.stall):
                        await flight.changed()
                except TimeoutError:
                    raise VerificationError(
                        f"{flight.key}: no byte for {flights.stall:g} s at {position}") from None
            if flight.attempt != attempt or flight.state in (State.FAILED, State.MISSING):
                raise VerificationError(f"{flight.key}: fetch started over at byte {position}")
            entry = self._entry
            assert entry is not None
            upto = min(end, flight.available(position)
                       if flight.state is not State.VERIFIED else end)
            pieces = entry.read(position, upto, flights.piece, flights.budget)
            try:
                async for piece in pieces:
                    if flight.attempt != attempt:
                        raise VerificationError(f"{flight.key}: fetch started over")
                    position += len(piece)
                    yield piece
            except OSError as err:  # the file was truncated under the read: a restart
                raise VerificationError(f"{flight.key}: {err}") from err
            finally:
                await pieces.aclose()  # type: ignore[attr-defined]  # an async generator

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.flight.detach(self)
        if self._entry is not None:
            self.flight._flights.cache.unpin(self._entry)


class Body:
    """A reader's body whose `aclose` closes the reader even if it was never iterated.

    A verified reader's body is also its entry's file (`file_span`), which the server
    sends with sendfile: no piece is read into memory, and the reader's pin keeps the
    entry until the body is closed."""

    def __init__(self, chunks: AsyncGenerator[bytes, None], close: Callable[[], None],
                 loop: asyncio.AbstractEventLoop, span: FileSpan | None = None) -> None:
        self._chunks = chunks
        self._close = close
        self._span = span
        self._closed = False
        # A body dropped unread (the client left before its first byte) still lets go
        # of its reader; readers live on the loop, so a finalizer elsewhere defers.
        weakref.finalize(self, _close_on, loop, threading.get_ident(), close)

    def file_span(self) -> FileSpan | None:
        return None if self._closed else self._span

    def __aiter__(self) -> Body:
        return self

    async def __anext__(self) -> bytes:
        self._span = None  # iterated: the bytes are being read, not sent from the file
        try:
            return await anext(self._chunks)
        except StopAsyncIteration:
            self._closed = True
            self._close()
            raise

    async def aclose(self) -> None:
        self._closed = True
        try:
            await self._chunks.aclose()
        finally:
            self._close()


def _close_on(loop: asyncio.AbstractEventLoop, thread: int, close: Callable[[], None]) -> None:
    if threading.get_ident() == thread:
        close()
        return
    with contextlib.suppress(RuntimeError):  # the loop is gone, and its readers with it
        loop.call_soon_threadsafe(close)


class Flights:
    """The node's table of fetches in flight, by key (a digest), over one cache."""

    def __init__(self, cache: BlobCache, events: FlightEvents, *, budget: MemoryBudget | None,
                 piece: int, stall: float) -> None:
        self.cache = cache
        self.events = events
        self.budget = budget
        self.piece = piece
        self.stall = stall
        self._flying: dict[str, Flight] = {}

    def attach(self, digest: Digest, source: Callable[[], BlobSource], *,
               verified: bool = True) -> Reader:
        """A reader of ``digest``: from the cache if it is there, else from the flight
        in progress, else from a new flight whose source ``source()`` makes."""
        key = str(digest)
        flight = self._flying.get(key)
        if flight is not None:
            self.events.flight_joined()
            return flight.attach(verified=verified)
        entry = self.cache.open(key)
        if entry is not None:
            landed = Flight(self, key, None, entry)
            reader = landed.attach(verified=verified)
            self.cache.unpin(entry)  # the reader holds its own pin
            return reader
        flight = Flight(self, key, source())
        self._flying[key] = flight
        return flight.attach(verified=verified)

    def flying(self, digest: Digest) -> Flight | None:
        """The flight of ``digest`` in progress, if any (to advertise it, say)."""
        return self._flying.get(str(digest))

    @property
    def readers(self) -> int:
        """Readers attached to fetches still in flight."""
        return sum(len(flight.readers) for flight in self._flying.values())

    def landed(self, flight: Flight) -> None:
        if self._flying.get(flight.key) is flight:
            del self._flying[flight.key]

    def close(self) -> None:
        for flight in list(self._flying.values()):
            flight._abandon()
