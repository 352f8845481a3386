"""bench_hostile's section from made-up runs: ratios against the baseline and the targets
it reports (the benchmark itself takes minutes, so it is not run here)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.bench_hostile import Latencies, Run, section
from benchmarks.results import write_section
from tests.benchmarks.helpers import assert_only_block_changed, copy_of_results


def _run(name: str, seconds: float) -> Run:
    return Run(name, f"{name} attack", Latencies([seconds] * 10, [seconds / 2] * 10, 0), 5.0)


def test_latencies_are_reported_as_ratios_of_the_baseline(tmp_path: Path) -> None:
    result = section([_run("baseline", 0.01), _run("storm", 0.02), _run("unread", 0.05)],
                     1.0, "(1/5/15 min) 0 / 0 / 0")
    rendered = result.render()
    assert "(2.00x / 2.00x)" in rendered and "(5.00x / 5.00x)" in rendered
    met = {t.what: t.met for t in result.targets}
    assert met["hostile storm: honest v2 p50 vs no attack"]
    assert not met["hostile unread: honest v2 p50 vs no attack"]
    assert met["hostile storm: worst honest v2"]  # 0.02 s within 2 s
    results = copy_of_results(tmp_path)
    before = results.read_text()
    write_section(result, results)
    if "<!-- BEGIN bench_hostile -->" in before:
        assert_only_block_changed(before, results.read_text(), "bench_hostile")
