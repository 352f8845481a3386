"""Content from the upstream itself: a blob streamed from an offset, a manifest by digest.

Only the owner of a cold digest (`routing.owner`) asks this, once per blob for
the whole cluster, and only for repositories the visibility check found public:
the fetch is anonymous, with the same token flow, session, endpoints (the
registry's hosts.toml ``server``) and circuit breaker as the manifest questions
of `client`, so an upstream that is down costs one bounded wait and then
nothing until the breaker's cooldown.

Every wait is bounded separately, because a blob may legitimately take minutes
while a dead upstream must not: connecting (the client's connect timeout),
the first byte of the answer (headers), and any stall between two reads of the
body. A body that stops short, or a stall, raises `UpstreamStall` to the
reader, which may resume with ``offset`` (a ``Range`` request) from here or
from elsewhere. Bytes are not verified here: the caller hashes them, since
only the whole blob can be checked against its digest.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import NoReturn

import aiohttp

from meshmirror.contentrange import parse_content_range
from meshmirror.oci import mediatypes
from meshmirror.oci.digest import Digest
from meshmirror.oci.manifest import MAX_MANIFEST_SIZE
from meshmirror.oci.reference import validate_repository
from meshmirror.upstream.breaker import behind_breaker
from meshmirror.upstream.client import (
    UpstreamClient,
    status_failure,
    transport_failure,
)
from meshmirror.upstream.endpoints import EndpointError
from meshmirror.upstream.results import AuthRequired, FailureKind, NotFound, Unreachable
from meshmirror.upstream.tokens import Token

DEFAULT_FIRST_BYTE_TIMEOUT = 10.0
DEFAULT_STALL_TIMEOUT = 10.0
DEFAULT_CHUNK = 1024 * 1024
_MAX_REDIRECTS = 5  # blob GETs are commonly redirected to object storage


class UpstreamStall(Exception):
    """The upstream's body stopped (stall, reset or short) at ``position``."""

    def __init__(self, position: int, reason: str) -> None:
        super().__init__(f"at byte {position}: {reason}")
        self.position = position
        self.reason = reason


@dataclass(frozen=True, slots=True)
class FetchedManifest:
    """A manifest fetched by digest, verified against it."""

    digest: Digest
    media_type: str | None
    data: bytes


class UpstreamBody:
    """An open upstream blob answer from ``offset`` to ``end`` (the blob's end unless a
    range was asked for); ``size`` is the whole blob's. ``ranged``: the upstream
    answered the ``Range`` with a 206 (a 200 means it ignores ranges).

    Iterate `chunks` once; `close` is safe on any path, any number of times.
    """

    def __init__(self, response: aiohttp.ClientResponse, size: int, offset: int,
                 skip: int, stall_timeout: float, chunk: int,
                 on_failure: Callable[[str], None], end: int | None = None) -> None:
        self._response = response
        self.size = size
        self.offset = offset
        self.end = size if end is None else min(end, size)
        self.ranged = response.status == 206
        self._skip = skip  # a 200 to a Range request: the prefix to discard
        self.stall_timeout = stall_timeout
        self._chunk = chunk
        self._on_failure = on_failure

    async def chunks(self) -> AsyncIterator[bytes]:
        position = self.offset
        content = self._response.content
        try:
            while position < self.end:
                try:
                    async with asyncio.timeout(self.stall_timeout):
                        chunk = await content.read(self._chunk)
                except TimeoutError:
                    self._fail(position, f"no byte for {self.stall_timeout:g}s")
                except aiohttp.ClientError as err:
                    self._fail(position, f"{type(err).__name__}: {err}")
                if not chunk:
                    self._fail(position, "body ended early")
                if self._skip:
                    dropped = min(self._skip, len(chunk))
                    self._skip -= dropped
                    chunk = chunk[dropped:]
                    if not chunk:
                        continue
                if position + len(chunk) > self.end:
                    chunk = chunk[: self.end - position]
                position += len(chunk)
                yield chunk
        finally:
            self.close()

    def _fail(self, position: int, reason: str) -> NoReturn:
        self._on_failure(reason)
        raise UpstreamStall(position, reason)

    def close(self) -> None:
        self._response.release()


class UpstreamContent:
    """Anonymous blob and manifest fetches through an `UpstreamClient`'s session."""

    def __init__(self, client: UpstreamClient, *,
                 first_byte_timeout: float = DEFAULT_FIRST_BYTE_TIMEOUT,
                 stall_timeout: float = DEFAULT_STALL_TIMEOUT,
                 chunk: int = DEFAULT_CHUNK) -> None:
        if first_byte_timeout <= 0 or stall_timeout <= 0:
            raise ValueError("timeouts must be positive")
        self._client = client
        self.first_byte_timeout = first_byte_timeout
        self.stall_timeout = stall_timeout
        self._chunk = chunk

    async def open_blob(self, registry: str, repository: str, digest: Digest,
                        offset: int = 0, end: int | None = None, *, ranged: bool = False
                        ) -> UpstreamBody | NotFound | AuthRequired | Unreachable:
        """The blob from ``offset`` (to ``end``); its headers within the first-byte bound.
        ``ranged`` asks with a ``Range`` even from byte 0, to learn from the answer's
        status whether the upstream serves ranges (`UpstreamBody.ranged`)."""
        path = f"/v2/{repository}/blobs/{digest}"
        last = "" if end is None else str(end - 1)
        headers = {"Range": f"bytes={offset}-{last}"} if offset or ranged or end else {}
        opened = await self._open(registry, repository, path, headers)
        if not isinstance(opened, aiohttp.ClientResponse):
            return opened
        response = opened
        breaker = self._client.breaker(registry)
        try:
            size, skip = _extent(response, offset)
        except ValueError as err:
            response.release()
            return Unreachable(FailureKind.PROTOCOL, f"{path}: {err}")
        return UpstreamBody(response, size, offset, skip, self.stall_timeout, self._chunk,
                            lambda reason: breaker.record_failure(f"body: {reason}"), end)

    def allows(self, client: str | None) -> bool:
        """Whether ``client`` may make this node fetch content for it now: a manifest
        nobody holds is an upstream GET each time it is asked for, and a registry may
        count each against the node's pull quota, so it takes the client's pace."""
        return self._client.allows(client)

    async def fetch_manifest(self, registry: str, repository: str, digest: Digest
                             ) -> FetchedManifest | NotFound | AuthRequired | Unreachable:
        """A manifest by digest, read whole (bounded) and verified."""
        path = f"/v2/{repository}/manifests/{digest}"
        opened = await self._open(registry, repository, path,
                                  {"Accept": mediatypes.CONTAINERD_ACCEPT})
        if not isinstance(opened, aiohttp.ClientResponse):
            return opened
        try:
            if (opened.content_length or 0) > MAX_MANIFEST_SIZE:
                return Unreachable(FailureKind.PROTOCOL, f"{path}: larger than the manifest bound")
            data = bytearray()
            async with asyncio.timeout(self.stall_timeout * 2):
                async for piece in opened.content.iter_chunked(64 * 1024):
                    data += piece
                    if len(data) > MAX_MANIFEST_SIZE:
                        return Unreachable(FailureKind.PROTOCOL,
                                           f"{path}: larger than the manifest bound")
            media_type = opened.headers.get("Content-Type", "").split(";")[0].strip()
        except (TimeoutError, aiohttp.ClientError) as err:
            return Unreachable(FailureKind.TIMEOUT, f"{path}: {type(err).__name__}")
        finally:
            opened.release()
        if Digest.of(bytes(data), digest.algorithm) != digest:
            return Unreachable(FailureKind.PROTOCOL, f"{path}: body does not match its digest")
        return FetchedManifest(digest, media_type or None, bytes(data))

    async def _open(self, registry: str, repository: str, path: str,
                    headers: dict[str, str]
                    ) -> aiohttp.ClientResponse | NotFound | AuthRequired | Unreachable:
        """A GET with the anonymous token flow, behind the breaker; a 200/206 response."""
        validate_repository(repository)
        try:
            base = self._client.base_url(registry)
        except EndpointError as err:
            return Unreachable(FailureKind.CONFIG, str(err))
        url = base + path

        async def get() -> aiohttp.ClientResponse | NotFound | AuthRequired | Unreachable:
            result = await self._get_with_token(registry, repository, url, headers)
            if (isinstance(result, Unreachable) and result.kind is FailureKind.SERVER_ERROR
                    and "/manifests/" in path):
                # A manifest by a digest a client chose (a layer's, say) gets a 5xx from
                # some registries: the request's shape, not an outage.
                return await self._client.shape_or_outage(registry, base, result)
            return result

        return await behind_breaker(self._client.breaker(registry), registry,
                                    self.first_byte_timeout, url, get)

    async def _get_with_token(self, registry: str, repository: str, url: str,
                              headers: dict[str, str]
                              ) -> aiohttp.ClientResponse | NotFound | AuthRequired | Unreachable:
        scope = f"repository:{repository}:pull"
        tokens = self._client.tokens
        token = tokens.get(registry, scope)
        for attempt in range(3):
            response = await self._get(url, headers, token)
            if isinstance(response, Unreachable):
                return response
            if response.status in (200, 206):
                return response
            status, reply_headers = response.status, response.headers
            response.release()
            if status == 401 and attempt == 0 and token is not None:
                tokens.discard(registry, scope)  # revoked or expired early
                token = None
                continue
            if status == 401 and token is None:
                fresh = await self._client.anonymous_token(registry, scope, status, reply_headers)
                if not isinstance(fresh, Token):
                    return fresh
                tokens.put(registry, scope, fresh)
                token = fresh.value
                continue
            if status in (401, 403):
                tokens.discard(registry, scope)
                return AuthRequired(f"{url}: {status} to an anonymous client")
            if status == 404:
                return NotFound()
            return status_failure(status, url)
        return AuthRequired(f"{url}: refused every anonymous token")

    async def _get(self, url: str, headers: dict[str, str],
                   token: str | None) -> aiohttp.ClientResponse | Unreachable:
        sent = dict(headers)
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        try:
            return await self._client.open_content(url, sent, stall_timeout=self.stall_timeout,
                                                   max_redirects=_MAX_REDIRECTS)
        except aiohttp.ClientError as err:
            return transport_failure(err, url)


def _extent(response: aiohttp.ClientResponse, offset: int) -> tuple[int, int]:
    """The whole blob's size and the prefix to skip, from a 200 or 206 to ``offset``."""
    if response.status == 206:
        value = response.headers.get("Content-Range")
        said = parse_content_range(value)  # a ContentRangeError is a ValueError
        if said.first != offset or said.total is None:
            raise ValueError(f"Content-Range {value!r}")
        return said.total, 0
    length = response.content_length
    if length is None:
        raise ValueError("no Content-Length")
    return length, offset
