"""Each benchmark's "write results" path, on a scratch copy of RESULTS.md.

Long benchmarks are given fake figures and their section builder is written as their
``main`` writes it; the quick ones (router, store read, simulator) run for real at a
tiny size with ``--results`` pointing at the copy.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import pytest

from benchmarks import (
    bench_burst,
    bench_containerd,
    bench_hosts_fallback,
    bench_peer_hop,
    bench_registry,
    bench_rolling_pull,
    bench_router,
    bench_store_read,
    bench_tag_resolution,
    bench_upstream_resolve,
    mesh_sim,
    mesh_vs_kinship,
)
from benchmarks.results import TARGETS, Section, write_section
from tests.benchmarks.helpers import assert_only_block_changed, block, copy_of_results

LOAD = "0.10 / 0.20 / 0.30"


def _write(tmp_path: Path, section: Section) -> str:
    """Write ``section`` into a copy of RESULTS.md; check it touched only its own block."""
    results = copy_of_results(tmp_path)
    before = results.read_text()
    write_section(section, results)
    after = results.read_text()
    assert_only_block_changed(before, after, section.name)
    return block(after, section.name)


def test_peer_hop(tmp_path: Path) -> None:
    hop = bench_peer_hop
    rates = {hop.DISTRIBUTION: [1.6e9], hop.CACHE: [0.7e9], hop.LOCAL: [1.8e9], hop.HOP: [0.8e9]}
    cpu: dict[str, list[list[float]]] = {hop.DISTRIBUTION: [[]], hop.CACHE: [[]],
                                         hop.LOCAL: [[0.5]], hop.HOP: [[0.5, 1.9]]}
    text = _write(tmp_path, hop.section([hop.Figures(512, rates, cpu)], 5, LOAD))
    assert "| peer hop | 0.80 | 0.50 | 1.14 | 0.50 + 1.90 |" in text
    assert "| distribution | 1.60 | 1.00 | 2.29 | - |" in text
    assert "| peer hop / pull-through cache, 512 MiB | >= 1x | 1.14x | yes |" in text
    assert "--size-mib 512 --rounds 5`" in text
    assert f"{LOAD} before" in text


@pytest.mark.real
def test_burst_runs_small_and_writes_its_block(tmp_path: Path) -> None:
    result = bench_burst.run(clients=5, size_mib=2)
    assert (result.served, result.peer_fetches) == (5, 1)
    text = _write(tmp_path, bench_burst.section(result, LOAD))
    assert "| served whole and verified | 5/5 |" in text
    assert "| burst: peer fetches of one blob | <= 1 | 1.00 | yes |" in text


def test_rolling_pull(tmp_path: Path) -> None:
    args = argparse.Namespace(nodes=2, layers=4, layer_mib=50, rate_mb=50.0, rounds=1,
                              mirror_resolve_timeout=None, mirror_spool_limit="0",
                              sample_spool=True)
    image = 200_000_000
    ideal = bench_rolling_pull.PullFigures("ideal", [2.0, 2.5], [1.5, 1.6], [0.0, 0.0],
                                           [0, 0], [{}, {}])
    base = bench_rolling_pull.PullFigures("baseline", [5.0, 5.2], [4.0, 4.1], [0.0, 0.0],
                                          [image, image], [{}, {}])
    hit = {"meshmirror_mirror_outcomes_total{kind=blob,result=hit}": 8.0}
    mesh = bench_rolling_pull.PullFigures("meshmirror", [5.1, 3.0], [4.0, 2.0], [0.0, 0.02],
                                          [image, 1000], [{}, hit], [2**27, 2**27],
                                          [2**27, 2**28])
    runs = {"ideal": [ideal], "baseline": [base], "meshmirror": [mesh]}
    text = _write(tmp_path, bench_rolling_pull.report(args, image, runs, LOAD))
    assert "--rounds 1 --mirror-spool-limit 0 --sample-spool`" in text
    assert ("| node1 | 2.50 (1.60) | 5.20 (4.10) | 200 | 3.00 (2.00) | 0 | 0.58 (0.49) "
            "| 1.20 (1.25) | 0.02 | hit 8 |") in text
    assert "| <= 1.01x | 1.00x | yes |" in text
    assert "whole pull, median round | <= 1.1x | 1.20x | **no** |" in text
    assert "node0 128/128; node1 128/256" in text


def test_registry(tmp_path: Path) -> None:
    args = argparse.Namespace(rounds=5, size_mib=512, heads=200)
    section = bench_registry.section(args, {"meshmirror": 1.5e9, "distribution": 1.0e9},
                                     {"meshmirror": (0.1, 0.3), "distribution": (0.2, 0.1)},
                                     LOAD)
    text = _write(tmp_path, section)
    assert "| meshmirror | 1.50 | 100 | 300 |" in text
    assert "| blob GB/s, meshmirror / Distribution | >= 0.9x | 1.50x | yes |" in text
    assert "| manifest HEAD p99, meshmirror / Distribution | <= 2x | 3.00x | **no** |" in text


def test_containerd(tmp_path: Path) -> None:
    args = argparse.Namespace(images=10, layers=2, events=3, big_mib=4, rounds=1, tmpfs=True)
    figures = bench_containerd.Figures(10, 50, 1.0, 2.0, 0.5, 0.6, 5.0, [0.01, 0.02, 1.5],
                                       [0.04, 0.05, 0.06], 4, 1.2e9, 0.3e9)
    text = _write(tmp_path, bench_containerd.section(args, figures, LOAD))
    assert "| baseline: one content `Info` RPC per blob (40 RPCs) | 5.00 s, 10.0x" in text
    assert "| image event -> KeyEvent, slowest of the imports | <= 1 s | 1.50 s | **no** |" in text


def test_hosts_fallback(tmp_path: Path) -> None:
    figures = {bench_hosts_fallback.BASELINE: 0.5, "refused mirror": 0.6}
    text = _write(tmp_path, bench_hosts_fallback.section(3, False, figures, LOAD))
    assert "--rounds 3`" in text and "| refused mirror | 0.600 | 1.20 |" in text


def test_tag_resolution(tmp_path: Path) -> None:
    times = {bench_tag_resolution.PEERS: [0.0005, 0.0005, 0.0005],
             bench_tag_resolution.UPSTREAM_FIRST: [0.002, 0.002, 0.002],
             bench_tag_resolution.PLAIN_HEAD: [0.0015, 0.0015, 0.0015]}
    figures = bench_tag_resolution.Figures(times, 0, 3)
    text = _write(tmp_path, bench_tag_resolution.section(3, figures, LOAD))
    assert "| upstream-first | 2.00 |" in text and "| plain HEAD to the upstream | 1.50 |" in text
    assert "upstream requests per upstream-first lookup: 1.00; connections opened" in text
    assert "why the 3x target is missed" in text
    assert "| upstream-first tag lookup / peers-only | <= 3x | 4.00x | **no** |" in text
    assert "| upstream-first added time / one plain HEAD to the upstream | <= 1.2x | 1.00x |" \
        in text


def test_upstream_resolve(tmp_path: Path) -> None:
    times = {bench_upstream_resolve.BASELINE: [0.0010, 0.0012, 0.0014],
             bench_upstream_resolve.WARM: [0.0011, 0.0013, 0.0020],
             "open breaker (resolve_tag, no request)": [2e-5, 3e-5, 4e-5]}
    text = _write(tmp_path, bench_upstream_resolve.section(7, times, LOAD))
    assert "--rounds 7`" in text and LOAD in text
    assert "| baseline (HEAD, token in hand) | 1.200 |" in text
    assert "| open breaker (resolve_tag, no request) | 0.030 |" in text
    assert "| warm upstream tag resolution / plain HEAD with a token | <= 1.5x | 1.08x | yes |" \
        in text


def test_mesh_vs_kinship(tmp_path: Path) -> None:
    mesh = mesh_vs_kinship.ImplResult("meshmirror", 5, 0.2, [6.0], [7.0])
    kin = mesh_vs_kinship.ImplResult("kinship", 5, 0.1, [6.0], [7.0], notes=["late"])
    text = _write(tmp_path, mesh_vs_kinship.report(mesh, kin, "python x", LOAD))
    assert "| join convergence (s) | 0.20 | 0.10 | 2.00 |" in text and "kinship notes: late" in text


def test_router_runs_small_and_writes_its_block(tmp_path: Path) -> None:
    results = copy_of_results(tmp_path)
    before = results.read_text()
    bench_router.main(["--peers", "5", "--lookups", "20", "--baseline-lookups", "5",
                       "--results", str(results)])
    after = results.read_text()
    assert_only_block_changed(before, after, "bench_router")
    assert "lookup p99 at 5 peers" in block(after, "bench_router")
    assert "lookup p99 at 5 peers" in block(after, TARGETS)


def test_store_read_runs_small_and_writes_its_block(tmp_path: Path) -> None:
    results = copy_of_results(tmp_path)
    before = results.read_text()
    asyncio.run(bench_store_read.main(["--size-mib", "4", "--rounds", "1",
                                       "--results", str(results)]))
    after = results.read_text()
    assert_only_block_changed(before, after, "bench_store_read")
    assert "--size-mib 4 --rounds 1`" in block(after, "bench_store_read")


def test_mesh_sim_runs_small_and_writes_its_block_and_plot(tmp_path: Path) -> None:
    results = copy_of_results(tmp_path)
    before = results.read_text()
    assert mesh_sim.main(["--sizes", "8", "--results", str(results)]) == 0
    after = results.read_text()
    assert_only_block_changed(before, after, "mesh_sim")
    assert "| 8 |" in block(after, "mesh_sim")
    assert (tmp_path / mesh_sim.PLOT.name).exists() == _has_matplotlib()


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
