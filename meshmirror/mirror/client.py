"""Talking to peers: bounded requests, in-flight accounting, blame, and body threads.

Every request the mirror sends a peer goes through one `PeerClient`, so the
rules that keep a bad peer from hurting a pull live in one place:

- requests to one peer pass its `PeerQueue`: at most ``peer_connections`` at
  once (fewer while the peer is busy), the rest waiting their turn. The bounds
  below start only once a request leaves the queue, so they measure the peer
  and never our own burst; a timeout while other requests to the peer run
  sends the request back into the queue once instead of failing it;
- a peer must accept the connection within ``connect_timeout`` (a dead or
  unreachable peer costs no more than that) and answer with headers within
  ``first_byte_timeout``. The two bounds differ on purpose: a live peer starting
  several responses at once on a busy node needs tens of milliseconds, and
  giving up on it sends the bytes upstream;
- a body must bring a byte within ``stall_timeout`` and keep up ``min_rate``
  (`body.Progress`), so a hanging or dripping peer is left within two
  ``stall_timeout``s;
- a request counts as in flight at its peer (the router ranks busy peers lower)
  from the moment it is sent until its `PeerResponse` is released, and on every
  path that never produces one, cancellation included: a leaked count would
  rank a healthy peer last for good;
- an outcome is charged to the peer that caused it, with the time it took: a
  404 is a false positive of its summary; a stall, bad bytes or a second timeout in a row open
  the peer's circuit (the router stops naming it for a while); anything else
  is an error that ranks it lower;
- requests carry `marker.PEER_HEADER`; a node answers those from its own store
  only (see `marker.peer_dispatch`), so a false positive can never bounce
  between mirrors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import aiohttp

from meshmirror.mirror.body import (
    BodyPump,
    Chunk,
    FileKeep,
    Progress,
    map_large_chunks,
    take_over,
)
from meshmirror.mirror.budget import MemoryBudget
from meshmirror.mirror.errors import FailureReason, PeerFailure, SinkFailure
from meshmirror.mirror.hedging import hedged
from meshmirror.mirror.marker import PEER_HEADER
from meshmirror.mirror.metrics import MirrorMetrics
from meshmirror.mirror.options import MirrorConfig
from meshmirror.mirror.peerqueue import PeerQueue
from meshmirror.routing.ranking import Outcome, PeerRanking
from meshmirror.routing.router import Peer

log = logging.getLogger(__name__)

# Failures that say the peer is unfit to ask for a while, not just unlucky once:
# they open its circuit in the router.
_CIRCUIT_REASONS = frozenset({FailureReason.STALLED, FailureReason.SLOW,
                              FailureReason.DIGEST_MISMATCH, FailureReason.BAD_DIGEST_HEADER})
# Failures that may be our own busy moment as much as the peer's (`Outcome.TIMEOUT`).
_TIMEOUT_REASONS = frozenset({FailureReason.TIMEOUT, FailureReason.CONNECT_TIMEOUT})
# aiohttp reads ahead up to twice this before pausing the socket.
_READ_BUFSIZE = 256 * 1024

# Body threads run at this much lower priority than the event loop's thread (Linux
# threads each have a nice value).
BODY_THREAD_NICENESS = 10


def _yield_to_the_loop() -> None:
    """A body thread's start: a lower priority than the event loop's.

    Hashing a large blob is bulk work; the event loop answers requests that take a
    millisecond. At the same priority, a hashing thread sharing a core with the loop
    holds it for whole scheduler slices, and every request the loop answers meanwhile
    waits: a client asking 20 HEADs of an uncached 64 MiB blob made honest answers on
    the same core 4-9x slower at the 95th percentile. At a lower priority the kernel
    runs the loop first, and the hashing still has every cycle the loop does not use.
    """
    with contextlib.suppress(OSError, AttributeError):  # not Linux: one priority for all
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BODY_THREAD_NICENESS)

class RangePastEnd(PeerFailure):
    """A 416 to a request from an offset: the peer's blob ends before it. A disagreement
    about the size with the peer that announced it, which the bytes settle (`fetch`):
    not charged to this peer."""


class PeerResponse:
    """A peer's response whose headers have arrived.

    It holds the request's in-flight count and its connection slot at its peer;
    `release` frees the connection (one whose body was not read to its end is
    closed, never pooled) and gives both back, once, however often it is called.
    """

    __slots__ = ("_give_back", "_released", "peer", "progress", "response", "started")

    def __init__(
        self,
        peer: Peer,
        response: aiohttp.ClientResponse,
        started: float,
        give_back: Callable[[], None],
        progress: Progress,
    ) -> None:
        self.peer = peer
        self.response = response
        self.started = started
        self.progress = progress
        self._give_back = give_back
        self._released = False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self.response.release()  # aiohttp closes a connection whose body was not read through
        self._give_back()


class PeerClient:
    """Sends the mirror's requests to peers and reports how each peer did."""

    def __init__(
        self,
        router: PeerRanking,
        session: aiohttp.ClientSession,
        options: MirrorConfig,
        metrics: MirrorMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._router = router
        self._session = session
        self._options = options
        self._metrics = metrics
        self._clock = clock
        # Our own threads for body reads: each holds its thread for a whole stream,
        # so on the default executor they would starve the stores' file reads.
        self._body_executor = ThreadPoolExecutor(
            max_workers=max(1, options.body_threads),
            thread_name_prefix="meshmirror-peer-body",
            initializer=_yield_to_the_loop,
        )
        self._pumps: set[BodyPump] = set()
        self._pumps_started = 0
        self._queues: dict[str, PeerQueue] = {}
        map_large_chunks()
        self.budget = MemoryBudget(options.memory_limit)

    @property
    def pumps_running(self) -> int:
        """Bodies being read on body threads right now."""
        return len(self._pumps)

    @property
    def pumps_started(self) -> int:
        """Bodies handed to body threads since this client was made."""
        return self._pumps_started

    def close(self) -> None:
        """Stop every body thread (their sockets are shut so blocked reads return)."""
        for pump in list(self._pumps):
            pump.stop()
        self._body_executor.shutdown(wait=False, cancel_futures=True)

    # -- requests ----------------------------------------------------------------

    async def open(
        self,
        peer: Peer,
        path: str,
        registry: str,
        *,
        headers: dict[str, str] | None = None,
        offset: int = 0,
        end: int | None = None,
    ) -> PeerResponse:
        """Ask one peer for ``path`` (bytes ``offset`` to ``end``); raise `PeerFailure`
        unless it answers 200 (206 for a range) within the connect and first-byte bounds."""
        request_headers = {PEER_HEADER: "1", "Accept-Encoding": "identity", **(headers or {})}
        if offset or end is not None:
            request_headers["Range"] = f"bytes={offset}-{'' if end is None else end - 1}"
        url = f"{peer.http_base}{path}"
        queue = self._queues.get(peer.name)
        if queue is None:
            queue = self._queues[peer.name] = PeerQueue(
                peer.name, self._options.peer_connections, self._options.deadline, self._clock)
        # Queued requests count as in flight: the router ranks a peer with a queue lower.
        self._router.begin(peer.name)

        def give_back() -> None:
            queue.leave()
            self._router.end(peer.name)

        for attempt in range(2):
            try:
                await queue.enter()
            except BaseException:
                self._router.end(peer.name)
                raise
            started = self._clock()
            try:
                response = await self._get(url, registry, request_headers)
            except PeerFailure as failure:
                if attempt == 0 and failure.reason in _TIMEOUT_REASONS and queue.running > 1:
                    # Busy with our other requests, not failing: fewer at once, wait again.
                    queue.overloaded()
                    queue.leave()
                    continue
                if attempt == 0 and failure.reason is FailureReason.CONNECT_TIMEOUT:
                    # A loopback or LAN connect takes microseconds: a connect timer that
                    # fires is as likely our own busy loop, late to see it. Once more.
                    queue.leave()
                    continue
                failure.elapsed = self._clock() - started
                give_back()
                raise
            except BaseException:
                give_back()
                raise
            queue.answered()
            break
        opened = PeerResponse(peer, response, started, give_back,
                              Progress(self._options.min_rate, self._options.stall_timeout))
        expected_status = 206 if offset or end is not None else 200
        if response.status != expected_status:
            opened.release()
            if response.status == 416 and offset:
                raise RangePastEnd(FailureReason.BAD_STATUS, f"{url} answered 416",
                                   elapsed=self._clock() - started)
            reason = (FailureReason.NOT_FOUND if response.status == 404
                      else FailureReason.BAD_STATUS)
            raise PeerFailure(reason, f"{url} answered {response.status}",
                              elapsed=self._clock() - started)
        self._metrics.first_byte.observe(self._clock() - started)
        return opened

    async def _get(
        self, url: str, registry: str, headers: dict[str, str]
    ) -> aiohttp.ClientResponse:
        try:
            return await asyncio.wait_for(
                self._session.get(
                    url,
                    params={"ns": registry},
                    headers=headers,
                    allow_redirects=False,
                    # What aiohttp buffers before a body thread takes the socket over
                    # (`body.take_over`): per response, outside the memory budget.
                    read_bufsize=_READ_BUFSIZE,
                    timeout=aiohttp.ClientTimeout(
                        sock_connect=self._options.connect_timeout,
                        sock_read=self._options.stall_timeout,
                    ),
                ),
                self._options.first_byte_timeout,
            )
        except aiohttp.ServerTimeoutError as err:  # before TimeoutError: it is one
            raise PeerFailure(FailureReason.CONNECT_TIMEOUT, url) from err
        except TimeoutError as err:
            raise PeerFailure(FailureReason.TIMEOUT, url) from err
        except (aiohttp.ClientError, OSError) as err:
            raise PeerFailure(FailureReason.CONNECT, f"{url}: {err}") from err

    def open_hedged(
        self,
        candidates: Sequence[Peer],
        path: str,
        registry: str,
        *,
        headers: dict[str, str] | None = None,
        offset: int = 0,
        on_start: Callable[[Peer], None] | None = None,
        on_failure: Callable[[Peer, PeerFailure], None] | None = None,
    ) -> AsyncGenerator[PeerResponse, None]:
        """Peers' responses to `open`, best candidate first, hedging after ``hedge_delay``.

        Failed attempts are charged to their peers; a caller that finds a yielded
        response bad (and charges it) may ask for the next one. Close the
        generator when done: the attempts still running are cancelled and what
        they opened is released. ``on_start`` learns each peer as it is asked,
        ``on_failure`` each one charged with a failure here.
        """

        def start(peer: Peer) -> Awaitable[PeerResponse]:
            if on_start is not None:
                on_start(peer)
            return self.open(peer, path, registry, headers=headers, offset=offset)

        def failed(peer: Peer, failure: PeerFailure) -> None:
            self.failed(peer, failure)
            if on_failure is not None:
                on_failure(peer, failure)

        return hedged(
            candidates,
            start,
            delay=self._options.hedge_delay,
            failure=PeerFailure,
            on_failure=failed,
            discard=PeerResponse.release,
        )

    # -- outcomes ----------------------------------------------------------------

    def succeeded(self, opened: PeerResponse) -> None:
        """The peer served good bytes: its latency counts towards its rank."""
        self._router.outcome(opened.peer.name, Outcome.OK, self._clock() - opened.started)

    def failed(self, peer: Peer, failure: PeerFailure) -> None:
        """Charge ``failure`` to ``peer``, by how much it says about the peer.

        The time the failure took counts like a success's: a peer that answers a
        quick 404 must not look like the fastest one.
        """
        if isinstance(failure, RangePastEnd):
            log.info("peer %s disagrees about the size: %s", peer.name, failure)
            return
        self._metrics.peer_failures.labels(failure.reason).inc()
        latency = max(0.0, failure.elapsed or 0.0)
        if failure.reason is FailureReason.QUEUE_STALLED:
            pass  # our own load: the peer is busy serving us, not failing
        elif failure.reason is FailureReason.NOT_FOUND:
            self._metrics.false_positives.inc()
            self._router.outcome(peer.name, Outcome.FALSE_POSITIVE, latency)
        elif failure.reason in _CIRCUIT_REASONS:
            self._router.outcome(peer.name, Outcome.UNFIT, latency)
        elif failure.reason in _TIMEOUT_REASONS:
            self._router.outcome(peer.name, Outcome.TIMEOUT, latency)
        else:
            self._router.outcome(peer.name, Outcome.ERROR, latency)
        log.info("peer %s failed: %s", peer.name, failure)

    # -- bodies ------------------------------------------------------------------

    async def read_chunk(self, opened: PeerResponse, size: int) -> bytes:
        """Up to ``size`` more bytes of the body on the event loop; b"" at its end.

        Raises `PeerFailure` when no byte comes within ``stall_timeout`` or the
        body falls below ``min_rate`` (`body.Progress`).
        """
        started = self._clock()
        try:
            async with asyncio.timeout(self._options.stall_timeout):
                chunk = await opened.response.content.read(size)
        except (TimeoutError, aiohttp.ServerTimeoutError) as err:
            raise PeerFailure(
                FailureReason.STALLED, f"no byte within {self._options.stall_timeout:g} s") from err
        except (aiohttp.ClientError, OSError) as err:
            raise PeerFailure(FailureReason.BROKEN, str(err)) from err
        if (slow := opened.progress.check(len(chunk), self._clock() - started)) is not None:
            raise slow
        self._count_bytes(opened.peer, len(chunk))
        return chunk

    def _count_bytes(self, peer: Peer, size: int) -> None:
        self._metrics.peer_bytes.inc(size)
        same = self._router.same_zone(peer.name)
        self._metrics.peer_zone_bytes.labels(
            "unknown" if same is None else "same" if same else "cross").inc(size)

    async def read_whole(self, opened: PeerResponse, limit: int) -> bytes:
        """The whole body, at most ``limit`` bytes, under the same stall and rate bounds."""
        length = opened.response.content_length
        if length is not None and length > limit:
            raise PeerFailure(FailureReason.TOO_LARGE, f"{length} bytes")
        buffer = bytearray()
        while chunk := await self.read_chunk(opened, 1024 * 1024):
            buffer += chunk
            if len(buffer) > limit:
                raise PeerFailure(FailureReason.TOO_LARGE, f"over {limit} bytes")
        return bytes(buffer)

    def pump(
        self,
        opened: PeerResponse,
        length: int,
        consume: Callable[[Chunk], None],
        keep: Callable[[Chunk], None] | None,
        into: FileKeep | None = None,
    ) -> AsyncGenerator[bytes | int, None] | None:
        """The rest of ``opened``'s body (``length`` bytes), read on body threads.

        Each chunk comes already passed to ``keep`` and then ``consume`` (with a
        ``keep``, as its length only: the bytes are where ``keep`` put them; with
        ``into`` as well, the file ``keep`` writes to, they are spliced there); a break
        raises `PeerFailure` after the last good chunk, a failure of ``keep`` or
        ``consume`` raises `SinkFailure`. Closing the generator stops the threads.
        None when half the body threads are taken or the response cannot be
        taken over: the caller reads it with `read_chunk` instead of waiting.
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
            stall_timeout=self._options.stall_timeout,
            min_rate=self._options.min_rate,
            budget=self.budget,
            consume=consume,
            keep=keep,
            into=into,
            read_ahead=self._options.read_ahead,
        )
        try:
            hashing = loop.run_in_executor(self._body_executor, pump.hash)
        except RuntimeError:  # executor shut down: the node is stopping
            sock.close()
            pump.items.put_nowait(PeerFailure(FailureReason.BROKEN, "mirror closed"))
            return self._chunks(pump, opened.peer)
        self._pumps.add(pump)
        self._pumps_started += 1
        hashing.add_done_callback(lambda _: self._pumps.discard(pump))
        try:
            reading = loop.run_in_executor(self._body_executor, pump.read)
        except RuntimeError:
            sock.close()
            pump.abandon()  # the hashing thread passes the failure on and returns
            return self._chunks(pump, opened.peer)
        # Closed on the loop only once the reader is done with it, so a concurrent
        # stop() can never shut down a descriptor that has been reused.
        reading.add_done_callback(lambda _: sock.close())
        return self._chunks(pump, opened.peer)

    async def _chunks(self, pump: BodyPump, peer: Peer) -> AsyncGenerator[bytes | int, None]:
        try:
            while True:
                item = await pump.items.get()
                if item is None:
                    return
                if isinstance(item, PeerFailure | SinkFailure):
                    raise item
                if isinstance(item, int):  # kept and hashed already: only its length
                    self._count_bytes(peer, item)
                    yield item
                    continue
                self._count_bytes(peer, len(item))
                yield item
                pump.consumed()
        finally:
            pump.stop()
            pump.ended("loop")
