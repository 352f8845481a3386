"""meshmirror's registry vs the Distribution registry, same machine, same run.

1. Blob throughput: one 512 MiB blob, served by ``meshmirror run --store
   oci:DIR`` and by ``docker-registry`` holding the same blob (pushed there from
   the same layout with skopeo), downloaded with curl to /dev/null. Rounds
   alternate between the two servers so background load hits both alike; the
   figure is the ratio of medians.
2. Manifest HEAD latency: 200 concurrent HEADs by tag with containerd's Accept
   header (what its resolve sends; Distribution 404s an OCI manifest without
   it), each on its own connection, several rounds; p50/p99 of
   every request against each server.

Targets (issue #2): blob throughput >= 0.9x Distribution; HEAD p99 <= 2x.

    python benchmarks/bench_registry.py [--rounds 5] [--size-mib 512] [--heads 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.results import BenchRun, Section, Table, Target, load_since, utc_now
from meshmirror.oci.imagebuilder import build_image
from meshmirror.oci.mediatypes import CONTAINERD_ACCEPT
from tests.support.distribution import DistributionRegistry
from tests.support.ports import free_port, loopback_host
from tests.support.processes import spawn, stop, wait_until

MESHMIRROR, DISTRIBUTION = SERVERS = ("meshmirror", "distribution")


def curl_throughput(url: str) -> float:
    """Bytes per second of one GET, as curl measures it."""
    result = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{speed_download} %{size_download}", url],
        capture_output=True, text=True, timeout=300, check=True)
    speed, _size = result.stdout.split()
    return float(speed)


async def head_round(url: str, n: int) -> list[float]:
    """n HEADs started together, each on its own connection; seconds per request."""
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        start_gate = asyncio.Event()

        async def one() -> float:
            await start_gate.wait()
            t0 = time.perf_counter()
            async with session.head(url, headers={"Accept": CONTAINERD_ACCEPT}) as response:
                assert response.status == 200, response.status
            return time.perf_counter() - t0

        tasks = [asyncio.create_task(one()) for _ in range(n)]
        await asyncio.sleep(0.05)
        start_gate.set()
        return list(await asyncio.gather(*tasks))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def section(args: argparse.Namespace, blob: dict[str, float],
            head: dict[str, tuple[float, float]], load_before: str) -> Section:
    """The benchmark's block in RESULTS.md: median blob bytes/s and HEAD (p50, p99) seconds
    per server."""
    rows = [(name, f"{blob[name] / 1e9:.2f}", f"{head[name][0] * 1000:.0f}",
             f"{head[name][1] * 1000:.0f}") for name in SERVERS]
    return Section(
        name="bench_registry", title="Registry against Distribution",
        command=f"python benchmarks/bench_registry.py --rounds {args.rounds} "
                f"--size-mib {args.size_mib} --heads {args.heads}",
        date=utc_now(), load=load_since(load_before),
        setup="meshmirror: `meshmirror run --store oci:DIR`. Distribution: Debian "
              "`docker-registry`, filesystem storage, the same image pushed with `skopeo copy "
              f"--preserve-digests`. Blob: one {args.size_mib} MiB layer, `curl -o /dev/null`, "
              "median GB/s; rounds alternate between the two servers so the load hits both. "
              f"HEAD: {args.heads} concurrent `HEAD /v2/library/big/manifests/1` with "
              "containerd's Accept header, one connection each; percentiles over all requests "
              "of all rounds.",
        tables=[Table(("server", "blob GB/s", "HEAD p50 ms", "HEAD p99 ms"), rows)],
        targets=[
            Target("blob GB/s, meshmirror / Distribution", ">=", 0.9,
                   blob[MESHMIRROR] / blob[DISTRIBUTION]),
            Target("manifest HEAD p99, meshmirror / Distribution", "<=", 2,
                   head[MESHMIRROR][1] / head[DISTRIBUTION][1]),
        ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--heads", type=int, default=200)
    bench = BenchRun(parser)
    args = bench.args

    with tempfile.TemporaryDirectory(prefix="bench-registry-") as tmp:
        layout = Path(tmp) / "layout"
        t0 = time.monotonic()
        image = build_image("docker.io/library/big:1", layout,
                            layer_sizes=(args.size_mib * 1024 * 1024,), seed=42)
        layer = image.platforms[0].layers[0]
        print(f"built {layer.size / 2**20:.0f} MiB layer in {time.monotonic() - t0:.1f}s")

        with DistributionRegistry() as dist:
            subprocess.run(
                ["skopeo", "--insecure-policy", "copy", "--dest-tls-verify=false",
                 "--preserve-digests", f"oci:{layout}:1",
                 f"docker://{dist.address}/library/big:1"],
                check=True, capture_output=True, timeout=600, stdin=subprocess.DEVNULL)
            host = loopback_host()
            address = f"{host}:{free_port(host)}"
            log = Path(tmp) / "meshmirror.log"
            proc = spawn([sys.executable, "-m", "meshmirror", "--log-level", "warning", "run",
                          "--store", f"oci:{layout}", "--registry-addr", address,
                          "--metrics-addr", f"{host}:{free_port(host)}"], log,
                         {**os.environ, "PYTHONUNBUFFERED": "1"})
            try:
                wait_until(lambda: subprocess.run(
                    ["curl", "-sf", f"http://{address}/healthz"], capture_output=True,
                    timeout=5).returncode == 0, 30, "meshmirror run")
                servers = {MESHMIRROR: f"http://{address}", DISTRIBUTION: dist.url}
                blob_path = f"/v2/library/big/blobs/{layer.digest}"
                head_path = "/v2/library/big/manifests/1"

                speeds: dict[str, list[float]] = {name: [] for name in servers}
                for base in servers.values():  # warm the page cache
                    curl_throughput(base + blob_path)
                for _ in range(args.rounds):
                    for name, base in servers.items():
                        speeds[name].append(curl_throughput(base + blob_path))

                latencies: dict[str, list[float]] = {name: [] for name in servers}
                for base in servers.values():
                    asyncio.run(head_round(base + head_path, args.heads))  # warm-up
                for _ in range(args.rounds):
                    for name, base in servers.items():
                        latencies[name] += asyncio.run(head_round(base + head_path, args.heads))
            finally:
                stop(proc)

    print(f"\nblob GET, {args.size_mib} MiB, curl -> /dev/null, {args.rounds} rounds")
    for name, values in speeds.items():
        print(f"  {name:13s} rounds: {', '.join(f'{v / 1e9:.2f}' for v in values)} GB/s")
    print(f"manifest HEAD by tag, {args.heads} concurrent, {args.rounds} rounds")
    for name, values in latencies.items():
        print(f"  {name:13s} max {max(values) * 1000:7.1f} ms")
    result = section(args, {name: statistics.median(v) for name, v in speeds.items()},
                     {name: (percentile(v, 0.5), percentile(v, 0.99))
                      for name, v in latencies.items()}, bench.load_before)
    bench.publish(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
