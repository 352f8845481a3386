"""A counting, optionally rate-limited TCP proxy on loopback, for tests and benchmarks.

Put in front of an upstream registry it answers "how many bytes did the
upstream really serve?" (``bytes_to_clients``) and "what if the upstream were
slow?" (``rate`` in bytes/s, shared by all connections like one uplink would
be). It runs its own asyncio loop in a daemon thread so synchronous test code
(subprocess-driven containerd pulls) can use it; every wait is bounded and
``stop`` closes every connection it accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from types import TracebackType

from tests.support.ports import free_port, loopback_host

_CHUNK = 256 * 1024


class _TokenBucket:
    """One rate shared by all connections; refills continuously, burst of a quarter second."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._tokens = 0.0
        self._last = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self, n: int) -> None:
        async with self._lock:
            while True:
                now = time.monotonic()
                self._tokens = min(self.rate / 4, self._tokens + (now - self._last) * self.rate)
                self._last = now
                if self._tokens >= n or self._tokens >= self.rate / 4:
                    self._tokens -= n
                    return
                await asyncio.sleep(min(0.25, (n - self._tokens) / self.rate))


class CountingProxy:
    """``with CountingProxy(upstream_host, upstream_port, rate=50e6) as p:`` on ``p.address``."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        host: str | None = None,
        port: int | None = None,
        rate: float | None = None,
        connect_timeout: float = 5.0,
        drain_timeout: float = 30.0,
    ) -> None:
        if rate is not None and rate <= 0:
            raise ValueError(f"rate must be a positive number of bytes/s, got {rate!r}")
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.host = host or loopback_host()
        self.port = port or free_port(self.host)
        self.rate = rate
        self.connect_timeout = connect_timeout
        self.drain_timeout = drain_timeout
        self._bytes_to_clients = 0
        self._bytes_to_upstream = 0
        self._connections = 0
        self._count_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._bucket: _TokenBucket | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def bytes_to_clients(self) -> int:
        """Bytes the upstream sent that reached clients through this proxy."""
        with self._count_lock:
            return self._bytes_to_clients

    @property
    def bytes_to_upstream(self) -> int:
        with self._count_lock:
            return self._bytes_to_upstream

    @property
    def connections(self) -> int:
        """Connections accepted so far (including ones to a dead upstream)."""
        with self._count_lock:
            return self._connections

    def reset(self) -> None:
        with self._count_lock:
            self._bytes_to_clients = 0
            self._bytes_to_upstream = 0
            self._connections = 0

    def start(self, timeout: float = 5.0) -> CountingProxy:
        if self._thread is not None:
            raise RuntimeError("proxy already started")
        loop = asyncio.new_event_loop()
        self._loop = loop
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._listen())
            except BaseException as exc:  # reported to start()'s caller
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=run, name=f"proxy-{self.address}", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError(f"proxy on {self.address} did not start within {timeout}s")
        if failure:
            self._thread.join(timeout)
            self._thread = None
            raise RuntimeError(f"proxy on {self.address} failed to listen") from failure[0]
        return self

    async def _listen(self) -> None:
        if self.rate is not None:
            self._bucket = _TokenBucket(self.rate)
        self._server = await asyncio.start_server(self._handle, self.host, self.port)

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        with self._count_lock:
            self._connections += 1
        self._writers.add(client_w)
        upstream_w: asyncio.StreamWriter | None = None
        try:
            try:
                upstream_r, connected_w = await asyncio.wait_for(
                    asyncio.open_connection(self.upstream_host, self.upstream_port),
                    self.connect_timeout,
                )
            except (TimeoutError, OSError):
                return  # upstream down: the client sees the connection close, like a refusal
            upstream_w = connected_w
            self._writers.add(connected_w)
            down = asyncio.create_task(self._pump(upstream_r, client_w, to_client=True))
            up = asyncio.create_task(self._pump(client_r, connected_w, to_client=False))
            _, pending = await asyncio.wait({down, up}, return_when=asyncio.FIRST_COMPLETED)
            # Requests are pipelined one at a time; when the response side ends the
            # exchange is over. When the client half-closes, let the response finish.
            if up not in pending and down in pending:
                with contextlib.suppress(asyncio.CancelledError, OSError, TimeoutError):
                    await asyncio.wait_for(asyncio.shield(down), self.drain_timeout)
            for task in pending:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await task
        finally:
            for w in (client_w, upstream_w):
                if w is not None:
                    self._writers.discard(w)
                    w.close()
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(w.wait_closed(), 1.0)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, to_client: bool
    ) -> None:
        try:
            while True:
                data = await reader.read(_CHUNK)
                if not data:
                    break
                if to_client and self._bucket is not None:
                    await self._bucket.take(len(data))
                # Counted as handed to the socket, before the peer can have read it,
                # so a client that finished reading sees the final count.
                with self._count_lock:
                    if to_client:
                        self._bytes_to_clients += len(data)
                    else:
                        self._bytes_to_upstream += len(data)
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                with contextlib.suppress(OSError):
                    writer.write_eof()
        except (ConnectionError, OSError):
            return

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)

    def stop(self, timeout: float = 5.0) -> None:
        """Close the listener and every open connection; idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if loop.is_running():
            fut = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
            with contextlib.suppress(Exception):
                fut.result(timeout)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._thread = None
        self._loop = None

    def __enter__(self) -> CountingProxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
