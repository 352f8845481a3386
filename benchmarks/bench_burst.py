"""A burst of concurrent GETs of one blob through one node, served by one peer fetch.

Real processes on loopback: a holder node with two layers of the same size in
its OCI-layout store and an empty node joined to it. First one client GETs
layer A alone through the empty node (the baseline: one request, one peer
fetch, verified, then sent); then ``--clients`` clients GET layer B at once.
Every body is hashed. Reported:

- served: bodies that arrived whole with the right digest;
- peer fetches: the holder's access-log lines for layer B (one fetch per blob
  per node wants 1);
- header latency: each client's time to response headers, as p50/p99 and as a
  ratio to the single request's; and the spread, each client's headers minus
  the first client's (the moment the verified blob became available): the
  issue's "headers within 1 s of the first byte being available";
- RSS: the node's peak (VmHWM, reset before the burst) minus its idle RSS.

    python -m benchmarks.bench_burst --clients 200 --size-mib 64
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import re
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from benchmarks.results import (
    BenchRun,
    Section,
    Table,
    Target,
    load_since,
    utc_now,
)
from meshmirror.oci.imagebuilder import build_image
from tests.helm.chart import default_memory_limit
from tests.support.node import RunningNode, start_node
from tests.support.processes import stop, wait_until

MiB = 1024 * 1024
TIMEOUT_S = 300


@dataclass(frozen=True)
class Burst:
    clients: int
    size_mib: int
    served: int
    peer_fetches: int
    single_headers_s: float
    headers_s: list[float]  # per served client, from its request
    spread_s: list[float]  # per served client, headers minus the first client's
    took_s: float
    rss_idle_mib: float
    rss_peak_mib: float


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def vm(pid: int, name: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{name}:\s+(\d+) kB$", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


async def pull(url: str, clients: int, digest: str) -> list[tuple[float, float] | None]:
    """(sent at, headers at) on the monotonic clock per client, None if not served whole."""
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector,
                                     auto_decompress=False) as session:

        async def one() -> tuple[float, float] | None:
            sent = time.monotonic()
            async with session.get(url) as response:
                headers = time.monotonic()
                if response.status != 200:
                    return None
                hasher = hashlib.sha256()
                async for chunk in response.content.iter_chunked(MiB):
                    hasher.update(chunk)
            return (sent, headers) if f"sha256:{hasher.hexdigest()}" == digest else None

        return await asyncio.gather(*(one() for _ in range(clients)))


def peer_fetches(holder: RunningNode, digest: str) -> int:
    return sum(1 for line in holder.log_lines()
               if line.get("msg") == "request" and line.get("method") == "GET"
               and str(line.get("path", "")).endswith(f"/blobs/{digest}"))


def run(clients: int, size_mib: int) -> Burst:
    with tempfile.TemporaryDirectory(prefix="bench-burst-") as tmp:
        workdir = Path(tmp)
        seeded, empty = workdir / "seeded", workdir / "empty"
        seeded.mkdir()
        empty.mkdir()
        image = build_image("docker.io/library/burst:1", seeded,
                            [size_mib * MiB, size_mib * MiB + 1, 1024], seed=11)
        single, burst, warm = (str(layer.digest) for layer in image.platforms[0].layers)
        holder = start_node(f"oci:{seeded}", workdir / "holder.log", ("--node-name", "holder"))
        node = None
        try:
            node = start_node(f"oci:{empty}", workdir / "node.log",
                              ("--node-name", "node", "--join", holder.mesh,
                               "--mirror-spool-dir", str(workdir)))
            base = f"http://{node.address}/v2/library/burst/blobs/"

            def routed() -> bool:
                got = asyncio.run(pull(f"{base}{warm}?ns=docker.io", 1, warm))
                return got[0] is not None

            wait_until(routed, 30, "the node to find the holder's blobs")
            (alone,) = asyncio.run(pull(f"{base}{single}?ns=docker.io", 1, single))
            assert alone is not None, "the single request was not served"
            time.sleep(1)
            idle = vm(node.proc.pid, "VmRSS")
            Path(f"/proc/{node.proc.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
            began = time.monotonic()
            results = asyncio.run(pull(f"{base}{burst}?ns=docker.io", clients, burst))
            took = time.monotonic() - began
            peak = vm(node.proc.pid, "VmHWM")
            fetches = peer_fetches(holder, burst)
        finally:
            for running in (node, holder):
                if running is not None:
                    stop(running.proc)
    served = [times for times in results if times is not None]
    first = min((headers for _, headers in served), default=0.0)
    return Burst(clients, size_mib, len(served), fetches, alone[1] - alone[0],
                 [headers - sent for sent, headers in served],
                 [headers - first for _, headers in served], took, idle / MiB, peak / MiB)


def section(result: Burst, load_before: str) -> Section:
    p50, p99 = (percentile(result.headers_s, q) for q in (0.5, 0.99))
    spread99 = percentile(result.spread_s, 0.99) if result.spread_s else float("inf")
    single = max(result.single_headers_s, 1e-9)
    rss = result.rss_peak_mib - result.rss_idle_mib
    rows = [
        ["served whole and verified", f"{result.served}/{result.clients}"],
        ["peer fetches of the blob", str(result.peer_fetches)],
        ["single request: headers after", f"{result.single_headers_s:.2f} s"],
        ["burst: headers p50 / p99", f"{p50:.2f} s / {p99:.2f} s "
                                     f"({p50 / single:.2f}x / {p99 / single:.2f}x the single)"],
        ["burst: headers after the first client's, p50 / p99",
         f"{statistics.median(result.spread_s):.3f} s / {spread99:.3f} s"],
        ["burst: all bodies received after", f"{result.took_s:.1f} s"],
        ["node RSS idle / peak", f"{result.rss_idle_mib:.0f} / {result.rss_peak_mib:.0f} MiB "
                                 f"(+{rss:.0f})"],
    ]
    return Section(
        name="bench_burst",
        title="Burst: concurrent GETs of one blob through one node",
        command=f"python -m benchmarks.bench_burst --clients {result.clients} "
                f"--size-mib {result.size_mib}",
        date=utc_now(),
        load=load_since(load_before),
        setup=(f"A holder node and an empty node on loopback; {result.clients} clients GET "
               f"one {result.size_mib} MiB layer at once through the empty node, which "
               "fetches it from the holder once (mirror/flight.py) and serves every client "
               "from its cache file once the digest verified. The single request is another "
               "layer of the same size, fetched alone first."),
        tables=[Table(["figure", "value"], rows)],
        notes=["Header latency is dominated by the fetch and verification every client "
               "waits for together; the spread is what single flight adds per client."],
        targets=[
            Target("burst: clients served", ">=", result.clients, result.served, ""),
            Target("burst: peer fetches of one blob", "<=", 1, result.peer_fetches, ""),
            Target("burst: headers p99 after the first client's", "<=", 1.0, spread99, " s"),
            Target("burst: node RSS over idle", "<=", result.size_mib, rss, " MiB"),
            Target("burst: node peak RSS, against the chart's memory limit", "<=",
                   default_memory_limit() / MiB, result.rss_peak_mib, " MiB"),
        ],
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--size-mib", type=int, default=64)
    bench = BenchRun(parser)
    bench.publish(section(run(bench.args.clients, bench.args.size_mib), bench.load_before))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
