"""Failure reasons are a closed set: every one has a series, none is spelt anew."""

from __future__ import annotations

import ast
from pathlib import Path

from prometheus_client import CollectorRegistry

from meshmirror.mirror.errors import FailureReason, PeerFailure
from meshmirror.mirror.metrics import MirrorMetrics

MIRROR = Path(__file__).resolve().parents[2] / "meshmirror" / "mirror"


def test_every_reason_has_a_series_from_the_start() -> None:
    registry = CollectorRegistry()
    MirrorMetrics(registry)
    for reason in FailureReason:
        assert registry.get_sample_value("meshmirror_mirror_peer_failures_total",
                                         {"reason": reason.value}) == 0, reason


def test_a_failure_carries_its_reason_and_reads_as_its_label() -> None:
    failure = PeerFailure(FailureReason.DIGEST_MISMATCH, "manifest sha256:ab")
    assert failure.reason is FailureReason.DIGEST_MISMATCH
    assert str(failure) == "digest_mismatch: manifest sha256:ab"


def test_the_mirror_raises_no_reason_as_a_bare_string() -> None:
    for path in MIRROR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id == "PeerFailure" and node.args):
                assert not isinstance(node.args[0], ast.Constant), (
                    f"{path.name}:{node.lineno}: PeerFailure takes a FailureReason")
