"""Prometheus metrics of the registry, registered on a registry the node owns.

The HTTP families carry the names and labels Spegel's do (``http_request_duration_seconds``,
``http_response_size_bytes``, ``http_requests_inflight``, each after our prefix, labelled
``handler, method, code``) so its dashboards and alerts read ours; the request count is the
duration histogram's ``_count``. Bytes by where they came from (``local``: this node's
store; ``peer``: streamed from a peer through the mirror) is our own counter, and so is
``meshmirror_mirror_misses_total{reason}``: every request not served, by its `MissReason`.

Every label value comes from a closed set, whatever a client sends: a method other
than the ones served is ``other`` (a client inventing methods would otherwise add a
series per method), handlers and reasons are the code's own, status codes are the
server's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from meshmirror.registry.fallback import MissReason

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                    1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Manifests are a few KiB, layers up to GiB: powers of 4 from 256 B to 4 GiB.
_SIZE_BUCKETS = tuple(float(256 * 4 ** i) for i in range(13))

# The handlers and sources the registry app sets on a request's scope.
HANDLERS: Final = ("manifest", "blob")
SOURCES: Final = ("local", "peer")
# The methods any route serves; every other method is labelled OTHER.
METHODS: Final = ("GET", "HEAD")
OTHER: Final = "other"


@dataclass(frozen=True, slots=True)
class MissedRequest:
    """One request not served, as the status page lists it (client text already cut short)."""

    reason: MissReason
    handler: str
    method: str
    status: int
    path: str
    registry: str | None  # the request's ``ns``, if any
    unix_seconds: float = field(default_factory=time.time)


MissObserver = Callable[[MissedRequest], None]


def method_label(method: str) -> str:
    """``method`` as a label value: one of `METHODS`, or `OTHER`."""
    return method if method in METHODS else OTHER


class RegistryMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.duration = Histogram(
            "meshmirror_http_request_duration_seconds",
            "Time from request to the last body byte sent, by handler, method and status code",
            ["handler", "method", "code"], buckets=_LATENCY_BUCKETS, registry=registry,
        )
        self.response_size = Histogram(
            "meshmirror_http_response_size_bytes",
            "Body bytes sent per response, by handler, method and status code",
            ["handler", "method", "code"], buckets=_SIZE_BUCKETS, registry=registry,
        )
        self.in_flight = Gauge(
            "meshmirror_http_requests_inflight", "Requests being answered now",
            registry=registry,
        )
        self.response_bytes = Counter(
            "meshmirror_registry_response_bytes",
            "Body bytes sent by the registry, by handler and where they came from "
            "(local: this node's store, peer: a peer through the mirror)",
            ["handler", "source"], registry=registry,
        )
        self.misses = Counter(
            "meshmirror_mirror_misses",
            "Requests not served (404 so containerd goes upstream, or a client error), by "
            "reason (docs/misses.md)",
            ["reason"], registry=registry,
        )
        # Hear of every miss (the status page lists the recent ones).
        self.miss_observers: list[MissObserver] = []
        for handler in HANDLERS:
            for source in SOURCES:
                self.response_bytes.labels(handler, source)
        for reason in MissReason:
            self.misses.labels(reason.value)

    def observe(self, handler: str, method: str, code: int, source: str, sent: int,
                elapsed: float) -> None:
        """Count one finished request."""
        labels = (handler, method_label(method), str(code))
        self.duration.labels(*labels).observe(elapsed)
        self.response_size.labels(*labels).observe(sent)
        if source in SOURCES:
            self.response_bytes.labels(handler, source).inc(sent)

    def missed(self, request: MissedRequest) -> None:
        """Count a request not served and tell the observers."""
        self.misses.labels(request.reason.value).inc()
        for observer in self.miss_observers:
            observer(request)
