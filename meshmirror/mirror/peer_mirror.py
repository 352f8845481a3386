"""The mirror: serve what the local store lacks by streaming it from peers.

`PeerMirror` is the registry's `Fallback`. For every miss it asks the router
which peers probably hold the key and fetches from them through a `PeerClient`
(bounded waits, hedging, blame). With nobody left the answer is a `Miss` with its
reason, which the app turns into a fast 404 (and a log line saying why) so
containerd goes upstream.

It passes on no unverified byte. A manifest is read whole into memory and
verified before the client sees any of it; a blob is fetched once per node
however many requests want it (see `flight`) into a cache file (see `cache`)
and served from there once verified, so a lying peer costs a retry on the next
candidate and nothing else. A blob the cache cannot hold is fetched for its
request alone: in memory (within the memory budget) when at most
``verify_before_send_limit`` bytes. Why not stream and check at the end: containerd keeps every byte
it was sent, so one corrupt byte fails its pull even when the mirror aborts.
Before any of that, the upstream has its word (see `tags` and `visibility`): a
tag means the digest the upstream names while it answers, and nothing of a
repository the upstream serves only with credentials comes from peers.

Only when the cache cannot hold a larger blob is it streamed (`fetch.BlobFetch`),
with its last chunk held back until the digest checks out; on a mismatch the
stream raises, the server aborts the connection short of Content-Length, and
the client cannot take it as complete (but that pull fails, and its retry
succeeds).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from prometheus_client import CollectorRegistry

from meshmirror.mirror.cache import BlobCache
from meshmirror.mirror.client import PeerClient, PeerResponse
from meshmirror.mirror.errors import FailureReason, PeerFailure, SinkFailure
from meshmirror.mirror.fetch import BlobFetch, DiscardSink, MemorySink, Sink, held_body
from meshmirror.mirror.flight import BlobSource, Flight, Flights, Reader, State
from meshmirror.mirror.metrics import MirrorMetrics, finished
from meshmirror.mirror.options import MirrorConfig, PrivateImages
from meshmirror.mirror.rollout import FirstFound, PeersFallback, Rollout
from meshmirror.mirror.tags import AskPeers, Refuse, TagPolicy, UseDigest, UseOwn
from meshmirror.mirror.upstream_questions import CountedUpstream, UpstreamQuestions
from meshmirror.mirror.visibility import BLOB_PROBE_REFERENCE, Access, RepositoryAccess
from meshmirror.oci.digest import Digest, DigestError
from meshmirror.oci.manifest import MAX_MANIFEST_SIZE
from meshmirror.oci.mediatypes import CONTAINERD_ACCEPT
from meshmirror.oci.reference import tag_key
from meshmirror.registry.app import NotServableError, stored_manifest
from meshmirror.registry.fallback import FallbackContent, Miss, MissReason
from meshmirror.registry.ranges import RangeSpec, UnsatisfiableRangeError
from meshmirror.registry.requester import requester as client_address
from meshmirror.routing.ranking import PeerRanking
from meshmirror.routing.vouches import VouchBook
from meshmirror.store.base import NotFoundError, Store

log = logging.getLogger(__name__)


class PeerMirror:
    """The registry's fallback: fetch from peers chosen by the router, verified.

    ``upstream``: asked for tags' digests and repositories' visibility. Without
    one (tests, the demo) peers resolve tags and every repository is shared.
    ``mesh_encrypted``: whether members need the gossip key, which decides
    whether peer-resolved tags and members' vouches are accepted during an outage.
    ``vouches``: members' vouches (the peer directory's). ``store``: the node's
    own, whose tags are served when the upstream cannot answer.
    """

    def __init__(
        self,
        router: PeerRanking,
        session: aiohttp.ClientSession,
        *,
        options: MirrorConfig | None = None,
        metrics: MirrorMetrics | None = None,
        upstream: UpstreamQuestions | None = None,
        mesh_encrypted: bool = False,
        clock: Callable[[], float] = time.monotonic,
        vouches: VouchBook | None = None,
        store: Store | None = None,
        rollout: Rollout | None = None,
        pace: Callable[[str | None], bool] | None = None,
    ) -> None:
        # Takes one of a client's tokens for each fetch it starts (`_new_fetch_allowed`).
        self._pace = pace
        self._router = router
        self._rollout = rollout
        self._options = options or MirrorConfig()
        self._metrics = metrics or MirrorMetrics(CollectorRegistry())
        self._clock = clock
        asked = CountedUpstream(upstream, self._metrics) if upstream is not None else None
        self._upstream = asked
        self.access = RepositoryAccess(
            asked, self._options, clock, vouches=vouches,
            trust_vouches=RepositoryAccess.trusts_vouches(self._options.outage_vouches,
                                                          mesh_encrypted),
            on_outage=lambda decision: self._metrics.outage_visibility.labels(decision).inc())
        self._store = store
        self.tags = TagPolicy(asked, self._options, self.access, mesh_encrypted=mesh_encrypted,
                              own_tags=self._own_tag if store is not None else None)
        self.client = PeerClient(router, session, self._options, self._metrics, clock)
        opts = self._options
        cache = BlobCache(opts.upstream_cache_dir or opts.spool_dir, opts.cache_limit,
                          opts.spool_limit, on_evict=self._metrics.cache_evictions.inc)
        self.flights = Flights(cache, self._metrics, budget=self.client.budget,
                               piece=opts.send_size, stall=opts.deadline)
        self._metrics.spool_bytes.set_function(lambda: cache.held)
        self._metrics.cache_bytes.set_function(lambda: cache.total)
        self._metrics.flight_readers.set_function(lambda: self.flights.readers)
        self._metrics.label_registries(self._options.mirrored_registries)
        # What the app that serves peers falls back to (see `rollout`).
        self.peers_fallback = (PeersFallback(self.flights, rollout, self.access, opts,
                                             self._source, self._mirrors)
                               if rollout is not None else None)

    @property
    def metrics(self) -> MirrorMetrics:
        """Its metrics; ``metrics.observers`` hear of every finished request."""
        return self._metrics

    def close(self) -> None:
        self.flights.close()
        self.flights.cache.close()
        self.client.close()
        self.access.close()

    def _mirrors(self, registry: str) -> bool:
        """``--mirrored-registries`` when set; otherwise, while the upstream is asked
        anything, only registries whose hosts.toml sends pulls here: a client's ``?ns=``
        must not choose whom this node asks."""
        opts = self._options
        asks = self._upstream is not None and (
            self.tags.upstream_first or opts.private_images is PrivateImages.UPSTREAM_ONLY)
        if opts.mirrored_registries or not asks or self._upstream is None:
            return opts.mirrors(registry)
        return self._upstream.mirrors(registry)

    async def open_manifest(
        self, registry: str, repository: str, reference: str, want_body: bool
    ) -> FallbackContent | Miss:
        opts = self._options
        started = self._clock()
        path = f"/v2/{repository}/manifests/{reference}"
        if not self._mirrors(registry):
            self._count(registry, "manifest", "not_mirrored", path, started)
            return Miss(MissReason.NOT_MIRRORED)
        if ":" in reference:
            try:
                digest = Digest.parse(reference)
            except DigestError:
                return Miss(MissReason.BAD_REFERENCE)
            return await self._manifest_by_digest(registry, repository, digest, path, started)
        key = tag_key(registry, repository, reference)
        if opts.filtered(key):
            self._count(registry, "manifest", "filtered", path, started)
            self._resolved(registry, "none")
            return Miss(MissReason.FILTERED)
        decision = await self.tags.decide(registry, repository, reference)
        if isinstance(decision, Refuse):
            log.debug("tag %s not resolved: %s", key, decision.reason.value)
            self._count(registry, "manifest", "refused", path, started)
            self._resolved(registry, "none")
            return Miss(decision.reason)
        if isinstance(decision, UseOwn):
            content = await self._own_manifest(decision.digest, want_body)
            source = "local" if not isinstance(content, Miss) else "none"
        elif isinstance(decision, UseDigest):
            # The upstream named the digest; this node's own store may hold it already
            # (tags are asked here, not of the store, under upstream-first).
            content = (await self._own_manifest(decision.digest, want_body)
                       if self._store is not None else Miss(MissReason.NO_PEER))
            if isinstance(content, Miss):
                content = await self._manifest_by_digest(registry, repository,
                                                         decision.digest, path, started)
            source = "upstream" if not isinstance(content, Miss) else "none"
        else:
            assert isinstance(decision, AskPeers)
            content = await self._manifest_by_tag(registry, repository, reference, path,
                                                  started)
            source = "peer" if not isinstance(content, Miss) else "none"
        self._resolved(registry, source)
        return content

    async def _manifest_by_digest(self, registry: str, repository: str, digest: Digest,
                                  path: str, started: float) -> FallbackContent | Miss:
        """A manifest whose digest is known, from peers, if the repository may be shared.

        Visibility is asked with the probe digest, never the client's: a registry may
        answer a layer's digest on the manifests endpoint with a 5xx."""
        access = await self.access.check(registry, repository, BLOB_PROBE_REFERENCE)
        if access.denied:
            self._count(registry, "manifest", "refused", path, started)
            return _denied(access)
        rollout = self._rollout
        content = await self._fetch_manifest(registry, f"/v2/{repository}/manifests/{digest}",
                                             str(digest), digest, path, started,
                                             count_miss=rollout is None)
        if not isinstance(content, Miss) or rollout is None:
            return content
        # No peer holds it: its owner fetches it from the upstream (see `rollout`).
        fetched = await rollout.manifest(registry, repository, digest)
        if isinstance(fetched, Miss):
            self._count(registry, "manifest", "miss", path, started)
            return fetched
        if fetched is None:
            self._count(registry, "manifest", "miss", path, started)
            return Miss(MissReason.UPSTREAM_FAILED)
        self._count(registry, "manifest", "hit", path, started, None, len(fetched.data))
        return FallbackContent(digest, len(fetched.data), fetched.media_type,
                               held_body(fetched.data, self._options.send_size))

    async def _manifest_by_tag(self, registry: str, repository: str, tag: str, path: str,
                               started: float) -> FallbackContent | Miss:
        """A tag as peers resolve it: whatever manifest they hold under it, checked only
        against the digest they announce (a tag has none of its own to check)."""
        access = await self.access.check(registry, repository, tag)
        if access.denied:
            self._count(registry, "manifest", "refused", path, started)
            return _denied(access)
        return await self._fetch_manifest(registry, path, tag_key(registry, repository, tag),
                                          None, path, started)

    async def _own_tag(self, registry: str, repository: str, tag: str) -> Digest | None:
        assert self._store is not None
        try:
            return await self._store.resolve(registry, repository, tag)
        except NotFoundError:
            return None

    async def _own_manifest(self, digest: Digest, want_body: bool) -> FallbackContent | Miss:
        """A manifest from this node's store: its own tag in an outage, or the digest the
        upstream named for a tag when the store holds it already."""
        assert self._store is not None
        try:
            info, media_type, data = await stored_manifest(self._store, digest, want_body)
        except NotFoundError:
            return Miss(MissReason.NO_PEER, "not in this node's store")
        except NotServableError as err:
            log.info("stored manifest %s not servable: %s", digest, err)
            return Miss(MissReason.NO_PEER, "stored manifest not servable")
        body = held_body(data, self._options.send_size) if data is not None else None
        return FallbackContent(info.digest, info.size, media_type, body)

    async def _fetch_manifest(self, registry: str, peer_path: str, key: str,
                              expected: Digest | None, path: str, started: float, *,
                              count_miss: bool = True) -> FallbackContent | Miss:
        """The first verified manifest from peers holding ``key``; HEAD is answered from a
        verified GET too: manifests are small, and a digest is only as good as its body."""
        candidates = self._router.candidates(key, limit=self._options.peers_tried)
        opener = self.client.open_hedged(
            candidates, peer_path, registry, headers={"Accept": CONTAINERD_ACCEPT}
        )
        try:
            async for opened in opener:
                try:
                    content = await self._read_manifest(opened, expected)
                except PeerFailure as failure:
                    self.client.failed(opened.peer, failure)
                    continue
                self.client.succeeded(opened)
                self._count(registry, "manifest", "hit", path, started, opened.peer.name,
                            content.size)
                return content
        finally:
            await opener.aclose()
        if count_miss:
            self._count(registry, "manifest", "miss", path, started)
        return Miss(MissReason.PEERS_FAILED if candidates else MissReason.NO_PEER)

    async def _read_manifest(
        self, opened: PeerResponse, expected: Digest | None
    ) -> FallbackContent:
        try:
            announced = opened.response.headers.get("Docker-Content-Digest", "")
            media_type = opened.response.headers.get("Content-Type", "").split(";")[0].strip()
            data = await self.client.read_whole(opened, MAX_MANIFEST_SIZE)
        finally:
            opened.release()
        if expected is None:
            try:
                expected = Digest.parse(announced)
            except DigestError as err:
                raise PeerFailure(FailureReason.BAD_DIGEST_HEADER, announced[:80]) from err
        if Digest.of(data, expected.algorithm) != expected:
            raise PeerFailure(FailureReason.DIGEST_MISMATCH, f"manifest {expected}")
        return FallbackContent(expected, len(data), media_type or None,
                               held_body(data, self._options.send_size))

    async def open_blob(
        self,
        registry: str,
        repository: str,
        digest: Digest,
        byte_range: RangeSpec | None,
        want_body: bool,
    ) -> FallbackContent | Miss:
        started = self._clock()
        path = f"/v2/{repository}/blobs/{digest}"
        if not self._mirrors(registry):
            self._count(registry, "blob", "not_mirrored", path, started)
            return Miss(MissReason.NOT_MIRRORED)
        access = await self.access.check(registry, repository, BLOB_PROBE_REFERENCE)
        if access.denied:
            self._count(registry, "blob", "refused", path, started)
            return _denied(access)
        # A blob no peer holds comes through its tree (see `rollout`); containerd gets
        # it verified, on the owner too (a slow upstream is then a 404, not a cut body).
        if not self._new_fetch_allowed(digest, whole=want_body and byte_range is None):
            self._count(registry, "blob", "miss", path, started)
            return Miss(MissReason.BUSY, "client rate limit")
        reader = self.flights.attach(digest, lambda: self._source(registry, repository, digest))
        record = _BlobRecord(registry, path, started, reader.flight)
        try:
            content = await self._shared_blob(reader, record, digest, byte_range, want_body)
        except BaseException:
            # Cancelled (the client left) or failed: the flight goes on only for others.
            reader.close()
            raise
        if not isinstance(content, _Unshared):
            return content
        reader.close()
        return await self._unshared_blob(registry, path, digest, byte_range, want_body, started)

    def _new_fetch_allowed(self, digest: Digest, whole: bool) -> bool:
        """Whether the client may start a fetch of ``digest`` (one nobody has in flight or
        cached): a request for less than the whole blob takes one of the client's tokens
        of new upstream questions.

        Any request starts the whole blob's fetch into the cache, so a HEAD or a one-byte
        Range would let one client pull gigabytes and churn the cache at no cost to
        itself. A GET of the whole blob is not charged: the client takes every byte it
        made the node fetch (an abandoned one stops within a bounded number of bytes),
        and containerd, one client with many layers to pull at a node's start, must not
        be sent upstream by its own pace. Joining a fetch or reading the cache costs no
        token either. (Answering a HEAD from a peer's HEAD instead would leave Ranges
        unpaced, and send containerd a size no digest has checked.)
        """
        if whole or self._pace is None or self.flights.flying(digest) is not None:
            return True
        entry = self.flights.cache.open(str(digest))
        if entry is not None:
            self.flights.cache.unpin(entry)
            return True
        return self._pace(client_address())

    def _peer_fetch(self, registry: str, path: str, digest: Digest) -> BlobFetch:
        return BlobFetch(self.client, self._router, self._options, registry, path, digest)

    def _source(self, registry: str, repository: str, digest: Digest) -> BlobSource:
        """Peers whose summary holds the blob; failing that, its tree (see `rollout`)."""
        fetch = self._peer_fetch(registry, f"/v2/{repository}/blobs/{digest}", digest)
        rollout = self._rollout
        if rollout is None:
            return fetch
        return FirstFound(fetch, lambda: rollout.source(registry, repository, digest))

    async def _shared_blob(
        self,
        reader: Reader,
        record: _BlobRecord,
        digest: Digest,
        byte_range: RangeSpec | None,
        want_body: bool,
    ) -> FallbackContent | Miss | _Unshared:
        """The blob through its one flight (see `flight`): every request for it, HEAD and
        Range included, waits on the same fetch and is served from its cache file once it
        verified. `_UNSHARED` when the cache cannot hold it."""
        size = await reader.opened()
        if size is None:
            if reader.refused:
                return _UNSHARED
            reader.close()
            missing = reader.flight.state is State.MISSING
            self._count_blob(record, "miss" if missing else "error")
            return _flight_miss(reader.flight)
        if reader.verified and not await reader.wait_verified():
            reader.close()
            self._count_blob(record, "error")
            return _flight_miss(reader.flight)
        size = reader.flight.size  # the verified size
        self._count_blob(record, "hit")
        if not want_body:
            reader.close()
            return FallbackContent(digest, size, None, None)
        try:
            selected = byte_range.resolve(size) if byte_range is not None else None
        except UnsatisfiableRangeError:
            reader.close()
            return FallbackContent(digest, size, None, None)
        start = 0 if selected is None else selected.offset
        end = size if selected is None else selected.offset + selected.length
        self._metrics.blob_bodies.labels("spool").inc()
        return FallbackContent(digest, size, None, reader.body(start, end))

    async def _unshared_blob(
        self,
        registry: str,
        path: str,
        digest: Digest,
        byte_range: RangeSpec | None,
        want_body: bool,
        started: float,
    ) -> FallbackContent | Miss:
        """A blob the cache cannot hold, fetched for this request alone: held in memory
        (within the node's memory budget) when small, else streamed and checked at its end."""
        fetch = self._peer_fetch(registry, path, digest)
        size = await fetch.open()
        record = _BlobRecord(registry, path, started, fetch)
        if size is None:
            self._count_blob(record, "miss")
            return Miss(MissReason.PEERS_FAILED if fetch.asked_any else MissReason.NO_PEER)
        try:
            return await self._blob_body(fetch, record, digest, size, byte_range, want_body)
        except BaseException:
            fetch.close()
            raise

    async def _blob_body(
        self,
        fetch: BlobFetch,
        record: _BlobRecord,
        digest: Digest,
        size: int,
        byte_range: RangeSpec | None,
        want_body: bool,
    ) -> FallbackContent | Miss:
        """The blob's content, its body held or streamed by size; ``fetch`` is open."""
        if not want_body:
            # A peer's headers are only its word: HEAD stands behind a verified blob.
            if (miss := await self._verify(fetch, DiscardSink(), record, threads=True)):
                return miss
            return FallbackContent(digest, fetch.size, None, None)
        try:
            selected = byte_range.resolve(size) if byte_range is not None else None
        except UnsatisfiableRangeError:
            fetch.close()
            return FallbackContent(digest, size, None, None)
        start = 0 if selected is None else selected.offset
        end = size if selected is None else selected.offset + selected.length
        if size <= self._options.verify_before_send_limit:
            budget = self.client.budget
            # The first peer's size, maybe a liar's: what goes back is what was taken.
            taken = size
            try:
                async with asyncio.timeout(self._options.deadline):
                    await budget.take(taken)
            except TimeoutError:
                fetch.close()
                log.warning("no memory to hold a %d-byte blob within %g s; answering 404",
                               size, self._options.deadline)
                self._count_blob(record, "error")
                return Miss(MissReason.BUSY, "memory budget")
            try:
                memory = MemorySink(self._options.verify_before_send_limit)
                miss = await self._verify(fetch, memory, record, threads=False)
            except BaseException:
                budget.give(taken)
                raise
            if miss:
                budget.give(taken)
                return miss
            self._metrics.blob_bodies.labels("memory").inc()
            size, end = fetch.size, fetch.size if selected is None else end  # the verified size
            body = bytes(memoryview(memory.data)[start:end])  # one copy, not two
            del memory
            return FallbackContent(digest, size, None,
                                   held_body(body, self._options.send_size, budget, taken))
        if not await fetch.size_confirmed():
            fetch.close()
            log.warning("peers disagree about the size of %s; not streaming it unverified",
                        digest)
            self._count_blob(record, "error")
            return Miss(MissReason.PEERS_FAILED, "peers disagree about the size")
        self._count_blob(record, "hit")
        self._metrics.blob_bodies.labels("stream").inc()
        return FallbackContent(digest, size, None, fetch.stream(start, end))

    async def _verify(self, fetch: BlobFetch, sink: Sink, record: _BlobRecord, *,
                      threads: bool) -> Miss | None:
        """Fill ``sink`` with the verified blob and count the request's outcome; the
        miss when it could not be verified."""
        miss: Miss | None = None
        try:
            if not await fetch.read_verified(sink, threads=threads):
                # read_verified gives up on its deadline or with no good peer left.
                miss = Miss(MissReason.DEADLINE if fetch.deadline_passed
                            else MissReason.PEERS_FAILED)
        except SinkFailure as err:
            fetch.close()
            log.warning("could not hold a blob until verified (%s); answering 404", err)
            miss = Miss(MissReason.BUSY, str(err))
        self._count_blob(record, "error" if miss else "hit")
        return miss

    def _count(self, registry: str, kind: str, result: str, path: str, started: float,
               peer: str | None = None, size: int | None = None) -> None:
        self._metrics.record(finished(registry, kind, path, result, started=started,
                                      clock=self._clock, peer=peer, size_bytes=size))

    def _resolved(self, registry: str, source: str) -> None:
        self._metrics.tag_resolutions.labels(self._metrics.registry_label(registry),
                                             source).inc()

    def _count_blob(self, record: _BlobRecord, result: str) -> None:
        self._count(record.registry, "blob", result, record.path, record.started,
                    record.peer, record.size if result == "hit" else None)


@dataclass(frozen=True, slots=True)
class _BlobRecord:
    """What a blob request's record says when it finishes: where, since when, from whom."""

    registry: str
    path: str
    started: float
    source: BlobFetch | Flight

    @property
    def peer(self) -> str | None:
        """The peer the bytes came from (for a cached blob: the one it came from then)."""
        return self.source.origin

    @property
    def size(self) -> int:
        return self.source.size


def _denied(access: Access) -> Miss:
    """The miss for a repository peers may not serve, with `RepositoryAccess`'s reason."""
    return Miss(access.reason or MissReason.UNKNOWN_REPOSITORY_OUTAGE)


def _flight_miss(flight: Flight) -> Miss:
    """Why a flight served nobody, as a request's miss reason."""
    if flight.sink_failure is not None:
        return Miss(MissReason.BUSY, flight.sink_failure)
    source = flight.source
    if isinstance(source, FirstFound):
        if source.through_tree:  # no peer held it, and its tree or upstream failed
            return Miss(MissReason.UPSTREAM_FAILED)
        source = source.first
    if not isinstance(source, BlobFetch):
        return Miss(MissReason.PEERS_FAILED)
    if flight.state is State.MISSING:
        return Miss(MissReason.PEERS_FAILED if source.asked_any else MissReason.NO_PEER)
    return Miss(MissReason.DEADLINE if source.deadline_passed else MissReason.PEERS_FAILED)


class _Unshared:
    """`PeerMirror._shared_blob`'s answer when the cache cannot hold the blob."""


_UNSHARED = _Unshared()
