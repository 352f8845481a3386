"""The fault matrix: real containerd pulls through meshmirror while one thing goes wrong.

Three real nodes on loopback (each a private containerd 1.6 and `meshmirror
run --store containerd`, see tests/e2e/cluster.py) and a Distribution registry
behind a proxy as the upstream. Nodes 1 and 3 hold the image; node 2 pulls it
with ``ctr images pull --hosts-dir`` through its own mirror, from an empty
content store, once per trial, while one fault is in place:

- ``peer_killed``: kill -9 of the peer serving node 2, as soon as peer bytes flow;
- ``corrupt_peer``: node 1's copy of every layer has one byte flipped;
- ``hanging_peer``: a rogue mesh member claims the image, sends a few bytes, hangs;
- ``all_peers_gone``: nodes 1 and 3's meshmirror are killed (kill -9);
- ``partition``: iptables drops everything between node 2 and nodes 1 and 3
  (rules on the loopback addresses, removed after each trial);
- ``containerd_restarted``: node 2's and node 1's containerd restart just before the pull;
- ``upstream_down``: the upstream refuses connections: only peers can serve.

For each trial it records whether the pull succeeded, how long it took, and
how long a direct pull (no mirror at all) of the same image took right after
(not for ``upstream_down``, where a direct pull cannot work). A *mirror-caused
failure* is a mirror pull that failed while the direct pull worked (or, with
the upstream down, any failed pull: peers hold everything). Goal: none.

    python benchmarks/fault_matrix.py [--trials 20] [--faults a,b,...] [--no-write]

Needs root (iptables) and the components `scripts/bootstrap` installs.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_burst import vm
from benchmarks.results import (
    BenchRun,
    Section,
    Table,
    Target,
    load_since,
    utc_now,
)
from meshmirror.oci.imagebuilder import BuiltImage, build_image
from tests.e2e.cluster import E2ENode, wait_mesh
from tests.helm.chart import default_memory_limit
from tests.reliability.rogue import Rogue, claiming_summary
from tests.support.distribution import DistributionRegistry
from tests.support.metrics import metric
from tests.support.processes import wait_until
from tests.support.proxy import CountingProxy
from tests.support.skopeo import push_layout

MiB = 1024 * 1024
FAULTS = ("peer_killed", "corrupt_peer", "hanging_peer", "all_peers_gone", "partition",
          "containerd_restarted", "upstream_down")
LAYERS = (1 * MiB, 6 * MiB, 48 * MiB)  # held in memory, spooled, spooled and long enough
PULL_TIMEOUT_S = 120.0


@dataclass
class Trial:
    ok: bool
    seconds: float
    direct_ok: bool | None  # None: no direct pull for this fault
    direct_seconds: float | None
    output: str = ""


@dataclass
class Matrix:
    """The running cluster and what every fault needs to break and repair it."""

    registry: DistributionRegistry
    proxy: CountingProxy
    n1: E2ENode
    n2: E2ENode
    n3: E2ENode
    image: BuiltImage
    workdir: Path
    results: dict[str, list[Trial]] = field(default_factory=dict)

    @property
    def nodes(self) -> list[E2ENode]:
        return [self.n1, self.n2, self.n3]

    def clean_puller(self) -> None:
        self.n2.remove_image(self.image.name, self.image.digests())

    def heal(self) -> None:
        for node in (self.n1, self.n3, self.n2):
            if not node.containerd.running:
                node.start_containerd()
            if not node.meshmirror_running:
                alive = next((n for n in self.nodes if n.meshmirror_running), None)
                node.start_meshmirror(join=alive.mesh_address if alive else None)
        wait_mesh(self.nodes, timeout=60)


@contextlib.contextmanager
def cluster(workdir: Path) -> Iterator[Matrix]:
    with DistributionRegistry() as registry, \
            CountingProxy(registry.host, registry.port) as proxy:
        image = build_image(f"{proxy.address}/faults/app:1", workdir / "layout",
                            layer_sizes=LAYERS, seed=77, archive=workdir / "app.tar")
        push_layout(workdir / "layout", "1", registry.address, "faults/app")
        nodes: list[E2ENode] = []
        try:
            n1 = E2ENode("matrix-1").start()
            nodes.append(n1)
            n2 = E2ENode("matrix-2", join=n1.mesh_address).start()
            nodes.append(n2)
            n3 = E2ENode("matrix-3", join=n1.mesh_address).start()
            nodes.append(n3)
            for node in nodes:
                node.configure(proxy.url, [node.registry_url])
            assert image.archive is not None
            for node in (n1, n3):
                node.import_archive(image.archive)
            wait_mesh(nodes, timeout=60)
            yield Matrix(registry, proxy, n1, n2, n3, image, workdir)
        finally:
            for node in nodes:
                node.close()


# -- faults: each is a context manager around the mirror pull ------------------------

def _iptables(action: str, source: str, destination: str) -> None:
    subprocess.run(["iptables", action, "INPUT", "-s", source, "-d", destination, "-j", "DROP"],
                   check=action == "-I", capture_output=True, timeout=10)


@contextlib.contextmanager
def partition(m: Matrix) -> Iterator[None]:
    pairs = [(m.n2.host, peer.host) for peer in (m.n1, m.n3)]
    pairs += [(b, a) for a, b in pairs]
    try:
        for source, destination in pairs:
            _iptables("-I", source, destination)
        yield
    finally:
        for source, destination in pairs:
            _iptables("-D", source, destination)


@contextlib.contextmanager
def corrupt_peer(m: Matrix) -> Iterator[None]:
    restore: list[Callable[[], None]] = []
    try:
        for layer in m.image.platforms[0].layers:
            restore.append(m.n1.corrupt_blob(str(layer.digest)))
        yield
    finally:
        for undo in restore:
            undo()


@contextlib.contextmanager
def hanging_peer(m: Matrix) -> Iterator[None]:
    summary = claiming_summary(sorted(m.image.keys()), epoch=3)
    name = f"rogue-{time.monotonic_ns()}"
    with Rogue("hang", summary, LAYERS[-1], join=m.n2.mesh_address,
               log=m.workdir / f"{name}.log", name=name, key_file=m.n2.key_file):
        wait_until(lambda: metric(m.n2.metrics(), "meshmirror_peer_summaries_share") >= 1.0
                   and metric(m.n2.metrics(), "meshmirror_mesh_members", state="alive") >= 4,
                   30, "node 2 to hold the rogue's summary")
        yield


@contextlib.contextmanager
def all_peers_gone(m: Matrix) -> Iterator[None]:
    # kill -9: no leave message, so node 2's router still names them until the
    # mesh declares them dead, and every attempt meets a refused connection.
    for node in (m.n1, m.n3):
        node.kill_meshmirror()
    yield


@contextlib.contextmanager
def containerd_restarted(m: Matrix) -> Iterator[None]:
    for node in (m.n2, m.n1):
        node.containerd.restart()
    yield


@contextlib.contextmanager
def upstream_down(m: Matrix) -> Iterator[None]:
    m.proxy.stop()
    try:
        yield
    finally:
        m.proxy = CountingProxy(m.registry.host, m.registry.port, host=m.proxy.host,
                                port=m.proxy.port).start()


@contextlib.contextmanager
def nothing(m: Matrix) -> Iterator[None]:
    yield


FAULT_CONTEXT: dict[str, Callable[[Matrix], contextlib.AbstractContextManager[None]]] = {
    "peer_killed": nothing,  # the kill happens during the pull, see `mirror_pull`
    "corrupt_peer": corrupt_peer,
    "hanging_peer": hanging_peer,
    "all_peers_gone": all_peers_gone,
    "partition": partition,
    "containerd_restarted": containerd_restarted,
    "upstream_down": upstream_down,
}


def mirror_pull(m: Matrix, fault: str) -> tuple[bool, float, str]:
    if fault != "peer_killed":
        result = m.n2.pull(m.image.name, timeout=PULL_TIMEOUT_S)
        return result.ok, result.seconds, result.output
    before = metric(m.n2.metrics(), "meshmirror_mirror_peer_bytes_total")
    log = m.workdir / "killed-pull.log"
    began = time.monotonic()
    proc = m.n2.start_pull(m.image.name, log)
    try:
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: metric(m.n2.metrics(), "meshmirror_mirror_peer_bytes_total")
                       > before, 10, "peer bytes", 0.002)
        serving = [n for n in (m.n1, m.n3)
                   if metric(n.metrics(), "meshmirror_http_requests_inflight") >= 1]
        (serving or [m.n1])[0].kill_meshmirror()
        code = proc.wait(PULL_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    return code == 0, time.monotonic() - began, log.read_text()[-2000:]


def run_trial(m: Matrix, fault: str) -> Trial:
    m.clean_puller()
    try:
        with FAULT_CONTEXT[fault](m):
            ok, seconds, output = mirror_pull(m, fault)
            if ok:
                m.n2.verify_image(m.image)
    finally:
        m.heal()
    direct_ok: bool | None = None
    direct_seconds: float | None = None
    if fault != "upstream_down":
        m.clean_puller()
        direct = m.n2.pull(m.image.name, timeout=PULL_TIMEOUT_S, direct=True)
        direct_ok, direct_seconds = direct.ok, direct.seconds
    return Trial(ok, seconds, direct_ok, direct_seconds, output)


def mirror_caused_failures(trials: list[Trial]) -> int:
    return sum(1 for t in trials if not t.ok and t.direct_ok is not False)


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def report(results: dict[str, list[Trial]]) -> Table:
    rows = []
    for fault, trials in results.items():
        took = [t.seconds for t in trials]
        direct = [t.direct_seconds for t in trials if t.direct_seconds is not None]
        ratio = (statistics.median(took) / statistics.median(direct)) if direct else None
        rows.append([
            fault, str(len(trials)), str(mirror_caused_failures(trials)),
            f"{statistics.median(took):.2f}", f"{_p(took, 0.9):.2f}", f"{max(took):.2f}",
            f"{statistics.median(direct):.2f}" if direct else "n/a",
            f"{ratio:.2f}x" if ratio is not None else "n/a",
        ])
    return Table(["fault", "trials", "mirror-caused failures", "pull p50 s", "pull p90 s",
                  "pull max s", "direct p50 s", "p50 vs direct"], rows)


def run(trials: int, faults: list[str], workdir: Path,
        peak_rss: list[int] | None = None) -> dict[str, list[Trial]]:
    """The trials by fault; ``peak_rss`` gets the pulling node's peak RSS over the whole
    run (VmHWM: node 2's meshmirror is never the one killed), for the memory limit."""
    with cluster(workdir) as m:
        for fault in faults:
            m.results[fault] = [run_trial(m, fault) for _ in range(trials)]
            table = report({fault: m.results[fault]})
            print(table.rows[0], flush=True)
        if peak_rss is not None and m.n2.proc is not None:
            peak_rss.append(vm(m.n2.proc.pid, "VmHWM"))
        return m.results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--faults", default=",".join(FAULTS))
    bench = BenchRun(parser, argv)
    args = bench.args
    faults = [f for f in args.faults.split(",") if f]
    unknown = set(faults) - set(FAULTS)
    if unknown:
        parser.error(f"unknown faults: {', '.join(sorted(unknown))}")
    peak: list[int] = []
    with tempfile.TemporaryDirectory(prefix="fault-matrix-") as tmp:
        results = run(args.trials, faults, Path(tmp), peak)
    table = report(results)
    peak_mib = peak[0] / MiB if peak else float("nan")
    limit_mib = default_memory_limit() / MiB
    failures = sum(mirror_caused_failures(t) for t in results.values())
    bench.publish(Section(
        name="fault_matrix",
        title="Fault matrix: real containerd pulls while one thing goes wrong",
        command=f"python benchmarks/fault_matrix.py --trials {args.trials}",
        date=utc_now(),
        load=load_since(bench.load_before),
        setup=("Three nodes (containerd 1.6 + `meshmirror run`) on loopback, Distribution "
               f"upstream; image of layers {', '.join(f'{s // MiB} MiB' for s in LAYERS)}; "
               "node 2 pulls from an empty store per trial with `ctr images pull "
               "--hosts-dir`, then pulls directly (no mirror) for comparison."),
        tables=[table],
        notes=["mirror-caused failure: the pull through the mirror failed while the "
               "direct one worked (upstream_down: any failure, peers hold everything).",
               f"The pulling node's meshmirror peaked at {peak_mib:.0f} MiB RSS over the "
               f"whole run (VmHWM), against the chart's {limit_mib:.0f}Mi memory limit."],
        targets=[Target("mirror-caused pull failures, all faults", "<=", 0,
                        float(failures), unit=""),
                 Target("fault matrix: pulling node's peak RSS", "<=", limit_mib, peak_mib,
                        unit=" MiB")],
    ))
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
