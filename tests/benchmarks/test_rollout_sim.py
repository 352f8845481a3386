"""The rollout model runs small and writes only its own block."""

from __future__ import annotations

from pathlib import Path

from benchmarks import rollout_sim
from tests.benchmarks.helpers import assert_only_block_changed, block, copy_of_results


def test_rollout_sim_runs_small_and_writes_its_block(tmp_path: Path) -> None:
    results = copy_of_results(tmp_path)
    before = results.read_text()
    assert rollout_sim.main(["--sizes", "20", "--image-mb", "200", "--dt", "0.05",
                             "--results", str(results)]) == 0
    after = results.read_text()
    assert_only_block_changed(before, after, "rollout_sim")
    text = block(after, "rollout_sim")
    assert "| 20 | striped |" in text and "| 20 | trees |" in text


def test_striped_trees_fetch_each_byte_once_and_beat_one_tree() -> None:
    alone = rollout_sim.run(1, "alone", 200e6, 8, 1, 0.05)
    trees = rollout_sim.run(50, "trees", 200e6, 8, 1, 0.05)
    striped = rollout_sim.run(50, "striped", 200e6, 8, 1, 0.05)
    assert trees.upstream_bytes == striped.upstream_bytes == alone.image_bytes
    assert striped.max_tree_readers <= 8 and trees.max_tree_readers <= 8
    assert striped.last_s < trees.last_s
