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
import datetime
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

from meshmirror.oci.imagebuilder import build_image
from tests.support.distribution import DistributionRegistry
from tests.support.ports import free_port, loopback_host
from tests.support.processes import spawn, stop, wait_until


def start_node(workdir: Path, name: str, layout: Path, join: str | None, *extra: str
               ) -> tuple[subprocess.Popen[bytes], str, str]:
    host = loopback_host()
    registry = f"{host}:{free_port(host)}"
    mesh = f"{host}:{free_port(host)}"
    argv = [sys.executable, "-m", "meshmirror", "--log-level", "warning", "run",
            "--store", f"oci:{layout}", "--registry-addr", registry,
            "--metrics-addr", f"{host}:{free_port(host)}", "--mesh-addr", mesh,
            "--node-name", name, *extra]
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = parser.parse_args()

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
            urls = {"distribution": f"{upstream.url}{path}",
                    "local": f"http://{reg1}{path}?ns=docker.io",
                    "peer hop (verified, then sent)": f"http://{reg2}{path}?ns=docker.io",
                    "peer hop (streamed)": f"http://{reg3}{path}?ns=docker.io"}
            # The empty nodes learn node1's summary through gossip; wait until they serve.
            for name in ("peer hop (verified, then sent)", "peer hop (streamed)"):
                wait_until(functools.partial(serves, urls[name]), 30, f"{name} to find the blob")
            # Processes whose CPU each download costs (Distribution's is not ours to count).
            serving = {"distribution": [], "local": [node1.pid],
                       "peer hop (verified, then sent)": [node1.pid, node2.pid],
                       "peer hop (streamed)": [node1.pid, node3.pid]}
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
    base = medians["distribution"]
    date = datetime.date.today().isoformat()
    def cpu_text(name: str) -> str:
        per_process = [statistics.median(run[i] for run in cpu[name])
                       for i in range(len(cpu[name][0]))]
        return " + ".join(f"{x:.2f}" for x in per_process) or "-"

    rows = [f"| {name} | {medians[name] / 1e9:.2f} | {medians[name] / base:.2f} | "
            f"{cpu_text(name)} |" for name in urls]
    section = "\n".join([
        f"\n## Peer-hop streaming throughput ({args.size_mib} MiB blob)\n",
        f"`python -m benchmarks.bench_peer_hop --size-mib {args.size_mib} --rounds {args.rounds}`"
        f" — {date}, 2-core shared machine, loopback, curl to /dev/null, median of "
        f"{args.rounds} rounds.\n",
        "| server | GB/s | x Distribution | CPU s/GB (serving peer + hop) |",
        "|---|---:|---:|---:|",
        *rows,
        "",
        "Target: peer hop >= 0.5x Distribution.",
        f"Load average at the end: {' / '.join(f'{x:.2f}' for x in os.getloadavg())}.",
    ])
    print(section)
    print(json.dumps({"medians_bytes_per_s": medians, "at": time.time()}))
    with args.results.open("a") as out:
        out.write(section + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
