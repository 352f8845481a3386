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

What containerd sees. Every node's containerd, the owner's too, gets the blob
only once its digest verified, as for any peer's bytes; mirrors between them
pass bytes on unverified, each verifying its own copy. So an upstream too slow
for the fetch's bound is a 404 for every containerd, which then goes to the
upstream itself, never a body cut short (containerd 1.6 does not take a cut
body to its next host).

Stripes. A blob of at least `fanout` x `routing.owner.MIN_STRIPE` bytes is
read as `fanout` byte ranges at once, each through its own rotated tree, into
the one cache entry, and hashed whole in order (`TreeSource`).

Failures. A parent that fails (refused, reset, stalled, or a 404 because it
serves `fanout` readers' worth already and no slot freed within `slot_wait`)
is left out and that tree (that stripe's) recomputed without it, so the reader
resumes with ``Range`` from its new parent, and a reader that becomes the root
(the old one died) resumes from the upstream itself. With every member
failed, the reader goes to the upstream directly. A node asked by a requester
never asks that requester back in the tree the requester reads from it. The
upstream down or slow: bounded by `upstream.blobs` and the fetch's deadline,
then a miss, and containerd goes upstream itself. Private repositories never
get here: the visibility check comes first.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge
from starlette.types import ASGIApp, Receive, Scope, Send

from meshmirror.contentrange import ContentRangeError, parse_content_range
from meshmirror.mirror.client import PeerClient, PeerResponse
from meshmirror.mirror.errors import FailureReason, PeerFailure, SinkFailure
from meshmirror.mirror.fetch import Sink, held_body
from meshmirror.mirror.flight import BlobSource, Flights, RangeSink, StreamSource
from meshmirror.mirror.marker import TREE_HEADER
from meshmirror.mirror.metrics import MirrorMetrics
from meshmirror.mirror.options import MirrorConfig
from meshmirror.mirror.visibility import BLOB_PROBE_REFERENCE, RepositoryAccess
from meshmirror.oci.digest import Digest, DigestError
from meshmirror.oci.mediatypes import CONTAINERD_ACCEPT
from meshmirror.registry.fallback import FallbackContent, Miss, MissReason
from meshmirror.registry.ranges import RangeSpec, UnsatisfiableRangeError
from meshmirror.registry.requester import requester as client_address
from meshmirror.routing.owner import MIN_STRIPE, FanoutTree, stripe_count, stripe_range
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

_TREE_HEADER_BYTES = TREE_HEADER.lower().encode()
_MAX_NAME = 256
# The node that sent the tree request being served, if the request is one.
_requester: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "meshmirror_tree_requester", default=None)
# Where the tree request being served starts (its Range's first byte): which stripe's
# tree the requester reads from this node, so the node never asks it back in that one.
_asked_at: contextvars.ContextVar[int] = contextvars.ContextVar(
    "meshmirror_tree_asked_at", default=0)


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


_MAX_SUSPECT_BLOBS = 1024

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
            "Peers' readers this node serves now, in whole blobs' worth (a stripe's reader "
            "counts 1/--rollout-fanout); at most --rollout-fanout",
            registry=registry)
        self.readers_peak = Gauge(
            "meshmirror_rollout_readers_peak",
            "The most peers' readers this node served at once since it started, as "
            "meshmirror_rollout_readers counts them",
            registry=registry)
        self.striped = Counter(
            "meshmirror_rollout_striped_blobs",
            "Blobs this node fetched as stripes, each from its own tree (see docs/rollout.md)",
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
        # A node may read every stripe of the blobs containerd fetches at once (3 by
        # default) from one member, each stripe one request: room for them all, or a
        # stripe queued behind the others could give up and go to the upstream.
        patient = replace(options, first_byte_timeout=content.first_byte_timeout + 1.0,
                          stall_timeout=content.stall_timeout + 1.0,
                          peer_connections=max(options.peer_connections,
                                               3 * (options.rollout_fanout + 1)))
        self.options = options
        self.client = PeerClient(router, session, patient, mirror_metrics)
        self._chunk = options.chunk_size
        # Tree and peer readers this node serves now, in whole blobs' worth (see `admit`).
        self.serving = 0.0
        self.serving_peak = 0.0
        self._freed = asyncio.Event()  # set (and replaced) whenever a slot frees
        # How long a tree request waits for a slot: well inside the requester's patience.
        self.slot_wait = content.first_byte_timeout / 2
        self._manifests: dict[str, asyncio.Future[FetchedManifest | None]] = {}
        # Registries whose upstream answered a stripe's range with the whole blob.
        self.no_ranges: set[str] = set()
        # A blob of at least `fanout` stripes of this many bytes is striped (tests lower it).
        self.min_stripe = MIN_STRIPE
        # By digest, the members whose bytes went into a copy that failed its digest. A
        # stripe cannot be verified alone, so all of them are left out of that blob's
        # trees from then on: a member that sends wrong bytes would otherwise be asked
        # again on every retry, and every retry would fail.
        self._suspects: OrderedDict[str, set[str]] = OrderedDict()

    def close(self) -> None:
        self.client.close()

    @staticmethod
    def requester() -> str | None:
        """The member that sent the request being served, if it is a tree request."""
        return _requester.get()

    def suspect(self, digest: Digest, members: set[str]) -> None:
        """``members`` sent bytes of a copy of ``digest`` that failed its digest."""
        if not members:
            return
        key = str(digest)
        self._suspects[key] = self._suspects.pop(key, set()) | members
        while len(self._suspects) > _MAX_SUSPECT_BLOBS:
            self._suspects.popitem(last=False)

    def tree(self, digest: Digest, leave_out: set[str],
             stripe: int = 0) -> tuple[FanoutTree, dict[str, Peer]]:
        suspects = self._suspects.get(str(digest), set())
        peers = {p.name: p for p in self._router.peers()
                 if p.name not in leave_out and p.name not in suspects and p.name != self.name}
        return FanoutTree(str(digest), [self.name, *peers], self.fanout, stripe), peers

    def source(self, registry: str, repository: str, digest: Digest) -> TreeSource:
        """A `flight.BlobSource` of the blob through its tree or its stripes' trees (see
        the module's note); made while serving a tree request, it never asks back the
        member that sent it."""
        leave_out = {r} if (r := self.requester()) else set()
        return TreeSource(self, registry, repository, digest, leave_out, _asked_at.get())

    # -- readers this node serves --------------------------------------------------

    def admit(self, share: float = 1.0) -> bool:
        """Take ``share`` of a reader slot (a stripe's reader takes 1/`fanout`: it moves
        that share of a blob); False when `fanout` whole readers' worth are served."""
        if self.serving + share > self.fanout + 1e-9:
            self.metrics.refused.inc()
            return False
        self._take(share)
        return True

    async def admit_waiting(self, share: float, wait: float) -> bool:
        """`admit`, waiting up to ``wait`` seconds for a slot to free. For tree requests:
        in a small cluster with many blobs at once (every member reads every stripe from
        its root) a node is briefly full; a refused reader would leave it out and could
        end up fetching from the upstream itself, while a short wait costs nothing."""
        try:
            async with asyncio.timeout(wait):
                while self.serving + share > self.fanout + 1e-9:
                    await self._freed.wait()
        except TimeoutError:
            self.metrics.refused.inc()
            return False
        self._take(share)
        return True

    def _take(self, share: float) -> None:
        self.serving += share
        self.serving_peak = max(self.serving_peak, self.serving)
        self.metrics.readers_served.inc()
        self.metrics.readers.set(self.serving)
        self.metrics.readers_peak.set(self.serving_peak)

    def release(self, share: float = 1.0) -> None:
        self.serving = max(0.0, self.serving - share)
        self.metrics.readers.set(self.serving)
        freed, self._freed = self._freed, asyncio.Event()
        freed.set()

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
                            offset: int, end: int | None = None,
                            follow_up: bool = False) -> UpstreamBody | None:
        """Bytes [offset, end) of the blob from the upstream, always asked with a Range:
        the answer's status says whether the upstream serves stripes. A ``follow_up``
        continues a stream whose first answer stopped where it was asked to (see
        `TreeStream`): the same fetch, so not counted as opened again."""
        opened = await self._content.open_blob(registry, repository, digest, offset, end,
                                               ranged=True)
        if isinstance(opened, UpstreamBody):
            if not follow_up:
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


class NoRanges(PeerFailure):
    """The upstream answered a range with the whole blob (200): it ignores ``Range``, so
    stripes cannot be fetched from it (see `TreeSource`)."""

    def __init__(self) -> None:
        super().__init__(FailureReason.NO_RANGES, "the upstream ignores Range")


class TreeStream:
    """The blob's bytes (or one stripe's, ``span``) from this node's parent in the tree
    of ``stripe``, or from the upstream when this node is that tree's root; resumed with
    Range from the next in order after a failure.

    A `flight.ChunkStream`: `open` finds a source and the size, `chunks` streams
    from an offset to the span's end and raises `PeerFailure` on a break.

    A stream that does not know the size yet (stripe 0's, or the whole blob's) asks
    its source for the probe only, bytes [0, ``min_stripe``) (see `TreeSource`), and
    when that answer ends where it was asked to, asks the same source for the rest:
    a parent that is still assembling the blob serves the follow-up from its flight
    as the bytes arrive, like any range.
    """

    def __init__(self, rollout: Rollout, registry: str, repository: str, digest: Digest,
                 leave_out: set[str], stripe: int = 0,
                 span: tuple[int, int] | None = None) -> None:
        self._rollout = rollout
        self._registry = registry
        self._repository = repository
        self._digest = digest
        self._path = f"/v2/{repository}/blobs/{digest}"
        self._left_out = set(leave_out)
        self._failed: set[str] = set()
        self._stripe = stripe
        self._span = span
        self._size = 0  # the whole blob's, once known (``_whole`` when given by the caller)
        self._whole = 0
        self._position = 0
        self._peer: PeerResponse | None = None
        self._upstream: UpstreamBody | None = None
        self._origin: str | None = None  # the member, or "upstream", now sending
        self._answer_end = 0  # where the open answer stops: its range's end
        self.senders: set[str] = set()  # the members that sent bytes of this stream
        self.deadline = float("inf")
        # Whether the source answered with a range: always for a peer; for the upstream,
        # its status to the first request (asked with a Range, see `TreeSource`).
        self.ranged = True

    @property
    def origin(self) -> str | None:
        """`flight.ChunkStream.origin`: the member (or "upstream") sending now."""
        return self._origin

    @property
    def end(self) -> int:
        return self._span[1] if self._span is not None else self._size

    @property
    def position(self) -> int:
        """The next byte this stream would send."""
        return self._position

    def limit(self, end: int) -> None:
        """Stream only up to ``end`` from here on (the first stripe of an open stream)."""
        self._span = (0, end)

    def leave_out(self, members: set[str]) -> None:
        """Never ask ``members`` from the next connection on (the requester, once the
        size shows it reads this stream's bytes from this node)."""
        self._left_out |= members

    async def open(self) -> int | None:
        size = await self._connect(0)
        if size is not None:
            # The whole fetch, resumes included, is bounded like a peer request.
            self.deadline = (asyncio.get_running_loop().time()
                             + self._rollout.options.deadline_for(size))
        return size

    def _late(self) -> bool:
        return asyncio.get_running_loop().time() > self.deadline

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
        while True:
            if self._upstream is not None:
                async for chunk in self._from_upstream(self._upstream):
                    yield chunk
            else:
                async for chunk in self._from_peer():
                    yield chunk
            if self._position >= self.end:
                return
            # The answer ended where it was asked to (the probe): the rest, same source.
            if self._late() or await self._connect(self._position) is None:
                raise PeerFailure(FailureReason.EXHAUSTED,
                                  f"no source left at byte {self._position}")

    async def _from_peer(self) -> AsyncIterator[bytes]:
        opened = self._peer
        assert opened is not None
        client = self._rollout.client
        end = min(self.end, self._answer_end)
        while self._position < end:
            try:
                if self._late():
                    raise PeerFailure(FailureReason.DEADLINE,
                                      f"past the deadline at byte {self._position}")
                chunk = await client.read_chunk(opened, min(self._rollout._chunk,
                                                            end - self._position))
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
        end = min(self.end, self._answer_end)
        try:
            async for chunk in body.chunks():
                if self._late():
                    self.close()
                    raise PeerFailure(FailureReason.DEADLINE, f"upstream past the deadline at "
                                                  f"byte {self._position}")
                chunk = chunk[:end - self._position]
                self._position += len(chunk)
                self._rollout.upstream_bytes(len(chunk))
                yield chunk
                if self._position >= end:
                    break
        except UpstreamStall as stall:
            self.close()
            raise PeerFailure(FailureReason.BROKEN, f"upstream {stall}") from stall
        if self._position >= self.end:
            self._rollout.metrics.upstream_fetches.labels("completed").inc()
        self.close()

    def _parent_failed(self, peer: Peer, failure: PeerFailure) -> None:
        log.info("%s: tree parent %s failed at byte %d: %s", self._digest, peer.name,
                    self._position, failure)
        self._failed.add(peer.name)
        self.close()

    async def _connect(self, offset: int) -> int | None:
        """Open the blob at ``offset`` from the parent in the tree over the members not
        yet failed (or left out), or from the upstream when this node is the root; the
        whole blob's size. Raises `NoRanges` when the upstream ignores a stripe's range."""
        rollout = self._rollout
        # A stripe needs the upstream to honour its range; a whole blob resumed from an
        # offset takes a 200 too (`upstream.blobs` skips the prefix).
        ranged = self._span is not None and (offset > 0 or self._span[1] < self._whole)
        # Before the size is known, the probe only (see the class's note); after it, to
        # the span's end, or to the blob's with an open-ended range.
        probe = self._span is None and self._whole == 0
        end = (self._span[1] if self._span is not None
               else rollout.min_stripe if probe else None)
        follow_up = 0 < offset == self._answer_end
        while True:
            tree, peers = rollout.tree(self._digest, self._left_out | self._failed,
                                       self._stripe)
            placement = tree.placement(rollout.name)
            if placement.parent is None:
                # The root, in this view: the upstream, from where we are.
                body = await rollout.open_upstream(
                    self._registry, self._repository, self._digest, offset, end, follow_up)
                if body is None:
                    return None
                if probe and not body.ranged:
                    body.end = body.size  # it ignores Range: the whole blob, read to its end
                if ranged and not body.ranged:
                    body.close()  # the whole blob again: not worth a byte more
                    raise NoRanges()
                if offset and body.size != self._whole:
                    body.close()
                    return None
                self._upstream, self._position = body, offset
                self._whole, self.ranged = body.size, body.ranged
                self._answer_end = body.end
                if self._span is None:
                    self._size = body.size
                self._origin = "upstream"
                return body.size
            peer = peers[placement.parent]
            try:
                opened = await rollout.client.open(
                    peer, self._path, self._registry, offset=offset, end=end,
                    headers={TREE_HEADER: rollout.name})
            except PeerFailure as failure:
                log.info("%s: tree parent %s refused: %s", self._digest, peer.name, failure)
                self._failed.add(peer.name)
                continue
            size = _size_of(opened, offset)
            if size is None or ((offset or self._span is not None) and size != self._whole):
                opened.release()
                self._failed.add(peer.name)
                continue
            self._peer, self._position, self._whole = opened, offset, size
            self._answer_end = size if end is None else min(end, size)
            self.senders.add(peer.name)
            if self._span is None:
                self._size = size
            self._origin = peer.name
            return size


def _size_of(opened: PeerResponse, offset: int) -> int | None:
    """The whole blob's size from a 200 or a 206 (its Content-Range); None for a 206 that
    does not start at ``offset``: its bytes would land in the wrong place (a stripe that
    then fails the whole blob's digest), so the parent is left out instead."""
    response = opened.response
    if response.status == 200:
        return response.content_length
    try:
        said = parse_content_range(response.headers.get("Content-Range"))
    except ContentRangeError:
        return None
    return said.total if said.first == offset else None


class TreeSource:
    """A `flight.BlobSource` for a blob nobody holds: through its tree, or, for a blob of
    at least F stripes of `routing.owner.MIN_STRIPE`, as F stripes at once, each from
    its own tree (see `routing.owner`), assembled into the flight's one cache entry and
    hashed whole in order as the stripes fill it.

    How a node learns the size, and whether to stripe: it opens the blob through the
    unrotated tree (stripe 0's) with a bounded *probe*, bytes [0, ``min_stripe``), the
    least any striped blob's stripe 0 holds; its root asks the upstream the same, so
    the status says whether the upstream serves ranges and Content-Range gives the
    size. Stripe 0 then continues from there with a follow-up range to its own end
    (`TreeStream`), and no byte past it was ever asked for: an open-ended first
    request would let the upstream send what its socket buffers hold past stripe 0's
    end, bytes stripe 1's root fetches again. An upstream that ignores ``Range``
    answers the probe with the whole blob (200), which is then read to its end.
    A stripe's root whose upstream ignores ``Range`` (`NoRanges`) turns this node back
    to the whole blob through the one tree (its followers start over), and the node
    stripes no blob of that registry again.
    """

    def __init__(self, rollout: Rollout, registry: str, repository: str, digest: Digest,
                 leave_out: set[str], asked_at: int = 0) -> None:
        """``leave_out``: the member this node serves the blob to, from byte
        ``asked_at``; it is left out of the tree of the stripe that starts there (in the
        other stripes' trees it is a member like any other)."""
        self._rollout = rollout
        self._args = (registry, repository, digest)
        self._leave_out = leave_out
        self._asked_at = asked_at
        self._digest = digest
        # The requester reads stripe 0 from here if it asked inside the probe (which
        # every layout's stripe 0 holds); past it, `open` decides once the size is known.
        self._first = TreeStream(rollout, registry, repository, digest,
                                 leave_out if asked_at < rollout.min_stripe else set())
        self._streams: list[TreeStream] = [self._first]
        self._size = 0
        self._bounds: list[tuple[int, int]] = []

    @property
    def striped(self) -> bool:
        """Whether the blob comes as stripes, from several members at once."""
        return len(self._bounds) > 1

    @property
    def origin(self) -> str | None:
        return "stripes" if self.striped else self._first.origin

    async def open(self) -> int | None:
        size = await self._first.open()
        if size is None:
            return None
        self._size = size
        rollout = self._rollout
        stripes = stripe_count(size, rollout.fanout, rollout.min_stripe)
        if stripes > 1 and self._first.ranged and self._args[0] not in rollout.no_ranges:
            self._bounds = [stripe_range(size, stripes, s) for s in range(stripes)]
            self._first.limit(self._bounds[0][1])
        if self._asked_at < (self._bounds[0][1] if self._bounds else size):
            self._first.leave_out(self._leave_out)
        return size

    async def fill(self, sink: Sink) -> bool:
        if self.striped and not isinstance(sink, RangeSink):  # a sink written in order
            self._bounds = []
            self._first.limit(self._size)
        if not self.striped or not isinstance(sink, RangeSink):
            verified = await StreamSource(self._first, self._digest, resumes=16,
                                          size=self._size).fill(sink)
            if not verified and self._first.position >= self._size:  # a mismatch
                self._rollout.suspect(self._digest, self._first.senders)
            return verified
        sink.reset()
        sink.split(self._bounds)
        self._rollout.metrics.striped.inc()
        try:
            return await self._striped(sink)
        except ExceptionGroup as group:
            if (failed := group.subgroup(SinkFailure)) is not None:
                raise failed.exceptions[0] from group
            if group.subgroup(NoRanges) is None:
                log.info("%s: a stripe gave up: %s", self._digest, group.exceptions[0])
                return False
            self._rollout.no_ranges.add(self._args[0])
        log.info("%s: the upstream ignores Range; the whole blob through one tree",
                    self._digest)
        self.close()
        self._bounds = []
        whole = TreeStream(self._rollout, *self._args, self._leave_out)
        self._streams = [whole]
        if await whole.open() != self._size:
            return False
        return await StreamSource(whole, self._digest, resumes=16, size=self._size).fill(sink)

    async def _striped(self, sink: RangeSink) -> bool:
        for index, span in enumerate(self._bounds[1:], 1):
            leave_out = self._leave_out if span[0] <= self._asked_at < span[1] else set()
            stream = TreeStream(self._rollout, *self._args, leave_out, index, span)
            stream._whole = self._size
            stream.deadline = self._first.deadline
            self._streams.append(stream)
        progress = asyncio.Event()
        async with asyncio.TaskGroup() as group:
            for index, stream in enumerate(self._streams):
                group.create_task(self._stripe(sink, index, stream, progress))
            hashed = group.create_task(self._hash(sink, progress))
        return hashed.result()

    async def _stripe(self, sink: RangeSink, index: int, stream: TreeStream,
                      progress: asyncio.Event) -> None:
        position, end = self._bounds[index]
        breaks = 0
        while position < end:
            try:
                async for chunk in stream.chunks(position):
                    await asyncio.to_thread(_keep, sink, index, chunk)
                    position += len(chunk)
                    progress.set()
                if position < end:
                    raise PeerFailure(FailureReason.BROKEN,
                                      f"stripe {index} ended at byte {position}")
            except NoRanges:
                raise
            except PeerFailure as failure:
                breaks += 1
                if breaks > 16:
                    raise PeerFailure(FailureReason.EXHAUSTED,
                                      f"stripe {index}: {failure}") from failure

    async def _hash(self, sink: RangeSink, progress: asyncio.Event) -> bool:
        """Hash the blob in order as its prefix fills: verified soon after the last byte."""
        hasher = self._digest.hasher()
        position = 0
        while position < self._size:
            upto = sink.available(position)
            if upto <= position:
                progress.clear()
                await progress.wait()
                continue
            data = await asyncio.to_thread(sink.read_at, position,
                                           min(upto - position, _HASH_PIECE))
            if not data:
                raise PeerFailure(FailureReason.BROKEN, f"cache file short at byte {position}")
            hasher.update(data)
            position += len(data)
        if hasher.hexdigest() != self._digest.hex:
            self._rollout.suspect(self._digest, {n for s in self._streams for n in s.senders})
            return False
        return True

    def close(self) -> None:
        for stream in self._streams:
            stream.close()


_HASH_PIECE = 1024 * 1024


def _keep(sink: RangeSink, index: int, chunk: bytes) -> None:
    try:
        sink.write_at(index, chunk)
    except Exception as err:
        raise SinkFailure.of(err) from err


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

    def __init__(self, body: AsyncIterator[bytes], rollout: Rollout, share: float) -> None:
        self._body = body
        self._rollout: Rollout | None = rollout
        self._share = share

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
        rollout.release(self._share)
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
        # A stripe's reader asks for a bounded range and moves 1/F of the blob. A first
        # request (from byte 0: the probe, or an open-ended one from a member of the
        # previous version) may be for a blob too small to stripe: a whole reader until
        # the size says otherwise.
        first = byte_range is None or byte_range.first == 0
        share = (1.0 / self._rollout.fanout if tree and not first and byte_range is not None
                 and byte_range.last is not None else 1.0)
        admitted = (await self._rollout.admit_waiting(share, self._rollout.slot_wait) if tree
                    else self._rollout.admit(share))
        if not admitted:
            return Miss(MissReason.BUSY, "rollout reader limit")
        source: Callable[[], BlobSource] = (
            (lambda: self._source(registry, repository, digest)) if tree else lambda: NoSource())
        # A flight started here takes the requester's place in the stripes from the
        # Range's first byte (the flight's task copies this context).
        asked = _asked_at.set(byte_range.first or 0 if byte_range is not None else 0)
        try:
            reader = self._flights.attach(digest, source, verified=False)
        finally:
            _asked_at.reset(asked)
        try:
            size = await reader.opened()
        except BaseException:
            reader.close()
            self._rollout.release(share)
            raise
        if (tree and share == 1.0 and size is not None and first
                and stripe_count(size, self._rollout.fanout, self._rollout.min_stripe) > 1):
            # The requester's first answer of a blob it stripes: it reads stripe 0 only.
            share = 1.0 / self._rollout.fanout
            self._rollout.release(1.0 - share)
        if size is None or not want_body:
            reader.close()
            self._rollout.release(share)
            if size is None:
                return Miss(MissReason.UPSTREAM_FAILED if tree else MissReason.NOT_HELD)
            return FallbackContent(digest, size, None, None)
        try:
            selected = byte_range.resolve(size) if byte_range is not None else None
        except UnsatisfiableRangeError:
            reader.close()
            self._rollout.release(share)
            return FallbackContent(digest, size, None, None)
        start = 0 if selected is None else selected.offset
        end = size if selected is None else selected.offset + selected.length
        return FallbackContent(digest, size, None,
                               _Counted(reader.body(start, end), self._rollout, share))

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
                               held_body(fetched.data, self._options.send_size)
                               if want_body else None)
