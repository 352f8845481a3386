"""Fake peers for mirror tests: real HTTP servers on loopback with scripted faults."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field

from aiohttp import web

from meshmirror.routing.router import Peer
from tests.support.ports import free_port, loopback_host


@dataclass
class Behaviour:
    """How a fake peer answers: honestly, or with one scripted fault."""

    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # ref -> (type, body)
    corrupt: bool = False
    break_after: int | None = None
    # Send this many body bytes, then nothing until the client goes away (or 10 s).
    stall_after: int | None = None
    # Set once a stalled response's connection has been closed by the client.
    client_gone: asyncio.Event = field(default_factory=asyncio.Event)
    # Send a byte every this many seconds, for as long as the client listens.
    drip_interval: float | None = None
    # Send random bytes instead of the blob (the right length, the wrong content).
    lie: bool = False
    # With ``lie``: this many bytes more (or fewer) than the blob, announced and sent.
    lie_size: int = 0
    header_delay: float = 0.0
    not_found: bool = False
    requests: list[tuple[str, str | None, str | None]] = field(default_factory=list)


class FakePeer:
    def __init__(self, name: str, behaviour: Behaviour) -> None:
        self.name = name
        self.behaviour = behaviour
        self.host = loopback_host()
        self.port = free_port(self.host)
        self._runner: web.AppRunner | None = None

    @property
    def peer(self) -> Peer:
        return Peer(self.name, f"http://{self.host}:{self.port}")

    async def start(self) -> FakePeer:
        app = web.Application()
        app.router.add_get(r"/v2/{repo:.+}/blobs/{digest}", self._blob)
        app.router.add_get(r"/v2/{repo:.+}/manifests/{ref}", self._manifest)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        b = self.behaviour
        b.requests.append(
            (request.path, request.headers.get("Range"), request.headers.get("X-Meshmirror-Peer"))
        )
        if b.header_delay:
            await asyncio.sleep(b.header_delay)
        data = b.blobs.get(request.match_info["digest"])
        if data is None or b.not_found:
            return web.Response(status=404)
        if b.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        if b.lie:
            data = bytes(len(data) + b.lie_size)
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", request.headers.get("Range", ""))
        status = 200
        headers = {"Docker-Content-Digest": request.match_info["digest"]}
        if match:
            start = int(match.group(1))
            if start >= len(data):
                return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
            total = len(data)
            if match.group(2):
                data = data[:int(match.group(2)) + 1]
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{total}"
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = len(data) - start
        await response.prepare(request)
        body = data[start:]
        if b.break_after is not None:
            await response.write(body[: b.break_after])
            assert request.transport is not None
            request.transport.close()
            return response
        if b.drip_interval is not None:
            try:
                for i in range(len(body)):
                    await response.write(body[i : i + 1])
                    await asyncio.sleep(b.drip_interval)
            except (ConnectionError, RuntimeError, asyncio.CancelledError):
                b.client_gone.set()
            return response
        if b.stall_after is not None:
            await response.write(body[: b.stall_after])
            transport = request.transport
            for _ in range(1000):
                if transport is None or transport.is_closing():
                    b.client_gone.set()
                    break
                await asyncio.sleep(0.01)
            return response
        for i in range(0, len(body), 256 * 1024):
            await response.write(body[i : i + 256 * 1024])
        await response.write_eof()
        return response

    async def _manifest(self, request: web.Request) -> web.Response:
        b = self.behaviour
        b.requests.append((request.path, None, request.headers.get("X-Meshmirror-Peer")))
        found = b.manifests.get(request.match_info["ref"])
        if found is None or b.not_found:
            return web.Response(status=404)
        media_type, body = found
        from meshmirror.oci.digest import Digest

        digest = str(Digest.of(body))
        if b.corrupt:
            body = body + b" "
        return web.Response(
            body=body, headers={"Content-Type": media_type, "Docker-Content-Digest": digest}
        )
