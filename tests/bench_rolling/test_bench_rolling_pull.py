"""The rolling-pull benchmark's own parsing: ctr's unpack time, metric labels, bad flags.

The benchmark's figures are only as good as these helpers: a misread Go duration
would shift every "fetch" time, a misparsed label would misreport why a node missed.
"""

from __future__ import annotations

import argparse
import sys

import pytest

from benchmarks import bench_rolling_pull as bench


@pytest.mark.parametrize(("text", "seconds"), [
    ("466.564985ms", 0.466564985),
    ("3.2s", 3.2),
    ("1m2.5s", 62.5),
    ("12\u00b5s", 12e-6),
    ("250us", 250e-6),
    ("1h0m0s", 3600.0),
])
def test_go_duration(text: str, seconds: float) -> None:
    assert bench.go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "abc", "12", "3.2 s", "1.5sx", "-1s"])
def test_go_duration_rejects_what_ctr_never_prints(text: str) -> None:
    with pytest.raises(ValueError, match="not a Go duration"):
        bench.go_duration(text)


def test_mirror_results_totals_over_kinds_and_lists_failure_reasons() -> None:
    metrics = {
        "meshmirror_mirror_outcomes_total{kind=blob,registry=r:1,result=hit}": 4.0,
        "meshmirror_mirror_outcomes_total{kind=manifest,registry=r:1,result=hit}": 2.0,
        "meshmirror_mirror_outcomes_total{kind=blob,registry=r:1,result=miss}": 3.0,
        "meshmirror_mirror_outcomes_created{kind=blob,registry=r:1,result=miss}": 1e9,
        "meshmirror_mirror_peer_failures_total{reason=timeout}": 3.0,
        "meshmirror_mirror_peer_bytes_total{}": 10.0,
    }
    assert bench.mirror_results(metrics) == "hit 6, miss 3; peer failures: timeout 3"


def test_mirror_results_of_an_idle_mirror() -> None:
    assert bench.mirror_results({"meshmirror_mirror_peer_bytes_total{}": 0.0}) == "none"


def test_mirror_results_leave_out_labels_created_at_zero() -> None:
    metrics = {
        "meshmirror_mirror_outcomes_total{kind=blob,registry=r:1,result=hit}": 8.0,
        "meshmirror_mirror_outcomes_total{kind=blob,registry=r:1,result=error}": 0.0,
        "meshmirror_mirror_peer_failures_total{reason=timeout}": 0.0,
    }
    assert bench.mirror_results(metrics) == "hit 8"


def figures(mode: str, seconds: list[float], upstream: list[int]) -> bench.PullFigures:
    return bench.PullFigures(mode, seconds=seconds, fetch_seconds=[s - 1 for s in seconds],
                             waits=[0.0] * len(seconds), upstream_bytes=upstream,
                             metrics=[{} for _ in seconds])


def test_report_checks_nodes_after_the_first_against_the_ideal() -> None:
    """The first node has nothing to hop from, so only nodes 2..N count against the
    ideal; the ratio is of means over those nodes, whole and without the unpack, taken
    round by round (each against the ideal of its own round), then the median round."""
    args = argparse.Namespace(nodes=3, layers=1, layer_mib=1, rate_mb=50.0, rounds=1,
                              mirror_resolve_timeout=None, mirror_spool_limit=None,
                              sample_spool=False)
    args.rounds = 3
    runs = {bench.IDEAL: [figures(bench.IDEAL, [2.0, 2.0, 2.0], [0, 0, 0]),
                          figures(bench.IDEAL, [4.0, 4.0, 4.0], [0, 0, 0]),
                          figures(bench.IDEAL, [2.0, 2.0, 2.0], [0, 0, 0])],
            bench.BASELINE: [figures(bench.BASELINE, [5.0, 5.0, 5.0], [100, 100, 100])] * 3,
            # Round 2 was loaded for both modes alike: 1.0x, not 2x the other rounds' ideal.
            bench.MESH: [figures(bench.MESH, [5.0, 2.0, 2.4], [100, 0, 0]),
                         figures(bench.MESH, [5.0, 4.0, 4.0], [100, 0, 0]),
                         figures(bench.MESH, [5.0, 2.2, 2.6], [100, 0, 0])]}
    section = bench.report(args, 100, runs, "0 / 0 / 0")
    targets = {t.what: t for t in section.targets}
    whole = targets["rolling pull: nodes 2..N / ideal (unthrottled loopback Distribution), "
                    "whole pull, median round"]
    fetch = targets["rolling pull: nodes 2..N / ideal, fetch part, median round"]
    assert whole.latest == pytest.approx(2.2 / 2.0) and whole.met
    assert fetch.latest == pytest.approx(1.2 / 1.0) and not fetch.met
    assert targets["upstream bytes per rolling pull / image (HTTP headers aside), "
                   "worst round"].latest == pytest.approx(1.0)


@pytest.mark.parametrize("argv", [
    ["--nodes", "1"],
    ["--rounds", "0"],
    ["--layer-mib", "0"],
    ["--rate-mb", "0"],
])
def test_bad_flags_exit_with_usage_before_starting_anything(
        argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["bench_rolling_pull", *argv])
    with pytest.raises(SystemExit) as exc:
        bench.main()
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_report_checks_the_first_node_against_the_baseline_of_its_round() -> None:
    """The first node has no peer: the mirror must not make it slower than pulling
    straight from the upstream, compared round by round with the baseline's first node."""
    args = argparse.Namespace(nodes=2, layers=1, layer_mib=1, rate_mb=50.0, rounds=3,
                              mirror_resolve_timeout=None, mirror_spool_limit=None,
                              sample_spool=False)
    runs = {bench.IDEAL: [figures(bench.IDEAL, [2.0, 2.0], [0, 0])] * 3,
            bench.BASELINE: [figures(bench.BASELINE, [5.0, 5.0], [100, 100]),
                             figures(bench.BASELINE, [10.0, 5.0], [100, 100]),
                             figures(bench.BASELINE, [5.0, 5.0], [100, 100])],
            bench.MESH: [figures(bench.MESH, [5.5, 2.0], [100, 0]),
                         figures(bench.MESH, [10.5, 2.0], [100, 0]),
                         figures(bench.MESH, [4.5, 2.0], [100, 0])]}
    section = bench.report(args, 100, runs, "0 / 0 / 0")
    [first] = [t for t in section.targets if t.what.startswith("rolling pull: first node")]
    assert first.latest == pytest.approx(10.5 / 10.0) and not first.met
    assert "whole pull 1.10x, 1.05x, 0.90x" in " ".join(section.notes)
