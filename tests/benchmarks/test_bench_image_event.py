"""bench_image_event runs at a tiny size and writes only its own block of RESULTS.md."""

from __future__ import annotations

from pathlib import Path

from benchmarks import bench_image_event
from benchmarks.results import TARGETS
from tests.benchmarks.helpers import assert_only_block_changed, block, copy_of_results


def test_image_event_runs_small_and_writes_its_block(tmp_path: Path) -> None:
    results = copy_of_results(tmp_path)
    before = results.read_text()
    bench_image_event.main(["--images", "20", "--per", "10", "--events", "3",
                            "--results", str(results)])
    after = results.read_text()
    assert_only_block_changed(before, after, "bench_image_event")
    assert "--images 20 --per 10 --events 3`" in block(after, "bench_image_event")
    assert "image event / rebuild, median" in block(after, TARGETS)
