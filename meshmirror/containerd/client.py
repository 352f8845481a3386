"""A small asyncio gRPC client for the parts of containerd's API meshmirror reads.

Only images List/Get, content Info/List/Read and events Subscribe are called, so
only those are declared in our own .proto files (see ``proto/``); the calls go
through `meshmirror.containerd.rpc` on grpclib, not grpcio (see there for why). Every
request carries the ``containerd-namespace`` metadata, because containerd scopes
images and content by namespace and answers NOT_FOUND for another namespace's records.

gRPC errors are translated at this boundary: NOT_FOUND becomes the Store's
``NotFoundError`` and everything that means "containerd is not answering"
becomes ``ContainerdUnavailableError``, so callers never see a gRPC status.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence

from meshmirror.containerd.proto import content_pb2, events_pb2, images_pb2
from meshmirror.containerd.rpc import (
    CANCELLED,
    DEADLINE_EXCEEDED,
    INTERNAL,
    NOT_FOUND,
    UNAVAILABLE,
    UNKNOWN,
    Channel,
    RpcError,
)
from meshmirror.store.base import NotFoundError

DEFAULT_NAMESPACE = "k8s.io"
NAMESPACE_METADATA = "containerd-namespace"

_UNAVAILABLE_CODES = frozenset({UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED, UNKNOWN, INTERNAL})
_IMAGES = "/containerd.services.images.v1.Images/"
_CONTENT = "/containerd.services.content.v1.Content/"
_EVENTS = "/containerd.services.events.v1.Events/"


class ContainerdError(RuntimeError):
    """containerd answered with an error that is neither NOT_FOUND nor an outage."""


class ContainerdUnavailableError(NotFoundError):
    """containerd cannot be reached right now.

    A subclass of NotFoundError on purpose: to the registry an unreachable
    containerd is a miss (a fast 404 sends containerd upstream), while callers
    that care, such as the store's reconnect loop, can tell the two apart.
    """


def _translate(err: RpcError, what: str) -> Exception:
    if err.code == NOT_FOUND:
        return NotFoundError(f"{what}: not found in containerd")
    if err.code in _UNAVAILABLE_CODES:
        return ContainerdUnavailableError(f"{what}: containerd unavailable ({err.name}: "
                                          f"{err.details})")
    return ContainerdError(f"{what}: containerd answered {err.name}: {err.details}")


class ContainerdClient:
    """One connection to one containerd socket, bound to one namespace; made on the
    first call and again on the next call after it broke."""

    def __init__(self, socket_path: str, namespace: str = DEFAULT_NAMESPACE,
                 *, timeout: float = 10.0) -> None:
        if not namespace:
            raise ValueError("containerd namespace must not be empty")
        self.socket_path = socket_path
        self.namespace = namespace
        self.timeout = timeout
        self._channel = Channel(socket_path, ((NAMESPACE_METADATA, namespace),))

    async def close(self) -> None:
        await self._channel.close()

    async def list_images(self, filters: Sequence[str] = ()) -> list[images_pb2.Image]:
        request = images_pb2.ListImagesRequest(filters=list(filters))
        try:
            data = await self._channel.unary(_IMAGES + "List", request.SerializeToString(),
                                             self.timeout)
        except RpcError as err:
            raise _translate(err, "list images") from err
        return list(images_pb2.ListImagesResponse.FromString(data).images)

    async def get_image(self, name: str) -> images_pb2.Image:
        request = images_pb2.GetImageRequest(name=name)
        try:
            data = await self._channel.unary(_IMAGES + "Get", request.SerializeToString(),
                                             self.timeout)
        except RpcError as err:
            raise _translate(err, f"image {name}") from err
        return images_pb2.GetImageResponse.FromString(data).image

    async def content_info(self, digest: str) -> content_pb2.Info:
        request = content_pb2.InfoRequest(digest=digest)
        try:
            data = await self._channel.unary(_CONTENT + "Info", request.SerializeToString(),
                                             self.timeout)
        except RpcError as err:
            raise _translate(err, f"content {digest}") from err
        return content_pb2.InfoResponse.FromString(data).info

    async def list_content(self, filters: Sequence[str] = ()) -> list[content_pb2.Info]:
        """Every blob of the namespace in one streamed call, instead of one Info per blob."""
        out: list[content_pb2.Info] = []
        async for response in self._list_content(filters):
            out.extend(response.info)
        return out

    async def content_digests(self, filters: Sequence[str] = ()) -> AsyncGenerator[str, None]:
        """The digest of every blob of the namespace, as `list_content` streams them. Each
        response's records are let go once their digests are read: the whole listing of
        100,000 blobs held at once (its parsed messages live as long as any of their
        records) cost a node over 30 MiB at the peak of a sync, and more after it."""
        async for response in self._list_content(filters):
            for info in response.info:
                yield info.digest

    async def _list_content(self, filters: Sequence[str]
                            ) -> AsyncGenerator[content_pb2.ListContentResponse, None]:
        request = content_pb2.ListContentRequest(filters=list(filters))
        stream = self._channel.stream(_CONTENT + "List", request.SerializeToString(),
                                      self.timeout * 6)
        try:
            async for data in stream:
                yield content_pb2.ListContentResponse.FromString(data)
        except RpcError as err:
            raise _translate(err, "list content") from err
        finally:
            await stream.aclose()

    async def read_content(self, digest: str, offset: int = 0, size: int = 0
                           ) -> AsyncGenerator[bytes, None]:
        """Stream a blob from ``offset``; ``size`` 0 means to the end, as containerd defines it."""
        if offset < 0 or size < 0:
            raise ValueError(f"offset and size must not be negative, got {offset}, {size}")
        request = content_pb2.ReadContentRequest(digest=digest, offset=offset, size=size)
        stream = self._channel.stream(_CONTENT + "Read", request.SerializeToString())
        try:
            async for data in stream:
                response = content_pb2.ReadContentResponse.FromString(data)
                if response.data:
                    yield response.data
        except RpcError as err:
            raise _translate(err, f"read {digest}") from err
        finally:
            await stream.aclose()  # stopping early cancels the call at containerd

    def subscribe(self, filters: Iterable[str]) -> EventStream:
        request = events_pb2.SubscribeRequest(filters=list(filters))
        return EventStream(self._channel.stream(_EVENTS + "Subscribe",
                                                request.SerializeToString()))


class EventStream:
    """A running events subscription; iterate for envelopes, ``cancel()`` to end it."""

    def __init__(self, call: AsyncGenerator[bytes, None]) -> None:
        self._call = call
        self._cancelled = False

    def cancel(self) -> None:
        """End the subscription; its iteration, when running, ends with it."""
        self._cancelled = True

    async def __aiter__(self) -> AsyncIterator[events_pb2.Envelope]:
        try:
            async for data in self._call:
                if self._cancelled:
                    return
                yield events_pb2.Envelope.FromString(data)
        except RpcError as err:
            raise _translate(err, "events subscription") from err
        finally:
            await self._call.aclose()
        # A stream that ends without an error still means containerd went away
        # (it never closes a subscription on its own).
        raise ContainerdUnavailableError("events subscription ended")
