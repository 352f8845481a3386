"""The gRPC framing on h2 (containerd/rpc.py): flow control against a real containerd,
and what a broken or hostile server on the socket makes of a call."""

from __future__ import annotations

import asyncio
import contextlib
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest

from meshmirror.containerd.client import ContainerdClient, ContainerdUnavailableError
from meshmirror.containerd.proto import images_pb2
from meshmirror.containerd.rpc import (
    CONNECTION_WINDOW,
    INTERNAL,
    MAX_MESSAGE,
    NOT_FOUND,
    STREAM_WINDOW,
    Channel,
    RpcError,
    call_blocking,
)
from meshmirror.store.base import NotFoundError
from tests.containerd.conftest import ImageFactory, import_image
from tests.support.containerd import Containerd

_Answer = Callable[[h2.connection.H2Connection, int], bool]


@contextlib.asynccontextmanager
async def fake_server(path: Path, answer: _Answer) -> AsyncIterator[list[int]]:
    """An HTTP/2 server on a unix socket that answers each request with ``answer(conn,
    stream_id)``; False from it drops the connection. Yields the connections made."""
    connections: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(len(connections))
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        try:
            while data := await reader.read(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.StreamEnded) and not answer(
                            conn, event.stream_id):
                        return
                writer.write(conn.data_to_send())
        finally:
            writer.close()

    server = await asyncio.start_unix_server(serve, str(path))
    try:
        yield connections
    finally:
        server.close()


def _reply(conn: h2.connection.H2Connection, stream_id: int, body: bytes,
           status: int = 0, message: str = "") -> None:
    conn.send_headers(stream_id, [(":status", "200"), ("content-type", "application/grpc")])
    if body:
        conn.send_data(stream_id, body)
    conn.send_headers(stream_id, [("grpc-status", str(status)), ("grpc-message", message)],
                      end_stream=True)


def _image(name: str) -> bytes:
    message = images_pb2.GetImageResponse(image=images_pb2.Image(name=name)).SerializeToString()
    return struct.pack(">BI", 0, len(message)) + message


async def test_a_status_and_its_message_come_from_the_trailers(tmp_path: Path) -> None:
    def answer(conn: h2.connection.H2Connection, stream_id: int) -> bool:
        _reply(conn, stream_id, b"", NOT_FOUND, "image%20gone")
        return True

    async with fake_server(tmp_path / "s.sock", answer):
        client = ContainerdClient(str(tmp_path / "s.sock"))
        try:
            with pytest.raises(NotFoundError, match="not found"):
                await client.get_image("r.example/a:1")
        finally:
            await client.close()
        with pytest.raises(RpcError, match="image gone") as caught:
            await asyncio.to_thread(call_blocking, str(tmp_path / "s.sock"), "/x/Get", b"",
                                    (), 2.0)
        assert caught.value.code == NOT_FOUND


async def test_an_oversized_message_fails_the_call_before_it_is_buffered(
        tmp_path: Path) -> None:
    def answer(conn: h2.connection.H2Connection, stream_id: int) -> bool:
        # Claims more than MAX_MESSAGE: refused at its 5-byte prefix, nothing held for it.
        _reply(conn, stream_id, struct.pack(">BI", 0, MAX_MESSAGE + 1) + b"x" * 1000)
        return True

    async with fake_server(tmp_path / "s.sock", answer):
        channel = Channel(str(tmp_path / "s.sock"))
        try:
            with pytest.raises(RpcError, match="over") as caught:
                await channel.unary("/x/Get", b"", 5.0)
            assert caught.value.code == INTERNAL
        finally:
            await channel.close()


async def test_a_dropped_connection_fails_its_calls_and_the_next_call_reconnects(
        tmp_path: Path) -> None:
    answered = 0

    def answer(conn: h2.connection.H2Connection, stream_id: int) -> bool:
        nonlocal answered
        answered += 1
        if answered == 1:
            return False  # the first request: the connection goes away unanswered
        _reply(conn, stream_id, _image("r.example/a:1"))
        return True

    async with fake_server(tmp_path / "s.sock", answer) as connections:
        client = ContainerdClient(str(tmp_path / "s.sock"), timeout=5.0)
        try:
            with pytest.raises(ContainerdUnavailableError, match="unavailable"):
                await client.get_image("r.example/a:1")
            assert (await client.get_image("r.example/a:1")).name == "r.example/a:1"
            assert len(connections) == 2
        finally:
            await client.close()


async def test_a_server_that_never_answers_meets_the_deadline(tmp_path: Path) -> None:
    async with fake_server(tmp_path / "s.sock", lambda conn, stream_id: True):
        client = ContainerdClient(str(tmp_path / "s.sock"), timeout=0.3)
        try:
            with pytest.raises(ContainerdUnavailableError, match="DEADLINE_EXCEEDED"):
                await client.get_image("r.example/a:1")
        finally:
            await client.close()


@pytest.mark.real
async def test_reads_left_early_do_not_stall_later_calls(containerd: Containerd,
                                                         make_image: ImageFactory) -> None:
    """Each read left after its first chunk held up to a stream's window unread; unless
    that goes back to the connection's window, enough of them stall every call."""
    image = make_image("docker.io/library/abandoned:1", (4 * 1024 * 1024,))
    import_image(containerd, image)
    layer = image.platforms[0].layers[0]
    data = image.blob_path(layer.digest).read_bytes()
    client = ContainerdClient(str(containerd.socket), timeout=10.0)
    try:
        async with asyncio.timeout(30):
            for _ in range(2 * CONNECTION_WINDOW // STREAM_WINDOW):
                async with contextlib.aclosing(client.read_content(str(layer.digest))) as body:
                    async for _chunk in body:
                        await asyncio.sleep(0.02)  # containerd fills the stream's window
                        break
            whole = b"".join([c async for c in client.read_content(str(layer.digest))])
            assert whole == data
            assert [i.name for i in await client.list_images()] == [image.name]
    finally:
        await client.close()


def test_a_node_over_containerd_loads_no_grpcio() -> None:
    """What the node imports to read containerd (the store, the start-up checks):
    grpcio's import alone was 9 MiB of its RSS."""
    probe = ("import sys\nimport meshmirror.node, meshmirror.containerd.store, "
             "meshmirror.containerd.checks, meshmirror.containerd.doctor\n"
             "print(*sorted(m for m in sys.modules if m.split('.')[0] == 'grpc'))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=Path(__file__).parents[2],
                          capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"imported {done.stdout.strip()}"
