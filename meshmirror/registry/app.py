"""The registry's HTTP application: the OCI distribution pull API over a Store.

Routes:

- ``GET/HEAD /v2/`` - API version check.
- ``GET/HEAD /v2/<name>/manifests/<tag|digest>`` and
  ``GET/HEAD /v2/<name>/blobs/<digest>`` (blobs honour a single Range).
- any other method on ``/v2/...`` - 405 UNSUPPORTED with ``Allow: GET, HEAD``.
- ``/healthz`` (the process answers) and ``/readyz`` (the store answers).

Which registry a tag belongs to: containerd names it in ``?ns=<registry>``. A
request without ``ns`` (skopeo, curl, containerd using us as ``server``) is
taken to mean ``options.default_registry``, ``docker.io`` unless configured -
the same registry Docker assumes for a bare name. Digests need no registry.

Blobs are content-addressed and the store does not record which repositories
reference them, so a blob is served under any valid repository name; the
repository only matters for tags (and is passed on to the fallback).

Manifests are at most ``MAX_MANIFEST_SIZE`` bytes (4 MiB, Distribution's
limit); anything larger, or anything that is not a manifest or index, is
MANIFEST_UNKNOWN on the manifests endpoint, so a layer can never be served as
a manifest. ``Accept`` is not negotiated: a manifest is served as stored, which
is what Distribution does for every non-schema1 manifest.

Bodies stream in the chunks the store yields (1-4 MiB for the stores we
ship), straight from store to socket under Hypercorn's backpressure, so memory
does not grow with blob size; manifests (at most 4 MiB) are read whole.

Failures of the store itself (containerd restarting) are treated as misses:
the fallback is asked, then 404, so containerd goes on to the next host
instead of failing the pull.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final, TypeVar

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from meshmirror.fileio import FileBacked
from meshmirror.oci import mediatypes
from meshmirror.oci.digest import Digest
from meshmirror.oci.manifest import MAX_MANIFEST_SIZE, ManifestError, parse_manifest
from meshmirror.oci.reference import DOCKER_HUB, InvalidRegistryError, validate_registry
from meshmirror.registry.accesslog import (
    SCOPE_HANDLER,
    SCOPE_REASON,
    SCOPE_SOURCE,
    AccessLogMiddleware,
)
from meshmirror.registry.errors import RegistryError
from meshmirror.registry.fallback import Fallback, FallbackContent, Miss, MissReason
from meshmirror.registry.metrics import RegistryMetrics
from meshmirror.registry.paths import Kind, V2Path, parse_v2_path
from meshmirror.registry.ranges import (
    ByteRange,
    MalformedRangeError,
    RangeSpec,
    UnsatisfiableRangeError,
    parse_range,
)
from meshmirror.registry.requester import set_requester
from meshmirror.registry.serveroptions import ZERO_COPY_SEND, SendAborted
from meshmirror.store.base import BlobInfo, NotFoundError, Store

log = logging.getLogger(__name__)

API_VERSION_HEADER: Final = "Docker-Distribution-API-Version"
API_VERSION: Final = "registry/2.0"
BLOB_CONTENT_TYPE: Final = "application/octet-stream"
_ALLOWED: Final = "GET, HEAD"
# A reference that is neither a tag nor a digest this registry can look up.
_BAD_REFERENCE_CODES: Final = frozenset({"TAG_INVALID", "DIGEST_INVALID"})
# Blobs never change under a digest; let caches keep them.
_BLOB_CACHE_CONTROL: Final = "max-age=31536000"


@dataclass(frozen=True, slots=True)
class RegistryConfig:
    default_registry: str = DOCKER_HUB
    # False: a tag is never answered from the store, whose record may be stale, but
    # by the fallback (which asks the upstream what the tag means now).
    tags_from_store: bool = True


class NotServableError(Exception):
    """What the store holds under a digest is not a manifest this registry serves."""


async def stored_manifest(store: Store, digest: Digest, want_body: bool
                          ) -> tuple[BlobInfo, str, bytes | None]:
    """A manifest from ``store``: its record, media type and (``want_body``) bytes.

    Only ever a document that really is a manifest or index, of a bounded size.
    Raises `NotServableError`, or the store's NotFoundError and failures. The
    mirror serves the node's own tags in an outage through this too.
    """
    info = await store.stat(digest)
    if info.size > MAX_MANIFEST_SIZE:
        raise NotServableError(f"{digest} is {info.size} bytes, too large for a manifest")
    media_type = info.media_type
    if media_type is not None and not mediatypes.is_manifest_like(media_type):
        raise NotServableError(f"{digest} is a {media_type}, not a manifest")
    data: bytes | None = None
    if want_body or media_type is None:
        data = await store.read_all(digest, MAX_MANIFEST_SIZE)
        if len(data) != info.size:
            raise NotServableError(f"{digest}: store returned {len(data)} of {info.size} bytes")
        try:
            parsed = parse_manifest(data, media_type, max_size=MAX_MANIFEST_SIZE)
        except ManifestError as err:
            raise NotServableError(str(err)) from err
        media_type = media_type or parsed.media_type
    return info, media_type, data


class _Miss(Exception):
    """The local store cannot serve this request; try the fallback, then 404."""


def _common_headers(digest: Digest, length: int, content_type: str) -> dict[str, str]:
    return {
        API_VERSION_HEADER: API_VERSION,
        "Content-Type": content_type,
        "Content-Length": str(length),
        "Docker-Content-Digest": str(digest),
        "ETag": f'"{digest}"',
    }


class _BodyResponse(StreamingResponse):
    """Streams a pre-read first chunk, then ``body``; closes ``body`` however the
    response ends, even before its first chunk was asked for (the client left while
    the headers were sent), since a fallback's body may hold a peer's connection.

    A body that is a span of a file goes to a server that can send files
    (`ZERO_COPY_SEND` in the scope's extensions) as that span: the kernel copies it
    from the page cache to the socket, and no byte passes through Python."""

    def __init__(self, first: bytes | None, body: AsyncIterator[bytes], *, status_code: int,
                 headers: dict[str, str]) -> None:
        super().__init__(_prefixed(first, body), status_code=status_code, headers=headers)
        self._body = body
        self._first = first

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            span = (self._body.file_span() if isinstance(self._body, FileBacked)
                    and not self._first else None)
            if span is not None and ZERO_COPY_SEND in scope.get("extensions", {}):
                await send({"type": "http.response.start", "status": self.status_code,
                            "headers": self.raw_headers})
                with contextlib.suppress(SendAborted):  # the client left: logged as such
                    await send({"type": ZERO_COPY_SEND, "file": span.fd,
                                "offset": span.offset, "count": span.count,
                                "more_body": False})
            else:
                await super().__call__(scope, receive, send)
        finally:
            await _aclose(self._body)


async def _prefixed(first: bytes | None, body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if first:
        yield first
    async for chunk in body:
        yield chunk


async def _aclose(body: AsyncIterator[bytes] | None) -> None:
    aclose = getattr(body, "aclose", None)
    if aclose is not None:
        await aclose()


_T = TypeVar("_T")


class _ClientLeft(Exception):
    """The client disconnected while the fallback was still looking."""


async def _unless_client_leaves(receive: Receive, work: Awaitable[_T]) -> _T:
    """``work``'s result; if the client disconnects first, ``work`` is cancelled and
    `_ClientLeft` raised.

    Why: the mirror holds a large blob until its digest checks out, which can take
    seconds; a pull cancelled meanwhile would otherwise keep a peer transfer and a
    spool file busy for nobody. A GET's only other message is its empty body.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this request itself is cancelled (the server is stopping)
        task.cancel()
        watcher.cancel()
        raise
    watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.wait({task})  # let its cleanup (closing peers, freeing the spool) finish
    raise _ClientLeft


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class RegistryApp:
    """Request handlers bound to one store, fallback and set of options."""

    def __init__(self, store: Store, options: RegistryConfig, fallback: Fallback | None) -> None:
        self.store = store
        self.options = options
        self.fallback = fallback

    # -- routes ---------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        request.scope[SCOPE_HANDLER] = "healthz"
        return PlainTextResponse("ok\n")

    async def readyz(self, request: Request) -> Response:
        request.scope[SCOPE_HANDLER] = "readyz"
        try:
            ready = await self.store.ready()
        except Exception:
            log.exception("store readiness check failed")
            ready = False
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    async def v2(self, request: Request) -> Response:
        request.scope[SCOPE_HANDLER] = "v2"
        set_requester(request.client.host if request.client is not None else None)
        head = request.method == "HEAD"
        try:
            if request.method not in ("GET", "HEAD"):
                raise RegistryError("UNSUPPORTED", f"{request.method[:20]} is not supported: "
                                    "this registry only serves pulls",
                                    headers={"Allow": _ALLOWED})
            path = parse_v2_path(request.scope["path"])
            request.scope[SCOPE_HANDLER] = path.kind.value
            if path.kind is Kind.BASE:
                return Response(b"" if head else b"{}", headers={
                    API_VERSION_HEADER: API_VERSION, "Content-Length": "2",
                    "Content-Type": "application/json"})
            registry = self._registry_for(request)
            if path.kind is Kind.MANIFEST:
                return await self._manifest(request, registry, path, head)
            return await self._blob(request, registry, path, head)
        except RegistryError as err:
            if err.code in _BAD_REFERENCE_CODES:
                request.scope.setdefault(SCOPE_REASON, MissReason.BAD_REFERENCE)
            return err.response(head=head)

    # -- helpers --------------------------------------------------------------

    def _registry_for(self, request: Request) -> str:
        ns = request.query_params.get("ns")
        if not ns:
            return self.options.default_registry
        try:
            return validate_registry(ns)
        except InvalidRegistryError as err:
            raise RegistryError("NAME_INVALID", str(err), {"ns": ns[:200]}) from err

    async def _local_manifest(self, registry: str, path: V2Path, want_body: bool
                              ) -> tuple[BlobInfo, str, bytes | None]:
        try:
            digest = path.digest
            if digest is None:
                assert path.tag is not None
                if not self.options.tags_from_store:
                    raise _Miss("tags are resolved by the fallback")
                digest = await self.store.resolve(registry, path.repository, path.tag)
            return await stored_manifest(self.store, digest, want_body)
        except NotServableError as err:
            raise _Miss(f"{path.reference} is not a servable manifest: {err}") from err
        except NotFoundError as err:
            raise _Miss(str(err)) from err
        except _Miss:
            raise
        except Exception as err:
            log.warning("store failed serving a manifest; treating it as a miss",
                                exc_info=True)
            raise _Miss(str(err)) from err

    async def _manifest(self, request: Request, registry: str, path: V2Path,
                        head: bool) -> Response:
        try:
            info, media_type, data = await self._local_manifest(registry, path, not head)
        except _Miss:
            return await self._fallback_manifest(request, registry, path, head)
        request.scope[SCOPE_SOURCE] = "local"
        headers = _common_headers(info.digest, info.size, media_type)
        return Response(b"" if head else (data or b""), headers=headers)

    async def _fallback_manifest(self, request: Request, registry: str, path: V2Path,
                                 head: bool) -> Response:
        unknown = RegistryError("MANIFEST_UNKNOWN", detail={
            "name": path.repository, "reference": path.reference, "registry": registry})

        def describe(content: FallbackContent) -> tuple[int, dict[str, str]]:
            if content.media_type is None or not mediatypes.is_manifest_like(content.media_type):
                log.warning("fallback returned a manifest without a manifest media type",
                                    extra={"fields": {"media_type": content.media_type}})
                raise unknown
            return 200, _common_headers(content.digest, content.size, content.media_type)

        return await self._from_fallback(
            request, head, "manifest", unknown, describe,
            lambda fallback: fallback.open_manifest(
                registry, path.repository, path.reference, not head))

    async def _from_fallback(
            self, request: Request, head: bool, kind: str, unknown: RegistryError,
            describe: Callable[[FallbackContent], tuple[int, dict[str, str]]],
            ask: Callable[[Fallback], Awaitable[FallbackContent | Miss]]) -> Response:
        """Serve a local miss from the fallback, or raise ``unknown`` (a 404).

        ``ask`` asks the fallback; ``describe`` gives the status and headers for
        what it found, or raises to refuse it (its body is closed then). Every 404 puts
        its `MissReason` on the scope for the access log.
        """
        if self.fallback is None:
            # Peers' requests (and every request with the mesh off): the store is all.
            request.scope[SCOPE_REASON] = MissReason.NOT_HELD
            raise unknown
        try:
            content = await _unless_client_leaves(request.receive, ask(self.fallback))
        except _ClientLeft:
            log.info("client left while the fallback looked for a %s", kind)
            request.scope[SCOPE_REASON] = MissReason.CLIENT_LEFT
            raise unknown from None
        except Exception:
            log.warning("fallback failed on a %s; answering 404", kind, exc_info=True)
            request.scope[SCOPE_REASON] = MissReason.ERROR
            raise unknown from None
        if isinstance(content, Miss):
            request.scope[SCOPE_REASON] = content.reason
            raise unknown
        try:
            status, headers = describe(content)
        except BaseException as err:
            if err is unknown:  # what the peer sent was refused (not a manifest)
                request.scope[SCOPE_REASON] = MissReason.PEERS_FAILED
            await _aclose(content.body)
            raise
        request.scope[SCOPE_SOURCE] = "fallback"
        if head or content.body is None:
            await _aclose(content.body)
            if not head:
                request.scope[SCOPE_REASON] = MissReason.ERROR
                raise unknown
            return Response(b"", headers=headers)
        return _BodyResponse(None, content.body, status_code=status, headers=headers)

    def _blob_range(self, request: Request, digest: Digest, head: bool) -> RangeSpec | None:
        """The client's range, or None when Range does not apply (HEAD, If-Range mismatch)."""
        value = request.headers.get("range")
        if head or value is None:
            return None
        if_range = request.headers.get("if-range")
        if if_range is not None and if_range.strip() != f'"{digest}"':
            return None  # a validator we do not match (or a date): RFC 9110 says send it all
        try:
            return parse_range(value)
        except MalformedRangeError as err:
            raise RegistryError("RANGE_INVALID", str(err)) from err

    async def _blob(self, request: Request, registry: str, path: V2Path,
                    head: bool) -> Response:
        digest = path.digest
        assert digest is not None
        malformed: RegistryError | None = None
        try:
            spec = self._blob_range(request, digest, head)
        except RegistryError as err:
            malformed, spec = err, None
        try:
            return await self._local_blob(request, digest, spec, head, malformed)
        except _Miss:
            return await self._fallback_blob(request, registry, path, digest, spec, head,
                                               malformed)

    async def _local_blob(self, request: Request, digest: Digest, spec: RangeSpec | None,
                          head: bool, malformed: RegistryError | None) -> Response:
        """The blob from the local store, or `_Miss`: absent, or a store that fails."""
        try:
            info = await self.store.stat(digest)
        except NotFoundError as err:
            raise _Miss(str(err)) from err
        except Exception as err:
            log.warning("store failed a blob stat; treating it as a miss", exc_info=True)
            raise _Miss(str(err)) from err
        if malformed is not None:
            malformed.headers["Content-Range"] = f"bytes */{info.size}"
            raise malformed
        selected = self._resolve(spec, info.size)
        headers = self._blob_headers(digest, info.size, selected)
        if head:
            request.scope[SCOPE_SOURCE] = "local"
            return Response(b"", headers=headers)
        offset, length = (0, info.size) if selected is None else (selected.offset, selected.length)
        first, body = await self._open_local(digest, offset, length)
        request.scope[SCOPE_SOURCE] = "local"
        status = 200 if selected is None else 206
        return _BodyResponse(first, body, status_code=status, headers=headers)

    async def _open_local(self, digest: Digest, offset: int, length: int
                          ) -> tuple[bytes | None, AsyncIterator[bytes]]:
        """The store's body for a blob range, or `_Miss`. A file the store can open is sent
        by the server with sendfile; any other body's first chunk is read before the
        status is committed, so a blob removed since stat is a miss, not a cut-off 200."""
        body: AsyncIterator[bytes] | None = None
        try:
            if length:
                body = await self.store.open_file(digest, offset, length)
            if body is not None:
                return None, body
            body = self.store.read(digest, offset, length)
            first: bytes | None = await anext(body) if length else None
        except StopAsyncIteration:
            first = None
        except NotFoundError as err:
            await _aclose(body)
            raise _Miss(str(err)) from err
        except Exception as err:
            await _aclose(body)
            log.warning("store failed reading a blob; treating it as a miss",
                                exc_info=True)
            raise _Miss(str(err)) from err
        assert body is not None
        return first, body

    @staticmethod
    def _resolve(spec: RangeSpec | None, size: int) -> ByteRange | None:
        if spec is None:
            return None
        try:
            return spec.resolve(size)
        except UnsatisfiableRangeError as err:
            raise RegistryError("RANGE_INVALID", str(err),
                                headers={"Content-Range": f"bytes */{size}"}) from err

    @staticmethod
    def _blob_headers(digest: Digest, size: int, selected: ByteRange | None) -> dict[str, str]:
        headers = _common_headers(digest, size if selected is None else selected.length,
                                  BLOB_CONTENT_TYPE)
        headers["Accept-Ranges"] = "bytes"
        headers["Cache-Control"] = _BLOB_CACHE_CONTROL
        if selected is not None:
            headers["Content-Range"] = selected.content_range()
        return headers

    async def _fallback_blob(self, request: Request, registry: str, path: V2Path,
                             digest: Digest, spec: RangeSpec | None, head: bool,
                             malformed: RegistryError | None = None) -> Response:
        if malformed is not None:
            raise malformed

        def describe(content: FallbackContent) -> tuple[int, dict[str, str]]:
            selected = self._resolve(spec, content.size)
            return (200 if selected is None else 206,
                    self._blob_headers(digest, content.size, selected))

        return await self._from_fallback(
            request, head, "blob", RegistryError("BLOB_UNKNOWN", detail={"digest": str(digest)}),
            describe,
            lambda fallback: fallback.open_blob(registry, path.repository, digest, spec, not head))


class _AnyMethod:
    def __init__(self, handler: Callable[[Request], Awaitable[Response]]) -> None:
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self.handler(Request(scope, receive))
        await response(scope, receive, send)


def create_app(store: Store, *, options: RegistryConfig | None = None,
               fallback: Fallback | None = None, metrics: RegistryMetrics | None = None,
               extra_routes: Sequence[BaseRoute] = ()) -> ASGIApp:
    """The registry as an ASGI app; ``extra_routes`` lets other components add endpoints.

    The access log wraps the whole Starlette app so even its own 404s and 500s
    are logged with their final status.
    """
    handlers = RegistryApp(store, options or RegistryConfig(), fallback)
    routes: list[BaseRoute] = [
        Route("/healthz", handlers.healthz, methods=["GET", "HEAD"]),
        Route("/readyz", handlers.readyz, methods=["GET", "HEAD"]),
        # An ASGI endpoint, not a function, so Starlette does not restrict the
        # methods: every method reaches `v2`, which answers OCI-style 405s.
        Route("/v2", _AnyMethod(handlers.v2)),
        Route("/v2/{rest:path}", _AnyMethod(handlers.v2)),
        *extra_routes,
    ]
    app = Starlette(routes=routes, exception_handlers={404: _unrouted})
    return AccessLogMiddleware(app, logging.getLogger("meshmirror.access"), metrics)


async def _unrouted(request: Request, exc: Exception) -> Response:
    """A /v2 path no route matched (e.g. one holding a newline) still gets an OCI error."""
    path = str(request.scope.get("path", ""))  # not request.url: the query may not decode
    if path == "/v2" or path.startswith("/v2/"):
        return RegistryError("NOT_FOUND").response(head=request.method == "HEAD")
    return PlainTextResponse("Not Found", status_code=404)
