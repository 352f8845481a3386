"""Running an ASGI app under Hypercorn's HTTP/1.1 protocol, on a socket we bound ourselves,
with bounds on what a client can hold.

Binding before the server starts gives a clear error ("address in use") at start-up
instead of a traceback from inside the server task, and lets the caller know the real
port when it asked for port 0.

Hypercorn parses HTTP and drives the app; the connection around it is ours, because
Hypercorn's own (``hypercorn.asyncio.serve``) lets any pod on the cluster stop the
node (issue 23, docs/security.md):

- It waits on ``drain()`` for as long as a client does not read: a response nobody
  reads holds its spool file, memory and peer connection for ever. Here a send that
  makes no progress for ``send_timeout`` aborts the connection; Hypercorn then tells
  the app the client left, and the app closes the response's body.
- A connection whose client closed it before sending a request keeps its descriptor
  until the keep-alive timer ends (75 s): the connection's task group waits for that
  timer. 20,000 connect+close cycles then exhaust the open-file limit. Here the timer
  stops when the client's side ends.
- It accepts without limit, through asyncio's ``start_server``, which on EMFILE logs a
  traceback and retries (we saw hundreds of thousands of them). Here connections are
  capped: at the cap the accept loop waits for a slot, so new connections wait in
  the kernel's backlog instead of being accepted and closed, and idle connections
  go after a short grace so that the slots turn over.
- Failed accepts, timed-out sends and connection errors are counted (metrics) and
  logged as one summary line per interval, never one traceback each.
- One listen backlog for every client lets a connect storm from one pod take the
  CPU the node's own clients wait for. The registry port is a group of sockets
  (`meshmirror.registry.steering`) the kernel chooses from by source address, and
  each queue but the node's own is accepted from at a bounded rate (`_Bucket`).

Hypercorn's config has no send timeout or connection cap (``backlog``,
``keep_alive_timeout``, ``read_timeout`` and ``h11_max_incomplete_size`` it has, and
we set them); uvicorn's ``limit_concurrency`` answers 503 after accepting, and it too
waits on an unread socket for ever. So we keep Hypercorn's protocol and own the
accept loop and the socket writes (`_Connection`), a small surface on its
``TCPServer``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import fcntl
import functools
import logging
import math
import os
import re
import resource
import socket
import struct
import termios
from collections.abc import Callable
from typing import Any, Final

import h11
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.asyncio.worker_context import WorkerContext
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.utils import wrap_app
from prometheus_client import CollectorRegistry, Counter, Gauge
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from meshmirror.fileio import ShortFileError
from meshmirror.registry.serveroptions import (
    ACCEPT_BURST_S,
    ZERO_COPY_SEND,
    SendAborted,
    ServerConfig,
)
from meshmirror.registry.steering import Listeners, bind_listener

__all__ = [
    "ServerConfig",
    "ServerMetrics",
    "bind_listener",
    "connection_cap",
    "listener_address",
    "serve",
]

log = logging.getLogger(__name__)

# One summary line per this many seconds at most, whatever clients do.
_SUMMARY_INTERVAL: Final = 10.0
# Out of descriptors or buffers: retrying at once would spin; a slot frees soon.
_ACCEPT_RESOURCE_ERRORS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS,
                                            errno.ENOMEM})
_ACCEPT_RETRY_DELAY: Final = 0.1
# Pressure starts at three quarters of the cap and ends below half of it.
_PRESSURE_ON, _PRESSURE_OFF = 0.75, 0.5
# On steered listeners, this share of the cap only the reserved queue (the node's own
# addresses: containerd) may fill, and one source queue may hold at most this share of
# the rest (`_Limiter`): it takes pods in four queues to make the other queues wait.
_RESERVED_SHARE: Final = 0.25
_QUEUE_SHARE: Final = 0.25
# Aborted connections and cancelled tasks get this long to finish at shutdown.
_ABORT_GRACE: Final = 1.0
# A request head still incomplete at this size goes to the protocol, which bounds it.
_SILENT_HEAD: Final = 4096
# Where a request head ends, as h11 finds it: a blank line, ended by CRLF or a bare LF
# (h11 accepts both, so a head ended by bare LFs is whole; a test sends each).
_HEAD_END: Final = re.compile(rb"\n\r?\n")
# The accept loop yields after this long of accepting (`serve`).
_ACCEPT_BUDGET: Final = 0.0005
# At most this much of what a client sent before its connection was set up is read at
# accept (`_read_ahead`); the request head is bounded at 16 KiB anyway.
_READ_AHEAD: Final = 2**16
# At most this much per sendfile call, and the loop runs other work between calls: a
# burst of responses that become ready at once (a verified blob's waiting readers) all
# get their headers out promptly, and a fast client never holds the loop.
_SENDFILE_MAX: Final = 1 << 20


def listener_address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def connection_cap(configured: int, open_file_limit: int | None = None) -> int:
    """``configured``, held to half the open-file limit (the soft RLIMIT_NOFILE when not
    given), so peers, blob files and the other port always find a descriptor."""
    if open_file_limit is None:
        open_file_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if open_file_limit == resource.RLIM_INFINITY or open_file_limit <= 0:
        return configured
    return max(1, min(configured, open_file_limit // 2))


SERVERS: Final = ("registry", "metrics")
"""The listeners a node runs: the ``server`` label's values."""
EVENTS: Final = ("send_timeout", "accept_failed", "connection_error", "at_cap",
                  "rate_limited")
"""What can happen to a client connection: the ``event`` label's values."""


class ServerMetrics:
    """Client connections of the node's listeners, for a dashboard and an alert: a port
    at its cap or dropping unread responses is being misused or is too small."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.connections = Gauge(
            "meshmirror_http_connections", "Open client connections, by listener.",
            ["server"], registry=registry)
        self.events = Counter(
            "meshmirror_http_connection_events",
            "Client connection events, by listener: send_timeout (a response dropped "
            "because its client took no byte for --client-send-timeout), accept_failed, "
            "connection_error (set-up failed or a bug), at_cap (the listener stopped "
            "accepting at --client-max-connections until a connection closed), "
            "rate_limited (a source queue used up its accept rate and is not read "
            "until it refills: the kernel drops that queue's new connections).",
            ["server", "event"], registry=registry)
        for server in SERVERS:
            self.connections.labels(server)
            for event in EVENTS:
                self.events.labels(server, event)


class _Summary:
    """Counts of client events, logged as one line per interval instead of one each, and
    counted in the metrics as they happen."""

    def __init__(self, server: str, metrics: ServerMetrics | None = None,
                 interval: float = _SUMMARY_INTERVAL) -> None:
        self._server = server
        self._metrics = metrics
        self._interval = interval
        self._counts: collections.Counter[str] = collections.Counter()
        self._flush: asyncio.TimerHandle | None = None

    def count(self, event: str, detail: str | None = None) -> None:
        """``event`` is one of `EVENTS`; the log line counts ``detail`` (an errno, an
        exception's type) when given, so the metric's labels stay a closed set."""
        if self._metrics is not None:
            self._metrics.events.labels(self._server, event).inc()
        self._counts[f"{event}_{detail}" if detail else event] += 1
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(self._interval, self.flush)

    def flush(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self._counts:
            log.warning("client connection events", extra={"fields": {
                "server": self._server, "interval_s": self._interval, **self._counts}})
            self._counts.clear()


class _Limiter:
    """The connection cap, and the pressure that makes idle connections go early.

    With ``queues`` > 1 (steered listeners, `meshmirror.registry.steering`) the cap is
    split by accept queue: an accept rate bounds how fast a source queue opens
    connections, not how many it keeps, and a pod holding unread responses (each kept
    for the send timeout) or silent connections would otherwise fill the whole cap, and
    the node's own containerd, on the reserved queue 0, would wait behind it. So
    `_RESERVED_SHARE` of the cap is for queue 0 alone, and each source queue holds at
    most `_QUEUE_SHARE` of the rest: a pod's connections then wait in its own queue's
    backlog, not in everyone's. Pressure is per queue too (``pressure[queue]``): a
    queue near its own limit closes its idle connections early, so that its slots
    turn over, and the other queues' keep theirs."""

    def __init__(self, cap: int, idle_grace: float, summary: _Summary,
                 gauge: Gauge | None, queues: int = 1) -> None:
        self.cap = cap
        self.open = 0
        self._by_queue = [0] * queues
        self._sources_open = 0
        self._sources_cap = cap - int(cap * _RESERVED_SHARE) if queues > 1 else cap
        self._queue_cap = (max(1, math.ceil(self._sources_cap * _QUEUE_SHARE))
                           if queues > 1 else cap)
        self.idle_grace = idle_grace
        self.pressure = [asyncio.Event() for _ in range(queues)]
        # Called with the queues whose pressure starts: connections waiting outside a
        # task (`_Silent`) have no ``pressure.wait()`` of their own.
        self.on_pressure: Callable[[range], None] | None = None
        self._summary = summary
        if gauge is not None:  # read at scrape time: no lock taken twice per connection
            gauge.set_function(lambda: self.open)
        # Pressure from the whole cap (every queue), from the source queues' share (all
        # but 0), and from one queue's own limit; each starts at `_PRESSURE_ON` of its
        # limit and ends below `_PRESSURE_OFF`.
        self._on = [limit * _PRESSURE_ON
                    for limit in (cap, self._sources_cap, self._queue_cap)]
        self._off = [limit * _PRESSURE_OFF
                     for limit in (cap, self._sources_cap, self._queue_cap)]
        self._all_pressed = self._sources_pressed = False
        # Called once when a slot frees after `full` found none (the acceptors' resume).
        self._on_slot: list[Callable[[], None]] = []

    def full(self, queue: int, on_slot: Callable[[], None]) -> bool:
        """Whether every slot ``queue`` may take is taken; if so, ``on_slot`` is called
        once one frees."""
        if self.open < self.cap and (queue == 0 or (
                self._sources_open < self._sources_cap
                and self._by_queue[queue] < self._queue_cap)):
            return False
        self._summary.count("at_cap")
        if on_slot not in self._on_slot:
            self._on_slot.append(on_slot)
        return True

    def take(self, queue: int) -> None:
        """A slot, for a connection just accepted from ``queue`` (`full` said there was
        one)."""
        self.open += 1
        self._by_queue[queue] += 1
        if queue:
            self._sources_open += 1
        if self.open >= self._on[0] and not self._all_pressed:
            self._all_pressed = True
            self._press(range(len(self.pressure)))
        elif queue and self._sources_open >= self._on[1] and not self._sources_pressed:
            self._sources_pressed = True
            self._press(range(1, len(self.pressure)))
        elif (queue and self._by_queue[queue] >= self._on[2]
              and not self.pressure[queue].is_set()):
            self._press(range(queue, queue + 1))

    def release(self, queue: int) -> None:
        self.open -= 1
        self._by_queue[queue] -= 1
        if queue:
            self._sources_open -= 1
        if self._on_slot:
            on_slot, self._on_slot = self._on_slot, []
            for resume in on_slot:
                resume()
        if self.idle_grace <= 0:
            return
        if self._all_pressed and self.open < self._off[0]:
            self._all_pressed = False
            self._relieve(range(len(self.pressure)))
        elif self._sources_pressed and self._sources_open < self._off[1]:
            self._sources_pressed = False
            self._relieve(range(1, len(self.pressure)))
        elif self.pressure[queue].is_set():
            self._relieve(range(queue, queue + 1))

    def closing(self) -> None:
        """At shutdown every idle connection goes at once."""
        self.idle_grace = 0.0
        self._all_pressed = True
        self._press(range(len(self.pressure)))

    def _press(self, queues: range) -> None:
        for queue in queues:
            self.pressure[queue].set()
        if self.on_pressure is not None:
            self.on_pressure(queues)

    def _relieve(self, queues: range) -> None:
        """Pressure ends on each of ``queues`` that no limit keeps it on."""
        for queue in queues:
            if not (self._all_pressed or (queue and (
                    self._sources_pressed or self._by_queue[queue] >= self._off[2]))):
                self.pressure[queue].clear()


class _Silent:
    """Connections accepted before their client sent a whole request head, waiting for
    it with a reader callback and a timer each: no transport, protocol or task until a
    request can start. A connect-and-close storm is accepted faster than its clients close, so
    many of its connections arrive here; they must cost the node as little as the ones
    already closed at accept (`_read_ahead`), or the honest connections queued behind
    them in the listen backlog wait. A silent client is held like an idle keep-alive
    one: ``keep_alive_timeout``, or the idle grace under pressure."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limiter: _Limiter,
                 keep_alive: float,
                 start: Callable[[socket.socket, bytes, int], None]) -> None:
        self._loop = loop
        self._limiter = limiter
        self._keep_alive = keep_alive
        self._start = start
        # fd -> (connection, its accept queue, what it sent so far, since, timer)
        self._waiting: dict[int, tuple[socket.socket, int, bytes, float,
                                       asyncio.TimerHandle]] = {}
        limiter.on_pressure = self._press

    def accepted(self, conn: socket.socket, queue: int) -> None:
        """Take over ``conn``, just accepted from ``queue`` (its slot of the cap taken),
        still set to reset at close as the listener is (`serve`)."""
        self._read(conn, queue, b"", self._loop.time(), fresh=True)

    def _read(self, conn: socket.socket, queue: int, head: bytes, since: float,
              fresh: bool = False) -> None:
        sent = _read_ahead(conn, head, lingering=fresh)
        if sent is None:
            self._limiter.release(queue)
            return
        if fresh:  # a dead connection skips both calls
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_OFF)
            conn.setblocking(False)  # for the transport
        if _HEAD_END.search(sent) or len(sent) > _SILENT_HEAD:
            self._start(conn, sent, queue)
        else:  # nothing yet, or part of a request head: a storm's byte before its close
            fd = conn.fileno()
            limit = (self._limiter.idle_grace if self._limiter.pressure[queue].is_set()
                     else self._keep_alive)
            timer = self._loop.call_at(since + limit, self._expire, fd)
            self._waiting[fd] = (conn, queue, sent, since, timer)
            self._loop.add_reader(fd, self._readable, fd)

    def _take(self, fd: int) -> tuple[socket.socket, int, bytes, float]:
        conn, queue, head, since, timer = self._waiting.pop(fd)
        timer.cancel()
        self._loop.remove_reader(fd)
        return conn, queue, head, since

    def _readable(self, fd: int) -> None:
        self._read(*self._take(fd))

    def _expire(self, fd: int) -> None:
        conn, queue = self._take(fd)[:2]
        conn.close()
        self._limiter.release(queue)

    def _press(self, queues: range) -> None:
        for fd, (conn, queue, head, since, timer) in list(self._waiting.items()):
            if queue not in queues:
                continue
            expires = since + self._limiter.idle_grace
            if expires < timer.when():
                timer.cancel()
                self._waiting[fd] = (conn, queue, head, since,
                                     self._loop.call_at(expires, self._expire, fd))

    def close_all(self) -> None:
        for fd in list(self._waiting):
            self._expire(fd)


class _SendTimedOut(Exception):
    pass


def _unacknowledged(transport: asyncio.WriteTransport) -> int:
    """Bytes written that the client has not acknowledged: our buffer plus the kernel's.

    The kernel's share matters: with a large send buffer it wakes a writer only once
    a third of it is free, so a slow reader's progress may not show in our own
    buffer for many seconds.
    """
    pending = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(ValueError):
            pending += _kernel_queued(sock.fileno())
    return pending


def _kernel_queued(fd: int) -> int:
    """Bytes in the socket's send queue that the client has not acknowledged."""
    try:
        return int(struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0])
    except OSError:
        return 0


class _FileSpan:
    """A file's bytes as h11 body data: h11 frames it by its length and passes it back
    untouched (``send_with_data_passthrough``), so the connection can sendfile it."""

    __slots__ = ("count", "fd", "offset", "sent")

    def __init__(self, fd: int, offset: int, count: int) -> None:
        self.fd, self.offset, self.count = fd, offset, count
        self.sent = 0

    def __len__(self) -> int:
        return self.count


def _set_ready(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _Connection(TCPServer):
    """Hypercorn's connection with bounded sends and no keep-alive wait after the client
    has gone; see the module docstring."""

    def __init__(self, app: ASGIApp, config: Config, *args: Any, options: ServerConfig,
                 limiter: _Limiter, summary: _Summary, queue: int = 0) -> None:
        super().__init__(wrap_app(self._app, config.wsgi_max_body_size,  # type: ignore[arg-type]
                                  "asgi"),
                         args[0], config, *args[1:])
        self._inner = app
        self._options = options
        self._limiter = limiter
        self._queue = queue  # its accept queue: whose pressure closes it when idle
        self._summary = summary
        # Set once the client's side has ended (`_read_data`): nothing more can come in.
        self._client_ended = False

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app, offered `ZERO_COPY_SEND` on HTTP/1.1: a file span it sends goes from
        the page cache to the socket with ``sendfile``, not through Python."""
        if scope["type"] != "http" or not isinstance(self.protocol.protocol, H11Protocol):
            await self._inner(scope, receive, send)
            return
        scope["extensions"] = {**(scope.get("extensions") or {}), ZERO_COPY_SEND: {}}
        head = scope["method"] == "HEAD"

        async def send_files(message: Message) -> None:
            if message["type"] != ZERO_COPY_SEND:
                await send(message)
                return
            file = message["file"]
            fd = file if isinstance(file, int) else file.fileno()
            if not head and message["count"]:
                count = int(message["count"])
                sent = await self._send_file(fd, int(message.get("offset", 0)), count)
                if sent < count:
                    raise SendAborted(sent)
            if not message.get("more_body", False):
                await send({"type": "http.response.body", "body": b"", "more_body": False})

        await self._inner(scope, receive, send_files)

    async def _send_file(self, fd: int, offset: int, count: int) -> int:
        """``count`` bytes of ``fd`` from ``offset`` as response body, framed by h11, sent
        by the kernel, bounded by the send timeout like every other write. Returns the
        bytes sent: fewer than ``count`` when the connection ended first."""
        h11_connection = self.protocol.protocol.connection
        assert isinstance(h11_connection, h11.Connection)  # HTTP/1.1 only: see `_app`
        span = _FileSpan(fd, offset, count)
        async with self.send_lock:
            if self.writer.transport.is_closing():
                return 0
            try:
                for piece in h11_connection.send_with_data_passthrough(
                        h11.Data(data=span)) or ():  # type: ignore[arg-type]  # by its length
                    if isinstance(piece, _FileSpan):
                        await self._sendfile(piece)
                    else:  # chunked framing around it, if any
                        self.writer.write(piece)
                        await self._drain()
                return span.sent
            except (ConnectionError, RuntimeError):
                pass
            except _SendTimedOut:
                self._summary.count("send_timeout")
                self.abort()
            except OSError as err:  # the file failed or ended early: cut the response short
                log.warning("sending a file failed; connection aborted",
                            extra={"fields": {"error": str(err)}})
                self.abort()
        await self.protocol.handle(Closed())
        return span.sent

    async def _sendfile(self, span: _FileSpan) -> None:
        transport = self.writer.transport
        await self._flush()
        # Our own descriptor of the socket: the transport may close its own meanwhile (the
        # client went, shutdown), and a number reused by another open must never be sent to.
        out = os.dup(transport.get_extra_info("socket").fileno())
        try:
            position, end = span.offset, span.offset + span.count
            while position < end:
                # Other work first, before each call: responses that become ready
                # together (a verified blob's readers) all get their headers out before
                # any one of them starts copying its body.
                await asyncio.sleep(0)
                if transport.is_closing():
                    raise ConnectionResetError("connection closed while sending a file")
                try:
                    sent = os.sendfile(out, span.fd, position, min(end - position, _SENDFILE_MAX))
                except BlockingIOError:
                    await self._writable(out)
                    continue
                if sent == 0:
                    raise ShortFileError(f"file ended at byte {position}, "
                                         f"{end - position} bytes early")
                position += sent
                span.sent += sent
        finally:
            os.close(out)

    async def _flush(self) -> None:
        """Wait until everything written before (the headers) has left our buffer."""
        transport = self.writer.transport
        if not transport.get_write_buffer_size():
            return
        low, high = transport.get_write_buffer_limits()
        transport.set_write_buffer_limits(high=0, low=0)
        try:
            await self._drain()
        finally:
            transport.set_write_buffer_limits(high=high, low=low)

    async def _writable(self, fd: int) -> None:
        """Until the socket takes more; `_SendTimedOut` once the client has acknowledged no
        byte for ``send_timeout`` (the rule `_drain` keeps)."""
        loop = asyncio.get_running_loop()
        limit = self._options.send_timeout
        pending = _kernel_queued(fd)
        last_progress = loop.time()
        while True:
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_writer(fd, _set_ready, ready)
            try:
                async with asyncio.timeout(limit / 4):
                    await ready
                return
            except TimeoutError:
                if self.writer.transport.is_closing():
                    raise ConnectionResetError("connection closed while sending a file") from None
                size, now = _kernel_queued(fd), loop.time()
                if size < pending:
                    pending, last_progress = size, now
                elif now - last_progress >= limit:
                    raise _SendTimedOut from None
            finally:
                loop.remove_writer(fd)

    def abort(self) -> None:
        self.writer.transport.abort()

    async def protocol_send(self, event: Event) -> None:
        if not isinstance(event, RawData):
            await super().protocol_send(event)
            return
        async with self.send_lock:
            if self.writer.transport.is_closing():
                # Aborted below: the app learns from the disconnect, not from errors.
                return
            try:
                self.writer.write(event.data)
                await self._drain()
            except (ConnectionError, RuntimeError):
                pass
            except _SendTimedOut:
                self._summary.count("send_timeout")
                self.abort()
            else:
                return
        await self.protocol.handle(Closed())

    async def _drain(self) -> None:
        """``drain()``, failing once the client has taken no byte for ``send_timeout``.

        Progress is the client acknowledging bytes, so a slow reader that keeps
        reading keeps its connection. Drain is waited on in steps only when it would block:
        a client that reads as fast as we write costs no timer.
        """
        transport = self.writer.transport
        if transport.get_write_buffer_size() <= transport.get_write_buffer_limits()[1]:
            await self.writer.drain()
            return
        loop = asyncio.get_running_loop()
        limit = self._options.send_timeout
        pending = _unacknowledged(transport)
        last_progress = loop.time()
        while True:
            try:
                async with asyncio.timeout(limit / 4):
                    await self.writer.drain()
                return
            except TimeoutError:
                size = _unacknowledged(transport)
                now = loop.time()
                if size < pending:
                    pending, last_progress = size, now
                elif now - last_progress >= limit:
                    raise _SendTimedOut from None

    async def _close(self) -> None:
        self._abort_unless_flushed()
        await super()._close()

    async def _initiate_server_close(self) -> None:
        self._abort_unless_flushed()
        await super()._initiate_server_close()

    def _abort_unless_flushed(self) -> None:
        """A graceful close waits until our buffer is sent: for a client that reads no
        more, for ever, holding the descriptor and a slot of the cap. So a close with
        bytes still pending becomes an abort once the send timeout has passed."""
        if self.writer.transport.get_write_buffer_size():
            asyncio.get_running_loop().call_later(self._options.send_timeout, self.abort)

    async def _read_data(self) -> None:
        await super()._read_data()
        # The client's side has ended and the request, if any, was told so; without
        # this the task group would wait out the keep-alive timer, holding the fd.
        self._client_ended = True
        await self.idle_task.stop()

    async def _idle_timeout(self) -> None:
        loop = asyncio.get_running_loop()
        if self._client_ended:
            # A request still in progress when the client's end arrived (sent with it,
            # or pipelined) restarts this timer once answered: with nobody left to send
            # another, the connection closes now rather than in ``keep_alive_timeout``.
            await asyncio.shield(self._initiate_server_close())
            return
        idle_since = loop.time()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.keep_alive_timeout):
                await self._limiter.pressure[self._queue].wait()
                await asyncio.sleep(idle_since + self._limiter.idle_grace - loop.time())
        await asyncio.shield(self._initiate_server_close())


class _Bucket:
    """Accepts per second for a source queue: ``rate`` a second, up to ``burst`` seconds'
    worth at once (`ACCEPT_BURST_S`: an honest burst, such as every peer fetching a
    changed summary, goes through)."""

    __slots__ = ("_capacity", "_last", "_rate", "_tokens")

    def __init__(self, rate: float, now: float, burst: float = ACCEPT_BURST_S) -> None:
        self._rate = rate
        self._capacity = rate * burst
        self._tokens = self._capacity
        self._last = now

    def ready(self, now: float) -> float:
        """0.0 if an accept may go now, else the seconds until one may."""
        self._tokens = min(self._capacity, self._tokens + (now - self._last) * self._rate)
        self._last = now
        return 0.0 if self._tokens >= 1.0 else (1.0 - self._tokens) / self._rate

    def take(self) -> None:
        self._tokens -= 1.0


class _Acceptor:
    """A listener's accept loop, as a reader callback: whatever the backlog holds is
    accepted in batches of at most `_ACCEPT_BUDGET`, and the loop's other work (requests
    already accepted, the other listener) runs between batches. A callback that stays
    registered costs a storm no task step, future or reader registration per wake-up,
    and the loop's readiness check, not a coroutine, decides when the next batch runs.
    At the cap it stops watching until a slot frees (`_Limiter.full`), so new
    connections wait in the kernel's backlog.

    A source queue (`meshmirror.registry.steering`) has a ``bucket``: its rate. Out of
    tokens, it stops watching until they refill (one timer), and its backlog fills: the
    kernel then drops that queue's new connections at SYN time, and the node spends
    nothing on them."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 limiter: _Limiter, silent: _Silent, summary: _Summary,
                 bucket: _Bucket | None = None, queue: int = 0) -> None:
        self._loop = loop
        self._sock = sock
        self._queue = queue
        self._fd = sock.fileno()
        self._limiter = limiter
        self._silent = silent
        self._summary = summary
        self._bucket = bucket
        self._watching = False
        self._stopped = False
        self._retry: asyncio.TimerHandle | None = None

    def watch(self) -> None:
        self._retry = None
        if not self._watching and not self._stopped:
            self._loop.add_reader(self._fd, self._readable)
            self._watching = True

    def _unwatch(self) -> None:
        if self._watching:
            self._loop.remove_reader(self._fd)
            self._watching = False

    def stop(self) -> None:
        self._stopped = True
        self._unwatch()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None

    def _readable(self) -> None:
        loop, sock, limiter, silent = self._loop, self._sock, self._limiter, self._silent
        now = loop.time()
        batch_ends = now + _ACCEPT_BUDGET
        bucket = self._bucket
        while True:
            if limiter.full(self._queue, self.watch):
                self._unwatch()
                return
            if bucket is not None and (wait := bucket.ready(now)):
                self._summary.count("rate_limited")
                self._unwatch()
                self._retry = loop.call_later(wait, self.watch)
                return
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return  # still watched: called again once the backlog holds more
            except OSError as err:
                self._summary.count("accept_failed", errno.errorcode.get(err.errno or 0)
                                    or type(err).__name__)
                if err.errno in _ACCEPT_RESOURCE_ERRORS:
                    self._unwatch()
                    self._retry = loop.call_later(_ACCEPT_RETRY_DELAY, self.watch)
                    return
                continue
            if bucket is not None:
                bucket.take()
            limiter.take(self._queue)
            try:
                silent.accepted(conn, self._queue)
            except Exception as err:  # a bug, not a client: counted, never a flood
                self._summary.count("connection_error", type(err).__name__)
                conn.close()
                limiter.release(self._queue)
            now = loop.time()
            if now >= batch_ends:
                return  # the backlog is still readable: the next batch after other work


def _read_ahead(conn: socket.socket, head: bytes = b"",
                lingering: bool = False) -> bytes | None:
    """What the client has sent already, read without waiting (b"" if nothing yet; ``conn``
    may be in blocking mode);
    None, with ``conn`` closed, if its client has already closed or reset it without
    a whole request head.

    A few system calls instead of a transport, a protocol and a task: a storm of
    connect-and-close (issue 23 saw 20,000 in seconds), with or without a byte or a
    partial request before the close, then costs the node little CPU, so the honest
    connections queued behind it in the listen backlog wait little. (A peek alone
    sees the end only when nothing was sent: a storm that sends one byte took the
    full path for each connection, and honest connections waited up to 11 s behind it.)
    What was read is handed to the connection, which reads on from there; ``head`` is
    what was read before, returned in front. ``lingering``: ``conn`` is set to reset at
    close already (inherited from the listener).
    """
    chunks = [head]
    size = len(head)
    while size < _READ_AHEAD:
        try:
            data = conn.recv(_READ_AHEAD - size, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            conn.close()
            return None
        if not data:
            head = b"".join(chunks)
            if _HEAD_END.search(head):
                return head  # a whole request, then half-closed: still answered
            if lingering:
                conn.close()
            else:
                _close_at_once(conn)
            return None
        chunks.append(data)
        size += len(data)
    return b"".join(chunks)


_LINGER_NONE: Final = struct.pack("ii", 1, 0)
_LINGER_OFF: Final = struct.pack("ii", 0, 0)


def _close_at_once(conn: socket.socket) -> None:
    """Close a connection whose client has already gone, with a reset rather than a
    FIN: there is nobody to say goodbye to, and on loopback the kernel does the FIN's
    whole exchange inside our ``close()``, which a storm pays for per connection."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_NONE)
    conn.close()


def _config(options: ServerConfig) -> Config:
    config = Config()
    config.accesslog = None  # the app logs each request itself, as JSON
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = options.graceful_timeout
    config.keep_alive_timeout = options.keep_alive_timeout
    config.backlog = options.backlog
    return config


async def serve(app: ASGIApp, sock: socket.socket | Listeners, shutdown: asyncio.Event,
                options: ServerConfig | None = None, *, name: str = "registry",
                metrics: ServerMetrics | None = None) -> None:
    """Serve until ``shutdown`` is set, then drain for at most ``graceful_timeout``.

    Takes ownership of ``sock``: it is closed when this returns, and must not
    be used by the caller afterwards. The app gets no lifespan events: the node
    starts and stops what the app uses. Steered `Listeners` get an accept rate per
    source queue (``accept_rate``); the reserved
    queue and a lone socket have none.
    """
    options = options or ServerConfig()
    loop = asyncio.get_running_loop()
    listeners = sock if isinstance(sock, Listeners) else Listeners([sock], False)
    for each in listeners.sockets:
        each.setblocking(False)
        # Accepted connections inherit it: one whose client has already gone is reset
        # at close without a system call of its own (`_close_at_once`; about 1 µs of
        # the 14-15 µs a storm connection costs at least), and the live ones, far
        # fewer in a storm, take it off at once (`_Silent`).
        each.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_NONE)
    config = _config(options)
    context = WorkerContext(None)
    cap = connection_cap(options.max_connections)
    if cap < options.max_connections:
        log.info("connection cap held to half the open-file limit",
                 extra={"fields": {"server": name, "max_connections": cap}})
    summary = _Summary(name, metrics)
    limiter = _Limiter(cap, options.idle_timeout_under_pressure, summary,
                       metrics.connections.labels(name) if metrics is not None else None,
                       len(listeners.sockets) if listeners.steered else 1)
    connections: dict[asyncio.Task[None], _Connection] = {}

    async def handle(conn: socket.socket, sent: bytes, queue: int) -> None:
        try:
            reader = asyncio.StreamReader(limit=2**16, loop=loop)
            reader.feed_data(sent)
            # connect_accepted_socket leaves Nagle on (create_server would not): a
            # response written as headers then body then waits for the client's
            # delayed ACK, 40 ms on every request after a connection's first
            # (containerd and peers keep connections alive; benchmarks/RESULTS.md).
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            transport, protocol = await loop.connect_accepted_socket(
                lambda: asyncio.StreamReaderProtocol(reader, loop=loop), conn)
            writer = asyncio.StreamWriter(transport, protocol, reader, loop)
            connection = _Connection(app, config, loop, context, {}, reader, writer,
                                     options=options, limiter=limiter, summary=summary,
                                     queue=queue)
            task = asyncio.current_task()
            assert task is not None
            connections[task] = connection
            await connection.run()
        except OSError:
            summary.count("connection_error")
            conn.close()
        except Exception as err:  # a bug, not a client: counted, named, never a flood
            summary.count("connection_error", type(err).__name__)
            conn.close()

    def finished(queue: int, task: asyncio.Task[None]) -> None:
        connections.pop(task, None)
        limiter.release(queue)

    def start(conn: socket.socket, sent: bytes, queue: int) -> None:
        task = loop.create_task(handle(conn, sent, queue))
        task.add_done_callback(functools.partial(finished, queue))

    silent = _Silent(loop, limiter, options.keep_alive_timeout, start)
    acceptors = [_Acceptor(loop, listeners.sockets[0], limiter, silent, summary)]
    if listeners.steered:
        acceptors += [_Acceptor(loop, each, limiter, silent, summary,
                                _Bucket(options.accept_rate, loop.time()), queue)
                      for queue, each in enumerate(listeners.sockets[1:], start=1)]
    for acceptor in acceptors:
        acceptor.watch()
    try:
        await shutdown.wait()
    finally:
        for acceptor in acceptors:
            acceptor.stop()
        listeners.close()
        await context.terminated.set()
        limiter.closing()
        silent.close_all()
        await _drain_connections(connections, options.graceful_timeout)
        summary.flush()


async def _drain_connections(connections: dict[asyncio.Task[None], _Connection],
                             graceful_timeout: float) -> None:
    """Let responses in progress finish; then abort the rest (a client that does not read
    would make a graceful close wait for ever) and cancel what still runs."""
    if connections:
        await asyncio.wait(set(connections), timeout=graceful_timeout)
    for connection in list(connections.values()):
        connection.abort()
    if connections:
        await asyncio.wait(set(connections), timeout=_ABORT_GRACE)
    for task in list(connections):
        task.cancel()
    if connections:
        await asyncio.wait(set(connections), timeout=_ABORT_GRACE)
