"""Prometheus view of the mesh: a custom collector read at scrape time.

The core keeps plain integer counters (``Memberlist.stats``) and the transport
keeps socket counters (``MeshNode.transport_stats``); neither touches
prometheus_client on the hot path. This collector turns both into metric
families when Prometheus scrapes, from whatever thread serves ``/metrics``.
The values are read without locks: they are ints and small dicts mutated in
place by the mesh thread, so a scrape sees a slightly stale, never torn, value.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from meshmirror.mesh.messages import NodeState
from meshmirror.mesh.state import MeshStats
from meshmirror.mesh.transport import LOOP_LAG_BUCKETS, MeshNode, TransportStats

_QUANTILES = (0.5, 0.9, 0.99)


class MeshCollector(Collector):
    """Exposes one ``MeshNode``'s core and transport counters."""

    def __init__(self, node: MeshNode) -> None:
        self._node = node

    def describe(self) -> Iterable[Metric]:
        # Families without samples: lets registration check for name clashes
        # without reading the live counters.
        return list(_families(None, None))

    def collect(self) -> Iterable[Metric]:
        core = self._node._core
        return list(_families(core.stats if core is not None else None,
                              self._node.transport_stats))


def register_mesh_metrics(registry: CollectorRegistry, node: MeshNode) -> MeshCollector:
    """Register the mesh collector on ``registry`` (never the global default)."""
    collector = MeshCollector(node)
    registry.register(collector)
    return collector


def _families(stats: MeshStats | None, transport: TransportStats | None) -> Iterator[Metric]:
    members = GaugeMetricFamily("meshmirror_mesh_members",
                                "Members known to this node, by state", labels=["state"])
    messages = CounterMetricFamily("meshmirror_mesh_messages",
                                   "Protocol messages by type and direction",
                                   labels=["type", "direction"])
    message_bytes = CounterMetricFamily(
        "meshmirror_mesh_message_bytes",
        "Encoded bytes of outbound messages by type (before compound framing and sealing)",
        labels=["type", "direction"])
    wire_bytes = CounterMetricFamily("meshmirror_mesh_transport_bytes",
                                     "Bytes on the sockets by protocol and direction",
                                     labels=["protocol", "direction"])
    packets = CounterMetricFamily("meshmirror_mesh_packets", "UDP datagrams by direction",
                                  labels=["direction"])
    streams = CounterMetricFamily("meshmirror_mesh_streams", "TCP streams by direction",
                                  labels=["direction"])
    dropped = CounterMetricFamily(
        "meshmirror_mesh_dropped_packets",
        "Packets, stream messages and push-pull node states dropped instead of processed, by "
        "reason: malformed, truncated, unknown_type, replayed, decrypt_failed, bad_name, "
        "bad_meta, bad_addr, too_large, too_many_nodes, timeout (a stream not complete "
        "within tcp_timeout), tcp_rejected, ...", labels=["reason"])
    rtt = SummaryMetricFamily("meshmirror_mesh_probe_rtt_seconds",
                              "Round-trip time of successful probes (quantiles over recent "
                              "samples)")
    awareness = GaugeMetricFamily(
        "meshmirror_mesh_awareness_score",
        "Lifeguard local health: 0 is healthy; each step stretches probe interval and timeout")
    probes = CounterMetricFamily("meshmirror_mesh_probes", "Probes by outcome",
                                 labels=["outcome"])
    suspicions = CounterMetricFamily("meshmirror_mesh_suspicions",
                                     "Members this node started suspecting")
    refutations = CounterMetricFamily("meshmirror_mesh_refutations",
                                      "Suspicions of this node it refuted with a new incarnation")
    deaths = CounterMetricFamily("meshmirror_mesh_deaths", "Members declared dead")
    push_pulls = CounterMetricFamily("meshmirror_mesh_push_pulls",
                                     "Full-state push-pull exchanges")
    loop_lag = GaugeMetricFamily("meshmirror_mesh_loop_lag_max_seconds",
                                 "Worst lateness of the mesh event loop since start")
    lag_histogram = HistogramMetricFamily(
        "meshmirror_mesh_loop_lag_seconds",
        "Lateness of the mesh event loop, sampled every 100 ms: what a probe waits before "
        "this node can answer it")

    if stats is not None:
        for state in NodeState:
            members.add_metric([state.name.lower()], stats.members_by_state.get(state, 0))
        for direction, counts in (("out", stats.messages_sent), ("in", stats.messages_received)):
            for kind, value in sorted(counts.items()):
                messages.add_metric([kind, direction], value)
        for kind, value in sorted(stats.bytes_sent.items()):
            message_bytes.add_metric([kind, "out"], value)
        samples = list(stats.probe_rtt_samples)
        rtt.add_metric([], stats.probe_rtt_count, stats.probe_rtt_sum)
        if len(samples) >= 2:
            cuts = statistics.quantiles(samples, n=100, method="inclusive")
            for q in _QUANTILES:
                rtt.samples.append(Sample(rtt.name, {"quantile": str(q)},
                                          cuts[round(q * 100) - 1]))
        awareness.add_metric([], stats.awareness)
        ok = stats.probes - stats.probe_failures
        probes.add_metric(["ok"], max(ok, 0))
        probes.add_metric(["failed"], stats.probe_failures)
        probes.add_metric(["indirect"], stats.indirect_probes)
        probes.add_metric(["tcp_fallback_rescued"], stats.tcp_fallback_rescues)
        suspicions.add_metric([], stats.suspicions)
        refutations.add_metric([], stats.refutations)
        deaths.add_metric([], stats.deaths)
        push_pulls.add_metric([], stats.push_pulls)
    if transport is not None:
        wire_bytes.add_metric(["udp", "out"], transport.udp_bytes_sent)
        wire_bytes.add_metric(["udp", "in"], transport.udp_bytes_received)
        wire_bytes.add_metric(["tcp", "out"], transport.tcp_bytes_sent)
        wire_bytes.add_metric(["tcp", "in"], transport.tcp_bytes_received)
        packets.add_metric(["out"], transport.udp_packets_sent)
        packets.add_metric(["in"], transport.udp_packets_received)
        streams.add_metric(["out"], transport.tcp_streams_opened)
        streams.add_metric(["in"], transport.tcp_streams_accepted)
        loop_lag.add_metric([], transport.loop_lag_max)
        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip((*LOOP_LAG_BUCKETS, float("inf")), transport.loop_lag_counts,
                                strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else str(bound), cumulative))
        lag_histogram.add_metric([], buckets, transport.loop_lag_sum)
    reasons: dict[str, int] = {}
    for source in (stats.dropped if stats else {}, transport.dropped if transport else {}):
        for reason, value in source.items():
            reasons[reason] = reasons.get(reason, 0) + value
    if transport is not None:
        reasons["tcp_rejected"] = reasons.get("tcp_rejected", 0) + transport.tcp_streams_rejected
    for reason, value in sorted(reasons.items()):
        dropped.add_metric([reason], value)

    yield from (members, messages, message_bytes, wire_bytes, packets, streams, dropped, rtt,
                awareness, probes, suspicions, refutations, deaths, push_pulls, loop_lag,
                lag_histogram)
