"""Talking to peers: bounded requests, in-flight accounting, blame, and body threads.

Every request the mirror sends a peer goes through one `PeerClient`, so the
rules that keep a bad peer from hurting a pull live in one place:

- a peer must accept the connection within ``resolve_timeout`` (a dead or
  unreachable peer costs no more than that) and answer with headers within
  ``first_byte_timeout``. The two bounds differ on purpose: a live peer starting
  several responses at once on a busy node needs tens of milliseconds, and
  giving up on it sends the bytes upstream;
- a request counts as in flight at its peer (the router ranks busy peers lower)
  from the moment it is sent until its `PeerResponse` is released, and on every
  path that never produces one, cancellation included: a leaked count would
  rank a healthy peer last for good;
- an outcome is charged to the peer that caused it: a 404 is a false positive
  of its summary, bad bytes earn a penalty, anything else an error;
- requests carry `marker.PEER_HEADER`; a node answers those from its own store
  only (see `marker.peer_dispatch`), so a false positive can never bounce
  between mirrors.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import aiohttp

from meshmirror.mirror.body import BodyPump, take_over
from meshmirror.mirror.errors import PeerFailure, SinkFailure
from meshmirror.mirror.hedging import hedged
from meshmirror.mirror.marker import PEER_HEADER
from meshmirror.mirror.metrics import MirrorMetrics
from meshmirror.mirror.options import MirrorOptions
from meshmirror.routing.router import Peer, Router

logger = logging.getLogger("meshmirror.mirror")


class PeerResponse:
    """A peer's response whose headers have arrived.

    It holds the request's in-flight count at its peer; `release` gives that
    back and frees the connection, once, however often it is called.
    """

    __slots__ = ("_released", "_router", "peer", "response", "started")

    def __init__(
        self, peer: Peer, response: aiohttp.ClientResponse, started: float, router: Router
    ) -> None:
        self.peer = peer
        self.response = response
        self.started = started
        self._router = router
        self._released = False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self.response.release()
        self._router.end(self.peer.name)


class PeerClient:
    """Sends the mirror's requests to peers and reports how each peer did."""

    def __init__(
        self,
        router: Router,
        session: aiohttp.ClientSession,
        options: MirrorOptions,
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
        )
        self._pumps: set[BodyPump] = set()
        self._pumps_started = 0

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
    ) -> PeerResponse:
        """Ask one peer for ``path`` (from byte ``offset``); raise `PeerFailure` unless
        it answers 200 (206 for an offset) within the connect and first-byte bounds."""
        request_headers = {PEER_HEADER: "1", "Accept-Encoding": "identity", **(headers or {})}
        if offset:
            request_headers["Range"] = f"bytes={offset}-"
        url = f"{peer.http_base}{path}"
        started = self._clock()
        self._router.begin(peer.name)
        try:
            response = await self._get(url, registry, request_headers)
        except BaseException:
            self._router.end(peer.name)
            raise
        opened = PeerResponse(peer, response, started, self._router)
        expected_status = 206 if offset else 200
        if response.status != expected_status:
            opened.release()
            reason = "not_found" if response.status == 404 else "bad_status"
            raise PeerFailure(reason, f"{url} answered {response.status}")
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
                    timeout=aiohttp.ClientTimeout(
                        sock_connect=self._options.resolve_timeout,
                        sock_read=self._options.read_timeout,
                    ),
                ),
                self._options.first_byte_timeout,
            )
        except aiohttp.ServerTimeoutError as err:  # before TimeoutError: it is one
            raise PeerFailure("connect_timeout", url) from err
        except TimeoutError as err:
            raise PeerFailure("timeout", url) from err
        except (aiohttp.ClientError, OSError) as err:
            raise PeerFailure("connect", f"{url}: {err}") from err

    def open_hedged(
        self,
        candidates: Sequence[Peer],
        path: str,
        registry: str,
        *,
        headers: dict[str, str] | None = None,
        offset: int = 0,
        on_start: Callable[[Peer], None] | None = None,
    ) -> AsyncGenerator[PeerResponse, None]:
        """Peers' responses to `open`, best candidate first, hedging after ``hedge_delay``.

        Failed attempts are charged to their peers; a caller that finds a yielded
        response bad (and charges it) may ask for the next one. Close the
        generator when done: the attempts still running are cancelled and what
        they opened is released. ``on_start`` learns each peer as it is asked.
        """

        def start(peer: Peer) -> Awaitable[PeerResponse]:
            if on_start is not None:
                on_start(peer)
            return self.open(peer, path, registry, headers=headers, offset=offset)

        return hedged(
            candidates,
            start,
            delay=self._options.hedge_delay,
            failure=PeerFailure,
            on_failure=self.failed,
            discard=PeerResponse.release,
        )

    # -- outcomes ----------------------------------------------------------------

    def succeeded(self, opened: PeerResponse) -> None:
        """The peer served good bytes: its latency counts towards its rank."""
        self._router.report(
            opened.peer.name, ok=True, latency_s=self._clock() - opened.started
        )

    def failed(self, peer: Peer, failure: PeerFailure) -> None:
        """Charge ``failure`` to ``peer``, by how much it says about the peer."""
        self._metrics.peer_failures.labels(failure.reason).inc()
        if failure.reason == "not_found":
            self._metrics.false_positives.inc()
            self._router.report(peer.name, ok=False, latency_s=0.0, false_positive=True)
        elif failure.reason == "digest_mismatch":
            self._router.penalise(peer.name)
        else:
            self._router.report(peer.name, ok=False, latency_s=0.0)
        logger.info("peer %s failed: %s", peer.name, failure)

    # -- bodies ------------------------------------------------------------------

    async def read_chunk(self, opened: PeerResponse, size: int) -> bytes:
        """Up to ``size`` more bytes of the body on the event loop; b"" at its end."""
        try:
            # The request's sock_read timeout bounds a stalled peer per read.
            chunk = await opened.response.content.read(size)
        except (TimeoutError, aiohttp.ServerTimeoutError) as err:
            raise PeerFailure("stalled", "no bytes within the read timeout") from err
        except (aiohttp.ClientError, OSError) as err:
            raise PeerFailure("broken", str(err)) from err
        self._metrics.peer_bytes.inc(len(chunk))
        return chunk

    async def read_whole(self, opened: PeerResponse, limit: int) -> bytes:
        """The whole body, at most ``limit`` bytes, within ``read_timeout``."""
        length = opened.response.content_length
        if length is not None and length > limit:
            raise PeerFailure("too_large", f"{length} bytes")
        buffer = bytearray()
        try:
            async with asyncio.timeout(self._options.read_timeout):
                async for chunk in opened.response.content.iter_any():
                    buffer += chunk
                    if len(buffer) > limit:
                        raise PeerFailure("too_large", f"over {limit} bytes")
        except TimeoutError as err:
            raise PeerFailure("stalled", "no bytes within the read timeout") from err
        except (aiohttp.ClientError, OSError) as err:
            raise PeerFailure("broken", str(err)) from err
        self._metrics.peer_bytes.inc(len(buffer))
        return bytes(buffer)

    def pump(
        self,
        opened: PeerResponse,
        length: int,
        consume: Callable[[bytes], None],
        keep: Callable[[bytes], None] | None,
    ) -> AsyncGenerator[bytes, None] | None:
        """The rest of ``opened``'s body (``length`` bytes), read on body threads.

        Each chunk comes already passed to ``keep`` and then ``consume``; a break
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
            return self._chunks(pump)
        self._pumps.add(pump)
        self._pumps_started += 1
        hashing.add_done_callback(lambda _: self._pumps.discard(pump))
        try:
            reading = loop.run_in_executor(self._body_executor, pump.read)
        except RuntimeError:
            sock.close()
            pump.abandon()  # the hashing thread passes the failure on and returns
            return self._chunks(pump)
        # Closed on the loop only once the reader is done with it, so a concurrent
        # stop() can never shut down a descriptor that has been reused.
        reading.add_done_callback(lambda _: sock.close())
        return self._chunks(pump)

    async def _chunks(self, pump: BodyPump) -> AsyncGenerator[bytes, None]:
        try:
            while True:
                item = await pump.items.get()
                if item is None:
                    return
                if isinstance(item, PeerFailure | SinkFailure):
                    raise item
                self._metrics.peer_bytes.inc(len(item))
                yield item
                pump.consumed()
        finally:
            pump.stop()
