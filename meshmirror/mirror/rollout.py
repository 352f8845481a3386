"""A rollout: the one node that fetches a cold public blob, and everyone reading from it.

When no alive peer's summary matches a blob of a public repository, nobody in
the cluster holds it yet: the first pulls of a new image. Rather than every
node answering 404 (and every containerd pulling the whole image from the
upstream), each node computes the blob's fan-out tree over the members it
sees (`routing.owner`): the root, the *owner*, fetches it from the upstream
once, anonymously (`upstream.blobs`); every other member reads it from its
parent in the tree, which reads from its own, while the bytes arrive. Each
node holds the blob in its flight (`flight`: one fetch per blob per node, a
cache file readers follow), so a node serves its own containerd and its tree
readers from one download.

Who asks whom. A member asks its parent with a *tree request*: the peer marker
plus `TREE_HEADER` naming the requester. A node answers a tree request from
the blob's flight if there is one, and otherwise joins the tree itself (starts
its own flight from its parent, or from the upstream if it is the owner in its
view), so a parent whose containerd has not asked yet still serves. Plain peer
requests are served from a flight or the cache too, but never start a fetch.
Nothing is advertised: the tree is a pure function of (digest, members), so a
node that needs the blob knows whom to ask before any summary could say so.

What containerd sees. The owner's containerd may follow the upstream's bytes
as they arrive (it would have fetched the same bytes itself). Every other
node's containerd gets the blob only once its digest verified, as for any
peer's bytes; mirrors between them pass bytes on unverified, each verifying
its own copy.

Failures. A parent that fails (refused, reset, stalled, or 429 because it
serves `fanout` readers already) is left out and the tree recomputed without
it, so the reader resumes with ``Range`` from its new parent, and a reader
that becomes the owner (the old owner died) resumes from the upstream itself.
With every member failed, the reader goes to the upstream directly. A node
asked by a requester never asks that requester back. The upstream down or
slow: bounded by `upstream.blobs`, then a miss, and containerd goes upstream
itself. Private repositories never get here: the visibility check comes first.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge
from starlette.types import ASGIApp, Receive, Scope, Send

from meshmirror.mirror.client import PeerClient, PeerResponse
from meshmirror.mirror.errors import FailureReason, PeerFailure
from meshmirror.mirror.fetch import Sink
from meshmirror.mirror.flight import BlobSource, Flights
from meshmirror.mirror.metrics import MirrorMetrics
from meshmirror.mirror.options import MirrorConfig
from meshmirror.mirror.visibility import BLOB_PROBE_REFERENCE, RepositoryAccess
from meshmirror.oci.digest import Digest, DigestError
from meshmirror.oci.mediatypes import CONTAINERD_ACCEPT
from meshmirror.registry.fallback import FallbackContent, Miss, MissReason
from meshmirror.registry.ranges import RangeSpec, UnsatisfiableRangeError
from meshmirror.registry.requester import requester as client_address
from meshmirror.routing.owner import FanoutTree
from meshmirror.routing.ranking import PeerRanking
from meshmirror.routing.router import Peer
from meshmirror.upstream.blobs import (
    FetchedManifest,
    UpstreamBody,
    UpstreamContent,
    UpstreamStall,
)
from meshmirror.upstream.results import AuthRequired, NotFound, Unreachable

log = logging.getLogger(__name__)

TREE_HEADER = "X-Meshmirror-Tree"
_TREE_HEADER_BYTES = TREE_HEADER.lower().encode()
_MAX_NAME = 256
# The node that sent the tree request being served, if the request is one.
_requester: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "meshmirror_tree_requester", default=None)


def tree_requests(app: ASGIApp) -> ASGIApp:
    """Note a request's `TREE_HEADER` for the peers' fallback (`Rollout.requester`)."""

    async def noted(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        value = next((v for k, v in scope.get("headers", ()) if k == _TREE_HEADER_BYTES), None)
        token = _requester.set(value.decode("latin-1")[:_MAX_NAME] if value else None)
        try:
            await app(scope, receive, send)
        finally:
            _requester.reset(token)

    return noted


UPSTREAM_RESULTS = ("opened", "completed", "manifest", "not_found", "auth_required", "failed")


class RolloutMetrics:
    """What this node fetched from the upstream for the cluster, and whom it served."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.upstream_fetches = Counter(
            "meshmirror_rollout_upstream_fetches",
            "Fetches this node made from the upstream as a blob's owner (or after every "
            "member failed), by result: opened, completed (whole body), manifest, "
            "not_found, auth_required, failed (down, slow, breaker open)",
            ["result"], registry=registry)
        for result in UPSTREAM_RESULTS:
            self.upstream_fetches.labels(result)
        self.upstream_bytes = Counter(
            "meshmirror_rollout_upstream_bytes",
            "Bytes this node fetched from the upstream (blobs and manifests)",
            registry=registry)
        self.readers_served = Counter(
            "meshmirror_rollout_readers_served",
            "Peers' readers this node served from a blob in flight or in its cache",
            registry=registry)
        self.readers = Gauge(
            "meshmirror_rollout_readers",
            "Peers' readers this node serves now (at most --rollout-fanout)",
            registry=registry)
        self.readers_peak = Gauge(
            "meshmirror_rollout_readers_peak",
            "The most peers' readers this node served at once since it started",
            registry=registry)
        self.refused = Counter(
            "meshmirror_rollout_readers_refused",
            "Peers' readers sent elsewhere because --rollout-fanout readers were served",
            registry=registry)


class Rollout:
    """This node's part in rollouts: whom to ask for a cold blob, and the upstream fetch.

    ``members`` is the alive peers that advertise a registry (the router's); this
    node takes part as ``name``.
    """

    def __init__(self, name: str, router: PeerRanking, session: aiohttp.ClientSession,
                 content: UpstreamContent, options: MirrorConfig, metrics: RolloutMetrics,
                 mirror_metrics: MirrorMetrics) -> None:
        self.name = name
        self.fanout = options.rollout_fanout
        self._router = router
        self._content = content
        self.metrics = metrics
        # Tree requests wait on a parent that is itself opening the blob upstream, and
        # follow it at the upstream's pace: the upstream's bounds apply, not a peer's.
        patient = replace(options, first_byte_timeout=content.first_byte_timeout + 1.0,
                          stall_timeout=content.stall_timeout + 1.0)
        self.options = options
        self.client = PeerClient(router, session, patient, mirror_metrics)
        self._chunk = options.chunk_size
        self.serving = 0  # tree and peer readers this node serves now
        self.serving_peak = 0
        self._manifests: dict[str, asyncio.Future[FetchedManifest | None]] = {}

    def close(self) -> None:
        self.client.close()

    @staticmethod
    def requester() -> str | None:
        """The member that sent the request being served, if it is a tree request."""
        return _requester.get()

    def tree(self, digest: Digest, leave_out: set[str]) -> tuple[FanoutTree, dict[str, Peer]]:
        peers = {p.name: p for p in self._router.peers()
                 if p.name not in leave_out and p.name != self.name}
        return FanoutTree(str(digest), [self.name, *peers], self.fanout), peers

    def is_owner(self, digest: Digest) -> bool:
        return self.tree(digest, set())[0].owner == self.name

    def stream(self, registry: str, repository: str, digest: Digest) -> TreeStream:
        """A `flight.ChunkStream` of the blob through the tree (see the module's note)."""
        leave_out = {r} if (r := self.requester()) else set()
        return TreeStream(self, registry, repository, digest, leave_out)

    # -- readers this node serves --------------------------------------------------

    def admit(self) -> bool:
        """Take a reader slot; False when `fanout` readers are served already."""
        if self.serving >= self.fanout:
            self.metrics.refused.inc()
            return False
        self.serving += 1
        self.serving_peak = max(self.serving_peak, self.serving)
        self.metrics.readers_served.inc()
        self.metrics.readers.set(self.serving)
        self.metrics.readers_peak.set(self.serving_peak)
        return True

    def release(self) -> None:
        self.serving -= 1
        self.metrics.readers.set(self.serving)

    async def counted(self, body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """``body`` holding a reader slot until it ends or is dropped."""
        try:
            async for chunk in body:
                yield chunk
        finally:
            self.release()
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                await aclose()

    # -- the upstream --------------------------------------------------------------

    async def open_upstream(self, registry: str, repository: str, digest: Digest,
                            offset: int) -> UpstreamBody | None:
        opened = await self._content.open_blob(registry, repository, digest, offset)
        if isinstance(opened, UpstreamBody):
            self.metrics.upstream_fetches.labels("opened").inc()
            return opened
        result = ("not_found" if isinstance(opened, NotFound)
                  else "auth_required" if isinstance(opened, AuthRequired) else "failed")
        self.metrics.upstream_fetches.labels(result).inc()
        if isinstance(opened, Unreachable | AuthRequired):
            log.info("upstream fetch of %s failed: %s", digest, opened)
        return None

    def upstream_bytes(self, n: int) -> None:
        self.metrics.upstream_bytes.inc(n)

    async def manifest(self, registry: str, repository: str,
                       digest: Digest) -> FetchedManifest | Miss | None:
        """A manifest no peer holds: from the owner, or from the upstream if this node is
        the owner (once, however many ask at once), or if the owner fails. A client
        past its pace of new upstream questions gets a miss (``busy``) instead."""
        key = f"{registry}/{repository}@{digest}"
        waiting = self._manifests.get(key)
        if waiting is not None:
            return await asyncio.shield(waiting)
        if not self._content.allows(client_address()):
            return Miss(MissReason.BUSY, "client rate limit")
        future: asyncio.Future[FetchedManifest | None] = (
            asyncio.get_running_loop().create_future())
        self._manifests[key] = future
        try:
            result = await self._manifest(registry, repository, digest)
        except BaseException:
            future.set_result(None)
            raise
        finally:
            del self._manifests[key]
        future.set_result(result)
        return result

    async def _manifest(self, registry: str, repository: str,
                        digest: Digest) -> FetchedManifest | None:
        leave_out = {r} if (r := self.requester()) else set()
        tree, peers = self.tree(digest, leave_out)
        owner = tree.owner
        if owner is not None and owner != self.name:
            got = await self._manifest_from(peers[owner], registry, repository, digest)
            if got is not None:
                return got
        fetched = await self._content.fetch_manifest(registry, repository, digest)
        if isinstance(fetched, FetchedManifest):
            self.metrics.upstream_fetches.labels("manifest").inc()
            self.upstream_bytes(len(fetched.data))
            return fetched
        self.metrics.upstream_fetches.labels("failed").inc()
        return None

    async def _manifest_from(self, peer: Peer, registry: str, repository: str,
                             digest: Digest) -> FetchedManifest | None:
        path = f"/v2/{repository}/manifests/{digest}"
        try:
            opened = await self.client.open(
                peer, path, registry, headers={TREE_HEADER: self.name,
                                               "Accept": CONTAINERD_ACCEPT})
        except PeerFailure as failure:
            log.info("owner %s had no manifest %s: %s", peer.name, digest, failure)
            return None
        try:
            media_type = opened.response.headers.get("Content-Type", "").split(";")[0].strip()
            data = await self.client.read_whole(opened, 4 * 1024 * 1024)
        except PeerFailure:
            return None
        finally:
            opened.release()
        if Digest.of(data, digest.algorithm) != digest:
            return None
        return FetchedManifest(digest, media_type or None, data)


class TreeStream:
    """The blob's bytes from this node's parent in the tree, or from the upstream when
    this node is the owner; resumed with Range from the next in order after a failure.

    A `flight.ChunkStream`: `open` finds a source and the size, `chunks` streams
    from an offset and raises `PeerFailure` on a break (the flight resumes it).
    """

    def __init__(self, rollout: Rollout, registry: str, repository: str, digest: Digest,
                 leave_out: set[str]) -> None:
        self._rollout = rollout
        self._registry = registry
        self._repository = repository
        self._digest = digest
        self._path = f"/v2/{repository}/blobs/{digest}"
        self._left_out = set(leave_out)
        self._failed: set[str] = set()
        self._size = 0
        self._position = 0
        self._peer: PeerResponse | None = None
        self._upstream: UpstreamBody | None = None
        self._origin: str | None = None  # the member, or "upstream", now sending
        self._deadline = float("inf")

    @property
    def origin(self) -> str | None:
        """`flight.ChunkStream.origin`: the member (or "upstream") sending now."""
        return self._origin

    async def open(self) -> int | None:
        size = await self._connect(0)
        if size is not None:
            # The whole fetch, resumes included, is bounded like a peer request.
            self._deadline = (asyncio.get_running_loop().time()
                              + self._rollout.options.deadline_for(size))
        return size

    def _late(self) -> bool:
        return asyncio.get_running_loop().time() > self._deadline

    def close(self) -> None:
        if self._peer is not None:
            self._peer.release()
            self._peer = None
        if self._upstream is not None:
            self._upstream.close()
            self._upstream = None

    async def chunks(self, offset: int) -> AsyncIterator[bytes]:
        if (self._peer is None and self._upstream is None) or self._position != offset:
            self.close()
            if self._late() or await self._connect(offset) is None:
                raise PeerFailure(FailureReason.EXHAUSTED, f"no source left at byte {offset}")
        if self._upstream is not None:
            async for chunk in self._from_upstream(self._upstream):
                yield chunk
            return
        opened = self._peer
        assert opened is not None
        client = self._rollout.client
        while self._position < self._size:
            try:
                if self._late():
                    raise PeerFailure(FailureReason.DEADLINE,
                                      f"past the deadline at byte {self._position}")
                chunk = await client.read_chunk(opened, min(self._rollout._chunk,
                                                            self._size - self._position))
                if not chunk:
                    raise PeerFailure(FailureReason.BROKEN, "body ended")
            except PeerFailure as failure:
                self._parent_failed(opened.peer, failure)
                raise
            self._position += len(chunk)
            yield chunk
        client.succeeded(opened)
        self.close()

    async def _from_upstream(self, body: UpstreamBody) -> AsyncIterator[bytes]:
        try:
            async for chunk in body.chunks():
                if self._late():
                    self.close()
                    raise PeerFailure(FailureReason.DEADLINE, f"upstream past the deadline at "
                                                  f"byte {self._position}")
                self._position += len(chunk)
                self._rollout.upstream_bytes(len(chunk))
                yield chunk
        except UpstreamStall as stall:
            self.close()
            raise PeerFailure(FailureReason.BROKEN, f"upstream {stall}") from stall
        self._rollout.metrics.upstream_fetches.labels("completed").inc()
        self.close()

    def _parent_failed(self, peer: Peer, failure: PeerFailure) -> None:
        log.info("%s: tree parent %s failed at byte %d: %s", self._digest, peer.name,
                    self._position, failure)
        self._failed.add(peer.name)
        self.close()

    async def _connect(self, offset: int) -> int | None:
        """Open the blob at ``offset`` from the parent in the tree over the members not
        yet failed (or left out), or from the upstream when this node is the root."""
        rollout = self._rollout
        while True:
            tree, peers = rollout.tree(self._digest, self._left_out | self._failed)
            placement = tree.placement(rollout.name)
            if placement.parent is None:
                # The owner, in this view: the upstream, from where we are.
                body = await rollout.open_upstream(self._registry, self._repository,
                                                   self._digest, offset)
                if body is None:
                    return None
                if offset and body.size != self._size:
                    body.close()
                    return None
                self._upstream, self._size, self._position = body, body.size, offset
                self._origin = "upstream"
                return body.size
            peer = peers[placement.parent]
            try:
                opened = await rollout.client.open(
                    peer, self._path, self._registry, offset=offset,
                    headers={TREE_HEADER: rollout.name})
            except PeerFailure as failure:
                log.info("%s: tree parent %s refused: %s", self._digest, peer.name, failure)
                self._failed.add(peer.name)
                continue
            size = _size_of(opened, offset)
            if size is None or (offset and size != self._size):
                opened.release()
                self._failed.add(peer.name)
                continue
            self._peer, self._size, self._position = opened, size, offset
            self._origin = peer.name
            return size


def _size_of(opened: PeerResponse, offset: int) -> int | None:
    """The whole blob's size from a 200 (offset 0) or a 206 starting at ``offset``."""
    headers = opened.response.headers
    if offset == 0:
        return opened.response.content_length
    value = headers.get("Content-Range", "")
    try:
        unit, _, rest = value.partition(" ")
        span, _, total = rest.partition("/")
        start = int(span.split("-", 1)[0])
        if unit != "bytes" or start != offset:
            return None
        return int(total)
    except ValueError:
        return None



class FirstFound:
    """A `flight.BlobSource`: ``first`` (peers whose summary holds the blob) if it finds
    the blob, else the source ``then()`` makes (the tree)."""

    def __init__(self, first: BlobSource, then: Callable[[], BlobSource]) -> None:
        self.first = first
        self._then = then
        self._active: BlobSource | None = None
        self.through_tree = False  # no peer held it: the tree (or the upstream) was asked

    @property
    def origin(self) -> str | None:
        return self._active.origin if self._active is not None else None

    async def open(self) -> int | None:
        size = await self.first.open()
        if size is not None:
            self._active = self.first
            return size
        self.first.close()
        self._active = self._then()
        self.through_tree = True
        return await self._active.open()

    async def fill(self, sink: Sink) -> bool:
        return self._active is not None and await self._active.fill(sink)

    def close(self) -> None:
        self.first.close()
        if self._active is not None:
            self._active.close()


class NoSource:
    """A `flight.BlobSource` that never has the blob: a plain peer request is served
    from a flight or the cache, but never starts a fetch."""

    @property
    def origin(self) -> str | None:
        return None

    async def open(self) -> int | None:
        return None

    async def fill(self, sink: Sink) -> bool:
        return False

    def close(self) -> None:
        pass


class _Counted:
    """A body that holds one of the rollout's reader slots until it ends or is closed,
    also when it is never iterated."""

    def __init__(self, body: AsyncIterator[bytes], rollout: Rollout) -> None:
        self._body = body
        self._rollout: Rollout | None = rollout

    def __aiter__(self) -> _Counted:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await anext(self._body)
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        rollout, self._rollout = self._rollout, None
        if rollout is None:
            return
        rollout.release()
        aclose = getattr(self._body, "aclose", None)
        if aclose is not None:
            await aclose()


class PeersFallback:
    """The fallback of the app that serves peers: blobs from a flight or the cache, and
    for a tree request, this node's own part in the tree (see the module's note).

    Never asks other peers on a plain peer request, so a false positive of a
    summary still cannot chain mirrors.
    """

    def __init__(self, flights: Flights, rollout: Rollout, access: RepositoryAccess,
                 options: MirrorConfig,
                 source: Callable[[str, str, Digest], BlobSource],
                 mirrors: Callable[[str], bool]) -> None:
        """``mirrors``: whether this node answers for a registry (`PeerMirror`'s rule)."""
        self._mirrors = mirrors
        self._flights = flights
        self._rollout = rollout
        self._access = access
        self._options = options
        self._source = source

    async def open_blob(self, registry: str, repository: str, digest: Digest,
                        byte_range: RangeSpec | None, want_body: bool) -> FallbackContent | Miss:
        if not self._mirrors(registry):
            return Miss(MissReason.NOT_MIRRORED)
        tree = Rollout.requester() is not None
        if tree:
            access = await self._access.check(registry, repository, BLOB_PROBE_REFERENCE)
            if access.denied:
                return Miss(access.reason or MissReason.PRIVATE_REPOSITORY)
        if not self._rollout.admit():
            return Miss(MissReason.BUSY, "rollout reader limit")
        source: Callable[[], BlobSource] = (
            (lambda: self._source(registry, repository, digest)) if tree else lambda: NoSource())
        reader = self._flights.attach(digest, source, verified=False)
        try:
            size = await reader.opened()
        except BaseException:
            reader.close()
            self._rollout.release()
            raise
        if size is None or not want_body:
            reader.close()
            self._rollout.release()
            if size is None:
                return Miss(MissReason.UPSTREAM_FAILED if tree else MissReason.NOT_HELD)
            return FallbackContent(digest, size, None, None)
        try:
            selected = byte_range.resolve(size) if byte_range is not None else None
        except UnsatisfiableRangeError:
            reader.close()
            self._rollout.release()
            return FallbackContent(digest, size, None, None)
        start = 0 if selected is None else selected.offset
        end = size if selected is None else selected.offset + selected.length
        return FallbackContent(digest, size, None,
                               _Counted(reader.body(start, end), self._rollout))

    async def open_manifest(self, registry: str, repository: str, reference: str,
                            want_body: bool) -> FallbackContent | Miss:
        if Rollout.requester() is None or not self._mirrors(registry):
            return Miss(MissReason.NOT_HELD)
        try:
            digest = Digest.parse(reference)
        except DigestError:
            return Miss(MissReason.NOT_HELD)
        access = await self._access.check(registry, repository, BLOB_PROBE_REFERENCE)
        if access.denied:
            return Miss(access.reason or MissReason.PRIVATE_REPOSITORY)
        fetched = await self._rollout.manifest(registry, repository, digest)
        if isinstance(fetched, Miss):
            return fetched
        if fetched is None:
            return Miss(MissReason.UPSTREAM_FAILED)
        return FallbackContent(digest, len(fetched.data), fetched.media_type,
                               _once(fetched.data) if want_body else None)


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data
