"""A small asyncio gRPC client for the parts of containerd's API meshmirror reads.

Only images List/Get, content Info/List/Read and events Subscribe are called, so
only those are declared in our own .proto files (see ``proto/``). Every request
carries the ``containerd-namespace`` metadata, because containerd scopes images
and content by namespace and answers NOT_FOUND for another namespace's records.

gRPC errors are translated at this boundary: NOT_FOUND becomes the Store's
``NotFoundError`` and everything that means "containerd is not answering"
becomes ``ContainerdUnavailableError``, so callers never import grpc.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from typing import Any

import grpc
import grpc.aio

from meshmirror.containerd.proto import content_pb2, events_pb2, images_pb2
from meshmirror.containerd.proto.content_pb2_grpc import ContentStub
from meshmirror.containerd.proto.events_pb2_grpc import EventsStub
from meshmirror.containerd.proto.images_pb2_grpc import ImagesStub
from meshmirror.store.base import NotFoundError

DEFAULT_NAMESPACE = "k8s.io"
NAMESPACE_METADATA = "containerd-namespace"

# containerd streams Read in 1 MiB messages; image and content listings of
# 1,000 images / 20,000 blobs reach a few MiB, over gRPC's 4 MiB default.
_MAX_MESSAGE = 64 * 1024 * 1024
_UNAVAILABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
    }
)


class ContainerdError(RuntimeError):
    """containerd answered with an error that is neither NOT_FOUND nor an outage."""


class ContainerdUnavailableError(NotFoundError):
    """containerd cannot be reached right now.

    A subclass of NotFoundError on purpose: to the registry an unreachable
    containerd is a miss (a fast 404 sends containerd upstream), while callers
    that care, such as the store's reconnect loop, can tell the two apart.
    """


def _translate(err: grpc.aio.AioRpcError, what: str) -> Exception:
    code = err.code()
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFoundError(f"{what}: not found in containerd")
    if code in _UNAVAILABLE_CODES:
        return ContainerdUnavailableError(f"{what}: containerd unavailable ({code.name}: "
                                          f"{err.details()})")
    return ContainerdError(f"{what}: containerd answered {code.name}: {err.details()}")


class ContainerdClient:
    """One channel to one containerd socket, bound to one namespace."""

    def __init__(self, socket_path: str, namespace: str = DEFAULT_NAMESPACE,
                 *, timeout: float = 10.0) -> None:
        if not namespace:
            raise ValueError("containerd namespace must not be empty")
        self.socket_path = socket_path
        self.namespace = namespace
        self.timeout = timeout
        self._metadata = ((NAMESPACE_METADATA, namespace),)
        # Short reconnect backoff: after a containerd restart the store wants to
        # notice within a fraction of a second, not grpc's default of up to 2 min.
        self._channel = grpc.aio.insecure_channel(
            f"unix://{socket_path}",
            options=[
                ("grpc.max_receive_message_length", _MAX_MESSAGE),
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 2000),
            ],
        )
        # The generated service stubs carry no type hints (grpcio-tools writes
        # none); the messages they return are typed through the .pyi files.
        self._images = ImagesStub(self._channel)  # type: ignore[no-untyped-call]
        self._content = ContentStub(self._channel)  # type: ignore[no-untyped-call]
        self._events = EventsStub(self._channel)  # type: ignore[no-untyped-call]

    async def close(self) -> None:
        await self._channel.close()

    async def list_images(self, filters: Sequence[str] = ()) -> list[images_pb2.Image]:
        try:
            response: images_pb2.ListImagesResponse = await self._images.List(
                images_pb2.ListImagesRequest(filters=list(filters)),
                metadata=self._metadata, timeout=self.timeout,
            )
        except grpc.aio.AioRpcError as err:
            raise _translate(err, "list images") from err
        return list(response.images)

    async def get_image(self, name: str) -> images_pb2.Image:
        try:
            response: images_pb2.GetImageResponse = await self._images.Get(
                images_pb2.GetImageRequest(name=name), metadata=self._metadata,
                timeout=self.timeout,
            )
        except grpc.aio.AioRpcError as err:
            raise _translate(err, f"image {name}") from err
        return response.image

    async def content_info(self, digest: str) -> content_pb2.Info:
        try:
            response: content_pb2.InfoResponse = await self._content.Info(
                content_pb2.InfoRequest(digest=digest), metadata=self._metadata,
                timeout=self.timeout,
            )
        except grpc.aio.AioRpcError as err:
            raise _translate(err, f"content {digest}") from err
        return response.info

    async def list_content(self, filters: Sequence[str] = ()) -> list[content_pb2.Info]:
        """Every blob of the namespace in one streamed call, instead of one Info per blob."""
        out: list[content_pb2.Info] = []
        call = self._content.List(content_pb2.ListContentRequest(filters=list(filters)),
                                  metadata=self._metadata, timeout=self.timeout * 6)
        try:
            async for response in call:
                out.extend(response.info)
        except grpc.aio.AioRpcError as err:
            raise _translate(err, "list content") from err
        return out

    async def content_digests(self, filters: Sequence[str] = ()) -> AsyncGenerator[str, None]:
        """The digest of every blob of the namespace, as `list_content` streams them. Each
        response's records are let go once their digests are read: the whole listing of
        100,000 blobs held at once (its parsed messages live as long as any of their
        records) cost a node over 30 MiB at the peak of a sync, and more after it."""
        call = self._content.List(content_pb2.ListContentRequest(filters=list(filters)),
                                  metadata=self._metadata, timeout=self.timeout * 6)
        try:
            async for response in call:
                for info in response.info:
                    yield info.digest
        except grpc.aio.AioRpcError as err:
            raise _translate(err, "list content") from err

    async def read_content(self, digest: str, offset: int = 0, size: int = 0
                           ) -> AsyncGenerator[bytes, None]:
        """Stream a blob from ``offset``; ``size`` 0 means to the end, as containerd defines it."""
        if offset < 0 or size < 0:
            raise ValueError(f"offset and size must not be negative, got {offset}, {size}")
        call = self._content.Read(
            content_pb2.ReadContentRequest(digest=digest, offset=offset, size=size),
            metadata=self._metadata,
        )
        try:
            async for response in call:
                if response.data:
                    yield bytes(response.data)
        except grpc.aio.AioRpcError as err:
            raise _translate(err, f"read {digest}") from err
        finally:
            call.cancel()

    def subscribe(self, filters: Iterable[str]) -> EventStream:
        call = self._events.Subscribe(events_pb2.SubscribeRequest(filters=list(filters)),
                                      metadata=self._metadata)
        return EventStream(call)


class EventStream:
    """A running events subscription; iterate for envelopes, ``cancel()`` to end it."""

    def __init__(self, call: Any) -> None:
        self._call = call

    def cancel(self) -> None:
        self._call.cancel()

    async def __aiter__(self) -> AsyncIterator[events_pb2.Envelope]:
        try:
            async for envelope in self._call:
                yield envelope
        except grpc.aio.AioRpcError as err:
            raise _translate(err, "events subscription") from err
        # A stream that ends without an error still means containerd went away
        # (it never closes a subscription on its own).
        raise ContainerdUnavailableError("events subscription ended")
