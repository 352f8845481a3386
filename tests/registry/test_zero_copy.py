"""Blobs in files go out with sendfile: the registry app over an OCI-layout store, under the
real server on a real socket. Whole, by range and HEAD; a client that stops reading is
dropped after the send timeout; a file shorter than promised cuts the response short."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from meshmirror.oci.imagebuilder import BuiltImage, blob_path, build_image
from meshmirror.registry.app import create_app
from meshmirror.registry.server import ServerOptions, bind_listener, serve
from meshmirror.store.ocilayout import OciLayoutStore
from tests.hostile.clients import closed_by_server, unread_get
from tests.support.ports import loopback_host

SIZE = 6 << 20


@pytest.fixture
def image(tmp_path: Path) -> BuiltImage:
    return build_image("docker.io/library/zc:1", tmp_path, layer_sizes=(SIZE,), seed=11)


@pytest.fixture
def sendfile_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The byte counts the server asked ``os.sendfile`` for: proof that the bytes did not
    pass through Python."""
    calls: list[int] = []
    real = os.sendfile

    def counting(out: int, fd: int, offset: int | None, count: int) -> int:
        sent = real(out, fd, offset, count)
        calls.append(sent)
        return sent

    monkeypatch.setattr(os, "sendfile", counting)
    return calls


async def serving(image: BuiltImage, options: ServerOptions,
                  body: Callable[[str, int, str], Awaitable[None]]) -> None:
    store = OciLayoutStore(image.layout)
    host = loopback_host()
    sock = bind_listener(host, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)  # accepted ones inherit it
    port = sock.getsockname()[1]
    shutdown = asyncio.Event()
    task = asyncio.create_task(serve(create_app(store), sock, shutdown, options))
    try:
        digest = image.platforms[0].layers[0].digest
        await body(host, port, f"/v2/library/zc/blobs/{digest}")
    finally:
        shutdown.set()
        await asyncio.wait_for(task, options.graceful_timeout + 10)
        await store.close()


async def test_whole_ranges_and_head_are_sent_by_the_kernel(
        image: BuiltImage, sendfile_calls: list[int]) -> None:
    layer = image.platforms[0].layers[0]
    data = blob_path(image.layout, layer.digest).read_bytes()
    size = layer.size

    async def check(host: str, port: int, path: str) -> None:
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=20) as client:
            whole = await client.get(path)
            assert whole.status_code == 200
            assert whole.headers["content-length"] == str(size)
            assert f"sha256:{hashlib.sha256(whole.content).hexdigest()}" == str(layer.digest)
            assert sum(sendfile_calls) == size
            part = await client.get(path, headers={"Range": "bytes=1000-1999999"})
            assert part.status_code == 206
            assert part.headers["content-range"] == f"bytes 1000-1999999/{size}"
            assert part.content == data[1000:2_000_000]
            tail = await client.get(path, headers={"Range": "bytes=-5"})
            assert (tail.status_code, tail.content) == (206, data[-5:])
            head = await client.head(path)
            assert (head.status_code, head.headers["content-length"], head.content) == (
                200, str(size), b"")
            assert sum(sendfile_calls) == size + 1_999_000 + 5
            # The connection is still in step after all of these: one more on it.
            assert (await client.get("/v2/")).status_code == 200

    await serving(image, ServerOptions(), check)


async def test_a_client_that_stops_reading_a_file_is_dropped(image: BuiltImage) -> None:
    async def check(host: str, port: int, path: str) -> None:
        stalled = unread_get(host, port, path)
        try:
            # 0.5 s without progress, found within an eighth more; reading to check would
            # be progress, so the client reads nothing for 3 s first.
            await asyncio.sleep(3)
            assert closed_by_server(stalled), "the server kept a connection nobody reads"
            async with httpx.AsyncClient(timeout=20) as client:
                assert (await client.get(f"http://{host}:{port}{path}")).status_code == 200
        finally:
            stalled.close()

    await serving(image, ServerOptions(send_timeout=0.5), check)


async def test_a_file_shorter_than_promised_cuts_the_response(image: BuiltImage) -> None:
    layer = image.platforms[0].layers[0]
    path_on_disk = blob_path(image.layout, layer.digest)

    async def check(host: str, port: int, path: str) -> None:
        async with httpx.AsyncClient(timeout=20) as client:
            # The store has read its index (and checked the file) once it answered a HEAD;
            # cut the file after that, so its record still promises the whole size.
            assert (await client.head(f"http://{host}:{port}{path}")).status_code == 200
            os.truncate(path_on_disk, layer.size // 2)
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get(f"http://{host}:{port}{path}")

    await serving(image, ServerOptions(), check)
