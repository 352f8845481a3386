"""bench_hostile's section from made-up runs: ratios against the baseline and the targets
it reports (the benchmark itself takes minutes, so it is not run here), and its CPU
pinning flags: the attack process on the attacker CPUs, bad lists a usage error."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path
from typing import Any

import pytest

from benchmarks.bench_hostile import (
    Latencies,
    Pinning,
    Run,
    cpu_set,
    main,
    on_cpus,
    pinned,
    section,
)
from benchmarks.results import write_section
from tests.benchmarks.helpers import assert_only_block_changed, copy_of_results


def _run(name: str, seconds: float) -> Run:
    return Run(name, f"{name} attack", Latencies([seconds] * 10, [seconds / 2] * 10, 0), 5.0)


def test_latencies_are_reported_as_ratios_of_the_baseline(tmp_path: Path) -> None:
    result = section([[_run("baseline", 0.01), _run("storm", 0.02), _run("unread", 0.05)]],
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


def test_pinned_runs_get_their_own_section_and_the_worst_run_holds_the_target() -> None:
    pinning = Pinning(frozenset({1}), frozenset({0}))
    trials = [[_run("baseline", 0.01), _run("storm", s)] for s in (0.02, 0.04, 0.03)]
    result = section(trials, 1.0, "(1/5/15 min) 0 / 0 / 0", pinning)
    assert result.name == "bench_hostile_pinned"
    assert "--attacker-cpus 1 --node-cpus 0 --repeat 3" in result.command
    rendered = result.render()
    assert "storm (run 2)" in rendered and "2.00x, 3.00x, 4.00x" in rendered
    met = {t.what: t for t in result.targets}
    assert met["hostile pinned storm: honest v2 p50 vs no attack"].latest == 4.0
    assert section(trials[:1], 1.0, "x").name == "bench_hostile"


def _affinity(cpus: frozenset[int] | None, out: Any) -> None:
    on_cpus(lambda: out.put(sorted(os.sched_getaffinity(0))), cpus)()


def test_an_attack_process_runs_on_the_attacker_cpus_and_the_node_side_on_its_own() -> None:
    allowed = os.sched_getaffinity(0)
    one = frozenset({min(allowed)})
    out: Any = multiprocessing.get_context("fork").Queue()
    child = multiprocessing.get_context("fork").Process(target=_affinity, args=(one, out))
    child.start()
    assert out.get(timeout=10) == sorted(one)
    child.join(10)
    with pinned(one):
        assert os.sched_getaffinity(0) == one
    assert os.sched_getaffinity(0) == allowed  # put back afterwards


@pytest.mark.parametrize("argv", [
    ["--attacker-cpus", "0"],  # without --node-cpus
    ["--attacker-cpus", "0", "--node-cpus", "0"],  # sharing a CPU
    ["--attacker-cpus", "4096", "--node-cpus", "0"],  # not a CPU this process has
    ["--attacker-cpus", "one", "--node-cpus", "0"],
    ["--repeat", "0"],
])
def test_bad_cpu_flags_are_a_usage_error(argv: list[str],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--no-write"])
    assert exited.value.code == 2
    assert "--" in capsys.readouterr().err.splitlines()[-1]


def test_cpu_lists_read_as_taskset_writes_them() -> None:
    allowed = sorted(os.sched_getaffinity(0))
    assert cpu_set(str(allowed[0])) == {allowed[0]}
    assert cpu_set(f"{allowed[0]}-{allowed[0]}") == {allowed[0]}
    assert cpu_set(",".join(map(str, allowed))) == set(allowed)


def test_a_kept_alive_client_and_the_storm_cpu_are_reported_beside_the_headline() -> None:
    def kept(name: str, seconds: float) -> Run:
        return Run(name, f"{name} attack",
                   Latencies([seconds] * 10, [seconds] * 10, 0, [seconds / 4] * 10), 5.0,
                   node_cpu=1.0 if name == "baseline" else 2.2,
                   connections=60_000 if name == "storm" else 0)

    result = section([[kept("baseline", 0.01), kept("storm", 0.04)]], 1.0,
                     "(1/5/15 min) 0 / 0 / 0", cpu=[{"storm": [20.0, 21.5]}])
    rendered = result.render()
    assert "registry, kept-alive connection" in rendered
    # 2.2 s less 1.0 s over the 60,000 connections that reached the node
    assert "(60000 storm connections reached the node, 20.0 µs each)" in rendered
    assert "20.00 µs, 21.50 µs" in rendered
    met = {t.what: t.met for t in result.targets}
    assert not met["hostile storm: honest kept-alive v2 p50 vs no attack"]  # 4x
    assert not met["hostile storm: honest v2 p50 vs no attack"]
