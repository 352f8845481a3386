"""Peer hop side by side: meshmirror against Distribution's pull-through cache and direct.

Four ways to get one blob, all real processes on loopback, in rounds that alternate
on the same blob so the machine's load hits each alike:

- ``distribution``: the Debian docker-registry (the origin) serving it directly;
- ``pull-through cache``: a second docker-registry with ``proxy: remoteurl`` pointing
  at the origin and fresh storage every round, so each round is a cold fetch that it
  stores, hashes and forwards: what a user would run instead of a mirror;
- ``local``: ``meshmirror run`` with the blob in its OCI-layout store;
- ``peer hop``: a second ``meshmirror run`` with an empty store, started afresh every
  round (its blob cache keeps a verified blob, so a warm node would not hop), which
  finds the blob through the first node's summary, fetches it into its cache while
  hashing and sends it once the sha256 checks out (containerd must never receive an
  unverified byte).

curl downloads the blob to /dev/null; the figure per server is the median over rounds.
Next to each rate: the CPU seconds per GB the processes that served it spent (user +
system, all threads, from /proc/PID/stat): the serving process, then the one that
forwarded (the cache, the hopping node). On a shared 2-core machine a hop's rate is
bounded by the CPU the two nodes and curl need in all, so the pull-through cache's
own figures are the fair comparison.

    python -m benchmarks.bench_peer_hop --size-mib 512 1024 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

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
from meshmirror.oci.imagebuilder import BuiltImage, build_image
from tests.support.distribution import DistributionRegistry
from tests.support.node import NO_UPSTREAM
from tests.support.ports import free_port, loopback_host
from tests.support.processes import spawn, stop, wait_until

DISTRIBUTION = "distribution"
CACHE = "pull-through cache"
LOCAL = "local"
HOP = "peer hop"
SERVERS = (DISTRIBUTION, CACHE, LOCAL, HOP)


@dataclass
class Figures:
    """One blob size's downloads: bytes/s per server per round, and CPU seconds per GB of
    the meshmirror processes that served each download (serving node, then hopping node)."""

    size_mib: int
    rates: dict[str, list[float]]
    cpu: dict[str, list[list[float]]]

    def median(self, server: str) -> float:
        return statistics.median(self.rates[server])

    def cpu_medians(self, server: str) -> list[float]:
        runs = self.cpu[server]
        if not runs or not runs[0]:
            return []
        return [statistics.median(run[i] for run in runs) for i in range(len(runs[0]))]


def start_node(workdir: Path, name: str, layout: Path, join: str | None, *extra: str
               ) -> tuple[subprocess.Popen[bytes], str, str]:
    host = loopback_host()
    registry = f"{host}:{free_port(host)}"
    mesh = f"{host}:{free_port(host)}"
    argv = [sys.executable, "-m", "meshmirror", "--log-level", "warning", "run",
            "--store", f"oci:{layout}", "--registry-addr", registry,
            "--metrics-addr", f"{host}:{free_port(host)}", "--mesh-addr", mesh,
            "--node-name", name, *NO_UPSTREAM, *extra]
    if join:
        argv += ["--join", join]
    proc = spawn(argv, workdir / f"{name}.log")
    try:
        wait_until(lambda: urllib.request.urlopen(f"http://{registry}/healthz", timeout=1)
                   .status == 200, 90, f"{name} to serve")
    except BaseException:
        stop(proc)
        raise
    return proc, registry, mesh


def curl_rate(url: str) -> float:
    """Bytes per second curl measured for one download to /dev/null."""
    out = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{speed_download}",
                          url], capture_output=True, text=True, timeout=600, check=True).stdout
    code, speed = out.split()
    if code != "200":
        raise RuntimeError(f"{url} answered {code}")
    return float(speed)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all threads, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _answers(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as response:
        return bool(response.status == 200)


def measure(size_mib: int, rounds: int, workdir: Path) -> Figures:
    seeded, empty = workdir / f"seeded-{size_mib}", workdir / f"empty-{size_mib}"
    seeded.mkdir()
    empty.mkdir()
    image: BuiltImage = build_image("docker.io/library/bench:1", seeded, [size_mib << 20],
                                    seed=3)
    platform = image.platforms[0]
    layer = platform.layers[0]
    path = f"/v2/library/bench/blobs/{layer.digest}"
    manifest_path = f"/v2/library/bench/manifests/{platform.manifest.digest}"
    rates: dict[str, list[float]] = {name: [] for name in SERVERS}
    cpu: dict[str, list[list[float]]] = {name: [] for name in SERVERS}
    gigabytes = layer.size / 1e9
    origin = DistributionRegistry()
    node1: subprocess.Popen[bytes] | None = None
    try:
        origin.start()
        subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                        f"oci:{seeded}:1", f"docker://{origin.address}/library/bench:1"],
                       check=True, timeout=900)
        node1, reg1, mesh1 = start_node(workdir, f"serving-{size_mib}", seeded, None)
        for round_no in range(rounds):
            for name in SERVERS:
                procs: list[subprocess.Popen[bytes]] = []
                pids: list[int] = []
                cache: DistributionRegistry | None = None
                try:
                    if name == DISTRIBUTION:
                        url, pids = f"{origin.url}{path}", [origin.pid]
                    elif name == CACHE:
                        cache = DistributionRegistry(proxy_remote=origin.url).start()
                        url, pids = f"{cache.url}{path}", [origin.pid, cache.pid]
                    elif name == LOCAL:
                        url, pids = f"http://{reg1}{path}?ns=docker.io", [node1.pid]
                    else:
                        hop, reg2, _ = start_node(workdir, f"hop-{size_mib}-{round_no}", empty,
                                                  mesh1)
                        procs.append(hop)
                        # The manifest (small, verified in memory) answers once the hop has
                        # node1's summary; the blob itself stays cold.
                        wait_until(lambda r=reg2: _answers(  # type: ignore[misc]
                            f"http://{r}{manifest_path}?ns=docker.io"), 90,
                            "the hopping node to find node1's content")
                        url, pids = f"http://{reg2}{path}?ns=docker.io", [node1.pid, hop.pid]
                    before = [cpu_seconds(pid) for pid in pids]
                    rates[name].append(curl_rate(url))
                    print(f"{size_mib} MiB round {round_no + 1}: {name} "
                          f"{rates[name][-1] / 1e9:.2f} GB/s", file=sys.stderr, flush=True)
                    cpu[name].append([(cpu_seconds(pid) - b) / gigabytes
                                      for pid, b in zip(pids, before, strict=True)])
                finally:
                    for proc in procs:
                        stop(proc)
                    if cache is not None:
                        cache.close()
    finally:
        if node1 is not None:
            stop(node1)
        origin.close()
    return Figures(size_mib, rates, cpu)


def section(figures: list[Figures], rounds: int, load_before: str) -> Section:
    """The benchmark's block in RESULTS.md: one table per blob size, ratios from the same run."""
    tables: list[Table] = []
    targets: list[Target] = []
    for fig in figures:
        direct, cache = fig.median(DISTRIBUTION), fig.median(CACHE)
        rows = []
        for name in SERVERS:
            rate = fig.median(name)
            rows.append((name, f"{rate / 1e9:.2f}", f"{rate / direct:.2f}", f"{rate / cache:.2f}",
                         " + ".join(f"{x:.2f}" for x in fig.cpu_medians(name)) or "-"))
        tables.append(Table((f"{fig.size_mib} MiB blob", "GB/s", "x direct", "x cache",
                             "CPU s/GB (serving + forwarding process)"), rows))
        hop = fig.median(HOP)
        targets += [
            Target(f"peer hop / pull-through cache, {fig.size_mib} MiB", ">=", 1.0, hop / cache),
            Target(f"peer hop / Distribution direct, {fig.size_mib} MiB", ">=", 0.5,
                   hop / direct),
            Target(f"local serving / Distribution direct, {fig.size_mib} MiB", ">=", 1.0,
                   fig.median(LOCAL) / direct),
        ]
    sizes = " ".join(str(fig.size_mib) for fig in figures)
    return Section(
        name="bench_peer_hop", title="Peer-hop streaming throughput",
        command=f"python -m benchmarks.bench_peer_hop --size-mib {sizes} --rounds {rounds}",
        date=utc_now(), load=load_since(load_before),
        setup="curl to /dev/null on loopback, median of "
              f"{rounds} rounds; each round asks Distribution direct, a cold Distribution "
              "pull-through cache (`proxy: remoteurl`, fresh storage), meshmirror's local "
              "store and a cold meshmirror peer hop (a fresh node) for the same blob. CPU is "
              "user + system seconds per GB of the process that served the bytes (the "
              "origin Distribution, the serving meshmirror) + the one that forwarded them "
              "(the pull-through cache, the hopping meshmirror), from /proc/PID/stat.",
        tables=tables, targets=targets)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, nargs="+", default=[512])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--no-write", action="store_true", help="print the section only")
    args = parser.parse_args()
    load_before = load_average()
    figures = []
    for size in args.size_mib:
        with tempfile.TemporaryDirectory(prefix="bench-hop-") as tmp:
            figures.append(measure(size, args.rounds, Path(tmp)))
        print(section(figures[-1:], args.rounds, load_before).render(), file=sys.stderr)
    result = section(figures, args.rounds, load_before)
    print(result.render())
    print(json.dumps({"rates": {f.size_mib: f.rates for f in figures},
                      "cpu_s_per_gb": {f.size_mib: f.cpu for f in figures}, "at": time.time()}))
    if not args.no_write:
        write_section(result, args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
