"""One blob request's journey across peers: opening, verifying, resuming, streaming.

A blob is fetched from the best responsive candidate (hedged, see
`PeerClient.open_hedged`). A peer that breaks, stalls or drips mid-body is
replaced by the next candidate, asked with ``Range: bytes=<reached>-``, and the
hash carries on from there. A client's own Range is served by hashing the blob
from byte 0 (the skipped prefix is read and discarded), because a digest can
only be checked over the whole blob.

Blame follows the bytes. Which peer sent which range of the current attempt is
recorded; when the digest does not match:

- one peer sent it all: that peer is charged and the blob is read again from
  byte 0 on the next candidate;
- several did (a resume): a sha256 over the whole cannot tell whose range was
  wrong, so nobody is charged yet and the blob is read again from byte 0 from
  the last of them alone. If that verifies, the earlier ones sent the bad
  bytes and are charged; if not, the last one is, and the next candidate
  follows. A streamed body cannot be read again, so there every contributor
  is charged.

The size is the first source's word too. A peer resumed from that disagrees
about it means one of them lies, and only the bytes can tell which: the
attempt starts over from byte 0 on the peer resumed to, with its size (held
bodies only; a streamed one has announced its length and is aborted).

Once a peer has answered, the request has a deadline
(`MirrorConfig.deadline_for`): past it the fetch gives up and the answer is a
404 while containerd can still go upstream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence
from typing import Protocol

from meshmirror.contentrange import ContentRangeError, parse_content_range
from meshmirror.mirror.body import Chunk, FileKeep
from meshmirror.mirror.budget import MemoryBudget
from meshmirror.mirror.client import PeerClient, PeerResponse, RangePastEnd
from meshmirror.mirror.errors import FailureReason, PeerFailure, SinkFailure, VerificationError
from meshmirror.mirror.options import MirrorConfig
from meshmirror.oci.digest import Digest
from meshmirror.routing.ranking import PeerRanking
from meshmirror.routing.router import Peer


class Sink(Protocol):
    """Where a blob is held until verified: a `MemorySink` or a `cache.CacheEntry`."""

    def write(self, chunk: Chunk) -> None:
        """Hold ``chunk``'s bytes (a memoryview of a reused buffer: copy them)."""
        ...

    def reset(self) -> None: ...

    def release(self) -> None:
        """`reset` after a failed attempt, also giving back the room held for its size
        while the next source is looked for; `resize` takes it again."""
        ...

    def resize(self, size: int) -> bool:
        """Make room for a blob of ``size`` bytes instead; False when it cannot."""
        ...


class DiscardSink:
    """Keeps nothing: for a HEAD, which needs the blob verified but not its bytes."""

    def write(self, chunk: Chunk) -> None:
        pass

    def reset(self) -> None:
        pass

    def release(self) -> None:
        pass

    def resize(self, size: int) -> bool:
        return True


class MemorySink:
    """A small blob held whole in memory, never more than ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        self.data = bytearray()
        self._limit = limit

    def write(self, chunk: Chunk) -> None:
        self.data += chunk

    def reset(self) -> None:
        self.data.clear()

    def release(self) -> None:
        self.reset()

    def resize(self, size: int) -> bool:
        return size <= self._limit


class _SizeChanged(Exception):
    """A peer resumed from announced another size than the first source."""

    def __init__(self, peer: Peer) -> None:
        super().__init__(peer.name)
        self.peer = peer


class StreamBody:
    """A streamed blob body whose `aclose` releases its peer even if the body was
    never iterated: an async generator that never started skips its own cleanup."""

    def __init__(self, chunks: AsyncGenerator[bytes, None], release: Callable[[], None]) -> None:
        self._chunks = chunks
        self._release = release

    def __aiter__(self) -> StreamBody:
        return self

    async def __anext__(self) -> bytes:
        return await anext(self._chunks)

    async def aclose(self) -> None:
        try:
            await self._chunks.aclose()
        finally:
            self._release()


class BlobFetch:
    """Fetches one blob from the peers the router names, verified against its digest.

    It holds at most one open response at a time; `close` releases it and is
    safe to call on any path, any number of times.
    """

    def __init__(
        self,
        client: PeerClient,
        router: PeerRanking,
        options: MirrorConfig,
        registry: str,
        path: str,
        digest: Digest,
    ) -> None:
        self._client = client
        self._router = router
        self._options = options
        self._registry = registry
        self._path = path
        self._digest = digest
        self._tried: set[str] = set()
        self._current: PeerResponse | None = None
        self._size = 0
        # The peers whose bytes make up the current attempt from byte 0, in order.
        self._sources: list[Peer] = []
        # On the loop's clock, set once a peer has answered (see `MirrorConfig.deadline`).
        self._deadline = 0.0
        # For the request's record: the last peer whose headers were good.
        self.last_peer: str | None = None

    @property
    def origin(self) -> str | None:
        """`flight.BlobSource.origin`: the last peer whose headers were good."""
        return self.last_peer

    @property
    def asked_any(self) -> bool:
        """Whether any peer was asked: a miss is then ``peers_failed``, not ``no_peer``."""
        return bool(self._tried)

    @property
    def deadline_passed(self) -> bool:
        """Whether the request's deadline has passed: a miss is then ``deadline``."""
        return bool(self._deadline) and asyncio.get_running_loop().time() >= self._deadline

    @property
    def size(self) -> int:
        """The blob's size as its current source has it (final once it verified)."""
        return self._size

    async def open(self) -> int | None:
        """Open a response from the best responsive peer; the blob's size, or None for none.

        Each candidate's wait is bounded on its own (queue progress, connect and
        first-byte bounds); the request's deadline starts from the answer.
        """
        candidates = self._router.candidates(str(self._digest), limit=self._options.peers_tried)
        self._current = await self._open_from(0, candidates)
        if self._current is None:
            return None
        self._deadline = (asyncio.get_running_loop().time()
                          + self._options.deadline_for(self._size))
        return self._size

    def close(self) -> None:
        if self._current is not None:
            self._current.release()
            self._current = None

    async def read_verified(self, sink: Sink, *, threads: bool) -> bool:
        """Fill ``sink`` with the whole blob and verify it, retrying from byte 0 after a
        mismatch (see the module's note on blame). False when no peer had good bytes
        before the deadline."""
        try:
            async with asyncio.timeout_at(self._deadline):
                return await self._read_verified(sink, threads=threads)
        except TimeoutError:
            self.close()
            return False

    async def fill(self, sink: Sink) -> bool:
        """`flight.BlobSource.fill`: the whole blob into ``sink``, verified, on body threads."""
        return await self.read_verified(sink, threads=True)

    async def _read_verified(self, sink: Sink, *, threads: bool) -> bool:
        suspects: list[Peer] = []  # contributors to a mismatch, cleared by a verified retry
        sink.reset()
        while self._current is not None:
            hasher = self._digest.hasher()
            # Each attempt from byte 0 has its source's size (`_check_headers`): after a
            # liar about the size, the next peer's blob must fit, and be all there is.
            if not sink.resize(self._size):
                self.close()
                return False
            self._sources = [self._current.peer]
            try:
                async for _ in self._chunks(0, hasher.update, sink.write, threads=threads,
                                            into=sink if isinstance(sink, FileKeep) else None):
                    pass
            except PeerFailure:
                self.close()
                return False
            except _SizeChanged as changed:
                # Nobody is charged for the disagreement: the bytes will tell.
                suspects = []
                sink.release()
                if not await self._reopen(changed.peer) or not sink.resize(self._size):
                    self.close()
                    return False
                continue
            if hasher.hexdigest() == self._digest.hex:
                for peer in suspects:
                    self._client.failed(peer, _mismatch(self._digest, "before a resume"))
                self._succeeded()
                return True
            # The bytes were wrong: neither they nor their source's size hold the cache
            # while the next source is looked for (up to the deadline).
            sink.release()
            last = self._sources[-1]
            earlier = [peer for peer in self._sources[:-1] if peer.name != last.name]
            if earlier and not suspects:
                # Whose range was wrong cannot be told: the last source alone decides.
                suspects = earlier
                if self._current is not None and await self._reopen(self._current.peer):
                    continue
            suspects = []
            if not await self._next_source(0, _mismatch(self._digest)):
                return False
        return False

    async def _reopen(self, peer: Peer) -> bool:
        """Make ``peer`` the source of the whole blob from byte 0, its size the blob's;
        False (it is charged) if it cannot."""
        self.close()
        try:
            opened = await self._client.open(peer, self._path, self._registry)
        except PeerFailure as failure:
            self._client.failed(peer, failure)
            return False
        try:
            self._check_headers(opened, 0)
        except PeerFailure as failure:
            opened.release()
            self._client.failed(peer, failure)
            return False
        self._current = opened
        return True

    async def size_confirmed(self) -> bool:
        """Whether another candidate agrees with the current source's size; True when
        there is none to ask, or it cannot tell (unreachable, a false positive).

        A stream sends bytes before they verify, and one peer's Content-Length chose it:
        a peer announcing more than the cache holds had the node stream it garbage, for
        as long as that size allows at the minimum rate. The blob's last byte by that
        size, from another peer, says its total: a 416 or another total is a
        disagreement nobody can settle before the bytes are sent.
        """
        current = self._current
        if current is None:
            return False
        others = [peer for peer in self._router.candidates(
            str(self._digest), limit=self._options.peers_tried + len(self._tried))
            if peer.name != current.peer.name]
        if not others or self._size == 0:
            return True
        try:
            opened = await self._client.open(others[0], self._path, self._registry,
                                             offset=self._size - 1, end=self._size)
        except PeerFailure as failure:
            return failure.reason is not FailureReason.BAD_STATUS
        try:
            said = parse_content_range(opened.response.headers.get("Content-Range"))
        except ContentRangeError:
            return False
        finally:
            opened.release()
        return said.total == self._size

    def stream(self, start: int, end: int) -> StreamBody:
        """Bytes [start, end) of the blob, hashed from byte 0; the last piece is held
        back until the whole digest verifies. The stream owns this fetch from here on.
        """
        return StreamBody(self._stream(start, end), self.close)

    async def _stream(self, start: int, end: int) -> AsyncGenerator[bytes, None]:
        """`stream`'s bytes.

        Reading and hashing run on body threads (socket reads and hashlib release
        the GIL) while the event loop forwards the previous chunk to the client, so
        the loop, the bottleneck of a fast transfer, does nothing but write.
        """
        hasher = self._digest.hasher()
        held: bytes | None = None
        if self._current is not None:
            self._sources = [self._current.peer]
        try:
            async for position, chunk in self._resumable(hasher.update):
                lo, hi = max(start, position), min(end, position + len(chunk))
                if lo >= hi:
                    continue
                whole = lo == position and hi == position + len(chunk)
                piece = chunk if whole else chunk[lo - position : hi - position]
                # Only the last piece is held back: withholding any byte is enough
                # to keep an unverified body from looking complete.
                for part in in_pieces(piece, self._options.send_size):
                    if held is not None:
                        yield held
                    held = part
            if hasher.hexdigest() != self._digest.hex:
                # No second reading: every peer that sent part of it shares the blame.
                for peer in {peer.name: peer for peer in self._sources}.values():
                    self._client.failed(peer, _mismatch(self._digest))
                raise VerificationError(f"{self._digest} did not verify; aborting the response")
            self._succeeded()
            if held is not None:
                yield held
        finally:
            self.close()

    async def _resumable(self, consume: Callable[[Chunk], None]
                         ) -> AsyncIterator[tuple[int, bytes]]:
        """`_chunks` for a stream, whose length is announced: a size change aborts it."""
        try:
            async for item in self._chunks(0, consume, threads=True):
                yield item
        except _SizeChanged as changed:
            raise VerificationError(
                f"{changed.peer.name} disagrees about the size of {self._digest}") from None

    # -- sources -----------------------------------------------------------------

    async def _open_from(self, offset: int, candidates: Sequence[Peer]) -> PeerResponse | None:
        fresh = [peer for peer in candidates if peer.name not in self._tried]
        # Peers asked here that answered or failed; the others lost a hedged race and were
        # dropped unread: they did nothing wrong, so a later source may be one of them.
        started: set[str] = set()
        spent: set[str] = set()
        past_end: list[Peer] = []  # answered 416: their blob ends before ``offset``

        def on_start(peer: Peer) -> None:
            started.add(peer.name)
            self._tried.add(peer.name)

        def on_failure(peer: Peer, failure: PeerFailure) -> None:
            spent.add(peer.name)
            if isinstance(failure, RangePastEnd):
                past_end.append(peer)

        opener = self._client.open_hedged(
            fresh,
            self._path,
            self._registry,
            offset=offset,
            on_start=on_start,
            on_failure=on_failure,
        )
        try:
            async for opened in opener:
                spent.add(opened.peer.name)
                try:
                    self._check_headers(opened, offset)
                except _SizeChanged:
                    opened.release()
                    raise
                except PeerFailure as failure:
                    opened.release()
                    self._client.failed(opened.peer, failure)
                    continue
                self.last_peer = opened.peer.name
                return opened
        finally:
            await opener.aclose()
            self._tried -= started - spent
        if past_end:
            # No peer resumes here, and one says the blob ends before: the size is in
            # doubt, and the bytes from byte 0 at that peer will settle it.
            raise _SizeChanged(past_end[0])
        return None

    def _check_headers(self, opened: PeerResponse, offset: int) -> None:
        headers = opened.response.headers
        announced = headers.get("Docker-Content-Digest")
        if announced is not None and announced != str(self._digest):
            raise PeerFailure(FailureReason.DIGEST_MISMATCH, f"announced {announced[:80]}")
        if offset == 0:
            length = opened.response.content_length
            if length is None:
                raise PeerFailure(FailureReason.BAD_HEADERS, "no Content-Length")
            self._size = length
            return
        value = headers.get("Content-Range")
        try:
            said = parse_content_range(value)
        except ContentRangeError as err:
            raise PeerFailure(FailureReason.BAD_HEADERS, str(err)) from None
        if said.first != offset or said.total is None:
            raise PeerFailure(FailureReason.BAD_HEADERS, f"Content-Range {value!r}")
        if said.total != self._size:
            raise _SizeChanged(opened.peer)

    async def _next_source(self, offset: int, failure: PeerFailure) -> bool:
        """Replace the current peer after ``failure``; False when none is left."""
        if self._current is not None:
            self._client.failed(self._current.peer, failure)
            self.close()
        more = self._router.candidates(
            str(self._digest), limit=self._options.peers_tried + len(self._tried)
        )
        self._current = await self._open_from(offset, more)
        if self._current is None:
            return False
        if offset == 0:
            self._sources = [self._current.peer]
        else:
            self._sources.append(self._current.peer)
        return True

    def _succeeded(self) -> None:
        if self._current is not None:
            self._client.succeeded(self._current)
            self.close()

    # -- bytes -------------------------------------------------------------------

    async def _chunks(
        self,
        offset: int,
        consume: Callable[[Chunk], None],
        keep: Callable[[Chunk], None] | None = None,
        *,
        threads: bool,
        into: FileKeep | None = None,
    ) -> AsyncIterator[tuple[int, bytes]]:
        """(position, chunk) pairs from ``offset`` to the end, failing over on breaks.

        Every chunk is passed, in order, to ``keep`` (where the blob is held until
        verified, if it is) and ``consume`` (hashing), and the generator ends only
        once all are. With a ``keep`` the chunk may come as ``b""`` (its bytes are
        in the keep already, read on body threads): only the positions count. With
        ``threads`` the body is read and consumed on body threads
        (`PeerClient.pump`), so the event loop only forwards chunks; otherwise, or
        without a free body thread, it is read here and consumed on the default
        executor, overlapped with the next read. ``into``: ``keep``'s file, for body
        threads to splice the body into (`body.BodyPump`).
        """
        off_loop = _keep_then(keep, consume)
        position = offset
        loop = asyncio.get_running_loop()
        hashing: asyncio.Future[None] | None = None
        pumped_from: PeerResponse | None = None
        while position < self._size:
            current = self._current
            if current is None:
                raise PeerFailure(FailureReason.EXHAUSTED, f"no peer left at byte {position}")
            pumped: AsyncGenerator[bytes | int, None] | None = None
            if threads and pumped_from is not current:
                pumped_from = current  # once per source: a refusal means read it here
                if hashing is not None:
                    await hashing  # the thread must carry on from a complete hash
                    hashing = None
                pumped = self._client.pump(current, self._size - position, consume, keep, into)
            try:
                if pumped is not None:
                    try:
                        async for item in pumped:
                            if isinstance(item, int):  # kept and hashed on the threads
                                yield position, b""
                                position += item
                                continue
                            yield position, item
                            position += len(item)
                    finally:
                        await pumped.aclose()
                    continue
                size = min(self._options.chunk_size, self._size - position)
                chunk = await self._client.read_chunk(current, size)
                if not chunk:
                    raise PeerFailure(FailureReason.BROKEN, "body ended")
            except PeerFailure as err:
                failure = PeerFailure(err.reason, f"at byte {position}: {err}")
            else:
                # Hashed overlapped with forwarding this chunk and reading the
                # next; kept in order by awaiting the previous one first.
                if hashing is not None:
                    await hashing
                hashing = loop.run_in_executor(None, off_loop, chunk)
                yield position, chunk
                position += len(chunk)
                continue
            if not await self._next_source(position, failure):
                raise PeerFailure(FailureReason.EXHAUSTED, f"no peer left at byte {position}")
        if hashing is not None:
            await hashing


def in_pieces(data: bytes, size: int) -> Iterator[bytes]:
    """``data`` in pieces of at most ``size`` bytes, for the server (`MirrorConfig.send_size`)."""
    if len(data) <= size:
        yield data
        return
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def held_body(data: bytes, piece: int, budget: MemoryBudget | None = None,
                    taken: int = 0) -> AsyncIterator[bytes]:
    """A verified body held in memory, handed on in pieces of at most ``piece`` bytes;
    ``taken`` bytes of ``budget`` go back once it is sent or dropped."""
    try:
        for part in in_pieces(data, piece):
            yield part
    finally:
        if budget is not None:
            budget.give(taken)


def _mismatch(digest: Digest, detail: str = "") -> PeerFailure:
    return PeerFailure(FailureReason.DIGEST_MISMATCH, f"{digest} {detail}".strip())


def _keep_then(
    keep: Callable[[Chunk], None] | None, consume: Callable[[Chunk], None]
) -> Callable[[bytes], None]:
    """One chunk's work off the loop: keep it, then hash it; a failure to keep it is ours."""

    def both(chunk: bytes) -> None:
        if keep is not None:
            try:
                keep(chunk)
            except Exception as err:
                raise SinkFailure.of(err) from err
        consume(chunk)

    return both
