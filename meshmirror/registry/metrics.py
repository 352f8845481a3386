"""Prometheus metrics of the registry, registered on a registry the node owns.

The HTTP families carry the names and labels Spegel's do (``http_request_duration_seconds``,
``http_response_size_bytes``, ``http_requests_inflight``, each after our prefix, labelled
``handler, method, code``) so its dashboards and alerts read ours; the request count is the
duration histogram's ``_count``. Bytes by where they came from (``local``: this node's
store; ``peer``: streamed from a peer through the mirror) is our own counter.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                    1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Manifests are a few KiB, layers up to GiB: powers of 4 from 256 B to 4 GiB.
_SIZE_BUCKETS = tuple(float(256 * 4 ** i) for i in range(13))

# The handlers and sources the registry app sets on a request's scope.
HANDLERS: Final = ("manifest", "blob")
SOURCES: Final = ("local", "peer")


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
        for handler in HANDLERS:
            for source in SOURCES:
                self.response_bytes.labels(handler, source)

    def observe(self, handler: str, method: str, code: int, source: str, sent: int,
                elapsed: float) -> None:
        """Count one finished request."""
        labels = (handler, method, str(code))
        self.duration.labels(*labels).observe(elapsed)
        self.response_size.labels(*labels).observe(sent)
        if source in SOURCES:
            self.response_bytes.labels(handler, source).inc(sent)
