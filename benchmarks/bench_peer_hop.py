"""Peer-hop streaming throughput: a blob through a meshmirror mirror vs Distribution direct.

Three servers hold the same blob, all real processes on loopback:

- ``distribution``: the Debian docker-registry serving it (the baseline);
- ``local``: ``meshmirror run`` with the blob in its OCI-layout store;
- ``peer hop (verified, then sent)``: a second ``meshmirror run`` with an empty
  store, which finds the blob through the first node's Bloom summary, fetches it
  into a spool file while hashing, and sends it once the sha256 checks out (the
  default: containerd must never receive an unverified byte);
- ``peer hop (streamed)``: a third node with ``--mirror-spool-limit 0``, which
  forwards while hashing and holds back only the last chunk.

curl downloads the blob to /dev/null from each, round-robin, and the figure per
server is the median over rounds. Issue target: peer hop >= 0.5x Distribution.
Next to each rate: the CPU seconds per GB the serving process(es) spent on it
(from /proc, user + system, all threads): on a shared 2-core machine the hop's
rate is bounded by the CPU that the hop, the serving peer and curl need in all.

    python -m benchmarks.bench_peer_hop --size-mib 512 --rounds 5
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
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
from meshmirror.oci.imagebuilder import build_image
from tests.support.distribution import DistributionRegistry
from tests.support.node import NO_UPSTREAM
from tests.support.ports import free_port, loopback_host
from tests.support.processes import spawn, stop, wait_until

DISTRIBUTION = "distribution"
VERIFIED, STREAMED = HOPS = ("peer hop (verified, then sent)", "peer hop (streamed)")


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
    wait_until(lambda: urllib.request.urlopen(f"http://{registry}/healthz", timeout=1).status
               == 200, 30, f"{name} to serve")
    return proc, registry, mesh


def curl_rate(url: str) -> float:
    """Bytes per second curl measured for one download to /dev/null."""
    out = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{speed_download}",
                          url], capture_output=True, text=True, timeout=300, check=True).stdout
    code, speed = out.split()
    if code != "200":
        raise RuntimeError(f"{url} answered {code}")
    return float(speed)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all threads, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serves(url: str) -> bool:
    return curl_rate(url) > 0


def section(size_mib: int, rounds: int, medians: dict[str, float],
            cpu: dict[str, list[float]], load_before: str) -> Section:
    """The benchmark's block in RESULTS.md: ``medians`` in bytes/s per server, ``cpu`` the
    median CPU seconds per GB of each process that served that server's downloads."""
    base = medians[DISTRIBUTION]
    rows = [(name, f"{rate / 1e9:.2f}", f"{rate / base:.2f}",
             " + ".join(f"{x:.2f}" for x in cpu.get(name, [])) or "-")
            for name, rate in medians.items()]
    return Section(
        name="bench_peer_hop", title="Peer-hop streaming throughput",
        command=f"python -m benchmarks.bench_peer_hop --size-mib {size_mib} --rounds {rounds}",
        date=utc_now(), load=load_since(load_before),
        setup=f"A {size_mib} MiB blob, curl to /dev/null from each server in turn on loopback, "
              f"median of {rounds} rounds. CPU is user + system seconds per GB of the serving "
              "meshmirror and of the hopping one, from /proc.",
        tables=[Table(("server", "GB/s", "x Distribution", "CPU s/GB (serving peer + hop)"),
                      rows)],
        targets=[Target(f"{name} / Distribution", ">=", 0.5, medians[name] / base)
                 for name in HOPS])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--no-write", action="store_true", help="print the section only")
    args = parser.parse_args()
    load_before = load_average()

    with tempfile.TemporaryDirectory(prefix="bench-hop-") as tmp:
        workdir = Path(tmp)
        seeded, empty, empty3 = workdir / "seeded", workdir / "empty", workdir / "empty3"
        for directory in (seeded, empty, empty3):
            directory.mkdir()
        image = build_image("docker.io/library/bench:1", seeded, [args.size_mib << 20], seed=3)
        layer = image.platforms[0].layers[0]
        procs: list[subprocess.Popen[bytes]] = []
        upstream = DistributionRegistry()
        try:
            upstream.start()
            subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                            f"oci:{seeded}:1", f"docker://{upstream.address}/library/bench:1"],
                           check=True, timeout=600)
            node1, reg1, mesh1 = start_node(workdir, "node1", seeded, None)
            procs.append(node1)
            node2, reg2, _ = start_node(workdir, "node2", empty, mesh1)
            procs.append(node2)
            node3, reg3, _ = start_node(workdir, "node3", empty3, mesh1,
                                        "--mirror-spool-limit", "0")
            procs.append(node3)
            path = f"/v2/library/bench/blobs/{layer.digest}"
            urls = {DISTRIBUTION: f"{upstream.url}{path}",
                    "local": f"http://{reg1}{path}?ns=docker.io",
                    VERIFIED: f"http://{reg2}{path}?ns=docker.io",
                    STREAMED: f"http://{reg3}{path}?ns=docker.io"}
            # The empty nodes learn node1's summary through gossip; wait until they serve.
            for name in HOPS:
                wait_until(functools.partial(serves, urls[name]), 30, f"{name} to find the blob")
            # Processes whose CPU each download costs (Distribution's is not ours to count).
            serving = {DISTRIBUTION: [], "local": [node1.pid],
                       VERIFIED: [node1.pid, node2.pid], STREAMED: [node1.pid, node3.pid]}
            rates: dict[str, list[float]] = {name: [] for name in urls}
            cpu: dict[str, list[list[float]]] = {name: [] for name in urls}
            gigabytes = layer.size / 1e9
            for _ in range(args.rounds):
                for name, url in urls.items():
                    before = [cpu_seconds(pid) for pid in serving[name]]
                    rates[name].append(curl_rate(url))
                    cpu[name].append([(cpu_seconds(pid) - b) / gigabytes
                                      for pid, b in zip(serving[name], before, strict=True)])
        finally:
            for proc in procs:
                stop(proc)
            upstream.stop()

    medians = {name: statistics.median(values) for name, values in rates.items()}
    cpu_medians = {name: [statistics.median(run[i] for run in runs)
                          for i in range(len(runs[0]))] for name, runs in cpu.items()}
    result = section(args.size_mib, args.rounds, medians, cpu_medians, load_before)
    print(result.render())
    print(json.dumps({"medians_bytes_per_s": medians, "at": time.time()}))
    if not args.no_write:
        write_section(result, args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
