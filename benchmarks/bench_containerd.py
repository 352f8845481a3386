"""ContainerdStore against a private real containerd 1.6: index build, event latency, reads.

1. Initial index build. ``--images`` images of ``--layers`` tiny layers each
   (manifest + config + layers = blobs per image) are written into one OCI
   layout and imported with one ``ctr images import --no-unpack``. The store's
   first full sync (images List + content List + one read per manifest) is
   timed against the naive baseline measured in the same run: one content Info
   RPC per blob.
2. Event-to-key-set latency. With that index loaded, small images are imported
   one at a time with ``ctr``; a separate raw events subscription records when
   containerd's ``/images/create`` arrives, the store's subscription when the
   KeyEvent carrying the new tag arrives.
3. Blob read throughput, direct file vs gRPC Read, on one ``--big-mib`` layer
   (page cache warm, best of ``--rounds``).

    python benchmarks/bench_containerd.py [--images 1000] [--layers 18] [--big-mib 256]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.results import BenchRun, Section, Table, Target, load_since, utc_now
from meshmirror.containerd.client import ContainerdClient
from meshmirror.containerd.store import ContainerdStore
from meshmirror.oci.digest import Digest
from meshmirror.oci.imagebuilder import BuiltImage, build_image
from tests.support.containerd import NAMESPACE, Containerd

MIB = 1024 * 1024


def build_many(layout: Path, images: int, layers: int) -> list[BuiltImage]:
    return [build_image(f"bench.local/many/img{i}:v1", layout, (32,) * layers, seed=i)
            for i in range(images)]


async def index_build(ctrd: Containerd, content: Path | None) -> tuple[float, int]:
    store = ContainerdStore(ctrd.socket, NAMESPACE, content, resync_interval=3600)
    start = time.perf_counter()
    await store.start()
    try:
        if not await store.wait_ready(900):
            raise RuntimeError("store did not sync within 900 s")
        return time.perf_counter() - start, len(await store.keys())
    finally:
        await store.close()


async def info_per_blob(ctrd: Containerd, digests: list[str]) -> float:
    client = ContainerdClient(str(ctrd.socket))
    try:
        start = time.perf_counter()
        for digest in digests:
            await client.content_info(digest)
        return time.perf_counter() - start
    finally:
        await client.close()


async def event_latency(ctrd: Containerd, images: list[BuiltImage]
                        ) -> tuple[list[float], list[float], list[float]]:
    """Per import: KeyEvent after containerd's event, KeyEvent after ctr start, ctr runtime."""
    store = ContainerdStore(ctrd.socket, NAMESPACE, ctrd.content_path, resync_interval=3600)
    raw = ContainerdClient(str(ctrd.socket))
    raw_seen: dict[str, float] = {}
    stream = raw.subscribe(['topic=="/images/create"'])

    async def watch_raw() -> None:
        from meshmirror.containerd.proto import image_events_pb2

        async for envelope in stream:
            name = image_events_pb2.ImageCreate.FromString(envelope.event.value).name
            raw_seen[name] = time.perf_counter()

    watcher = asyncio.create_task(watch_raw())
    after_event: list[float] = []
    after_start: list[float] = []
    ctr_runtime: list[float] = []
    await store.start()
    try:
        if not await store.wait_ready(900):
            raise RuntimeError("store did not sync")
        events = store.subscribe()
        for image in images:
            assert image.archive is not None
            start = time.perf_counter()
            proc = await asyncio.create_subprocess_exec(
                "ctr", "--address", str(ctrd.socket), "-n", NAMESPACE, "images", "import",
                "--no-unpack", str(image.archive),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            waiter = asyncio.create_task(proc.wait())
            while True:
                event = await asyncio.wait_for(anext(events), 30)
                if image.tag_key in event.added:
                    break
            seen = time.perf_counter()
            if await waiter != 0:
                raise RuntimeError(f"ctr import {image.archive} failed")
            ctr_done = time.perf_counter()
            after_event.append(seen - raw_seen.get(image.name, seen))
            after_start.append(seen - start)
            ctr_runtime.append(ctr_done - start)
    finally:
        watcher.cancel()
        stream.cancel()
        await raw.close()
        await store.close()
    return after_event, after_start, ctr_runtime


async def read_throughput(ctrd: Containerd, digest: Digest, size: int, rounds: int
                          ) -> tuple[float, float]:
    async def best(store: ContainerdStore) -> float:
        rates = []
        for _ in range(rounds):
            start = time.perf_counter()
            total = 0
            async for chunk in store.read(digest):
                total += len(chunk)
            assert total == size
            rates.append(size / (time.perf_counter() - start))
        return max(rates)

    direct = ContainerdStore(ctrd.socket, NAMESPACE, ctrd.content_path)
    viagrpc = ContainerdStore(ctrd.socket, NAMESPACE, ctrd.dir / "no-content-dir")
    async with direct, viagrpc:
        assert await direct.wait_ready(60) and await viagrpc.wait_ready(60)
        return await best(direct), await best(viagrpc)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--layers", type=int, default=18, help="layers per image")
    parser.add_argument("--events", type=int, default=20, help="imports timed for latency")
    parser.add_argument("--big-mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tmpfs", type=lambda v: v.lower() in {"1", "true", "yes"},
                        default=True, metavar="BOOL",
                        help="containerd root and layouts on /dev/shm: containerd fsyncs "
                             "every blob commit (~25 ms each on this disk), which would "
                             "make importing 20,000 blobs take many minutes")
    bench = BenchRun(parser)
    args = bench.args
    if min(args.images, args.layers, args.events, args.big_mib, args.rounds) < 1:
        parser.error("every count must be at least 1")

    scratch = Path("/dev/shm") if args.tmpfs else Path(tempfile.gettempdir())
    with tempfile.TemporaryDirectory(prefix="bench-ctrd-", dir=scratch) as tmp:
        work = Path(tmp)
        ctrd = Containerd()
        try:
            if args.tmpfs:
                (work / "ctrd-root").mkdir()
                ctrd.root.symlink_to(work / "ctrd-root")
            ctrd.start()
            figures = run(args, work, ctrd)
        finally:
            ctrd.close()
    result = section(args, figures, bench.load_before)
    bench.publish(result)
    return 0


@dataclass(frozen=True)
class Figures:
    """What one run measured; seconds and bytes per second unless named otherwise."""

    images: int
    keys: int
    build_layout: float
    ctr_import: float
    index_build: float
    index_build_grpc: float
    info_per_blob: float
    after_event: list[float]
    after_start: list[float]
    read_mib: int
    read_direct: float
    read_grpc: float


def section(args: argparse.Namespace, f: Figures, load_before: str) -> Section:
    """The benchmark's block in RESULTS.md."""
    def ms(seconds: float) -> str:
        return f"{seconds * 1000:.1f} ms"

    rows = [
        (f"building the {f.images:,}-image layout / `ctr images import --no-unpack`",
         f"{f.build_layout:.1f} s / {f.ctr_import:.1f} s"),
        (f"initial index build (images List, content List, {f.images:,} manifest reads from "
         "files)", f"{f.index_build:.2f} s for {f.keys:,} keys"),
        ("same, manifests read over gRPC `Read`", f"{f.index_build_grpc:.2f} s"),
        (f"baseline: one content `Info` RPC per blob ({f.keys - f.images:,} RPCs)",
         f"{f.info_per_blob:.2f} s, {f.info_per_blob / f.index_build:.1f}x the index build"),
        ("containerd `/images/create` event -> store's KeyEvent",
         f"p50 {ms(statistics.median(f.after_event))}, p90 {ms(pct(f.after_event, 0.9))}, "
         f"max {ms(max(f.after_event))}"),
        ("`ctr images import` start -> KeyEvent",
         f"p50 {ms(statistics.median(f.after_start))}, max {ms(max(f.after_start))}"),
        (f"{f.read_mib} MiB blob read, direct file / gRPC `Read`",
         f"{f.read_direct / 1e9:.2f} GB/s / {f.read_grpc / 1e9:.2f} GB/s, ratio "
         f"{f.read_direct / f.read_grpc:.1f}x"),
    ]
    return Section(
        name="bench_containerd", title="containerd store: index build, events, reads",
        command=f"python benchmarks/bench_containerd.py --images {args.images} --layers "
                f"{args.layers} --events {args.events} --big-mib {args.big_mib} --rounds "
                f"{args.rounds}" + ("" if args.tmpfs else " --tmpfs false"),
        date=utc_now(), load=load_since(load_before),
        setup=f"{args.images:,} images x {args.layers} tiny layers, {args.events} timed "
              f"imports, {args.big_mib} MiB read blob, best of {args.rounds}. containerd 1.6 "
              f"with its root {'on /dev/shm' if args.tmpfs else 'on disk'}.",
        tables=[Table(("measure", "figure"), rows)],
        targets=[Target("image event -> KeyEvent, slowest of the imports", "<=", 1,
                        max(f.after_event), " s")])


def run(args: argparse.Namespace, work: Path, ctrd: Containerd) -> Figures:
    t = time.perf_counter()
    many = build_many(work / "many", args.images, args.layers)
    built_s = time.perf_counter() - t
    archive = work / "many.tar"
    subprocess.run(["tar", "-C", str(work / "many"), "-cf", str(archive), "."], check=True)
    t = time.perf_counter()
    ctrd.ctr("images", "import", "--no-unpack", str(archive), timeout=1800)
    import_s = time.perf_counter() - t
    digests = sorted({d for image in many for d in image.digests()})
    print(f"built {args.images} images / {len(digests)} blobs in {built_s:.1f} s, "
          f"ctr import {import_s:.1f} s", flush=True)

    build_direct, keys = asyncio.run(index_build(ctrd, ctrd.content_path))
    build_grpc, keys_grpc = asyncio.run(index_build(ctrd, None))
    naive = asyncio.run(info_per_blob(ctrd, digests))
    assert keys == keys_grpc == len(digests) + args.images, (keys, keys_grpc)
    print(f"index build: {build_direct:.2f} s (manifests read from files), "
          f"{build_grpc:.2f} s (manifests over gRPC Read); {keys} keys")
    print(f"baseline, one Info RPC per blob: {naive:.2f} s; "
          f"ratio baseline/ours = {naive / build_direct:.1f}x")

    small = [build_image(f"bench.local/event/img{i}:v1", work / f"ev{i}", (1024,),
                         seed=100_000 + i, archive=work / f"ev{i}.tar")
             for i in range(args.events)]
    after_event, after_start, ctr_runtime = asyncio.run(event_latency(ctrd, small))
    print(f"event -> KeyEvent (ms): p50 {1000 * statistics.median(after_event):.1f}, "
          f"p90 {1000 * pct(after_event, 0.9):.1f}, max {1000 * max(after_event):.1f}")
    print(f"ctr import start -> KeyEvent (ms): p50 {1000 * statistics.median(after_start):.1f}"
          f", max {1000 * max(after_start):.1f}; ctr import runtime p50 "
          f"{1000 * statistics.median(ctr_runtime):.1f} ms")

    big = build_image("bench.local/big:v1", work / "big", (args.big_mib * MIB,), seed=7,
                      archive=work / "big.tar")
    ctrd.ctr("images", "import", "--no-unpack", str(big.archive), timeout=600)
    layer = big.platforms[0].layers[0]
    direct, grpc_rate = asyncio.run(read_throughput(ctrd, layer.digest, layer.size,
                                                    args.rounds))
    print(f"read {layer.size / MIB:.0f} MiB: direct file {direct / 1e9:.2f} GB/s, gRPC Read "
          f"{grpc_rate / 1e9:.2f} GB/s; ratio direct/gRPC = {direct / grpc_rate:.1f}x")

    return Figures(args.images, keys, built_s, import_s, build_direct, build_grpc, naive,
                   after_event, after_start, args.big_mib, direct, grpc_rate)

if __name__ == "__main__":
    sys.exit(main())
