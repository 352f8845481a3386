"""Metric label values come from closed sets whatever a client sends, and every miss
reason is documented."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from meshmirror.mirror.metrics import MAX_REGISTRY_LABELS, MirrorMetrics
from meshmirror.registry.fallback import MissReason
from meshmirror.registry.metrics import RegistryMetrics

ROOT = Path(__file__).resolve().parents[2]


def _series(registry: CollectorRegistry) -> int:
    return sum(len(family.samples) for family in registry.collect())


def test_every_reason_is_documented_and_exported_at_zero() -> None:
    doc = (ROOT / "docs" / "misses.md").read_text()
    registry = CollectorRegistry()
    RegistryMetrics(registry)
    for reason in MissReason:
        assert f"| `{reason.value}` |" in doc, reason
        assert registry.get_sample_value("meshmirror_mirror_misses_total",
                                         {"reason": reason.value}) == 0


def test_invented_methods_share_one_label() -> None:
    registry = CollectorRegistry()
    metrics = RegistryMetrics(registry)
    metrics.observe("v2", "BREW", 405, "none", 10, 0.001)
    before = _series(registry)
    for i in range(200):
        metrics.observe("v2", f"M{i:0>198}", 405, "none", 10, 0.001)
    assert _series(registry) == before
    assert registry.get_sample_value("meshmirror_http_request_duration_seconds_count",
                                     {"handler": "v2", "method": "other", "code": "405"}) == 201


def test_registries_outside_the_mirrored_set_are_other() -> None:
    registry = CollectorRegistry()
    metrics = MirrorMetrics(registry)
    metrics.label_registries({"127.0.0.1:5000"})
    before = _series(registry)
    assert metrics.registry_label("127.0.0.1:5000") == "127.0.0.1:5000"
    assert {metrics.registry_label(f"host{i}.example") for i in range(500)} == {"other"}
    assert _series(registry) == before


def test_with_every_registry_mirrored_only_the_first_few_get_labels() -> None:
    registry = CollectorRegistry()
    metrics = MirrorMetrics(registry)
    metrics.label_registries(())
    labels = [metrics.registry_label(f"host{i}.example") for i in range(500)]
    assert len(set(labels)) == MAX_REGISTRY_LABELS + 1
    assert labels[-1] == "other" and labels[0] == "host0.example"
