"""A rollout's summary traffic at 100, 1,000 and 5,000 nodes: whole filters against deltas.

    python -m benchmarks.summary_sim [--seed 1] [--no-write]

A model, not a packet simulation (the mesh simulator takes 220 CPU s at 1,000
nodes and grows as N^2 in push-pull). What drives it:

* gossip: the time for a node's new epoch to reach a peer is uniform between
  0 and T(N), the mesh simulator's 99.9% metadata convergence (RESULTS.md,
  mesh_sim: 0.62 s at 100, 0.89 s at 1,000), log-linear in N beyond;
  membership bytes per node are the simulator's steady-state UDP + TCP rates
  (TCP push-pull grows with N, extrapolated linearly) over the rollout;
* sizes: the encoded whole filter of a 21,500-key node and the delta of one
  pulled image, as the code encodes them (bench_summary_scale), plus 300 bytes
  of HTTP request and response headers per fetch;
* serving: a node answers its peers' fetches one at a time, each costing
  ``--serve-ms`` (1 ms: a small Python response) plus its bytes at 1 Gbit/s;
* the workload: every node pulls the same 8-layer image at a uniform time in
  the minute, its 11 keys arriving over 3 s; the publisher's 150 ms debounce
  makes versions of them;
* fetching as the directory does: a holder has one fetch at a time, and
  versions published while it waits are picked up by that one fetch;
* who holds whom: before this change every node held every peer (H = N - 1);
  now each holds those that fit 20 MiB (H = 780 at 21,500 keys a peer), so a
  node is fetched by about H peers.

Figures per node per rollout: summary bytes in and out (a node fetches as much
as it serves, on average), membership bytes, and the 99.9th percentile of the
time from a version's publication until a holder has installed it.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import heapq
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.bench_summary_scale import PEER_KEYS, delta_size
from benchmarks.results import (
    BenchRun,
    Section,
    Table,
    Target,
    load_since,
    utc_now,
)
from meshmirror.routing.directory import SUMMARY_BUDGET_BYTES

HERE = Path(__file__).resolve().parent
PLOT = HERE / "summary_rollout.png"
SIZES = (100, 1_000, 5_000)
# mesh_sim (RESULTS.md): 99.9% metadata convergence, and steady-state bytes per node per s.
META_999 = {100: 0.62, 1_000: 0.89}
UDP_BPS = 83.0
TCP_BPS = {100: 156.0, 1_000: 817.0}
HTTP_OVERHEAD = 300
ROLLOUT_S = 60.0
PULL_S = 3.0
IMAGE_KEYS = 11
DEBOUNCE_S = 0.15
LINK_BPS = 1e9 / 8


def meta_999(n: int) -> float:
    """Log-linear through the simulator's two sizes."""
    slope = (META_999[1_000] - META_999[100]) / math.log(10)
    return META_999[100] + slope * math.log(n / 100)


def tcp_bps(n: int) -> float:
    slope = (TCP_BPS[1_000] - TCP_BPS[100]) / 900
    return TCP_BPS[100] + slope * (n - 100)


@dataclass(frozen=True)
class Run:
    n: int
    scheme: str
    held: int
    versions: float
    fetches: float  # per holder: versions coalesce while a fetch is queued
    bytes_per_node: float
    membership_bytes: float
    p999_s: float


def versions_of(rng: np.random.Generator) -> list[float]:
    """Publication times of one node's versions for its pull (debounced)."""
    start = rng.uniform(0, ROLLOUT_S)
    arrivals = np.sort(start + rng.uniform(0, PULL_S, IMAGE_KEYS))
    out: list[float] = []
    window_end = -1.0
    for t in arrivals:
        if t > window_end:
            window_end = t + DEBOUNCE_S
            out.append(window_end)
    return out


def simulate(n: int, held: int, body: int, serve_s: float, rng: np.random.Generator,
             origins: int = 40) -> tuple[float, float, float]:
    """(versions per node, fetches per holder per node, p99.9 install delay) over
    ``origins`` sampled nodes.

    As the directory fetches: a holder has at most one fetch queued at the origin;
    learning a newer epoch meanwhile asks nothing more, since the fetch, when
    served, returns the version current then. The origin serves its queue in order.
    """
    delays: list[float] = []
    versions = fetches = 0
    cost = serve_s + (body + HTTP_OVERHEAD) / LINK_BPS
    t999 = meta_999(n)
    for _ in range(origins):
        published = versions_of(rng)
        versions += len(published)
        learn = [(t + d, h) for t in published
                 for h, d in enumerate(rng.uniform(0, t999, held))]
        heapq.heapify(learn)
        queued = np.zeros(held, dtype=bool)
        installed = np.full(held, -1)  # index of the version each holder holds
        waiting: collections.deque[int] = collections.deque()
        free_at = 0.0
        while learn or waiting:
            if waiting and (not learn or max(free_at, 0.0) <= learn[0][0]):
                holder = waiting.popleft()
                done = free_at + cost
                free_at = done
                queued[holder] = False
                fetches += 1
                current = bisect.bisect_right(published, done - cost) - 1
                for v in range(installed[holder] + 1, current + 1):
                    delays.append(done - published[v])
                installed[holder] = max(installed[holder], current)
                continue
            at, holder = heapq.heappop(learn)
            if not waiting:
                free_at = max(free_at, at)
            version = bisect.bisect_right(published, at) - 1
            if not queued[holder] and installed[holder] < version:
                queued[holder] = True
                waiting.append(holder)
    return versions / origins, fetches / origins / held, float(np.quantile(delays, 0.999))


def plot(runs: list[Run], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for scheme in dict.fromkeys(r.scheme for r in runs):
        mine = [r for r in runs if r.scheme == scheme]
        left.plot([r.n for r in mine], [r.bytes_per_node / 2**20 for r in mine], "o-",
                  label=scheme)
        right.plot([r.n for r in mine], [r.p999_s for r in mine], "o-", label=scheme)
    left.plot(SIZES, [r.membership_bytes / 2**20 for r in runs if r.scheme == runs[0].scheme],
              "k--", label="membership (gossip)")
    for ax, title in ((left, "summary MiB in (= out) per node per rollout"),
                      (right, "p99.9 s from publication to installed")):
        ax.set_xscale("log")
        ax.set_xlabel("nodes")
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
    left.set_yscale("log")
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--serve-ms", type=float, default=1.0)
    bench = BenchRun(parser, argv)
    args = bench.args
    rng = np.random.default_rng(args.seed)
    full, delta = delta_size()
    budget_held = SUMMARY_BUDGET_BYTES // (full - 40)
    serve_s = args.serve_ms / 1000
    runs: list[Run] = []
    for n in SIZES:
        membership = (UDP_BPS + tcp_bps(n)) * ROLLOUT_S
        subset = f"{SUMMARY_BUDGET_BYTES >> 20} MiB subset"
        for scheme, held, body in (("whole filters, every peer held (before)", n - 1, full),
                                   (f"whole filters, {subset}", min(n - 1, budget_held), full),
                                   (f"deltas, {subset}", min(n - 1, budget_held), delta)):
            versions, fetches, p999 = simulate(n, held, body, serve_s, rng)
            runs.append(Run(n, scheme, held, versions, fetches,
                            fetches * held * (body + HTTP_OVERHEAD), membership, p999))
            print(runs[-1], flush=True)
    drew = plot(runs, PLOT)
    rows = [(f"{r.n:,}", r.scheme, f"{r.held:,}", f"{r.versions:.1f}", f"{r.fetches:.1f}",
             f"{r.bytes_per_node / 2**20:,.2f} MiB", f"{r.membership_bytes / 2**20:.2f} MiB",
             f"{r.p999_s:.2f} s") for r in runs]
    deltas = {r.n: r for r in runs if r.scheme.startswith("deltas")}
    section = Section(
        name="summary_sim", title="A rollout's summary traffic at 5,000 nodes (model)",
        command=f"python -m benchmarks.summary_sim --seed {args.seed} --serve-ms "
                f"{args.serve_ms:g}",
        date=utc_now(), load=load_since(bench.load_before),
        setup=(f"Model driven by the mesh simulator's convergence and traffic figures and the "
               f"encoded sizes (see the script's docstring): every node pulls one 8-layer "
               f"image in the same minute; whole filter {full:,} bytes ({PEER_KEYS:,} keys), "
               f"delta {delta} bytes, +{HTTP_OVERHEAD} bytes of HTTP each; a node serves "
               f"one fetch at a time at {args.serve_ms:g} ms + 1 Gbit/s. Bytes are per node "
               "per rollout, in and out alike:"),
        tables=[Table(("N", "summaries", "peers held", "versions per node",
                       "fetches per holder",
                       "summary bytes in = out", "membership bytes", "p99.9 published to "
                       "installed"), rows)],
        notes=[f"Gossip delay to each peer uniform up to the 99.9% metadata convergence: "
               f"{meta_999(100):.2f} s at 100, {meta_999(1000):.2f} s at 1,000 (simulated), "
               f"{meta_999(5000):.2f} s at 5,000 (extrapolated log-linearly).",
               "Not simulated packet by packet at 5,000 nodes: the model takes the gossip "
               "layer's figures from the 100- and 1,000-node simulations.",
               "Plot: `benchmarks/summary_rollout.png`." if drew else "No plot: matplotlib "
               "is not installed."],
        targets=[Target("delta summary bytes per node, 5,000 vs 1,000 nodes", "<=", 2,
                        deltas[5_000].bytes_per_node / deltas[1_000].bytes_per_node),
                 Target("p99.9 published to installed at 1,000 nodes, deltas", "<=", 2,
                        deltas[1_000].p999_s, " s")])
    bench.publish(section)


if __name__ == "__main__":
    main()
