"""containerd/rpc.py (grpclib underneath) against a real containerd 1.6: status codes,
a containerd that goes away mid-stream, flow control for a reader that stops."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import pytest

from meshmirror.containerd.client import NAMESPACE_METADATA
from meshmirror.containerd.proto import content_pb2, images_pb2
from meshmirror.containerd.rpc import (
    CANCELLED,
    DEADLINE_EXCEEDED,
    MAX_MESSAGE,
    NOT_FOUND,
    RESOURCE_EXHAUSTED,
    STREAM_WINDOW,
    UNAVAILABLE,
    Channel,
    RpcError,
    call_blocking,
)
from tests.containerd.conftest import ImageFactory, import_image
from tests.support.containerd import NAMESPACE, Containerd

MiB = 1024 * 1024
_METADATA = ((NAMESPACE_METADATA, NAMESPACE),)
_GET_IMAGE = "/containerd.services.images.v1.Images/Get"
_LIST_IMAGES = "/containerd.services.images.v1.Images/List"
_READ = "/containerd.services.content.v1.Content/Read"
_SUBSCRIBE = "/containerd.services.events.v1.Events/Subscribe"


def _read_request(digest: str) -> bytes:
    return content_pb2.ReadContentRequest(digest=digest).SerializeToString()


def _images(reply: bytes) -> list[str]:
    return [i.name for i in images_pb2.ListImagesResponse.FromString(reply).images]


class _Relay:
    """A unix socket in front of containerd's that counts the bytes containerd sends:
    what it may send is what our flow-control windows allow."""

    def __init__(self, target: Path, path: Path) -> None:
        self.target, self.path = target, path
        self.from_containerd = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> _Relay:
        self._server = await asyncio.start_unix_server(self._accept, str(self.path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(str(self.target))
        for task in (self._pipe(reader, up_writer, False), self._pipe(up_reader, writer, True)):
            self._tasks.add(asyncio.create_task(task))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    count: bool) -> None:
        try:
            while data := await reader.read(256 * 1024):
                if count:
                    self.from_containerd += len(data)
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()


async def _settled(relay: _Relay, within: float = 10.0) -> int:
    """What containerd has sent once it stopped sending (bounded wait)."""
    last = -1
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while relay.from_containerd != last and loop.time() < deadline:
        last = relay.from_containerd
        await asyncio.sleep(0.3)
    return relay.from_containerd


@pytest.fixture
async def big_layer(containerd: Containerd, make_image: ImageFactory) -> AsyncIterator[
        tuple[str, bytes]]:
    image = make_image("docker.io/library/big:1", (12 * MiB,), seed=8)
    import_image(containerd, image)
    layer = image.platforms[0].layers[0]
    yield str(layer.digest), image.blob_path(layer.digest).read_bytes()


@pytest.mark.real
async def test_not_found_keeps_its_status(containerd: Containerd) -> None:
    channel = Channel(str(containerd.socket), _METADATA)
    try:
        with pytest.raises(RpcError) as caught:
            await channel.unary(_GET_IMAGE, images_pb2.GetImageRequest(
                name="docker.io/library/absent:1").SerializeToString(), 5.0)
        assert caught.value.code == NOT_FOUND and caught.value.name == "NOT_FOUND"
        assert "not found" in caught.value.details
    finally:
        await channel.close()
    with pytest.raises(RpcError) as blocking:
        call_blocking(str(containerd.socket), _GET_IMAGE, images_pb2.GetImageRequest(
            name="docker.io/library/absent:1").SerializeToString(), _METADATA, 5.0)
    assert blocking.value.code == NOT_FOUND


@pytest.mark.real
async def test_containerd_gone_mid_stream_then_the_next_call_reconnects(
        containerd: Containerd, make_image: ImageFactory) -> None:
    image = make_image("docker.io/library/events:1", seed=3)
    channel = Channel(str(containerd.socket), _METADATA)
    task = asyncio.current_task()
    assert task is not None
    try:
        events = channel.stream(_SUBSCRIBE, b"")
        first = asyncio.create_task(anext(events))
        await asyncio.sleep(0.5)  # subscribed before the import publishes
        import_image(containerd, image)
        await asyncio.wait_for(first, 10.0)
        containerd.stop()
        with pytest.raises(RpcError) as caught:
            async with asyncio.timeout(10.0):
                async for _ in events:
                    pass
        assert caught.value.code == UNAVAILABLE, caught.value
        await events.aclose()
        with pytest.raises(RpcError) as down:  # containerd away: refused at once
            await channel.unary(_LIST_IMAGES, b"", 5.0)
        assert down.value.code == UNAVAILABLE
        containerd.start()
        assert _images(await channel.unary(_LIST_IMAGES, b"", 5.0)) == [image.name]
    finally:
        await channel.close()
    # grpclib ended the stream by cancelling this task: no cancel request is left over.
    assert task.cancelling() == 0


@pytest.mark.real
async def test_a_reader_that_stops_bounds_what_containerd_sends(
        containerd: Containerd, big_layer: tuple[str, bytes], tmp_path: Path) -> None:
    digest, data = big_layer
    async with _Relay(containerd.socket, tmp_path / "relay.sock") as relay:
        channel = Channel(str(relay.path), _METADATA)
        try:
            stalled = channel.stream(_READ, _read_request(digest))
            first = content_pb2.ReadContentResponse.FromString(await anext(stalled)).data
            held = await _settled(relay)
            # The stream's window and the message being taken, not the 12 MiB blob.
            assert held <= STREAM_WINDOW + 2 * MiB, held
            # The connection is not stalled with it: another call runs meanwhile.
            assert _images(await channel.unary(_LIST_IMAGES, b"", 5.0)) == [
                "docker.io/library/big:1"]
            rest = [content_pb2.ReadContentResponse.FromString(m).data
                    async for m in stalled]
            assert first + b"".join(rest) == data
        finally:
            await channel.close()


@pytest.mark.real
async def test_abandoned_streams_give_their_window_back(
        containerd: Containerd, big_layer: tuple[str, bytes]) -> None:
    digest, data = big_layer
    channel = Channel(str(containerd.socket), _METADATA)
    try:
        # Each abandoned read left up to a stream window unread: 20 of them are more
        # than the connection's window, which would stall every call had it not
        # been handed back.
        for _ in range(20):
            stream = channel.stream(_READ, _read_request(digest))
            await anext(stream)
            await stream.aclose()
        got = [content_pb2.ReadContentResponse.FromString(m).data
               async for m in channel.stream(_READ, _read_request(digest), 30.0)]
        assert b"".join(got) == data
    finally:
        await channel.close()


async def test_deadline_on_a_socket_that_never_answers(tmp_path: Path) -> None:
    path = tmp_path / "mute.sock"
    task = asyncio.current_task()
    assert task is not None
    with socket.socket(socket.AF_UNIX) as mute:
        mute.bind(str(path))
        mute.listen()
        channel = Channel(str(path))
        try:
            with pytest.raises(RpcError) as caught:
                await channel.unary(_LIST_IMAGES, b"", 0.3)
            assert caught.value.code == DEADLINE_EXCEEDED
            # The caller's own timeout still works after grpclib's deadline fired.
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await asyncio.sleep(5)
        finally:
            await channel.close()
    assert task.cancelling() == 0


async def test_unreachable_socket_and_closed_channel(tmp_path: Path) -> None:
    channel = Channel(str(tmp_path / "absent.sock"))
    with pytest.raises(RpcError) as caught:
        await channel.unary(_LIST_IMAGES, b"", 1.0)
    assert caught.value.code == UNAVAILABLE and "absent.sock" in caught.value.details
    await channel.close()
    with pytest.raises(RpcError) as closed:
        await channel.unary(_LIST_IMAGES, b"", 1.0)
    assert closed.value.code == CANCELLED


@pytest.mark.real
async def test_close_ends_a_running_stream(containerd: Containerd) -> None:
    channel = Channel(str(containerd.socket), _METADATA)
    events = channel.stream(_SUBSCRIBE, b"")
    waiting = asyncio.create_task(anext(events))
    await asyncio.sleep(0.3)
    await channel.close()
    with pytest.raises(RpcError) as caught:
        await asyncio.wait_for(waiting, 5.0)
    assert caught.value.code == CANCELLED
    with contextlib.suppress(RpcError):
        await events.aclose()


def test_a_node_over_containerd_loads_no_grpcio() -> None:
    """grpcio's C core was 9 MiB of a node's RSS: only tests and stub generation use it."""
    probe = ("import sys, meshmirror.node, meshmirror.containerd.store, "
             "meshmirror.containerd.checks, meshmirror.containerd.doctor\n"
             "print(sorted(m for m in sys.modules if m.split('.')[0] == 'grpc'))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


class _Boaster:
    """An HTTP/2 server on a unix socket whose answer to ``/x.Y/Huge`` announces a
    message of 4 GiB and sends as much of it as the client's windows allow (up to
    ``limit``), counting it; ``/x.Y/Ok`` gets one message and status OK."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.sent = 0
        self.tasks: set[asyncio.Task[None]] = set()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        while data := await reader.read(65536):
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    path = dict(event.headers)[b":path"]
                    conn.send_headers(event.stream_id, [(":status", "200"),
                                                        ("content-type", "application/grpc")])
                    if path == b"/x.Y/Huge":
                        conn.send_data(event.stream_id, b"\0" + struct.pack(">I", 0xFFFFFFF0))
                        self.tasks.add(asyncio.create_task(
                            self._flood(conn, event.stream_id, writer)))
                    else:
                        conn.send_data(event.stream_id, b"\0" + struct.pack(">I", 2) + b"ok")
                        conn.send_headers(event.stream_id, [("grpc-status", "0")],
                                          end_stream=True)
            writer.write(conn.data_to_send())
        writer.close()

    async def _flood(self, conn: h2.connection.H2Connection, stream_id: int,
                     writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(h2.exceptions.H2Error, ConnectionError):
            while self.sent < self.limit:
                window = min(conn.local_flow_control_window(stream_id),
                             conn.max_outbound_frame_size, self.limit - self.sent)
                if window > 0:
                    conn.send_data(stream_id, bytes(window))
                    self.sent += window
                writer.write(conn.data_to_send())
                await writer.drain()
                await asyncio.sleep(0.001 if window > 0 else 0.02)


async def test_a_message_over_the_bound_is_refused_at_its_prefix(tmp_path: Path) -> None:
    """grpclib reads whatever length a prefix claims: the node bounds it (a containerd
    gone wrong had it buffer all it sent until the deadline)."""
    boaster = _Boaster(limit=MAX_MESSAGE + 8 * MiB)
    server = await asyncio.start_unix_server(boaster.serve, str(tmp_path / "boast.sock"))
    channel = Channel(str(tmp_path / "boast.sock"))
    try:
        with pytest.raises(RpcError) as caught:
            await channel.unary("/x.Y/Huge", b"", 20.0)
        assert caught.value.code == RESOURCE_EXHAUSTED, caught.value
        assert boaster.sent <= STREAM_WINDOW, boaster.sent
        assert await channel.unary("/x.Y/Ok", b"", 5.0) == b"ok"  # the connection serves on
    finally:
        await channel.close()
        for task in boaster.tasks:
            task.cancel()
        await asyncio.gather(*boaster.tasks, return_exceptions=True)
        server.close()
        await server.wait_closed()
