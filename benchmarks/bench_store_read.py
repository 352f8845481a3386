"""OciLayoutStore.read throughput on a 512 MiB blob against a plain file read.

Both read the same page-cached file in the same run, at 1 MiB and at 4 MiB per
read; the store goes through asyncio and a thread per chunk (os.pread in the
default executor), so its chunk size decides how often it pays for the hop.
While the store streams, a 1 ms ticker on the same loop records how late it
wakes, which is what keeps a registry on that loop responsive. For contrast,
the same ticker runs while a naive reader does blocking reads on the loop.

    python benchmarks/bench_store_read.py [--size-mib 512] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.results import BenchRun, Section, Table, load_since, utc_now
from meshmirror.oci.digest import Digest
from meshmirror.oci.imagebuilder import build_image
from meshmirror.store.ocilayout import OciLayoutStore

MIB = 1024 * 1024
# The timed readers, by their key in the figures, as RESULTS.md names them.
READERS = {
    "plain 1 MiB": "plain `read()` 1 MiB",
    "plain 4 MiB": "plain `read()` 4 MiB",
    "store 1 MiB": "store, 1 MiB chunks (thread hop per chunk)",
    "store 4 MiB": "store, 4 MiB chunks (default)",
    "blocking on loop 1 MiB": "blocking reads on the event loop, 1 MiB",
}


def plain_read(path: Path, chunk: int) -> int:
    total = 0
    with open(path, "rb", buffering=0) as f:
        while data := f.read(chunk):
            total += len(data)
    return total


async def store_read(store: OciLayoutStore, digest: Digest) -> int:
    total = 0
    async for data in store.read(digest):
        total += len(data)
    return total


async def blocking_read_on_loop(path: Path, chunk: int) -> int:
    """Deliberately blocking: the contrast case the store's thread hop avoids."""
    total = 0
    with open(path, "rb", buffering=0) as f:  # noqa: ASYNC230
        while data := f.read(chunk):
            total += len(data)
            await asyncio.sleep(0)
    return total


async def with_ticker(work: Callable[[], Awaitable[int]]) -> tuple[int, float, list[float]]:
    """Run ``work`` while a 1 ms ticker measures how late the loop wakes it (ms)."""
    lags: list[float] = []
    done = asyncio.Event()

    async def tick() -> None:
        loop = asyncio.get_running_loop()
        while not done.is_set():
            t0 = loop.time()
            await asyncio.sleep(0.001)
            lags.append((loop.time() - t0 - 0.001) * 1000)

    ticker = asyncio.create_task(tick())
    start = time.perf_counter()
    total = await work()
    elapsed = time.perf_counter() - start
    done.set()
    await ticker
    return total, elapsed, lags


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    bench = BenchRun(parser, argv)
    args = bench.args
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        t0 = time.perf_counter()
        image = build_image("127.0.0.1:5050/bench/big:1", Path(tmp), [args.size_mib * MIB])
        build_s = time.perf_counter() - t0
        layer = image.platforms[0].layers[0]
        path = image.blob_path(layer.digest)
        stores = {c: OciLayoutStore(Path(tmp), chunk_size=c * MIB) for c in (1, 4)}
        print(f"built a {layer.size / MIB:.0f} MiB layer in {build_s:.2f}s "
              f"({layer.size / build_s / 1e9:.2f} GB/s)")
        plain_read(path, MIB)  # warm the page cache

        results: dict[str, list[float]] = {}
        lag: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for c, store in stores.items():
                t = time.perf_counter()
                assert plain_read(path, c * MIB) == layer.size
                results.setdefault(f"plain {c} MiB", []).append(
                    layer.size / (time.perf_counter() - t))
                total, elapsed, lags = await with_ticker(
                    functools.partial(store_read, store, layer.digest))
                assert total == layer.size
                results.setdefault(f"store {c} MiB", []).append(layer.size / elapsed)
                lag.setdefault(f"store {c} MiB", []).extend(lags)
            total, elapsed, lags = await with_ticker(lambda: blocking_read_on_loop(path, MIB))
            assert total == layer.size
            results.setdefault("blocking on loop 1 MiB", []).append(layer.size / elapsed)
            lag.setdefault("blocking on loop 1 MiB", []).extend(lags)
        for store in stores.values():
            await store.close()

    med = {k: statistics.median(v) for k, v in results.items()}
    for name, values in results.items():
        print(f"{name:24s} rounds {[f'{x / 1e9:.2f}' for x in values]} GB/s")
    print(f"cpus: {os.cpu_count()}")

    def ratio(store: str, plain: str) -> str:
        return f"{med[store] / med[plain]:.2f}"

    def lag_text(name: str) -> str:
        values = lag[name]
        return (f"p50 {pct(values, .5):.2f} ms, p99 {pct(values, .99):.2f} ms, "
                f"max {max(values):.2f} ms")

    section = Section(
        name="bench_store_read", title="OciLayoutStore.read against a plain file read",
        command=f"python benchmarks/bench_store_read.py --size-mib {args.size_mib} "
                f"--rounds {args.rounds}",
        date=utc_now(), load=load_since(bench.load_before),
        setup=f"A page-cached {args.size_mib} MiB blob, median GB/s over {args.rounds} rounds; "
              "the ratios are measured round by round in the same run.",
        tables=[Table(("reader", "median GB/s"),
                      [(READERS[name], f"{med[name] / 1e9:.2f}") for name in READERS])],
        notes=[f"Store / plain: {ratio('store 4 MiB', 'plain 4 MiB')} at 4 MiB "
               f"({ratio('store 4 MiB', 'plain 1 MiB')} against plain 1 MiB reads); "
               f"{ratio('store 1 MiB', 'plain 1 MiB')} at 1 MiB.",
               f"Event-loop lag seen by a 1 ms ticker while streaming: store 4 MiB "
               f"{lag_text('store 4 MiB')}; blocking reads on the loop "
               f"{lag_text('blocking on loop 1 MiB')}.",
               f"Building the {args.size_mib} MiB layer took {build_s:.1f} s "
               f"({layer.size / build_s / 1e9:.2f} GB/s)."])
    bench.publish(section)

if __name__ == "__main__":
    asyncio.run(main())
