"""Prometheus metrics of the registry, registered on a registry the node owns."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                    1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class RegistryMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "meshmirror_registry_requests", "HTTP requests answered by the registry",
            ["handler", "method", "status"], registry=registry,
        )
        self.response_bytes = Counter(
            "meshmirror_registry_response_bytes", "Body bytes sent by the registry",
            ["handler", "source"], registry=registry,
        )
        self.duration = Histogram(
            "meshmirror_registry_request_duration_seconds",
            "Time from request to the last body byte sent",
            ["handler"], buckets=_LATENCY_BUCKETS, registry=registry,
        )
        self.in_flight = Gauge(
            "meshmirror_registry_requests_in_flight", "Requests being answered now",
            registry=registry,
        )
