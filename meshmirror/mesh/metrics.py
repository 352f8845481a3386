"""Prometheus view of the mesh: a custom collector read at scrape time.

The core keeps plain integer counters (``Memberlist.stats``) and the transport
keeps socket counters (``MeshNode.transport_stats``); neither touches
prometheus_client on the hot path. This collector turns both into metric
families when Prometheus scrapes, from whatever thread serves ``/metrics``.
The values are read without locks: they are ints and small dicts mutated in
place by the mesh thread, so a scrape sees a slightly stale, never torn, value.

Probe RTT and event-loop lag are histograms (aggregatable across nodes, alertable
with ``histogram_quantile``), built here rather than in the core: the core keeps a
count and a bounded deque of recent samples, and each scrape files the samples that
arrived since the last one into cumulative buckets.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from meshmirror.mesh.messages import NodeState
from meshmirror.mesh.state import MeshStats
from meshmirror.mesh.transport import LOOP_LAG_BUCKETS, MeshNode, TransportStats

_RTT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class SampleBuckets:
    """A cumulative histogram fed from a producer's running count and recent samples.

    The producer only appends to a bounded deque and bumps a count; ``update`` takes
    the samples added since the previous call. If more arrived than the deque holds,
    the missing ones are filed like the ones that are still there.
    """

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self._counts = [0] * (len(self.bounds) + 1)
        self._seen = 0

    def update(self, count: int, recent: Sequence[float]) -> None:
        if count < self._seen:  # a new producer (the core restarted): start over
            self._counts = [0] * len(self._counts)
            self._seen = 0
        new = count - self._seen
        self._seen = count
        if new <= 0:
            return
        taken = list(recent)[-new:]
        if not taken:
            self._counts[-1] += new
            return
        for i in range(new):
            self._counts[bisect.bisect_left(self.bounds, taken[i % len(taken)])] += 1

    def family(self, name: str, documentation: str, total: float) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, documentation)
        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for bound, value in zip((*map(str, self.bounds), "+Inf"), self._counts, strict=True):
            cumulative += value
            buckets.append((bound, cumulative))
        family.add_metric([], buckets, total)
        return family


class MeshCollector(Collector):
    """Exposes one ``MeshNode``'s core and transport counters."""

    def __init__(self, node: MeshNode) -> None:
        self._node = node
        self._rtt = SampleBuckets(_RTT_BUCKETS)

    def describe(self) -> Iterable[Metric]:
        # Families without samples: lets registration check for name clashes
        # without reading the live counters.
        return [*_families(None, None), *self._histograms(None, None)]

    def collect(self) -> Iterable[Metric]:
        core = self._node._core
        stats = core.stats if core is not None else None
        transport = self._node.transport_stats
        return [*_families(stats, transport), *self._histograms(stats, transport)]

    def _histograms(self, stats: MeshStats | None, transport: TransportStats | None
                    ) -> Iterator[Metric]:
        rtt_doc = "Round-trip time of successful probes"
        lag_doc = ("How late the mesh event loop woke from a 100 ms sleep: "
                   "gossip timing needs this near 0")
        if stats is None:
            yield HistogramMetricFamily("meshmirror_mesh_probe_rtt_seconds", rtt_doc)
        else:
            self._rtt.update(stats.probe_rtt_count, stats.probe_rtt_samples)
            yield self._rtt.family("meshmirror_mesh_probe_rtt_seconds", rtt_doc,
                                   stats.probe_rtt_sum)
        lag = HistogramMetricFamily("meshmirror_mesh_loop_lag_seconds", lag_doc)
        if transport is not None:
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for bound, count in zip((*map(str, LOOP_LAG_BUCKETS), "+Inf"),
                                    transport.loop_lag_counts, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            lag.add_metric([], buckets, transport.loop_lag_sum)
        yield lag


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
    undecryptable = CounterMetricFamily(
        "meshmirror_mesh_undecryptable",
        "Gossip packets and streams this node could not decrypt (reason decrypt_failed or "
        "not_encrypted): the sender holds another gossip key, or none. By source IP "
        "address; after 16 distinct addresses the rest count as source=\"other\"",
        labels=["source"])

    if stats is not None:
        for state in NodeState:
            members.add_metric([state.name.lower()], stats.members_by_state.get(state, 0))
        for direction, counts in (("out", stats.messages_sent), ("in", stats.messages_received)):
            for kind, value in sorted(counts.items()):
                messages.add_metric([kind, direction], value)
        for kind, value in sorted(stats.bytes_sent.items()):
            message_bytes.add_metric([kind, "out"], value)
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
        for address, value in sorted(stats.undecryptable.by_source.items()):
            undecryptable.add_metric([address], value)
    if transport is not None:
        wire_bytes.add_metric(["udp", "out"], transport.udp_bytes_sent)
        wire_bytes.add_metric(["udp", "in"], transport.udp_bytes_received)
        wire_bytes.add_metric(["tcp", "out"], transport.tcp_bytes_sent)
        wire_bytes.add_metric(["tcp", "in"], transport.tcp_bytes_received)
        packets.add_metric(["out"], transport.udp_packets_sent)
        packets.add_metric(["in"], transport.udp_packets_received)
        streams.add_metric(["out"], transport.tcp_streams_opened)
        streams.add_metric(["in"], transport.tcp_streams_accepted)
    reasons: dict[str, int] = {}
    for source in (stats.dropped if stats else {}, transport.dropped if transport else {}):
        for reason, value in source.items():
            reasons[reason] = reasons.get(reason, 0) + value
    if transport is not None:
        reasons["tcp_rejected"] = reasons.get("tcp_rejected", 0) + transport.tcp_streams_rejected
    for reason, value in sorted(reasons.items()):
        dropped.add_metric([reason], value)

    yield from (members, messages, message_bytes, wire_bytes, packets, streams, dropped,
                awareness, probes, suspicions, refutations, deaths, push_pulls,
                undecryptable)
