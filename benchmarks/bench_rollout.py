"""Batched rollout: every containerd node pulls one new image at the same moment.

The rollout case of issue 16, real and on loopback: a Debian docker-registry
holds a ~200 MB image (4 layers of 50 MiB by default) behind a counting proxy
limited to ~50 MB/s (one shared uplink). Each node is a private containerd 1.6
and, in the meshmirror run, a ``meshmirror run --store containerd`` in one
mesh. All nodes start ``ctr images pull`` at once. Nobody holds the image, so
with meshmirror each blob's owner fetches it from the upstream once and the
others read it from the owner while it downloads (`meshmirror.mirror.rollout`);
a layer of at least F x 16 MiB comes as F stripes, each from its own root.

The baseline is the same batch on fresh containerds whose hosts dir holds only
the upstream ``server``: every node fetches the whole image over the shared,
rate-limited link. Rounds alternate the modes. Figures: bytes the upstream
served per batch as a multiple of the image (target <= 1.05x with meshmirror,
about N x without), each node's pull time in both modes, and the most peers'
readers a node served at once, a stripe's reader counting 1/F (<= --rollout-fanout).

    python -m benchmarks.bench_rollout --nodes 3 --layers 4 --layer-mib 50 --rate-mb 50
    python -m benchmarks.bench_rollout --nodes 3 --layers 2 --layer-mib 130 --rate-mb 50 \
        --rounds 2    # 8 stripes a layer

Helpers (containerd on tmpfs, starting meshmirror, ``ctr`` pulls, metrics) are
`bench_rolling_pull`'s.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.bench_rolling_pull import (
    MeshNode,
    configure_hosts,
    containerd_on_tmpfs,
    label_totals,
    pull,
    start_meshmirror,
)
from benchmarks.results import BenchRun, Section, Table, Target, load_since, utc_now
from meshmirror.oci.imagebuilder import BuiltImage, build_image
from meshmirror.routing.owner import DEFAULT_FANOUT
from tests.support.distribution import DistributionRegistry
from tests.support.processes import stop, wait_until
from tests.support.proxy import CountingProxy
from tests.support.skopeo import push_layout

REPOSITORY = "bench/rollout"
TAG = "1"


@dataclass
class BatchFigures:
    """One batched pull: per-node seconds, upstream bytes, and each mirror's metrics."""

    label: str
    seconds: list[float] = field(default_factory=list)
    upstream_bytes: int = 0
    metrics: list[dict[str, float]] = field(default_factory=list)

    def readers_peak(self) -> list[float]:
        return [m.get("meshmirror_rollout_readers_peak{}", 0.0) for m in self.metrics]

    def fetched_by_mirrors(self) -> float:
        return sum(m.get("meshmirror_rollout_upstream_bytes_total{}", 0.0)
                   for m in self.metrics)


def batch_run(args: argparse.Namespace, scratch: Path, proxy: CountingProxy,
              image: BuiltImage, *, mesh: bool) -> BatchFigures:
    figures = BatchFigures("meshmirror" if mesh else "baseline")
    run_dir = scratch / figures.label
    run_dir.mkdir()
    with ExitStack() as stack:
        ctrds = [stack.enter_context(containerd_on_tmpfs(run_dir, f"node{i}"))
                 for i in range(args.nodes)]
        nodes: list[MeshNode] = []
        if mesh:
            for i, ctrd in enumerate(ctrds):
                # Its hosts.toml (written below) says which registry it mirrors: without
                # it the node asks no upstream anything, and fetches nothing either.
                flags = ["--rollout-fanout", str(args.fanout),
                         "--containerd-registry-config-path", str(run_dir / f"hosts{i}")]
                node = start_meshmirror(run_dir, f"node{i}", ctrd,
                                        nodes[0].mesh if nodes else None, flags)
                stack.callback(stop, node.proc)
                nodes.append(node)
            wait_until(lambda: all(n.alive_members() == args.nodes for n in nodes), 60,
                       f"{args.nodes} nodes to see each other alive")
        hosts_dirs = [run_dir / f"hosts{i}" for i in range(args.nodes)]
        for i, hosts_dir in enumerate(hosts_dirs):
            configure_hosts(hosts_dir, proxy.url, nodes[i].registry if mesh else None)
        proxy.reset()
        with ThreadPoolExecutor(args.nodes) as pool:
            pulls = [pool.submit(pull, ctrd, hosts_dirs[i], image)
                     for i, ctrd in enumerate(ctrds)]
            figures.seconds = [future.result()[0] for future in pulls]
        figures.upstream_bytes = proxy.bytes_to_clients
        figures.metrics = [n.scrape() for n in nodes]
        print(f"{figures.label}: " + ", ".join(f"{s:.2f} s" for s in figures.seconds)
              + f"; {figures.upstream_bytes / 1e6:.1f} MB from upstream", flush=True)
    return figures


def mirror_results(metrics: dict[str, float]) -> str:
    """``hit 5, miss 2; peer failures: broken 1``, leaving out what never happened."""
    parts = []
    for prefix, label, title in (("meshmirror_mirror_outcomes_total", "result", ""),
                                 ("meshmirror_mirror_peer_failures_total", "reason",
                                  "peer failures: ")):
        totals = {k: v for k, v in label_totals(metrics, prefix, label).items() if v}
        if totals:
            parts.append(title + ", ".join(f"{k} {v:.0f}" for k, v in sorted(totals.items())))
    return "; ".join(parts) or "none"


def report(args: argparse.Namespace, image_bytes: int, base: list[BatchFigures],
           mesh: list[BatchFigures], load_before: str) -> Section:
    """The benchmark's block in RESULTS.md, from the rounds of each mode."""
    rows = []
    for i in range(args.nodes):
        base_s = statistics.median(run.seconds[i] for run in base)
        mesh_s = statistics.median(run.seconds[i] for run in mesh)
        rows.append((f"node{i}", f"{base_s:.2f}", f"{mesh_s:.2f}", f"{mesh_s / base_s:.2f}",
                     "/".join(f"{run.readers_peak()[i]:.0f}" for run in mesh),
                     " / ".join(mirror_results(run.metrics[i]) for run in mesh)))
    upstream_base = [run.upstream_bytes / image_bytes for run in base]
    upstream_mesh = [run.upstream_bytes / image_bytes for run in mesh]
    by_mirrors = [run.fetched_by_mirrors() / image_bytes for run in mesh]
    slowest = (statistics.median(max(run.seconds) for run in mesh)
               / statistics.median(max(run.seconds) for run in base))
    peak = max(max(run.readers_peak(), default=0.0) for run in mesh)
    command = (f"python -m benchmarks.bench_rollout --nodes {args.nodes} --layers "
               f"{args.layers} --layer-mib {args.layer_mib} --rate-mb {args.rate_mb:g} "
               f"--rounds {args.rounds} --fanout {args.fanout}")
    return Section(
        name="bench_rollout", title="Batched rollout across containerd nodes",
        command=command, date=utc_now(), load=load_since(load_before),
        setup=f"Image: {args.layers} x {args.layer_mib} MiB layers, {image_bytes / 1e6:.1f} MB "
              "in all, in docker-registry behind a counting proxy limited to "
              f"{args.rate_mb:g} MB/s shared by all connections. All {args.nodes} nodes run "
              "`ctr images pull --hosts-dir` at the same moment (containerd 1.6, root on "
              "/dev/shm, the pull includes unpacking). Baseline: hosts.toml with only the "
              "upstream `server`. meshmirror: each node's own `meshmirror run --store "
              f"containerd --rollout-fanout {args.fanout}`, all in one mesh, nobody holding "
              f"the image. {args.rounds} rounds, modes alternating on fresh containerds; times "
              "are medians, per-round figures are separated by `/`.",
        tables=[Table(("node", "baseline s", "meshmirror s", "meshmirror/baseline",
                       "peers' readers at once (max)", "mirror results"), rows)],
        notes=["Bytes from upstream per batch, as a multiple of the image: baseline "
               + ", ".join(f"{r:.2f}x" for r in upstream_base) + "; meshmirror "
               + ", ".join(f"**{r:.2f}x**" for r in upstream_mesh)
               + " (of which the mirrors' own fetches: "
               + ", ".join(f"{r:.2f}x" for r in by_mirrors) + ").",
               f"Slowest node of a batch, meshmirror against baseline: {slowest:.2f}x."],
        targets=[Target("rollout: upstream bytes per batched pull / image, worst round",
                        "<=", 1.05, max(upstream_mesh)),
                 Target("rollout: peers' readers a node served at once", "<=",
                        float(args.fanout), peak, unit=""),
                 Target("rollout: slowest node, meshmirror / baseline", "<=", 1.0, slowest)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--layer-mib", type=int, default=50)
    parser.add_argument("--rate-mb", type=float, default=50.0,
                        help="upstream rate limit in MB/s (10^6 bytes), shared")
    parser.add_argument("--rounds", type=int, default=1,
                        help="batches per mode, alternating meshmirror and baseline")
    parser.add_argument("--fanout", type=int, default=DEFAULT_FANOUT,
                        help="passed to every `meshmirror run` as --rollout-fanout")
    bench = BenchRun(parser, argv)
    args = bench.args
    if args.nodes < 2:
        parser.error("--nodes: a batched rollout needs at least 2 nodes")
    if (min(args.layers, args.layer_mib, args.rounds, args.fanout) < 1
            or args.rate_mb <= 0):
        parser.error("--layers, --layer-mib, --rounds and --fanout must be >= 1 and "
                     "--rate-mb > 0")

    scratch_root = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    base: list[BatchFigures] = []
    mesh: list[BatchFigures] = []
    with tempfile.TemporaryDirectory(prefix="bench-rollout-", dir=scratch_root) as tmp, \
            DistributionRegistry() as upstream:
        scratch = Path(tmp)
        proxy = CountingProxy(upstream.host, upstream.port, rate=args.rate_mb * 1e6)
        image = build_image(f"{proxy.address}/{REPOSITORY}:{TAG}", scratch / "layout",
                            [args.layer_mib << 20] * args.layers, seed=23)
        image_bytes = sum(blob.size for blob in image.blobs())
        push_layout(image.layout, TAG, upstream.address, REPOSITORY, timeout=600)
        shutil.rmtree(image.layout)
        with proxy:
            for round_no in range(args.rounds):
                order = (True, False) if round_no % 2 == 0 else (False, True)
                for with_mesh in order:
                    run_dir = scratch / f"round{round_no}"
                    run_dir.mkdir(exist_ok=True)
                    started = time.monotonic()
                    figures = batch_run(args, run_dir, proxy, image, mesh=with_mesh)
                    print(f"  ({time.monotonic() - started:.1f} s with setup)", flush=True)
                    (mesh if with_mesh else base).append(figures)
    section = report(args, image_bytes, base, mesh, bench.load_before)
    bench.publish(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
