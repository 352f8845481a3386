"""gRPC calls to containerd's socket over HTTP/2, framed here with `h2`.

The node reads containerd through a handful of calls (unary ones, and server streams
for listings, reads and events), all on a local unix socket. grpcio did that for
9 MiB of RSS (its C core, mapped and relocated, before a call is made) plus its
threads' buffers and malloc arenas, on a node whose whole budget is 128 MiB; `h2`
is already loaded for the registry's server (hypercorn), so calls framed on it cost
what they hold. What gRPC adds to HTTP/2 is small: a POST per call with a few
headers, each message prefixed by a flag byte and a 4-byte length, and the status
in the trailers (``grpc-status``, ``grpc-message``).

Flow control bounds what a slow reader makes the node buffer: each stream's window
(`STREAM_WINDOW`) is handed back to containerd only as its messages are taken, so a
blob read for a client that stopped reading holds at most that much here.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import urllib.parse
from collections import deque
from collections.abc import AsyncGenerator, Sequence

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

# gRPC status codes (grpc/status.proto) the node tells apart.
OK = 0
CANCELLED = 1
UNKNOWN = 2
DEADLINE_EXCEEDED = 4
NOT_FOUND = 5
INTERNAL = 13
UNAVAILABLE = 14
STATUS_NAMES = {0: "OK", 1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT",
                4: "DEADLINE_EXCEEDED", 5: "NOT_FOUND", 6: "ALREADY_EXISTS",
                7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED", 9: "FAILED_PRECONDITION",
                10: "ABORTED", 11: "OUT_OF_RANGE", 12: "UNIMPLEMENTED", 13: "INTERNAL",
                14: "UNAVAILABLE", 15: "DATA_LOSS", 16: "UNAUTHENTICATED"}

# containerd streams Read in 1 MiB messages; listings of 1,000 images reach a few MiB.
MAX_MESSAGE = 64 * 1024 * 1024
STREAM_WINDOW = 2 * 1024 * 1024
# All streams' windows together: a few stalled reads must not stop the others.
CONNECTION_WINDOW = 32 * 1024 * 1024
_READ_SIZE = 256 * 1024
_PREFIX = struct.Struct(">BI")


class RpcError(Exception):
    """A call that ended without status OK; ``code`` is its gRPC status code."""

    def __init__(self, code: int, details: str) -> None:
        super().__init__(f"{STATUS_NAMES.get(code, str(code))}: {details}")
        self.code = code
        self.details = details

    @property
    def name(self) -> str:
        return STATUS_NAMES.get(self.code, str(self.code))


def _config() -> h2.config.H2Configuration:
    return h2.config.H2Configuration(client_side=True, header_encoding="utf-8")


def _start(conn: h2.connection.H2Connection) -> None:
    conn.initiate_connection()
    conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                          h2.settings.SettingCodes.MAX_FRAME_SIZE: 1 << 20})
    conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)


def _headers(method: str, metadata: Sequence[tuple[str, str]], timeout: float | None
             ) -> list[tuple[str, str]]:
    headers = [(":method", "POST"), (":scheme", "http"), (":path", method),
               (":authority", "localhost"), ("content-type", "application/grpc"),
               ("te", "trailers"), *metadata]
    if timeout is not None:  # the server's deadline: milliseconds, at most 8 digits
        headers.append(("grpc-timeout", f"{min(max(1, int(timeout * 1000)), 99_999_999)}m"))
    return headers


def _frame(message: bytes) -> bytes:
    return _PREFIX.pack(0, len(message)) + message


def _status(headers: dict[str, str], reset: int | None) -> RpcError | None:
    """The call's outcome from its trailers (or the headers of a trailers-only answer)."""
    if reset is not None:
        return RpcError(CANCELLED if reset == 8 else INTERNAL,
                        f"stream reset by containerd (HTTP/2 error {reset})")
    status = headers.get("grpc-status")
    if status is None:
        return RpcError(UNKNOWN, "the call ended without a grpc-status")
    try:
        code = int(status)
    except ValueError:
        return RpcError(UNKNOWN, f"grpc-status {status!r}")
    if code == OK:
        return None
    return RpcError(code, urllib.parse.unquote(headers.get("grpc-message", "")))


class _Messages:
    """Length-prefixed messages out of the DATA frames of one stream."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        out = []
        while len(self._buffer) >= 5:
            compressed, length = _PREFIX.unpack_from(self._buffer)
            if compressed:
                raise RpcError(INTERNAL, "compressed message (none was offered)")
            if length > MAX_MESSAGE:
                raise RpcError(INTERNAL, f"message of {length} bytes, over {MAX_MESSAGE}")
            if len(self._buffer) < 5 + length:
                break
            out.append(bytes(self._buffer[5:5 + length]))
            del self._buffer[:5 + length]
        return out

    def pending(self) -> bool:
        return bool(self._buffer)


class _Stream:
    """One call's received side: messages not yet taken, how many bytes they came in
    (acknowledged to containerd when taken), and the outcome once it ended."""

    def __init__(self, conn: h2.connection.H2Connection | None = None) -> None:
        self.conn = conn
        self.messages: deque[tuple[bytes, int]] = deque()
        self.parser = _Messages()
        self.headers: dict[str, str] = {}
        self.ended = False
        self.error: RpcError | None = None
        self.reset: int | None = None
        self.wake = asyncio.Event()
        self._unacked = 0

    def data(self, data: bytes, flow: int) -> None:
        self._unacked += flow
        for message in self.parser.feed(data):
            self.messages.append((message, self._unacked))
            self._unacked = 0

    def unconsumed(self) -> int:
        """Flow-controlled bytes received and never taken."""
        return self._unacked + sum(flow for _, flow in self.messages)


class Channel:
    """One HTTP/2 connection to a unix socket, made on first use and again after it
    broke; calls on it run concurrently as streams."""

    def __init__(self, socket_path: str, metadata: Sequence[tuple[str, str]] = ()) -> None:
        self.socket_path = socket_path
        self._metadata = tuple(metadata)
        self._conn: h2.connection.H2Connection | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._streams: dict[int, _Stream] = {}
        self._connecting = asyncio.Lock()
        self._closed = False

    async def close(self) -> None:
        self._closed = True
        self._drop(RpcError(CANCELLED, "channel closed"))

    async def unary(self, method: str, request: bytes, seconds: float | None) -> bytes:
        """The one response message of a unary call of at most ``seconds``."""
        async with contextlib.aclosing(self.stream(method, request, seconds)) as responses:
            got = [message async for message in responses]
        if len(got) != 1:
            raise RpcError(INTERNAL, f"{method} answered {len(got)} messages, not one")
        return got[0]

    async def stream(self, method: str, request: bytes, seconds: float | None = None
                     ) -> AsyncGenerator[bytes, None]:
        """Each response message of a call as it arrives; leaving early cancels the call.
        ``seconds`` bound the whole call, here and at containerd (its grpc-timeout)."""
        loop = asyncio.get_running_loop()
        deadline = None if seconds is None else loop.time() + seconds
        try:
            async with asyncio.timeout_at(deadline):
                stream_id, stream = await self._open(method, request, seconds)
        except TimeoutError:
            raise RpcError(DEADLINE_EXCEEDED, f"{method}: no connection in time") from None
        try:
            while True:
                if stream.messages:
                    message, flow = stream.messages.popleft()
                    self._acknowledge(stream, stream_id, flow)
                    yield message
                    continue
                if stream.error is not None:
                    raise stream.error
                if stream.ended:
                    if stream.parser.pending():
                        raise RpcError(INTERNAL, f"{method}: a message cut short")
                    error = _status(stream.headers, stream.reset)
                    if error is not None:
                        raise error
                    return
                stream.wake.clear()
                try:
                    async with asyncio.timeout_at(deadline):
                        await stream.wake.wait()
                except TimeoutError:
                    raise RpcError(DEADLINE_EXCEEDED, f"{method}: deadline exceeded") from None
        finally:
            if self._streams.pop(stream_id, None) is not None and not stream.ended:
                self._cancel(stream_id)
            # What it never took goes back to the connection's window, or abandoned
            # reads would shrink it until every call stalled.
            self._acknowledge(stream, stream_id, stream.unconsumed())

    async def _open(self, method: str, request: bytes, seconds: float | None
                    ) -> tuple[int, _Stream]:
        conn = await self._connection()
        stream_id = conn.get_next_available_stream_id()
        stream = _Stream(conn)
        self._streams[stream_id] = stream
        try:
            conn.send_headers(stream_id, _headers(method, self._metadata, seconds))
            conn.send_data(stream_id, _frame(request), end_stream=True)
        except h2.exceptions.H2Error as err:  # e.g. a request over the window: never ours
            self._streams.pop(stream_id, None)
            raise RpcError(INTERNAL, f"{method}: {err}") from err
        self._flush()
        return stream_id, stream

    async def _connection(self) -> h2.connection.H2Connection:
        async with self._connecting:
            if self._closed:
                raise RpcError(CANCELLED, "channel closed")
            if self._conn is not None:
                return self._conn
            try:
                reader, writer = await asyncio.open_unix_connection(self.socket_path)
            except OSError as err:
                raise RpcError(UNAVAILABLE, f"cannot connect to {self.socket_path}: "
                                            f"{err.strerror or err}") from err
            conn = h2.connection.H2Connection(config=_config())
            _start(conn)
            self._conn, self._writer = conn, writer
            self._flush()
            self._reader_task = asyncio.create_task(self._read(conn, reader))
            return conn

    def _flush(self) -> None:
        if self._conn is not None and self._writer is not None:
            data = self._conn.data_to_send()
            if data:
                self._writer.write(data)

    def _acknowledge(self, stream: _Stream, stream_id: int, flow: int) -> None:
        """Hand ``flow`` bytes of window back (to the connection alone once the stream
        is closed), on the connection they came on."""
        if flow and self._conn is not None and self._conn is stream.conn:
            with contextlib.suppress(h2.exceptions.H2Error):
                self._conn.acknowledge_received_data(flow, stream_id)
                self._flush()

    def _cancel(self, stream_id: int) -> None:
        if self._conn is not None:
            with contextlib.suppress(h2.exceptions.H2Error):
                self._conn.reset_stream(stream_id, 8)  # CANCEL
                self._flush()

    async def _read(self, conn: h2.connection.H2Connection,
                    reader: asyncio.StreamReader) -> None:
        error = RpcError(UNAVAILABLE, "containerd closed the connection")
        try:
            while (data := await reader.read(_READ_SIZE)):
                for event in conn.receive_data(data):
                    self._event(event)
                self._flush()
        except asyncio.CancelledError:
            raise
        except (OSError, h2.exceptions.H2Error) as err:
            error = RpcError(UNAVAILABLE, f"connection to containerd lost: {err}")
        except RpcError as err:
            error = err
        if self._conn is conn:
            self._drop(error)

    def _event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ConnectionTerminated):
            raise RpcError(UNAVAILABLE, f"containerd ended the connection "
                                        f"(HTTP/2 error {event.error_code})")
        stream_id = getattr(event, "stream_id", None)
        stream = None if stream_id is None else self._streams.get(stream_id)
        if stream is None:
            if isinstance(event, h2.events.DataReceived) and self._conn is not None:
                # A stream already left: its bytes go back to the connection's window.
                with contextlib.suppress(h2.exceptions.H2Error):
                    self._conn.acknowledge_received_data(event.flow_controlled_length,
                                                         event.stream_id)
            return
        if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
            stream.headers.update((str(k), str(v)) for k, v in event.headers)
        elif isinstance(event, h2.events.DataReceived):
            try:
                stream.data(event.data, event.flow_controlled_length)
            except RpcError as err:
                stream.error = err
        elif isinstance(event, h2.events.StreamEnded):
            stream.ended = True
        elif isinstance(event, h2.events.StreamReset):
            stream.reset, stream.ended = event.error_code, True
        else:
            return
        stream.wake.set()

    def _drop(self, error: RpcError) -> None:
        """The connection is gone: every call on it fails with ``error``; the next call
        connects again."""
        writer, task = self._writer, self._reader_task
        self._conn = self._writer = self._reader_task = None
        for stream in self._streams.values():
            if stream.error is None and not stream.ended:
                stream.error = error
            stream.wake.set()
        self._streams.clear()
        if writer is not None:
            writer.close()
        if task is not None and task is not asyncio.current_task():
            task.cancel()


def call_blocking(socket_path: str, method: str, request: bytes,
                  metadata: Sequence[tuple[str, str]], timeout: float) -> bytes:
    """One unary call on a connection of its own, without an event loop: the start-up
    checks run before the node's loop does. Raises RpcError as `Channel` does."""
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as err:
        raise RpcError(UNAVAILABLE, str(err)) from err
    with sock:
        sock.settimeout(timeout)
        try:
            sock.connect(socket_path)
            conn = h2.connection.H2Connection(config=_config())
            _start(conn)
            stream_id = conn.get_next_available_stream_id()
            conn.send_headers(stream_id, _headers(method, metadata, timeout))
            conn.send_data(stream_id, _frame(request), end_stream=True)
            sock.sendall(conn.data_to_send())
            stream = _Stream()
            while not stream.ended and stream.error is None:
                data = sock.recv(_READ_SIZE)
                if not data:
                    raise RpcError(UNAVAILABLE, "containerd closed the connection")
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ConnectionTerminated):
                        raise RpcError(UNAVAILABLE, "containerd ended the connection")
                    if getattr(event, "stream_id", None) != stream_id:
                        continue
                    if isinstance(event, h2.events.ResponseReceived
                                  | h2.events.TrailersReceived):
                        stream.headers.update((str(k), str(v)) for k, v in event.headers)
                    elif isinstance(event, h2.events.DataReceived):
                        stream.data(event.data, event.flow_controlled_length)
                        conn.acknowledge_received_data(event.flow_controlled_length,
                                                       stream_id)
                    elif isinstance(event, h2.events.StreamEnded):
                        stream.ended = True
                    elif isinstance(event, h2.events.StreamReset):
                        stream.reset, stream.ended = event.error_code, True
                pending = conn.data_to_send()
                if pending:
                    sock.sendall(pending)
        except TimeoutError:
            raise RpcError(DEADLINE_EXCEEDED, f"{method}: no answer within {timeout:g}s"
                           ) from None
        except OSError as err:
            raise RpcError(UNAVAILABLE, f"{socket_path}: {err.strerror or err}") from err
        except h2.exceptions.H2Error as err:
            raise RpcError(UNAVAILABLE, f"{socket_path}: {err}") from err
    if stream.error is not None:
        raise stream.error
    error = _status(stream.headers, stream.reset)
    if error is not None:
        raise error
    if len(stream.messages) != 1 or stream.parser.pending():
        raise RpcError(INTERNAL, f"{method} answered {len(stream.messages)} messages, not one")
    return stream.messages[0][0]
