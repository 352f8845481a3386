"""Blob and manifest fetches from real Distribution registries, anonymous, bounded, resumable."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator

import pytest

from meshmirror.oci.digest import Digest
from meshmirror.oci.imagebuilder import BuiltImage
from meshmirror.upstream import AuthRequired, FailureKind, NotFound, Unreachable
from meshmirror.upstream.blobs import FetchedManifest, UpstreamBody, UpstreamContent, UpstreamStall
from tests.support.ports import free_port, loopback_host
from tests.support.scripted_http import Reply, Request, ScriptedHTTPServer, refused_url
from tests.upstream.conftest import PRIVATE_REPO, PUBLIC_REPO, FakeClock, Upstream, client_for

pytestmark = pytest.mark.real


def largest_layer(image: BuiltImage) -> tuple[Digest, bytes]:
    layer = max(image.platforms[0].layers, key=lambda b: b.size)
    return layer.digest, image.blob_path(layer.digest).read_bytes()


async def read_all(body: UpstreamBody) -> bytes:
    return b"".join([chunk async for chunk in body.chunks()])


@pytest.mark.parametrize("kind", ["public_upstream", "token_upstream"])
async def test_a_blob_whole_and_from_an_offset(kind: str, image: BuiltImage,
                                               request: pytest.FixtureRequest) -> None:
    upstream: Upstream = request.getfixturevalue(kind)
    digest, data = largest_layer(image)
    async with client_for(upstream) as client:
        content = UpstreamContent(client, chunk=4096)
        whole = await content.open_blob(upstream.name, PUBLIC_REPO, digest)
        assert isinstance(whole, UpstreamBody) and whole.size == len(data)
        assert await read_all(whole) == data
        offset = len(data) // 3
        rest = await content.open_blob(upstream.name, PUBLIC_REPO, digest, offset)
        assert isinstance(rest, UpstreamBody) and rest.size == len(data)
        assert await read_all(rest) == data[offset:]


async def test_a_manifest_by_digest_verified(public_upstream: Upstream) -> None:
    async with client_for(public_upstream) as client:
        got = await UpstreamContent(client).fetch_manifest(
            public_upstream.name, PUBLIC_REPO, public_upstream.digest)
    assert isinstance(got, FetchedManifest)
    assert Digest.of(got.data) == public_upstream.digest and got.media_type


async def test_private_and_missing(token_upstream: Upstream, htpasswd_upstream: Upstream,
                                   image: BuiltImage) -> None:
    digest, _ = largest_layer(image)
    async with client_for(token_upstream, htpasswd_upstream) as client:
        content = UpstreamContent(client)
        assert isinstance(await content.open_blob(token_upstream.name, PRIVATE_REPO, digest),
                          AuthRequired)
        assert isinstance(await content.open_blob(htpasswd_upstream.name, PRIVATE_REPO, digest),
                          AuthRequired)
        absent = Digest.of(b"nothing of this")
        assert isinstance(await content.open_blob(token_upstream.name, PUBLIC_REPO, absent),
                          NotFound)
        assert isinstance(await content.fetch_manifest(token_upstream.name, PUBLIC_REPO,
                                                       absent), NotFound)


async def test_down_is_unreachable_then_the_breaker_opens() -> None:
    name = "down.test"
    async with client_for((name, refused_url()), failure_threshold=2) as client:
        content = UpstreamContent(client)
        digest = Digest.of(b"x")
        kinds = [(await content.open_blob(name, "a/b", digest)) for _ in range(3)]
    assert [k.kind for k in kinds if isinstance(k, Unreachable)] == [
        FailureKind.CONNECTION, FailureKind.CONNECTION, FailureKind.CIRCUIT_OPEN]


@contextlib.asynccontextmanager
async def silent_after(prefix: bytes, headers_only: bool = False) -> AsyncIterator[str]:
    """An HTTP server that sends ``prefix`` and then nothing, holding the connection."""
    host = loopback_host()
    port = free_port(host)
    held: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if not headers_only:
            writer.write(prefix)
        held.append(writer)

    server = await asyncio.start_server(handle, host, port)
    try:
        yield f"http://{host}:{port}"
    finally:
        for writer in held:
            writer.close()
        server.close()


async def test_a_stalled_body_and_silent_headers_are_bounded() -> None:
    name = "stall.test"
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10
    async with silent_after(reply) as url, client_for((name, url)) as client:
        content = UpstreamContent(client, stall_timeout=0.3, first_byte_timeout=0.3)
        body = await content.open_blob(name, "a/b", Digest.of(b"x"))
        assert isinstance(body, UpstreamBody)
        with pytest.raises(UpstreamStall) as stalled:
            await read_all(body)
        assert stalled.value.position == 10
    async with silent_after(b"", headers_only=True) as url, client_for((name, url)) as client:
        content = UpstreamContent(client, stall_timeout=0.3, first_byte_timeout=0.3)
        silent = await content.open_blob(name, "a/b", Digest.of(b"x"))
        assert isinstance(silent, Unreachable) and silent.kind is FailureKind.TIMEOUT


async def test_a_probe_given_up_while_its_5xx_is_checked_leaves_the_breaker_usable() -> None:
    """A manifest fetch's 5xx is checked against ``/v2/`` before the breaker hears of
    it. A caller that gives up during that check must free the half-open probe, or
    the registry would be held unreachable for good (the check once ran outside the
    breaker's wrapping, where a cancel skipped `abandon`)."""
    clock = FakeClock()
    base_asked, release = threading.Event(), threading.Event()

    def respond(request: Request) -> Reply:
        if request.path == "/v2/":
            base_asked.set()
            release.wait(10)
            return Reply(200)
        return Reply(500)

    with ScriptedHTTPServer(respond) as server:
        try:
            async with client_for(("r.test", server.url), failure_threshold=1, cooldown=10,
                                  clock=clock) as client:
                breaker = client.breaker("r.test")
                assert breaker.allow()
                breaker.record_failure("refused")
                clock.now += 10  # half-open: the next fetch is the probe
                fetch = asyncio.create_task(UpstreamContent(client).fetch_manifest(
                    "r.test", "a/b", Digest.of(b"a layer, asked for as a manifest")))
                assert await asyncio.to_thread(base_asked.wait, 10)
                fetch.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await fetch
                assert breaker.allow(), "the probe slot was left taken"
        finally:
            release.set()
