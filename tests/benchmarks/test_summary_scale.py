"""Smoke tests of the summary benchmarks' building blocks: small, seconds at most."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.bench_summary_scale import delta_size, memory, subset_hit_ratio, write_layout
from benchmarks.summary_sim import meta_999, simulate


def test_an_images_delta_is_a_small_fraction_of_the_whole_filter() -> None:
    full, delta = delta_size()
    assert 20_000 < full < 30_000  # 10 bits a key, 21,500 keys
    assert delta < full // 100


def test_the_rollout_model_coalesces_versions_and_stays_within_gossip_time() -> None:
    versions, fetches, p999 = simulate(100, 20, 135, 0.001, np.random.default_rng(1),
                                       origins=3)
    assert versions >= 1 and 1 <= fetches <= versions
    assert meta_999(100) * 0.5 < p999 < meta_999(100) + 1


def test_the_subset_finds_widely_held_content() -> None:
    rows = subset_hit_ratio(936, seed=1, trials=200)
    assert float(rows[-1][2]) > 0.9999  # held by 5% of nodes


def test_the_memory_scenario_runs_a_real_node_that_holds_its_peers(tmp_path: Path) -> None:
    """The harness, small: a real node serving a 3-image layout joins 5 members
    through the loopback seed and fetches and installs all 5 summaries."""
    layout = tmp_path / "layout"
    assert write_layout(layout, images=3) == 303
    figures = memory(5, layout, tmp_path)
    assert figures["members"] == 5 and figures["held"] == 5
    assert figures["filter_bytes"] > 5 * 20_000  # 5 whole filters of 21,500 keys
    assert figures["peak"] >= figures["rss"] > 0
