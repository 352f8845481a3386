"""A node's Prometheus /metrics, read the way every real-process test reads it.

One parser (prometheus_client's own) rather than regexes per test, so a sample
with labels is matched by its labels, not by how they happen to be printed.
"""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_metrics(text: str) -> Metrics:
    """Prometheus text as {(sample name, sorted labels): value}."""
    out: Metrics = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return out


def scrape(address: str, timeout: float = 5.0) -> Metrics:
    """The /metrics of the server at ``address`` (host:port), parsed."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout) as r:
        return parse_metrics(r.read().decode())


def metric(metrics: Metrics, name: str, **labels: str) -> float:
    """Sum of the samples named ``name`` whose labels include ``labels`` (0 when absent)."""
    wanted = set(labels.items())
    return sum(v for (n, lab), v in metrics.items() if n == name and wanted <= set(lab))


def read_metric(address: str, name: str, **labels: str) -> float:
    """One ``metric`` from a fresh scrape of ``address``: for polling a single value."""
    return metric(scrape(address), name, **labels)
