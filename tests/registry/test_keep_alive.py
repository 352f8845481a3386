"""Accepted connections have Nagle off.

asyncio's ``connect_accepted_socket`` (the server's own accept loop hands it each
socket) leaves TCP_NODELAY unset, unlike ``create_server``. A response goes out as
headers, then body: with Nagle on, the body then waited for the client's delayed ACK,
40 ms on every request after a connection's first, and containerd and peers keep their
connections alive (measured: 44 ms per kept-alive GET before, 1-2 ms after).
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest

from meshmirror.oci.imagebuilder import build_image
from meshmirror.registry.app import create_app
from meshmirror.registry.server import ServerConfig, bind_listener, serve
from meshmirror.store.ocilayout import OciLayoutStore
from tests.support.ports import loopback_host


async def test_kept_alive_connections_are_accepted_with_nodelay(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = build_image("docker.io/library/ka:1", tmp_path / "layout", [4096], seed=3)
    store = OciLayoutStore(image.layout)
    loop = asyncio.get_running_loop()
    accepted = loop.connect_accepted_socket
    nodelay: list[int] = []

    async def recording(factory: Any, sock: socket.socket, **kwargs: Any) -> Any:
        nodelay.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        return await accepted(factory, sock, **kwargs)

    monkeypatch.setattr(loop, "connect_accepted_socket", recording)
    host = loopback_host()
    sock = bind_listener(host, 0)
    shutdown = asyncio.Event()
    options = ServerConfig()
    task = asyncio.create_task(serve(create_app(store), sock, shutdown, options))
    try:
        digest = image.platforms[0].layers[0].digest
        async with httpx.AsyncClient(base_url=f"http://{host}:{sock.getsockname()[1]}",
                                     timeout=20) as client:
            for _ in range(3):  # one connection, kept alive
                response = await client.get(f"/v2/library/ka/blobs/{digest}")
                assert response.status_code == 200
            assert (await client.get("/v2/")).status_code == 200
    finally:
        shutdown.set()
        await asyncio.wait_for(task, options.graceful_timeout + 10)
        await store.close()
    assert len(nodelay) == 1, "the client's requests did not share one connection"
    assert nodelay[0] != 0
