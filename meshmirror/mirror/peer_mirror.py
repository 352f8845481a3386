"""Mirror mode: serve what the local store lacks by streaming it from peers.

`PeerMirror` is the registry's `Fallback`. For every miss it asks the router
which peers probably hold the key, and then:

- **bounds the wait.** A peer must accept the connection within
  ``connect_timeout`` (a dead or unreachable peer costs no more than that) and
  answer with headers within ``first_byte_timeout``; a second (hedged) request
  to the next candidate starts after ``hedge_delay`` if the first is silent, and
  the first good answer wins. With nobody left the answer is None, which the app
  turns into a fast 404 so containerd goes upstream. The two bounds differ on
  purpose: a live peer starting several responses at once on a busy node needs
  tens of milliseconds, and giving up on it sends the bytes upstream.
- **passes on no unverified byte.** A manifest, or a blob of at most
  ``verify_before_send_limit`` bytes, is read whole into memory and verified
  before the client sees any of it; a larger blob is held the same way in a
  spool file (see `spool`), so a lying peer costs a retry on the next candidate
  and nothing else. Why not stream and check at the end: containerd keeps every
  byte it was sent, so one corrupt byte fails its pull even when the mirror
  aborts. Only when the spool budget is spent is a blob streamed, with its last
  chunk held back until the digest checks out; on a mismatch the stream raises,
  the server aborts the connection short of Content-Length, and the client
  cannot take it as complete (but that pull fails, and its retry succeeds).
- **resumes.** A peer that breaks mid-stream is replaced by the next candidate,
  asked with ``Range: bytes=<reached>-``, and the hash carries on from there.
  A client's own Range is served by hashing the blob from byte 0 (the skipped
  prefix is read from the peer and discarded), because a digest can only be
  checked over the whole blob.

Requests to peers carry `marker.PEER_HEADER`; a node answers those from its own store
only (see `marker.peer_dispatch`), so a false positive can never bounce between mirrors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import aiohttp
from prometheus_client import CollectorRegistry

from meshmirror.mirror.body import BodyPump, take_over
from meshmirror.mirror.errors import PeerFailure, SinkFailure, VerificationError
from meshmirror.mirror.marker import PEER_HEADER
from meshmirror.mirror.metrics import MirrorMetrics, finished
from meshmirror.mirror.options import MirrorOptions
from meshmirror.mirror.spool import SpoolBudget
from meshmirror.oci.digest import Digest, DigestError
from meshmirror.oci.mediatypes import CONTAINERD_ACCEPT
from meshmirror.oci.reference import tag_key
from meshmirror.registry.fallback import FallbackContent
from meshmirror.registry.ranges import RangeSpec, UnsatisfiableRangeError
from meshmirror.routing.router import Peer, Router

_MANIFEST_LIMIT = 4 * 1024 * 1024

logger = logging.getLogger("meshmirror.mirror")


@dataclass(slots=True)
class _Opened:
    """A peer's response whose headers have arrived."""

    peer: Peer
    response: aiohttp.ClientResponse
    started: float


class PeerMirror:
    """The registry's fallback: fetch from peers chosen by the router, verified."""

    def __init__(
        self,
        router: Router,
        session: aiohttp.ClientSession,
        *,
        options: MirrorOptions | None = None,
        metrics: MirrorMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._router = router
        self._session = session
        self._options = options or MirrorOptions()
        self._metrics = metrics or MirrorMetrics(CollectorRegistry())
        self._clock = clock
        # Our own threads for body reads: each holds its thread for a whole stream,
        # so on the default executor they would starve the stores' file reads.
        self._body_executor = ThreadPoolExecutor(
            max_workers=max(1, self._options.body_threads),
            thread_name_prefix="meshmirror-peer-body",
        )
        self._pumps: set[BodyPump] = set()
        self._spools = SpoolBudget(self._options.spool_dir, self._options.spool_limit)
        self._metrics.spool_bytes.set_function(lambda: self._spools.used)
        for name in sorted(self._options.mirrored_registries):
            self._metrics.init_registry(name)

    @property
    def metrics(self) -> MirrorMetrics:
        """Its metrics; ``metrics.observers`` hear of every finished request."""
        return self._metrics

    def close(self) -> None:
        """Stop every body thread (their sockets are shut so blocked reads return)."""
        for pump in list(self._pumps):
            pump.stop()
        self._body_executor.shutdown(wait=False, cancel_futures=True)

    def _start_pump(
        self,
        opened: _Opened,
        length: int,
        consume: Callable[[bytes], None],
        keep: Callable[[bytes], None] | None,
    ) -> BodyPump | None:
        """Hand the rest of ``opened``'s body (``length`` bytes) to a body thread.

        None when every body thread is busy or the response cannot be taken over;
        the caller then reads it through aiohttp on the event loop as before.
        """
        if 2 * (len(self._pumps) + 1) > self._options.body_threads:
            return None
        taken = take_over(opened.response)
        if taken is None:
            return None
        prefix, sock = taken
        loop = asyncio.get_running_loop()
        pump = BodyPump(
            loop,
            sock,
            prefix[:length],
            length,
            chunk_size=self._options.chunk_size,
            read_timeout=self._options.read_timeout,
            consume=consume,
            keep=keep,
            read_ahead=self._options.read_ahead,
        )
        try:
            hashing = loop.run_in_executor(self._body_executor, pump.hash)
        except RuntimeError:  # executor shut down: the node is stopping
            sock.close()
            pump.items.put_nowait(PeerFailure("broken", "mirror closed"))
            return pump
        self._pumps.add(pump)
        hashing.add_done_callback(lambda _: self._pumps.discard(pump))
        try:
            reading = loop.run_in_executor(self._body_executor, pump.read)
        except RuntimeError:
            sock.close()
            pump.abandon()  # the hashing thread passes the failure on and returns
            return pump
        # Closed on the loop only once the reader is done with it, so a concurrent
        # stop() can never shut down a descriptor that has been reused.
        reading.add_done_callback(lambda _: sock.close())
        return pump

    # -- Fallback ------------------------------------------------------------------

    async def open_manifest(
        self, registry: str, repository: str, reference: str, want_body: bool
    ) -> FallbackContent | None:
        opts = self._options
        started = self._clock()
        path = f"/v2/{repository}/manifests/{reference}"
        expected: Digest | None = None
        if ":" in reference:
            try:
                expected = Digest.parse(reference)
            except DigestError:
                return None
            key = str(expected)
        else:
            key = tag_key(registry, repository, reference)
            if not opts.resolve_tags or opts.filtered(key):
                self._count(registry, "manifest", "filtered", path, started)
                return None
        if not opts.mirrors(registry):
            self._count(registry, "manifest", "not_mirrored", path, started)
            return None
        # HEAD is answered from a verified GET too: manifests are small and a tag's
        # digest is only as good as the body it came with.
        candidates = self._router.candidates(key, limit=opts.max_attempts)
        opener = _hedged_open(
            self, candidates, path, registry, {"Accept": CONTAINERD_ACCEPT}, offset=0
        )
        try:
            async for opened in opener:
                try:
                    content = await self._read_manifest(opened, expected)
                except PeerFailure as failure:
                    self._fail(opened.peer, failure)
                    continue
                self._router.report(
                    opened.peer.name, ok=True, latency_s=self._clock() - opened.started
                )
                self._count(registry, "manifest", "hit", path, started, opened.peer.name,
                            content.size)
                return content
        finally:
            await opener.aclose()
        self._count(registry, "manifest", "miss", path, started)
        return None

    async def open_blob(
        self,
        registry: str,
        repository: str,
        digest: Digest,
        byte_range: RangeSpec | None,
        want_body: bool,
    ) -> FallbackContent | None:
        path = f"/v2/{repository}/blobs/{digest}"
        if not self._options.mirrors(registry):
            self._count(registry, "blob", "not_mirrored", path, self._clock())
            return None
        fetch = _BlobFetch(self, registry, path, digest)
        opened = await fetch.open_first()
        if opened is None:
            self._count_blob(fetch, "miss")
            return None
        size = opened
        if not want_body:
            await fetch.close()
            self._count_blob(fetch, "hit")
            return FallbackContent(digest, size, None, None)
        try:
            selected = byte_range.resolve(size) if byte_range is not None else None
        except UnsatisfiableRangeError:
            await fetch.close()
            return FallbackContent(digest, size, None, None)
        start = 0 if selected is None else selected.offset
        end = size if selected is None else selected.offset + selected.length
        if size <= self._options.verify_before_send_limit:
            memory = _MemorySink()
            if not await self._verify(fetch, memory, registry, threads=False):
                return None
            self._metrics.blob_bodies.labels("memory").inc()
            body = bytes(memoryview(memory.data)[start:end])  # one copy, not two
            return FallbackContent(digest, size, None, _once(body))
        spool = self._spools.reserve(size)
        if spool is not None:
            try:
                verified = await self._verify(fetch, spool, registry, threads=True)
            except BaseException:
                spool.release()
                raise
            if not verified:
                spool.release()
                return None
            self._metrics.blob_bodies.labels("spool").inc()
            return FallbackContent(
                digest, size, None, spool.read(start, end, self._options.chunk_size))
        self._count_blob(fetch, "hit")
        self._metrics.blob_bodies.labels("stream").inc()
        return FallbackContent(digest, size, None, fetch.stream(start, end))

    async def _verify(
        self, fetch: _BlobFetch, sink: _Sink, registry: str, *, threads: bool
    ) -> bool:
        """Fill ``sink`` with the verified blob and count the request's outcome."""
        try:
            verified = await fetch.read_verified(sink, threads=threads)
        except SinkFailure as err:
            await fetch.close()
            logger.warning("could not hold a blob until verified (%s); answering 404", err)
            verified = False
        self._count_blob(fetch, "hit" if verified else "error")
        return verified

    # -- shared plumbing ---------------------------------------------------------

    def _count(self, registry: str, kind: str, result: str, path: str, started: float,
               peer: str | None = None, size: int | None = None) -> None:
        self._metrics.record(finished(registry, kind, path, result, started=started,
                                      clock=self._clock, peer=peer, size_bytes=size))

    def _count_blob(self, fetch: _BlobFetch, result: str) -> None:
        self._count(fetch._registry, "blob", result, fetch._path, fetch.started,
                    fetch.last_peer, fetch._size if result == "hit" else None)

    def _fail(self, peer: Peer, failure: PeerFailure) -> None:
        self._metrics.peer_failures.labels(failure.reason).inc()
        if failure.reason == "not_found":
            self._metrics.false_positives.inc()
            self._router.report(peer.name, ok=False, latency_s=0.0, false_positive=True)
        elif failure.reason == "digest_mismatch":
            self._router.penalise(peer.name)
        else:
            self._router.report(peer.name, ok=False, latency_s=0.0)
        logger.info("peer %s failed: %s", peer.name, failure)

    async def _open(
        self, peer: Peer, path: str, registry: str, headers: dict[str, str], offset: int
    ) -> _Opened:
        """Ask one peer; headers must arrive within the first-byte bound."""
        request_headers = {PEER_HEADER: "1", "Accept-Encoding": "identity", **headers}
        if offset:
            request_headers["Range"] = f"bytes={offset}-"
        started = self._clock()
        url = f"{peer.http_base}{path}"
        self._router.begin(peer.name)
        try:
            response = await asyncio.wait_for(
                self._session.get(
                    url,
                    params={"ns": registry},
                    headers=request_headers,
                    allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(
                        sock_connect=self._options.connect_timeout,
                        sock_read=self._options.read_timeout,
                    ),
                ),
                self._options.first_byte_timeout,
            )
        except aiohttp.ServerTimeoutError as err:  # before TimeoutError: it is one
            self._router.end(peer.name)
            raise PeerFailure("connect_timeout", url) from err
        except TimeoutError as err:
            self._router.end(peer.name)
            raise PeerFailure("timeout", url) from err
        except (aiohttp.ClientError, OSError) as err:
            self._router.end(peer.name)
            raise PeerFailure("connect", f"{url}: {err}") from err
        expected_status = 206 if offset else 200
        if response.status != expected_status:
            response.release()
            self._router.end(peer.name)
            reason = "not_found" if response.status == 404 else "bad_status"
            raise PeerFailure(reason, f"{url} answered {response.status}")
        self._metrics.first_byte.observe(self._clock() - started)
        return _Opened(peer, response, started)

    def _done(self, opened: _Opened) -> None:
        opened.response.release()
        self._router.end(opened.peer.name)

    async def _read_manifest(self, opened: _Opened, expected: Digest | None) -> FallbackContent:
        try:
            response = opened.response
            announced = response.headers.get("Docker-Content-Digest", "")
            media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
            if response.content_length is not None and response.content_length > _MANIFEST_LIMIT:
                raise PeerFailure("too_large", f"{response.content_length} bytes")
            data = await self._read_limited(response, _MANIFEST_LIMIT)
        finally:
            self._done(opened)
        self._metrics.peer_bytes.inc(len(data))
        if expected is None:
            try:
                expected = Digest.parse(announced)
            except DigestError as err:
                raise PeerFailure("bad_digest_header", announced[:80]) from err
        if Digest.of(data, expected.algorithm) != expected:
            raise PeerFailure("digest_mismatch", f"manifest {expected}")
        return FallbackContent(expected, len(data), media_type or None, _once(data))

    async def _read_limited(self, response: aiohttp.ClientResponse, limit: int) -> bytes:
        buffer = bytearray()
        try:
            async with asyncio.timeout(self._options.read_timeout):
                async for chunk in response.content.iter_any():
                    buffer += chunk
                    if len(buffer) > limit:
                        raise PeerFailure("too_large", f"over {limit} bytes")
        except TimeoutError as err:
            raise PeerFailure("stalled", "no bytes within the read timeout") from err
        except (aiohttp.ClientError, OSError) as err:
            raise PeerFailure("broken", str(err)) from err
        return bytes(buffer)


async def _hedged_open(
    mirror: PeerMirror,
    candidates: Sequence[Peer],
    path: str,
    registry: str,
    headers: dict[str, str],
    offset: int,
    launched: set[str] | None = None,
) -> AsyncGenerator[_Opened, None]:
    """Yield peers' opened responses, best first, hedging slow ones.

    The next candidate is started when the current ones fail or stay silent for
    ``hedge_delay``; the first good response is yielded and, if the caller comes
    back for more (that one turned out bad), the race goes on. Responses that
    lose the race are closed.
    """
    remaining = list(candidates)
    pending: dict[asyncio.Task[_Opened], Peer] = {}
    hedge_delay = mirror._options.hedge_delay

    def launch() -> None:
        peer = remaining.pop(0)
        if launched is not None:
            launched.add(peer.name)
        pending[asyncio.ensure_future(mirror._open(peer, path, registry, headers, offset))] = peer

    try:
        if remaining:
            launch()
        while pending:
            done, _ = await asyncio.wait(
                pending, timeout=hedge_delay, return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                if remaining:
                    launch()
                continue
            for task in done:
                peer = pending.pop(task)
                try:
                    opened = task.result()
                except PeerFailure as failure:
                    mirror._fail(peer, failure)
                    if remaining:
                        launch()
                    continue
                yield opened
                if not pending and remaining:
                    launch()
    finally:
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(BaseException):
                mirror._done(await task)


class _BlobFetch:
    """One blob request's journey across peers: opening, verifying, resuming."""

    def __init__(self, mirror: PeerMirror, registry: str, path: str, digest: Digest) -> None:
        self._mirror = mirror
        self._registry = registry
        self._path = path
        self._digest = digest
        # What the request's record says: when it began and who last answered.
        self.started = mirror._clock()
        self.last_peer: str | None = None
        key = str(digest)
        self._candidates = mirror._router.candidates(key, limit=mirror._options.max_attempts)
        self._tried: set[str] = set()
        self._current: _Opened | None = None
        self._size = 0

    async def open_first(self) -> int | None:
        """Open a response from the best responsive peer; its size, or None for none."""
        opened = await self._open_from(0, self._candidates)
        if opened is None:
            return None
        self._current = opened
        return self._size

    async def _open_from(self, offset: int, candidates: Sequence[Peer]) -> _Opened | None:
        fresh = [peer for peer in candidates if peer.name not in self._tried]
        opener = _hedged_open(
            self._mirror, fresh, self._path, self._registry, {}, offset, launched=self._tried
        )
        try:
            async for opened in opener:
                try:
                    self._check_headers(opened, offset)
                except PeerFailure as failure:
                    self._mirror._done(opened)
                    self._mirror._fail(opened.peer, failure)
                    continue
                self.last_peer = opened.peer.name
                return opened
        finally:
            await opener.aclose()
        return None

    def _check_headers(self, opened: _Opened, offset: int) -> None:
        headers = opened.response.headers
        announced = headers.get("Docker-Content-Digest")
        if announced is not None and announced != str(self._digest):
            raise PeerFailure("digest_mismatch", f"announced {announced[:80]}")
        if offset == 0:
            length = opened.response.content_length
            if length is None:
                raise PeerFailure("bad_headers", "no Content-Length")
            self._size = length
            return
        match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", headers.get("Content-Range", ""))
        if match is None or int(match.group(1)) != offset or int(match.group(3)) != self._size:
            raise PeerFailure("bad_headers", f"Content-Range {headers.get('Content-Range')!r}")

    async def close(self) -> None:
        if self._current is not None:
            self._mirror._done(self._current)
            self._current = None

    async def _next_source(self, offset: int, failure: PeerFailure) -> bool:
        """Replace the current peer after ``failure``; False when none is left."""
        if self._current is not None:
            self._mirror._fail(self._current.peer, failure)
            self._mirror._done(self._current)
            self._current = None
        more = self._mirror._router.candidates(
            str(self._digest), limit=self._mirror._options.max_attempts + len(self._tried)
        )
        self._current = await self._open_from(offset, more)
        return self._current is not None

    async def _chunks(
        self,
        offset: int,
        consume: Callable[[bytes], None],
        keep: Callable[[bytes], None] | None = None,
        *,
        threads: bool,
    ) -> AsyncIterator[tuple[int, bytes]]:
        """(position, chunk) pairs from ``offset`` to the end, failing over on breaks.

        Every chunk is passed, in order, to ``keep`` (where the blob is held until
        verified, if it is) and ``consume`` (hashing), and the generator ends only
        once all are. With ``threads`` the body is read and consumed on body
        threads (`BodyPump`), so the event loop only forwards chunks; otherwise,
        or without a free body thread, it is read here and consumed on the
        default executor, overlapped with the next read.
        """
        off_loop = _keep_then(keep, consume)
        position = offset
        chunk_size = self._mirror._options.chunk_size
        loop = asyncio.get_running_loop()
        hashing: asyncio.Future[None] | None = None
        pumped_from: _Opened | None = None
        while position < self._size:
            current = self._current
            if current is None:
                raise PeerFailure("exhausted", f"no peer left at byte {position}")
            pump: BodyPump | None = None
            if threads and pumped_from is not current:
                pumped_from = current  # once per source: a refusal means read it here
                if hashing is not None:
                    await hashing  # the thread must carry on from a complete hash
                    hashing = None
                pump = self._mirror._start_pump(current, self._size - position, consume, keep)
            if pump is not None:
                failure: PeerFailure | None = None
                try:
                    while True:
                        item = await pump.items.get()
                        if item is None:
                            break
                        if isinstance(item, SinkFailure):
                            raise item
                        if isinstance(item, PeerFailure):
                            failure = PeerFailure(item.reason, f"at byte {position}: {item}")
                            break
                        self._mirror._metrics.peer_bytes.inc(len(item))
                        yield position, item
                        position += len(item)
                        pump.consumed()
                finally:
                    pump.stop()
                if failure is None:
                    continue
            else:
                try:
                    # The request's sock_read timeout bounds a stalled peer per read.
                    chunk = await current.response.content.read(chunk_size)
                except (TimeoutError, aiohttp.ServerTimeoutError):
                    failure = PeerFailure("stalled", f"at byte {position}")
                except (aiohttp.ClientError, OSError) as err:
                    failure = PeerFailure("broken", f"at byte {position}: {err}")
                else:
                    if chunk:
                        if position + len(chunk) > self._size:
                            chunk = chunk[: self._size - position]
                        self._mirror._metrics.peer_bytes.inc(len(chunk))
                        # Overlapped with forwarding this chunk and reading the
                        # next; ordered by awaiting the previous one first.
                        if hashing is not None:
                            await hashing
                        hashing = loop.run_in_executor(None, off_loop, chunk)
                        yield position, chunk
                        position += len(chunk)
                        continue
                    failure = PeerFailure("broken", f"body ended at byte {position}")
            if not await self._next_source(position, failure):
                raise PeerFailure("exhausted", f"no peer left at byte {position}")
        if hashing is not None:
            await hashing

    async def read_verified(self, sink: _Sink, *, threads: bool) -> bool:
        """Fill ``sink`` with the whole blob and verify it; on a mismatch, start again
        from byte 0 on the next peer. False when no peer had good bytes."""
        while self._current is not None:
            hasher = self._digest.hasher()
            sink.reset()
            try:
                async for _ in self._chunks(0, hasher.update, sink.write, threads=threads):
                    pass
            except PeerFailure:
                await self.close()
                return False
            if hasher.hexdigest() == self._digest.hex:
                self._report_ok()
                return True
            if not await self._next_source(0, PeerFailure("digest_mismatch", str(self._digest))):
                return False
        return False

    def _report_ok(self) -> None:
        if self._current is not None:
            opened = self._current
            self._mirror._router.report(
                opened.peer.name, ok=True, latency_s=self._mirror._clock() - opened.started
            )
            self._mirror._done(opened)
            self._current = None

    async def stream(self, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes [start, end) of the blob, hashed from byte 0; the last chunk is held
        back until the whole digest verifies.

        Reading and hashing run on a body thread (socket reads and hashlib release
        the GIL) while the event loop forwards the previous chunk to the client, so
        the loop, which was the bottleneck, does nothing but write.
        """
        hasher = self._digest.hasher()
        held: bytes | None = None
        try:
            async for position, chunk in self._chunks(0, hasher.update, threads=True):
                lo, hi = max(start, position), min(end, position + len(chunk))
                if lo >= hi:
                    continue
                whole = lo == position and hi == position + len(chunk)
                piece = chunk if whole else chunk[lo - position : hi - position]
                if held is not None:
                    yield held
                held = piece
            if hasher.hexdigest() != self._digest.hex:
                if self._current is not None:
                    self._mirror._fail(
                        self._current.peer, PeerFailure("digest_mismatch", str(self._digest))
                    )
                raise VerificationError(f"{self._digest} did not verify; aborting the response")
            self._report_ok()
            if held is not None:
                yield held
        finally:
            await self.close()


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


class _Sink(Protocol):
    """Where a blob is held until verified: `_MemorySink` or a `spool.SpoolFile`."""

    def write(self, chunk: bytes) -> None: ...

    def reset(self) -> None: ...


class _MemorySink:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, chunk: bytes) -> None:
        self.data += chunk

    def reset(self) -> None:
        self.data.clear()


def _keep_then(
    keep: Callable[[bytes], None] | None, consume: Callable[[bytes], None]
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
