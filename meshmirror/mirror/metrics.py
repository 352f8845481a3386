"""What the mirror counts, for operators: requests, outcomes, peer failures, bytes and waits.

Two request counters on purpose: ``meshmirror_mirror_requests_total{registry,cache}``
means what ``spegel_mirror_requests_total`` means (a dashboard written for Spegel
reads it unchanged), while ``meshmirror_mirror_outcomes_total`` keeps the detail
(manifest or blob; filtered, not mirrored, error) that says *why* a miss happened.

Every finished request is also handed to ``observers`` as a `MirrorRequest`, so the
status page can show the recent ones without the mirror knowing about it.

The ``registry`` label comes from a closed set (`MirrorMetrics.registry_label`): a
client names any registry it likes in ``?ns=``, and a series per name would grow
the node and its scrape without bound. With ``--mirrored-registries`` set, those
registries are labelled and every other is ``other``; with every registry mirrored,
the first `MAX_REGISTRY_LABELS` seen are, and later ones share ``other``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from meshmirror.mirror.errors import FailureReason
from meshmirror.upstream import BreakerHealth, BreakerState, FailureKind

_FIRST_BYTE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)

# Outcome results that mean "the mirror tried its peers": Spegel's hit/miss.
# ``filtered`` and ``not_mirrored`` never reached a peer, so they are no mirror request.
_CACHE_OF_RESULT: Final = {"hit": "hit", "miss": "miss", "error": "miss"}

KINDS: Final = ("manifest", "blob")
# ``refused``: the upstream's word (tag absent, repository private, outage policy)
# ruled peers out before any was asked.
RESULTS: Final = ("hit", "miss", "error", "filtered", "not_mirrored", "refused")
# Who decided what a tag means: the upstream, a peer (outage or --resolve-tags=peers),
# this node's own store (an outage), or nobody (404: absent upstream, private,
# refused in an outage, no peer held it).
TAG_SOURCES: Final = ("upstream", "peer", "local", "none")
# What decided a repository's visibility while the upstream could not: this node's
# last verdict, a member's vouch, a vouch not trusted, or --private-images-unknown.
OUTAGE_DECISIONS: Final = ("own_verdict", "vouch", "vouch_not_trusted", "policy")
# What an anonymous upstream question came back with.
UPSTREAM_RESULTS: Final = ("answered", "not_found", "auth_required",
                           *(kind.value for kind in FailureKind))
BODY_MODES: Final = ("memory", "spool", "stream")
FLIGHT_RESULTS: Final = ("verified", "failed", "missing", "refused")
# The registry label of a registry outside the labelled set.
OTHER_REGISTRY: Final = "other"
# With every registry mirrored, how many get series of their own (first come).
MAX_REGISTRY_LABELS: Final = 16


@dataclass(frozen=True, slots=True)
class MirrorRequest:
    """One request the mirror answered (or gave up on), as the status page lists it."""

    registry: str
    kind: str
    path: str
    result: str
    peer: str | None
    size_bytes: int | None
    # From the local miss to the mirror's answer (for a streamed blob: its first byte).
    duration_seconds: float
    finished_unix_seconds: float


MirrorObserver = Callable[[MirrorRequest], None]


class MirrorMetrics:
    """The mirror's metric families on a registry the node owns, plus request observers."""

    def __init__(self, registry: CollectorRegistry, *, registries: tuple[str, ...] = ()) -> None:
        self.requests = Counter(
            "meshmirror_mirror_requests",
            "Requests the mirror tried its peers for, by whether a peer served them "
            "(as spegel_mirror_requests_total)",
            ["registry", "cache"], registry=registry,
        )
        self.outcomes = Counter(
            "meshmirror_mirror_outcomes",
            "Requests the local store missed, by object kind and outcome",
            ["registry", "kind", "result"], registry=registry,
        )
        self.last_success = Gauge(
            "meshmirror_mirror_last_success_timestamp_seconds",
            "Unix time a peer last served a mirror request (0: never since start)",
            registry=registry,
        )
        self.peer_bytes = Counter(
            "meshmirror_mirror_peer_bytes",
            "Bytes received from peers (verified or not)",
            registry=registry,
        )
        # Cross-zone transfer is what clouds bill; "unknown" when either zone is not known.
        self.peer_zone_bytes = Counter(
            "meshmirror_mirror_peer_zone_bytes",
            "Bytes received from peers, by whether the peer is in this node's zone "
            "(same, cross, unknown)",
            ["zone"], registry=registry,
        )
        for zone in ("same", "cross", "unknown"):
            self.peer_zone_bytes.labels(zone)
        self.first_byte = Histogram(
            "meshmirror_mirror_first_byte_seconds",
            "From a miss to the first peer's response headers (the lookup cost a pull sees)",
            buckets=_FIRST_BYTE_BUCKETS,
            registry=registry,
        )
        self.false_positives = Counter(
            "meshmirror_mirror_peer_false_positives",
            "Peers whose summary matched but that answered 404",
            registry=registry,
        )
        self.peer_failures = Counter(
            "meshmirror_mirror_peer_failures",
            "Peer requests that failed, by reason",
            ["reason"],
            registry=registry,
        )
        self.blob_bodies = Counter(
            "meshmirror_mirror_blob_bodies",
            "Blob bodies sent from peers, by how they were verified: whole in memory or in "
            "a cache file (spool) before the first byte, or streamed and checked at the end",
            ["mode"],
            registry=registry,
        )
        self.outage_visibility = Counter(
            "meshmirror_outage_visibility_decisions",
            "Visibility checks the upstream could not answer, by what decided: own_verdict, "
            "vouch (a member's, trusted), vouch_not_trusted (refused) or policy "
            "(--private-images-unknown)",
            ["decision"], registry=registry,
        )
        for decision in OUTAGE_DECISIONS:
            self.outage_visibility.labels(decision)
        self.spool_bytes = Gauge(
            "meshmirror_mirror_spool_bytes",
            "Bytes of blob cache files pinned by requests in progress (being fetched, "
            "verified or sent; bounded by --mirror-spool-limit)",
            registry=registry,
        )
        self.flight_readers = Gauge(
            "meshmirror_mirror_flight_readers",
            "Requests attached to blob fetches still in flight (one fetch per blob per node)",
            registry=registry,
        )
        self.flight_joins = Counter(
            "meshmirror_mirror_flight_joins",
            "Requests that joined a fetch of their blob already in flight instead of "
            "starting one",
            registry=registry,
        )
        self.flight_restarts = Counter(
            "meshmirror_mirror_flight_restarts",
            "Fetches in flight that started over from byte 0 (a digest mismatch or a size "
            "disagreement); readers following unverified bytes were aborted",
            registry=registry,
        )
        self.flights = Counter(
            "meshmirror_mirror_flights",
            "Blob fetches that landed, by result: verified, failed (the sources gave up or "
            "nobody wanted it any more), missing, refused (the cache could not hold it)",
            ["result"], registry=registry,
        )
        self.cache_bytes = Gauge(
            "meshmirror_mirror_cache_bytes",
            "Bytes of blob cache files (being fetched or verified and kept)",
            registry=registry,
        )
        self.cache_evictions = Counter(
            "meshmirror_mirror_cache_evictions",
            "Verified blobs evicted from the cache to make room, least recently used first",
            registry=registry,
        )
        self.tag_resolutions = Counter(
            "meshmirror_tag_resolutions",
            "Tag lookups the mirror answered, by who decided the digest: upstream, peer, "
            "local (this node's store, in an outage) or none (answered 404)",
            ["registry", "source"], registry=registry,
        )
        self.upstream_answers = Counter(
            "meshmirror_upstream_answers",
            "Anonymous questions to upstream registries (tag digest, repository "
            "visibility), by result; circuit_open ones were never sent",
            ["registry", "result"], registry=registry,
        )
        self.observers: list[MirrorObserver] = []
        # Where these live, so the node's other views can register beside them.
        self.registry = registry
        self._labelled: set[str] = set()
        # True once the mirrored registries are named: nobody else gets a label.
        self._closed = False
        # Every reason a PeerFailure can carry, so a failure panel shows 0 for each
        # rather than no series at all.
        for reason in FailureReason:
            self.peer_failures.labels(reason)
        for mode in BODY_MODES:
            self.blob_bodies.labels(mode)
        for result in FLIGHT_RESULTS:
            self.flights.labels(result)
        self.init_registry(OTHER_REGISTRY)
        self.label_registries(registries)

    def label_registries(self, registries: Iterable[str]) -> None:
        """Label exactly these registries (the mirrored ones); none: the first few seen."""
        names = set(registries)
        self._closed = bool(names)
        for name in sorted(names):
            self._label(name)

    def registry_label(self, registry: str) -> str:
        """``registry`` as a label value: itself if labelled (or still admitted), else other."""
        if registry in self._labelled:
            return registry
        if self._closed or len(self._labelled) >= MAX_REGISTRY_LABELS:
            return OTHER_REGISTRY
        self._label(registry)
        return registry

    def _label(self, registry: str) -> None:
        self._labelled.add(registry)
        self.init_registry(registry)

    def init_registry(self, registry: str) -> None:
        """Create ``registry``'s request series at 0, so rates exist before the first miss.
        Only for label values `registry_label` gives."""
        for cache in ("hit", "miss"):
            self.requests.labels(registry, cache)
        for kind in KINDS:
            for result in RESULTS:
                self.outcomes.labels(registry, kind, result)
        for source in TAG_SOURCES:
            self.tag_resolutions.labels(registry, source)
        for result in UPSTREAM_RESULTS:
            self.upstream_answers.labels(registry, result)

    # `flight.FlightEvents`
    def flight_joined(self) -> None:
        self.flight_joins.inc()

    def flight_restarted(self) -> None:
        self.flight_restarts.inc()

    def flight_ended(self, result: str) -> None:
        self.flights.labels(result if result in FLIGHT_RESULTS else "failed").inc()

    def watch_upstream(self, health: Callable[[], Mapping[str, BreakerHealth]],
                       known: Iterable[str] = ()) -> None:
        """Export each labelled upstream's health, read from its breaker at every scrape."""
        self.registry.register(UpstreamHealthCollector(
            lambda: {name: state for name, state in health().items()
                     if name in self._labelled},
            tuple(known)))

    def record(self, request: MirrorRequest) -> None:
        """Count one finished request and tell the observers about it."""
        registry = self.registry_label(request.registry)
        self.outcomes.labels(registry, request.kind, request.result).inc()
        cache = _CACHE_OF_RESULT.get(request.result)
        if cache is not None:
            self.requests.labels(registry, cache).inc()
        if request.result == "hit":
            self.last_success.set(request.finished_unix_seconds)
        for observer in self.observers:
            observer(request)


def finished(registry: str, kind: str, path: str, result: str, *, started: float,
             clock: Callable[[], float], peer: str | None = None,
             size_bytes: int | None = None) -> MirrorRequest:
    """A `MirrorRequest` ending now; ``started`` is a reading of ``clock``."""
    return MirrorRequest(registry, kind, path, result, peer, size_bytes,
                         max(0.0, clock() - started), time.time())


class UpstreamHealthCollector(Collector):
    """``meshmirror_upstream_up`` and ``meshmirror_upstream_breaker_state`` per registry.

    Read from the breakers when scraped, so the gauges can never disagree with
    what the client decides. Registries in ``known`` (the mirrored ones) are
    exported before they are first asked, as up with a closed breaker.
    """

    def __init__(self, health: Callable[[], Mapping[str, BreakerHealth]],
                 known: tuple[str, ...]) -> None:
        self._health = health
        self._known = known

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily(
            "meshmirror_upstream_up",
            "1 while the registry answers anonymous questions (or has not been asked), "
            "0 while the last one failed or its breaker is not closed",
            labels=["registry"])
        state = GaugeMetricFamily(
            "meshmirror_upstream_breaker_state",
            "The registry's circuit breaker: 1 for its current state (closed: asked; "
            "open: not asked, peers resolve tags; half_open: one probe decides)",
            labels=["registry", "state"])
        closed = BreakerHealth(BreakerState.CLOSED, 0, None, None)
        healths = {name: closed for name in self._known}
        healths.update(self._health())
        for registry, health in sorted(healths.items()):
            healthy = health.state is BreakerState.CLOSED and health.consecutive_failures == 0
            up.add_metric([registry], 1.0 if healthy else 0.0)
            for candidate in BreakerState:
                state.add_metric([registry, candidate.value],
                                 1.0 if candidate is health.state else 0.0)
        yield up
        yield state

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())
