"""What the mirror counts, for operators: outcomes, peer failures, bytes and waits."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_FIRST_BYTE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)


class MirrorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "meshmirror_mirror_requests",
            "Requests the local store missed, by outcome",
            ["registry", "kind", "result"],
            registry=registry,
        )
        self.peer_bytes = Counter(
            "meshmirror_mirror_peer_bytes",
            "Bytes received from peers (verified or not)",
            registry=registry,
        )
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
            "a spool file before the first byte, or streamed and checked at the end",
            ["mode"],
            registry=registry,
        )
        self.spool_bytes = Gauge(
            "meshmirror_mirror_spool_bytes",
            "Bytes of spool files held by requests in progress",
            registry=registry,
        )
