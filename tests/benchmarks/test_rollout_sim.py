"""The rollout model runs small; both rollout benchmarks write only their own block."""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks import bench_rollout, rollout_sim
from benchmarks.results import write_section
from tests.benchmarks.helpers import assert_only_block_changed, block, copy_of_results


def test_rollout_sim_runs_small_and_writes_its_block(tmp_path: Path) -> None:
    results = copy_of_results(tmp_path)
    before = results.read_text()
    assert rollout_sim.main(["--sizes", "20", "--image-mb", "200", "--dt", "0.05",
                             "--results", str(results)]) == 0
    after = results.read_text()
    assert_only_block_changed(before, after, "rollout_sim")
    text = block(after, "rollout_sim")
    assert "| 20 | striped |" in text and "| 20 | per-blob |" in text


def test_striped_trees_fetch_each_byte_once_and_beat_one_tree() -> None:
    alone = rollout_sim.run(1, "alone", 200e6, 8, 1, 0.05)
    trees = rollout_sim.run(50, "per-blob", 200e6, 8, 1, 0.05)
    striped = rollout_sim.run(50, "striped", 200e6, 8, 1, 0.05)
    assert trees.upstream_bytes == striped.upstream_bytes == alone.image_bytes
    assert striped.max_tree_readers <= 8 and trees.max_tree_readers <= 8
    assert striped.last_s < trees.last_s


def test_bench_rollout_report_writes_its_block(tmp_path: Path) -> None:
    args = argparse.Namespace(nodes=2, layers=4, layer_mib=50, rate_mb=50.0, rounds=1, fanout=8)
    image = 200_000_000
    base = bench_rollout.BatchFigures("baseline", [8.0, 8.2], 2 * image, [])
    peak = {"meshmirror_rollout_readers_peak{}": 2.0,
            "meshmirror_rollout_upstream_bytes_total{}": image / 2,
            "meshmirror_mirror_outcomes_total{kind=blob,result=hit}": 4.0}
    mesh = bench_rollout.BatchFigures("meshmirror", [4.0, 4.4], int(image * 1.01), [peak, peak])
    results = copy_of_results(tmp_path)
    before = results.read_text()
    write_section(bench_rollout.report(args, image, [base], [mesh], "0.1 / 0.2 / 0.3"), results)
    after = results.read_text()
    assert_only_block_changed(before, after, "bench_rollout")
    text = block(after, "bench_rollout")
    assert "| node1 | 8.20 | 4.40 | 0.54 | 2 | hit 4 |" in text
    assert "| rollout: upstream bytes per batched pull / image, worst round | <= 1.05x | 1.01x " \
           "| yes |" in text
    assert "(of which the mirrors' own fetches: 1.00x)" in text


def test_mirror_results_leave_out_what_never_happened() -> None:
    metrics = {"meshmirror_mirror_outcomes_total{kind=blob,result=hit}": 5.0,
               "meshmirror_mirror_outcomes_total{kind=blob,result=error}": 0.0,
               "meshmirror_mirror_peer_failures_total{reason=broken}": 0.0}
    assert bench_rollout.mirror_results(metrics) == "hit 5"
