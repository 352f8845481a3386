"""gRPC calls to containerd's socket through grpclib: pure Python, on `h2`.

The node reads containerd through a handful of calls (unary ones, and server streams
for listings, reads and events), all on a local unix socket. grpcio's C core is 9 MiB
of RSS once imported, plus its threads' buffers and malloc arenas, on a node whose
whole budget is 128 MiB; grpclib runs the calls on the event loop over `h2`, which
hypercorn loads for the registry anyway. Measured in-process after a full sync of
101,000 keys from a real containerd: grpcio 69 MiB RSS, grpclib 55 MiB (a hand-written
h2 client, the alternative, 54.5 MiB), and content listings no slower.

This module adapts grpclib to what the callers want: already-serialized messages in
and out (a pass-through codec: the generated protobuf classes stay the callers'
business), one `RpcError` carrying the gRPC status code for every way a call fails,
and a channel made inside the running loop on first use. grpclib connects again on
the next call after the connection broke, and acknowledges a stream's data only as
its messages are taken, so a reader that stopped holds at most `STREAM_WINDOW` here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import h2.exceptions
from grpclib.client import Channel as _GrpcChannel
from grpclib.client import Stream as _GrpcStream
from grpclib.config import Configuration
from grpclib.const import Cardinality, Status
from grpclib.encoding.base import CodecBase
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError

# gRPC status codes (grpc/status.proto) the node tells apart.
OK = Status.OK.value
CANCELLED = Status.CANCELLED.value
UNKNOWN = Status.UNKNOWN.value
DEADLINE_EXCEEDED = Status.DEADLINE_EXCEEDED.value
NOT_FOUND = Status.NOT_FOUND.value
INTERNAL = Status.INTERNAL.value
RESOURCE_EXHAUSTED = Status.RESOURCE_EXHAUSTED.value
UNAVAILABLE = Status.UNAVAILABLE.value

# containerd streams Read in 1 MiB messages: two of them in flight per stream.
STREAM_WINDOW = 2 * 1024 * 1024
# All streams' windows together: a few stalled reads must not stop the others.
CONNECTION_WINDOW = 32 * 1024 * 1024
# The largest message taken: containerd sends at most 16 MiB unless configured to send
# more (grpc max_send_message_size). grpclib itself reads, and acknowledges, whatever
# length a message's prefix claims: a containerd gone wrong that announced 4 GiB had
# the node buffer all it sent (300 MiB in 15 s) on a 128 MiB budget.
MAX_MESSAGE = 64 * 1024 * 1024
_CONFIG = Configuration(http2_stream_window_size=STREAM_WINDOW,
                        http2_connection_window_size=CONNECTION_WINDOW)


class RpcError(Exception):
    """A call that ended without status OK; ``code`` is its gRPC status code."""

    def __init__(self, code: int, details: str) -> None:
        super().__init__(f"{_name(code)}: {details}")
        self.code = code
        self.details = details

    @property
    def name(self) -> str:
        return _name(self.code)


def _name(code: int) -> str:
    try:
        return Status(code).name
    except ValueError:
        return str(code)


class _Raw(CodecBase):
    """Messages pass as the bytes the callers serialized; "proto" is what containerd
    answers to (``application/grpc``)."""

    __content_subtype__ = "proto"

    def encode(self, message: Any, message_type: Any) -> bytes:
        return bytes(message)

    def decode(self, data: bytes, message_type: Any) -> bytes:
        return data


_CODEC = _Raw()


class Channel:
    """One HTTP/2 connection to a unix socket, made on first use and again after it
    broke; calls on it run concurrently as streams."""

    def __init__(self, socket_path: str, metadata: Sequence[tuple[str, str]] = ()) -> None:
        self.socket_path = socket_path
        self._metadata = tuple(metadata)
        # grpclib's channel takes the running loop when made: made by the first call.
        self._channel: _GrpcChannel | None = None
        self._closed = False

    async def close(self) -> None:
        self._closed = True
        if self._channel is not None:
            self._channel.close()  # calls still running end with CANCELLED
            self._channel = None

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
        call = self._call(method, seconds)
        # The task running the generator (and its cancel requests) as of its last resumption.
        task = asyncio.current_task()
        cancelling = 0 if task is None else task.cancelling()
        try:
            async with call:
                await call.send_message(request, end=True)
                await call.recv_initial_metadata()
                while (message := await _recv_message(call)) is not None:
                    yield message
                    task = asyncio.current_task()
                    cancelling = 0 if task is None else task.cancelling()
        except GRPCError as err:
            raise RpcError(err.status.value, err.message or "") from None
        except _TooLarge as err:
            raise RpcError(RESOURCE_EXHAUSTED, f"{method}: {err}") from None
        except (TimeoutError, StreamTerminatedError, OSError, AssertionError,
                NotImplementedError, ProtocolError, h2.exceptions.H2Error) as err:
            # grpclib wakes a call that must fail (deadline, connection gone) by
            # cancelling its task and raising its own error instead: the cancel
            # request it leaves behind would make the caller's asyncio.timeout or
            # TaskGroup take a later timeout for a cancellation.
            while task is not None and task.cancelling() > cancelling:
                task.uncancel()
            raise self._failure(method, err) from err

    def _call(self, method: str, seconds: float | None) -> _GrpcStream[bytes, bytes]:
        if self._closed:
            raise RpcError(CANCELLED, "channel closed")
        if self._channel is None:
            self._channel = _GrpcChannel(path=self.socket_path, codec=_CODEC, config=_CONFIG)
        return self._channel.request(method, Cardinality.UNARY_STREAM, bytes, bytes,
                                     timeout=seconds, metadata=self._metadata)

    def _failure(self, method: str, err: BaseException) -> RpcError:
        if self._closed:
            return RpcError(CANCELLED, "channel closed")
        if isinstance(err, TimeoutError):
            return RpcError(DEADLINE_EXCEEDED, f"{method}: deadline exceeded")
        if isinstance(err, OSError):  # connecting, or writing to a socket that broke
            return RpcError(UNAVAILABLE, f"cannot reach {self.socket_path}: "
                                         f"{err.strerror or err}")
        if isinstance(err, StreamTerminatedError | h2.exceptions.H2Error):
            return RpcError(UNAVAILABLE, f"{method}: connection to containerd lost ({err})")
        # grpclib asserts a stream did not end inside a message, and refuses
        # compressed ones (none is offered).
        return RpcError(INTERNAL, f"{method}: malformed answer ({err or type(err).__name__})")


class _TooLarge(Exception):
    """A message whose length prefix is over `MAX_MESSAGE`."""


async def _recv_message(call: _GrpcStream[bytes, bytes]) -> bytes | None:
    """grpclib's `Stream.recv_message` (after the initial metadata), with the length
    prefix checked before the body is read: grpclib has no bound of its own. It runs
    inside the call's wrapper, as grpclib's does, so the deadline and a lost connection
    still wake it."""
    with call._wrapper:
        prefix = await call._stream.recv_data(5)
        if not prefix:
            return None
        if prefix[0]:
            raise NotImplementedError("compressed message (none was offered)")
        length = int.from_bytes(prefix[1:5])
        if length > MAX_MESSAGE:
            raise _TooLarge(f"message of {length} bytes, over {MAX_MESSAGE}")
        message = await call._stream.recv_data(length)
        if len(message) != length:
            raise AssertionError(f"stream ended {length - len(message)} bytes into a message")
        return message


def call_blocking(socket_path: str, method: str, request: bytes,
                  metadata: Sequence[tuple[str, str]], timeout: float) -> bytes:
    """One unary call on a connection and event loop of its own: the start-up checks
    run before the node's loop does. Raises RpcError as `Channel` does. Called where
    a loop already runs (a test, a tool), the private loop runs on a thread, as a
    blocking call there would have blocked anyway."""

    async def call() -> bytes:
        channel = Channel(socket_path, metadata)
        try:
            return await channel.unary(method, request, timeout)
        finally:
            await channel.close()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(call())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(call())).result()
