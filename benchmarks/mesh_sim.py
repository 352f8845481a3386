"""Membership at 50 to 1,000 nodes on the simulator, against memberlist's and Serf's numbers.

Runs the real sans-IO core (memberlist LAN defaults) for every node on one
virtual clock, packets encoded by the real wire codec, over a LAN model (0.5 ms
+ up to 0.5 ms one-way). For each cluster size N it measures:

- join: a new node joins through one seed; time until 99.9% of nodes know it;
- metadata: one node changes its metadata; time until 99.9% of nodes see it;
- crash (kill -9): time until the first node and until every node declares it
  dead, over several crashes, plus per-observer p50/p99;
- false deaths over 60 virtual seconds at 10% packet loss;
- messages and bytes per node per second, UDP and TCP (push-pull) apart.

References (published, not re-measured here): memberlist kill -9 at 100 nodes
on real sockets with LAN defaults: detection p50 9.86 s, p99 11.98 s, no false
deaths, slowest node 0.38 s behind the first at the median; Serf's convergence
model: 99.9% of 100 nodes in ~1.6 s, of 1,000 in ~2.0 s (200 ms gossip, fanout
3), ~328 kbit/s per node.

Packets are sent uncompressed by default (``--compress`` turns memberlist's LZW
on): Python LZW on every packet would make 1,000 nodes take an hour, and the
messages here are small enough that compression rarely wins anyway.

Usage: python benchmarks/mesh_sim.py [--sizes 50,100,200,1000] [--seed 1]
       [--no-write] [--compress]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run as a script: `benchmarks` is then importable

from benchmarks.results import (  # noqa: E402
    BenchRun,
    Section,
    Table,
    cluster_sizes,
    load_since,
    utc_now,
)
from meshmirror.mesh.config import MeshConfig  # noqa: E402
from meshmirror.mesh.events import Effect, MemberJoined, MemberLeft, MemberUpdated  # noqa: E402
from meshmirror.mesh.simulator import NetworkModel, Simulator  # noqa: E402

PLOT = HERE / "mesh_convergence.png"

MEMBERLIST_P50, MEMBERLIST_P99, MEMBERLIST_TRAIL = 9.86, 11.98, 0.38
SERF_999 = {100: 1.6, 1000: 2.0}
SERF_KBITS = 328.0


@dataclass
class SizeResult:
    n: int
    join_999: float = math.nan
    meta_999: float = math.nan
    crash_first: list[float] = field(default_factory=list)
    crash_all: list[float] = field(default_factory=list)
    crash_observer: list[float] = field(default_factory=list)
    false_deaths_lan: int = 0
    false_deaths_loss: int = 0
    false_victims_loss: int = 0
    suspicions_loss: int = 0
    refutations_loss: int = 0
    udp_msgs_per_node_s: float = 0.0
    udp_bytes_per_node_s: float = 0.0
    tcp_bytes_per_node_s: float = 0.0
    cpu_seconds: float = 0.0


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[idx]


def _time_to_fraction(times: list[float], population: int, fraction: float = 0.999) -> float:
    need = math.ceil(fraction * population)
    if len(times) < need:
        return math.nan
    return sorted(times)[need - 1]


def run_lan(n: int, cfg: MeshConfig, seed: int, crashes: int) -> SizeResult:
    """Join, metadata change and crashes on a loss-free LAN."""
    res = SizeResult(n)
    sim = Simulator(cfg, seed=seed, network=NetworkModel())
    names = sim.bootstrap(n)
    events: list[tuple[float, str, Effect]] = []
    sim.observe(lambda t, who, e: events.append((t, who, e)))

    # Steady-state traffic: probes and the odd push-pull, nothing to gossip.
    sim.run_until(1.0)
    before = (sim.traffic.packets, sim.traffic.bytes, sim.traffic.stream_bytes)
    sim.run_until(6.0)
    span = 5.0 * n
    res.udp_msgs_per_node_s = (sim.traffic.packets - before[0]) / span
    res.udp_bytes_per_node_s = (sim.traffic.bytes - before[1]) / span
    res.tcp_bytes_per_node_s = (sim.traffic.stream_bytes - before[2]) / span

    t_join = sim.now
    sim.add_node("joiner")
    sim.act("joiner", lambda core, now: core.join([sim.nodes[names[0]].addr], now))
    sim.run_until(t_join + 10.0)
    seen = {who: t for t, who, e in reversed(events)
            if isinstance(e, MemberJoined) and e.node.name == "joiner" and who != "joiner"}
    res.join_999 = _time_to_fraction([t - t_join for t in seen.values()], n)

    t_meta = sim.now
    sim.act(names[1], lambda core, now: core.update_meta(b"epoch=2", now))
    sim.run_until(t_meta + 10.0)
    seen = {who: t for t, who, e in reversed(events)
            if isinstance(e, MemberUpdated) and e.node.name == names[1]
            and e.node.meta == b"epoch=2" and who != names[1]}
    res.meta_999 = _time_to_fraction([t - t_meta for t in seen.values()], n)

    victims = names[2:2 + crashes]
    for victim in victims:
        t_crash = sim.now
        sim.crash(victim)
        live = {name for name, node in sim.nodes.items() if node.up}
        deadline = t_crash + 90.0
        while sim.now < deadline:
            sim.run_until(sim.now + 2.0)
            seen = {who: t for t, who, e in events if t >= t_crash and isinstance(e, MemberLeft)
                    and e.dead and e.node.name == victim}
            if live <= set(seen):
                break
        detections = sorted(t - t_crash for who, t in seen.items() if who in live)
        if detections:
            res.crash_first.append(detections[0])
            res.crash_observer.extend(detections)
            if len(detections) == len(live):
                res.crash_all.append(detections[-1])
        sim.run_until(sim.now + 5.0)  # let the news settle before the next crash

    crashed = set(victims)
    res.false_deaths_lan = sum(1 for _, _, e in events
                               if isinstance(e, MemberLeft) and e.dead
                               and e.node.name not in crashed)
    return res


def run_loss(res: SizeResult, cfg: MeshConfig, seed: int, seconds: float = 60.0) -> None:
    """No crash at all, 10% of packets lost: every death is a false one."""
    sim = Simulator(cfg, seed=seed + 1000, network=NetworkModel(loss=0.10))
    sim.bootstrap(res.n)
    victims: set[str] = set()
    deaths = 0

    def watch(_t: float, _who: str, e: Effect) -> None:
        nonlocal deaths
        if isinstance(e, MemberLeft) and e.dead:
            deaths += 1
            victims.add(e.node.name)

    sim.observe(watch)
    sim.run_until(seconds)
    res.false_deaths_loss = deaths
    res.false_victims_loss = len(victims)
    res.suspicions_loss = sum(node.core.stats.suspicions for node in sim.nodes.values())
    res.refutations_loss = sum(node.core.stats.refutations for node in sim.nodes.values())


def _fmt(x: float, digits: int = 2) -> str:
    return "n/a" if math.isnan(x) else f"{x:.{digits}f}"


def table(results: list[SizeResult]) -> Table:
    header = ("N", "join 99.9% (s)", "meta 99.9% (s)", "crash: first (s, median)",
              "crash: every node (s, median)", "per-observer p50 / p99 (s)", "false deaths LAN",
              "false deaths @10% loss (victims)", "suspicions / refutations @10%",
              "UDP msgs/node/s", "UDP B/node/s", "TCP B/node/s", "CPU s")
    rows = []
    for r in results:
        first = statistics.median(r.crash_first) if r.crash_first else math.nan
        every = statistics.median(r.crash_all) if r.crash_all else math.nan
        rows.append((
            str(r.n), _fmt(r.join_999), _fmt(r.meta_999), _fmt(first), _fmt(every),
            f"{_fmt(_quantile(r.crash_observer, 0.5))} / "
            f"{_fmt(_quantile(r.crash_observer, 0.99))}", str(r.false_deaths_lan),
            f"{r.false_deaths_loss} ({r.false_victims_loss})",
            f"{r.suspicions_loss} / {r.refutations_loss}", f"{r.udp_msgs_per_node_s:.1f}",
            f"{r.udp_bytes_per_node_s:.0f}", f"{r.tcp_bytes_per_node_s:.0f}",
            f"{r.cpu_seconds:.0f}"))
    return Table(header, rows)


def comparison(results: list[SizeResult]) -> list[str]:
    out: list[str] = []
    by_n = {r.n: r for r in results}
    if 100 in by_n and by_n[100].crash_observer:
        r = by_n[100]
        p50 = _quantile(r.crash_observer, 0.5)
        p99 = _quantile(r.crash_observer, 0.99)
        trail = statistics.median(a - f for a, f in zip(r.crash_all, r.crash_first, strict=False))
        out.append(
            f"kill -9 at 100 nodes: per-observer detection p50 {p50:.2f} s "
            f"({p50 / MEMBERLIST_P50:.2f}x memberlist's 9.86 s), p99 {p99:.2f} s "
            f"({p99 / MEMBERLIST_P99:.2f}x its 11.98 s); slowest node trails the first by "
            f"{trail:.2f} s at the median (memberlist: 0.38 s).")
    for n, ref in SERF_999.items():
        if n in by_n:
            r = by_n[n]
            out.append(f"99.9% of {n} nodes know of a join in {_fmt(r.join_999)} s, of a "
                       f"metadata change in {_fmt(r.meta_999)} s (Serf's model: ~{ref} s; "
                       f"ratio {r.join_999 / ref:.2f} / {r.meta_999 / ref:.2f}).")
    for r in results:
        kbits = r.udp_bytes_per_node_s * 8 / 1000
        out.append(f"N={r.n}: {kbits:.1f} kbit/s UDP + "
                   f"{r.tcp_bytes_per_node_s * 8 / 1000:.1f} kbit/s TCP per node in steady "
                   f"state (Serf's worst-case budget ~{SERF_KBITS:.0f} kbit/s: "
                   f"{kbits / SERF_KBITS:.3f}x).")
    return out


def plot(results: list[SizeResult], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return False
    ns = [r.n for r in results]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(ns, [r.join_999 for r in results], "o-", label="join, 99.9% of nodes")
    ax.plot(ns, [r.meta_999 for r in results], "s-", label="metadata change, 99.9% of nodes")
    ax.plot(ns, [statistics.median(r.crash_first) if r.crash_first else math.nan
                 for r in results], "^--", label="crash: first node declares dead")
    ax.plot(list(SERF_999), list(SERF_999.values()), "kx", markersize=10,
            label="Serf convergence model (99.9%)")
    ax.plot([100], [MEMBERLIST_P50], "r*", markersize=12,
            label="memberlist kill -9 detection p50, 100 nodes")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("cluster size N")
    ax.set_ylabel("seconds")
    ax.set_title("meshmirror mesh, simulated (memberlist LAN defaults)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=cluster_sizes(least=3), default="50,100,200,1000")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--compress", action="store_true")
    bench = BenchRun(parser, argv)
    args = bench.args
    cfg = MeshConfig(enable_compression=args.compress)
    results: list[SizeResult] = []
    for n in args.sizes:
        start = time.process_time()
        res = run_lan(n, cfg, args.seed, crashes=2 if n >= 1000 else 5)
        run_loss(res, cfg, args.seed)
        res.cpu_seconds = time.process_time() - start
        results.append(res)
        print(json.dumps(asdict(res) | {"crash_observer": len(res.crash_observer)}),
              flush=True)
    command = "python benchmarks/mesh_sim.py " + " ".join(argv if argv is not None
                                                          else sys.argv[1:])
    section = Section(
        name="mesh_sim", title="Mesh membership, simulated",
        command=command.strip(), date=utc_now(), load=load_since(bench.load_before),
        setup=f"Seed {args.seed}, memberlist LAN defaults, LAN model 0.5-1 ms one way, packets "
              f"{'LZW-compressed' if args.compress else 'uncompressed'}; crash rows over 2 "
              "crashes at N=1000, 5 below; false deaths over 60 virtual s at 10% loss. Times "
              "are virtual, so the load changes only the CPU column.",
        tables=[table(results)],
        notes=[*comparison(results), f"Plot: `benchmarks/{PLOT.name}`."])
    bench.publish(section)
    if bench.writes:
        plot(results, args.results.with_name(PLOT.name))  # beside the results it illustrates
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
