"""Rolling pull of one image across containerd nodes, with and without meshmirror.

Everything is real and on loopback: a Debian docker-registry holds a ~200 MB
image (4 layers of 50 MiB by default) behind a counting proxy that limits the
upstream to ~50 MB/s, like a shared uplink. Each node is a private containerd
1.6 and, in the meshmirror run, a ``meshmirror run --store containerd`` joined
into one mesh, with the hosts dir written by ``meshmirror configure`` pointing
``ctr images pull --hosts-dir`` at the node's own mirror. Nodes pull one after
another (a rolling deployment); before each pull after the first the benchmark
waits until that node's mirror resolves the tag through a peer, and records how
long that took after the previous pull ended (gossip + summary convergence).

The baseline is the same rolling pull on fresh containerds whose hosts dir
holds only the upstream ``server``: every node fetches the whole image over the
rate-limited link. The ideal is what a node after the first could hope for at
best: the same pull with the hosts dir's ``server`` pointing straight at the
Distribution on loopback, no proxy and no limit, as if the image sat in a
registry on the node itself. Rounds rotate the three modes. Figures: bytes the
upstream served (target 1.0x the image with meshmirror, against N x without) and
each node's pull time, whole and without the unpack that ctr reports separately;
nodes 2..N with meshmirror should take at most 1.1x the ideal.

    python -m benchmarks.bench_rolling_pull --nodes 3 --layer-mib 50 --layers 4 --rate-mb 50

ctr fetches inside its own process and writes through containerd's content API,
which on a busy 2-core machine ingests only ~50-80 MB/s; an upstream limit at or
above that shows in bytes rather than in seconds, so try ``--rate-mb 10`` too.

containerd roots live on /dev/shm: containerd fsyncs every blob it commits and
unpacks every layer, and the disk here is shared, so a tmpfs keeps the figures
about the network path rather than about someone else's disk writes.
"""

from __future__ import annotations

import argparse
import functools
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from benchmarks.results import (
    RESULTS,
    Section,
    Table,
    Target,
    load_average,
    load_since,
    utc_now,
    write_section,
)
from meshmirror.oci import mediatypes as mt
from meshmirror.oci.imagebuilder import BuiltImage, build_image
from tests.support.containerd import Containerd
from tests.support.distribution import DistributionRegistry
from tests.support.ports import free_port, loopback_host
from tests.support.processes import spawn, stop, wait_until
from tests.support.proxy import CountingProxy
from tests.support.skopeo import push_layout

# The three ways a rolling run pulls: through meshmirror, from the throttled upstream
# alone, and from an unthrottled Distribution on loopback (the ideal).
MESH, BASELINE, IDEAL = "meshmirror", "baseline", "ideal"
MODES = (MESH, BASELINE, IDEAL)
REPOSITORY = "bench/rolling"
TAG = "1"
# --sample-spool polls the pulling node's /metrics this often (it costs CPU, so the
# figures of a sampled run are for sizing the spool, not for the time ratios).
SAMPLE_INTERVAL = 0.05
# A pull slower than this at the configured rate means something is stuck.
PULL_TIMEOUT = 600.0


@dataclass
class PullFigures:
    """One rolling run: per-node pull seconds, waits before each pull, upstream bytes.
    ``label`` is the mode: one of `MODES`."""

    label: str
    seconds: list[float] = field(default_factory=list)
    fetch_seconds: list[float] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)
    upstream_bytes: list[int] = field(default_factory=list)
    metrics: list[dict[str, float]] = field(default_factory=list)
    # With --sample-spool: the pulling node's highest spool and cache gauges, per node.
    peak_spool: list[float] = field(default_factory=list)
    peak_cache: list[float] = field(default_factory=list)

    @property
    def total_upstream(self) -> int:
        return sum(self.upstream_bytes)


@dataclass
class MeshNode:
    """A running ``meshmirror run --store containerd`` beside its containerd."""

    name: str
    proc: subprocess.Popen[bytes]
    registry: str
    mesh: str
    metrics: str
    log: Path

    def scrape(self) -> dict[str, float]:
        """Flat ``name{labels}`` -> value of this node's Prometheus exposition."""
        with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=5) as response:
            text = response.read().decode()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{labels}}}"] = sample.value
        return out

    def alive_members(self) -> int:
        return int(self.scrape().get("meshmirror_mesh_members{state=alive}", 0))


@contextmanager
def containerd_on_tmpfs(scratch: Path, name: str) -> Iterator[Containerd]:
    """A private containerd whose root (content + snapshots) is a directory on ``scratch``."""
    ctrd = Containerd()
    try:
        root = scratch / f"{name}-root"
        root.mkdir()
        ctrd.root.symlink_to(root)
        ctrd.start()
        # `run --store containerd` refuses a namespace that does not exist yet.
        ctrd.ctr("namespaces", "create", "k8s.io")
        yield ctrd
    finally:
        ctrd.close()
        shutil.rmtree(scratch / f"{name}-root", ignore_errors=True)


def start_meshmirror(workdir: Path, name: str, ctrd: Containerd, join: str | None,
                     extra: list[str]) -> MeshNode:
    host = loopback_host()
    registry = f"{host}:{free_port(host)}"
    mesh = f"{host}:{free_port(host)}"
    metrics = f"{host}:{free_port(host)}"
    argv = [sys.executable, "-m", "meshmirror", "--log-level", "warning", "run",
            "--store", "containerd", "--containerd-sock", str(ctrd.socket),
            "--containerd-content-path", str(ctrd.content_path),
            "--containerd-config", str(ctrd.config),
            "--registry-addr", registry, "--metrics-addr", metrics, "--mesh-addr", mesh,
            "--node-name", name, *extra]
    if join is not None:
        argv += ["--join", join]
    log = workdir / f"{name}.log"
    proc = spawn(argv, log)
    node = MeshNode(name, proc, registry, mesh, metrics, log)
    try:
        wait_until(lambda: urllib.request.urlopen(f"http://{registry}/readyz", timeout=1)
                   .status == 200, 60, f"{name} to be ready (log: {log})")
    except TimeoutError:
        stop(proc)
        raise
    return node


def run_flags(args: argparse.Namespace) -> list[str]:
    """``meshmirror run`` flags the benchmark was asked to override (none by default)."""
    flags: list[str] = []
    if args.mirror_resolve_timeout is not None:
        flags += ["--mirror-resolve-timeout", str(args.mirror_resolve_timeout)]
    if args.mirror_spool_limit is not None:
        flags += ["--mirror-spool-limit", args.mirror_spool_limit]
    return flags


def configure_hosts(hosts_dir: Path, upstream_url: str, mirror: str | None) -> None:
    """``meshmirror configure`` for a node with a mirror; the bare server entry without."""
    if mirror is None:
        registry = upstream_url.removeprefix("http://")
        (hosts_dir / registry).mkdir(parents=True)
        (hosts_dir / registry / "hosts.toml").write_text(f'server = "{upstream_url}"\n')
        return
    subprocess.run([sys.executable, "-m", "meshmirror", "configure",
                    "--containerd-registry-config-path", str(hosts_dir),
                    "--mirrored-registries", upstream_url, "--mirror-targets", f"http://{mirror}"],
                   check=True, capture_output=True, timeout=60)


def mirror_resolves(node: MeshNode, image: BuiltImage) -> bool:
    """True once the node's mirror answers the tag (it can only do so through a peer)."""
    request = urllib.request.Request(
        f"http://{node.registry}/v2/{image.repository}/manifests/{image.tag}"
        f"?ns={image.registry}", method="HEAD",
        headers={"Accept": f"{mt.OCI_MANIFEST}, {mt.OCI_INDEX}"})
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def go_duration(text: str) -> float:
    """Seconds in a Go ``time.Duration`` string such as ``1m2.5s`` or ``466.56ms``."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|\u00b5s|ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a Go duration: {text!r}")
    return sum(float(number) * _GO_UNITS[unit] for number, unit in parts)


def pull(ctrd: Containerd, hosts_dir: Path, image: BuiltImage) -> tuple[float, float]:
    """(whole pull, fetch part) in seconds; the fetch part is the pull minus the unpack
    time ctr prints as ``done: <duration>`` after ``unpacking``.

    ``ctr --debug``: without it ctr draws its progress table every 100 ms and, once the
    fetch is done, waits for the next tick before it unpacks, so every pull was rounded
    up to ctr's tick (fetch parts of 0.71, 0.81, 0.91 s and nothing between), turning a
    20 ms difference into 100 ms in a median of three. The pull itself is the same."""
    started = time.perf_counter()
    result = ctrd.ctr("--debug", "images", "pull", "--hosts-dir", str(hosts_dir), image.name,
                      timeout=PULL_TIMEOUT)
    seconds = time.perf_counter() - started
    done = re.search(r"^done: (\S+)\s*$", result.stdout, re.MULTILINE)
    if done is None:
        raise RuntimeError(f"ctr printed no unpack time: {result.stdout[-300:]!r}")
    content = set(ctrd.ctr("content", "ls", "--quiet").stdout.split())
    missing = image.digests() - content
    if missing:
        raise RuntimeError(f"pull finished without {sorted(missing)}")
    return seconds, seconds - go_duration(done.group(1))


def rolling_run(args: argparse.Namespace, scratch: Path, proxy: CountingProxy,
                direct_url: str, image: BuiltImage, mode: str) -> PullFigures:
    """One rolling pull in ``mode``; ``direct_url`` is the Distribution behind the proxy,
    which the ideal pulls from with no limit. The ideal names the image by that address:
    containerd 1.6 sends a pull to the image's own host whatever ``server`` its hosts.toml
    names (checked here: a ``server`` of a closed port still pulled through the proxy)."""
    figures = PullFigures(mode)
    mesh = mode == MESH
    upstream_url = proxy.url
    if mode == IDEAL:
        upstream_url = direct_url
        direct = direct_url.removeprefix("http://")
        image = replace(image, name=f"{direct}/{image.repository}:{image.tag}", registry=direct)
    run_dir = scratch / figures.label
    run_dir.mkdir()
    with ExitStack() as stack:
        ctrds = [stack.enter_context(containerd_on_tmpfs(run_dir, f"node{i}"))
                 for i in range(args.nodes)]
        nodes: list[MeshNode] = []
        if mesh:
            for i, ctrd in enumerate(ctrds):
                # Its hosts.toml (written below) says which registry it mirrors.
                hosts = ["--containerd-registry-config-path", str(run_dir / f"hosts{i}")]
                node = start_meshmirror(run_dir, f"node{i}", ctrd,
                                        nodes[0].mesh if nodes else None, run_flags(args) + hosts)
                stack.callback(stop, node.proc)
                nodes.append(node)
            wait_until(lambda: all(n.alive_members() == args.nodes for n in nodes), 60,
                       f"{args.nodes} nodes to see each other alive")
        hosts_dirs = []
        for i in range(args.nodes):
            hosts_dirs.append(run_dir / f"hosts{i}")
            configure_hosts(hosts_dirs[i], upstream_url, nodes[i].registry if mesh else None)
        proxy.reset()
        previous_end = time.perf_counter()
        for i, ctrd in enumerate(ctrds):
            if mesh and i > 0:
                wait_until(functools.partial(mirror_resolves, nodes[i], image), 60,
                           f"node{i}'s mirror to find the image on a peer", interval=0.02)
            figures.waits.append(time.perf_counter() - previous_end)
            before = proxy.bytes_to_clients
            with ExitStack() as sampling:
                if mesh and args.sample_spool:
                    peaks = sampling.enter_context(
                        gauge_peaks(nodes[i], (SPOOL, CACHE), SAMPLE_INTERVAL))
                seconds, fetch_seconds = pull(ctrd, hosts_dirs[i], image)
            if mesh and args.sample_spool:
                figures.peak_spool.append(peaks[SPOOL])
                figures.peak_cache.append(peaks[CACHE])
            previous_end = time.perf_counter()
            figures.seconds.append(seconds)
            figures.fetch_seconds.append(fetch_seconds)
            figures.upstream_bytes.append(proxy.bytes_to_clients - before)
            print(f"{figures.label} node{i}: {seconds:.2f} s (fetch {fetch_seconds:.2f} s), "
                  f"{figures.upstream_bytes[-1] / 1e6:.1f} MB from upstream "
                  f"(waited {figures.waits[-1]:.2f} s before)", flush=True)
        figures.metrics = [n.scrape() for n in nodes]
    return figures


SPOOL = "meshmirror_mirror_spool_bytes{}"
CACHE = "meshmirror_mirror_cache_bytes{}"


@contextmanager
def gauge_peaks(node: MeshNode, names: tuple[str, ...], interval: float
                ) -> Iterator[dict[str, float]]:
    """Highest value of each gauge in ``names`` seen on ``node`` while the block runs,
    polled every ``interval`` seconds (and once at the end)."""
    peaks = dict.fromkeys(names, 0.0)
    done = threading.Event()

    def sample() -> None:
        while True:
            try:
                metrics = node.scrape()
            except OSError:
                metrics = {}
            for name in names:
                peaks[name] = max(peaks[name], metrics.get(name, 0.0))
            if done.wait(interval):
                return

    thread = threading.Thread(target=sample, name=f"peaks-{node.name}", daemon=True)
    thread.start()
    try:
        yield peaks
    finally:
        done.set()
        thread.join(10)


def peer_bytes(metrics: dict[str, float]) -> float:
    return sum(v for k, v in metrics.items() if k.startswith("meshmirror_mirror_peer_bytes_total"))


def label_totals(metrics: dict[str, float], prefix: str, label: str) -> dict[str, float]:
    """A counter's samples summed by one label's value, over every other label."""
    totals: dict[str, float] = {}
    for key, value in metrics.items():
        if key.startswith(prefix + "{"):
            labels = dict(p.split("=", 1) for p in key[len(prefix) + 1:-1].split(",") if p)
            totals[labels[label]] = totals.get(labels[label], 0) + value
    return totals


def mirror_results(metrics: dict[str, float]) -> str:
    """``hit 5, miss 6; peer failures: timeout 3``: what a node's mirror did with misses."""
    results = label_totals(metrics, "meshmirror_mirror_outcomes_total", "result")
    failures = label_totals(metrics, "meshmirror_mirror_peer_failures_total", "reason")
    text = ", ".join(f"{k} {int(v)}" for k, v in sorted(results.items()) if v) or "none"
    if any(failures.values()):
        text += "; peer failures: " + ", ".join(
            f"{k} {int(v)}" for k, v in sorted(failures.items()) if v)
    return text


def median_per_node(runs: list[PullFigures], pick: Callable[[PullFigures], list[float]]
                    ) -> list[float]:
    return [statistics.median(pick(run)[i] for run in runs) for i in range(len(pick(runs[0])))]


def mean_ratio(top: list[float], bottom: list[float]) -> float:
    """Nodes 2..N (the ones a mirror can help): mean of ``top`` over mean of ``bottom``."""
    return statistics.mean(top[1:]) / statistics.mean(bottom[1:])


def report(args: argparse.Namespace, image_bytes: int, runs: dict[str, list[PullFigures]],
           load_before: str) -> Section:
    """The benchmark's block in RESULTS.md, from the rounds of each mode."""
    base, mesh = runs[BASELINE], runs[MESH]
    whole = {mode: median_per_node(runs[mode], lambda f: f.seconds) for mode in MODES}
    fetch = {mode: median_per_node(runs[mode], lambda f: f.fetch_seconds) for mode in MODES}

    def cell(mode: str, i: int) -> str:
        return f"{whole[mode][i]:.2f} ({fetch[mode][i]:.2f})"

    def ratio(mode: str, i: int) -> str:
        return (f"{whole[MESH][i] / whole[mode][i]:.2f} "
                f"({fetch[MESH][i] / fetch[mode][i]:.2f})")

    rows = []
    for i in range(args.nodes):
        rows.append((
            f"node{i}", cell(IDEAL, i), cell(BASELINE, i),
            "/".join(f"{run.upstream_bytes[i] / 1e6:.0f}" for run in base),
            cell(MESH, i),
            "/".join(f"{run.upstream_bytes[i] / 1e6:.0f}" for run in mesh),
            ratio(BASELINE, i), ratio(IDEAL, i),
            "-" if i == 0 else "/".join(f"{run.waits[i]:.2f}" for run in mesh),
            " / ".join(mirror_results(run.metrics[i]) for run in mesh)))
    base_total = mean_ratio(whole[MESH], whole[BASELINE])
    base_fetch = mean_ratio(fetch[MESH], fetch[BASELINE])
    # Against the ideal, round by round: the two ran minutes apart at most, so a
    # change in the machine's load (shared, 2 cores) moves both.
    rounds = list(zip(mesh, runs[IDEAL], strict=True))
    paired_total = [mean_ratio(m.seconds, i.seconds) for m, i in rounds]
    paired_fetch = [mean_ratio(m.fetch_seconds, i.fetch_seconds) for m, i in rounds]
    ideal_total = statistics.median(paired_total)
    ideal_fetch = statistics.median(paired_fetch)
    # The first node has no peer to read from: the mirror fetches from the upstream for
    # it (and for the others), and must not make its pull slower than going there itself.
    first_rounds = list(zip(mesh, base, strict=True))
    first_total = [m.seconds[0] / b.seconds[0] for m, b in first_rounds]
    first_fetch = [m.fetch_seconds[0] / b.fetch_seconds[0] for m, b in first_rounds]
    upstream_base = [run.total_upstream / image_bytes for run in base]
    upstream_mesh = [run.total_upstream / image_bytes for run in mesh]
    sampled = []
    if args.sample_spool:
        sampled.append(
            "Pulling node's peak spool (pinned) / cache bytes, MiB, per node and round: "
            + "; ".join(f"node{i} " + ", ".join(
                f"{run.peak_spool[i] / 2**20:.0f}/{run.peak_cache[i] / 2**20:.0f}"
                for run in mesh) for i in range(args.nodes))
            + f" (polled every {SAMPLE_INTERVAL:g} s, which costs the mirror CPU).")
    command = (f"python -m benchmarks.bench_rolling_pull --nodes {args.nodes} --layers "
               f"{args.layers} --layer-mib {args.layer_mib} --rate-mb {args.rate_mb:g} "
               f"--rounds {args.rounds}" + "".join(f" {flag}" for flag in run_flags(args))
               + (" --sample-spool" if args.sample_spool else ""))
    return Section(
        name="bench_rolling_pull", title="Rolling pull across containerd nodes",
        command=command, date=utc_now(), load=load_since(load_before),
        setup=f"Image: {args.layers} x {args.layer_mib} MiB layers, {image_bytes / 1e6:.1f} MB "
              "in all, in docker-registry behind a counting proxy limited to "
              f"{args.rate_mb:g} MB/s. Each of {args.nodes} nodes runs `ctr images pull "
              "--hosts-dir` in turn (containerd 1.6.20, root on /dev/shm, the pull includes "
              "unpacking). Ideal: hosts.toml whose `server` is the same docker-registry "
              "straight on loopback, no proxy and no limit. Baseline: hosts.toml with only "
              "the upstream `server`. meshmirror: `meshmirror configure` pointing at the "
              "node's own `meshmirror run --store containerd`, all nodes in one mesh. "
              f"{args.rounds} rounds, the three modes rotating on fresh containerds; times "
              "are medians, per-round figures are separated by `/`.",
        tables=[Table(("node", "ideal s (fetch)", "baseline s (fetch)",
                       "baseline MB from upstream", "meshmirror s (fetch)",
                       "meshmirror MB from upstream", "meshmirror/baseline (fetch)",
                       "meshmirror/ideal (fetch)", "wait for summary s",
                       "meshmirror mirror results"), rows)],
        notes=["Bytes from upstream per rolling pull, as a multiple of the image: baseline "
               + ", ".join(f"{r:.2f}x" for r in upstream_base) + "; meshmirror "
               + ", ".join(f"**{r:.2f}x**" for r in upstream_mesh) + ".",
               f"Nodes after the first, mean of medians: whole pull {base_total:.2f}x the "
               f"baseline, fetch part {base_fetch:.2f}x.",
               "Nodes after the first against the ideal of the same round (mean over the "
               "nodes), per round: whole pull "
               + ", ".join(f"{r:.2f}x" for r in paired_total) + ", fetch part "
               + ", ".join(f"{r:.2f}x" for r in paired_fetch)
               + f"; median **{ideal_total:.2f}x** and **{ideal_fetch:.2f}x**.",
               "The first node against the baseline's first node, per round (the baseline ran "
               "in the same round): whole pull " + ", ".join(f"{r:.2f}x" for r in first_total)
               + ", fetch part " + ", ".join(f"{r:.2f}x" for r in first_fetch)
               + f"; median **{statistics.median(first_total):.2f}x** and "
               f"**{statistics.median(first_fetch):.2f}x**.", *sampled],
        targets=[Target("upstream bytes per rolling pull / image (HTTP headers aside), "
                        "worst round", "<=", 1.01, max(upstream_mesh)),
                 Target("rolling pull: nodes 2..N / ideal (unthrottled loopback "
                        "Distribution), whole pull, median round", "<=", 1.1, ideal_total),
                 Target("rolling pull: nodes 2..N / ideal, fetch part, median round", "<=",
                        1.1, ideal_fetch),
                 Target("rolling pull: first node / baseline (straight from the upstream), "
                        "whole pull, median round", "<=", 1.0,
                        statistics.median(first_total))])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--layer-mib", type=int, default=50)
    parser.add_argument("--rate-mb", type=float, default=50.0,
                        help="upstream rate limit in MB/s (10^6 bytes)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rolling pulls per mode, rotating meshmirror, baseline and ideal")
    parser.add_argument("--mirror-resolve-timeout", type=float, default=None, metavar="SECONDS",
                        help="passed to every `meshmirror run` (default: run's own default)")
    parser.add_argument("--mirror-spool-limit", default=None, metavar="SIZE",
                        help="passed to every `meshmirror run`; 0 streams blobs from peers "
                             "instead of holding them until verified")
    parser.add_argument("--sample-spool", action="store_true",
                        help="poll the pulling node's spool and cache gauges for their peaks "
                             "(sizes the spool; the polling slows the mirror a little)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--no-write", action="store_true", help="print the section only")
    args = parser.parse_args()
    if args.nodes < 2:
        parser.error("--nodes: a rolling pull needs at least 2 nodes")
    if min(args.layers, args.layer_mib, args.rounds) < 1 or args.rate_mb <= 0:
        parser.error("--layers, --layer-mib and --rounds must be >= 1 and --rate-mb > 0")

    load_before = load_average()
    scratch_root = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    runs: dict[str, list[PullFigures]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="bench-rolling-", dir=scratch_root) as tmp, \
            DistributionRegistry() as upstream:
        scratch = Path(tmp)
        proxy = CountingProxy(upstream.host, upstream.port, rate=args.rate_mb * 1e6)
        image = build_image(f"{proxy.address}/{REPOSITORY}:{TAG}", scratch / "layout",
                            [args.layer_mib << 20] * args.layers, seed=17)
        image_bytes = sum(blob.size for blob in image.blobs())
        push_layout(image.layout, TAG, upstream.address, REPOSITORY, timeout=600)
        shutil.rmtree(image.layout)
        with proxy:
            for round_no in range(args.rounds):
                # Rotate which mode goes first so a drift in machine load hits each.
                shift = round_no % len(MODES)
                for mode in MODES[shift:] + MODES[:shift]:
                    run_dir = scratch / f"round{round_no}"
                    run_dir.mkdir(exist_ok=True)
                    runs[mode].append(rolling_run(args, run_dir, proxy, upstream.url,
                                                  image, mode))
    section = report(args, image_bytes, runs, load_before)
    print(section.render())
    if not args.no_write:
        write_section(section, args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
