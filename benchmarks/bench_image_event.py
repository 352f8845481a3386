"""Event-loop time of one containerd image event at 100,000 keys, against a rebuild.

containerd sends image events all through a pull, and the store applies each on the
node's event loop, which also serves registry requests: one image's record replaced in
the index, the key view taken and published, and the subscription (the summary
publisher's) computing what was added and removed. The baseline, in the same run, is
what the index did before it changed one image at a time: the union rebuilt from every
image's table, and the two views told apart by a search over all their digests (which
is also what a subscriber further behind than the union's kept steps pays, timed on
its own as well).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import statistics
import time
import tracemalloc
from collections.abc import Sequence

from benchmarks.results import BenchRun, Section, Table, Target, load_since, utc_now
from meshmirror.containerd.store import ImageIndex, ImageRecord
from meshmirror.store.base import KeyEventHub
from meshmirror.store.digests import (
    DigestKeys,
    DigestTableBuilder,
    DigestUnion,
    PackedDigests,
    digest_text,
)

# Wanted: an image event well under what a registry request waits for on the loop,
# for little more memory than the union's table alone.
EVENT_P50_MS = 5.0
EVENT_VS_REBUILD = 0.25
INDEX_VS_TABLE = 1.25


def record(image: int, per: int, extra: int = 0) -> ImageRecord:
    """Image ``image``'s record: ``per`` blobs of its own, ``extra`` more (a new version)."""
    seeds = [b"%d" % (image * per + n) for n in range(per)]
    seeds += [b"extra-%d-%d" % (image, n) for n in range(extra)]
    raws = [hashlib.sha256(seed).digest() for seed in seeds]
    # As a walk names them: the target, and its children (what the manifest cache holds).
    return ImageRecord(digest_text(raws[0]), (PackedDigests([(raws[0], 1)]),
                                              PackedDigests((raw, 1) for raw in raws[1:])),
                       f"r.example/img{image}:latest")


def memory(images: int, per: int) -> dict[str, float]:
    """MiB traced: the index over ``images`` records (its union's table, a count per
    digest, the tag keys) and, the baseline, the union's table built whole alone."""
    records = [record(image, per) for image in range(images)]
    traced: dict[str, float] = {}
    tracemalloc.start()
    try:
        builder = DigestTableBuilder()
        for r in records:
            r.add_to(builder)
        table = builder.build()
        traced["table"] = tracemalloc.get_traced_memory()[0] / 2**20
        del builder, table
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
        index = ImageIndex()
        for image, r in enumerate(records):
            index.put(f"img{image}", r)
        index.keys()
        current, peak = tracemalloc.get_traced_memory()
        traced["index"], traced["index peak"] = (current - start) / 2**20, (peak - start) / 2**20
    finally:
        tracemalloc.stop()
    return traced


async def measure(images: int, per: int, events: int) -> dict[str, list[float]]:
    """Milliseconds per event: as the index does it now, and rebuilt (the baseline)."""
    index = ImageIndex()
    for image in range(images):
        index.put(f"img{image}", record(image, per))
    hub = KeyEventHub(index.keys())
    subscription = hub.subscribe()
    updates = [record(n % images, per, extra=n + 1) for n in range(events)]
    figures: dict[str, list[float]] = {"event": [], "search": [], "rebuild": []}
    for n, update in enumerate(updates):
        name = f"img{n % images}"
        before = index.keys()
        start = time.perf_counter()
        index.put(name, update)
        hub.publish(index.keys())
        event = await subscription.__anext__()
        figures["event"].append((time.perf_counter() - start) * 1e3)
        assert event.added, "the replacement added blobs"
        start = time.perf_counter()
        builder = DigestTableBuilder()
        for r in index.images.values():
            r.add_to(builder)
        union = DigestUnion(builder)
        rebuilt = DigestKeys(union.table, frozenset(
            tag for r in index.images.values() if (tag := r.tag_key()) is not None))
        built = time.perf_counter()
        added, removed = rebuilt.changes(before)  # no steps from `before`: a search
        figures["search"].append((time.perf_counter() - built) * 1e3)
        figures["rebuild"].append((time.perf_counter() - start) * 1e3)
        assert set(added) == set(event.added) and set(removed) == set(event.removed)
    return figures


def section(images: int, per: int, events: int, figures: dict[str, list[float]],
            traced: dict[str, float], load: str) -> Section:
    p50 = {kind: statistics.median(times) for kind, times in figures.items()}
    worst = {kind: max(times) for kind, times in figures.items()}
    rows = [(label, f"{p50[kind]:.2f} ms", f"{worst[kind]:.2f} ms")
            for kind, label in (("event", "image event (index changed one image at a time, "
                                          "diff from the union's step)"),
                                ("search", "the diff by search alone (a subscriber further "
                                           "behind than the kept steps)"),
                                ("rebuild", "baseline: union rebuilt, views searched"))]
    return Section(
        name="bench_image_event",
        title="Event-loop time of a containerd image event at 100,000 keys",
        command=f"python -m benchmarks.bench_image_event --images {images} --per {per} "
                f"--events {events}",
        date=utc_now(), load=load,
        setup=f"{images:,} images of {per} blobs each ({images * per:,} keys); each event "
              "replaces one image's record with one holding more blobs, publishes the key "
              "view to a KeyEventHub and takes the subscription's KeyEvent:",
        tables=[Table(("per event", "median", "max"), rows),
                Table(("held at the start (tracemalloc)", "MiB"), [
                    ("index: union table, a count per digest, tag keys",
                     f"{traced['index']:.2f}"),
                    ("index, peak while built", f"{traced['index peak']:.2f}"),
                    ("baseline: the union's table alone", f"{traced['table']:.2f}")])],
        targets=[Target("image event median", "<=", EVENT_P50_MS, p50["event"], " ms"),
                 Target("image event / rebuild, median", "<=", EVENT_VS_REBUILD,
                        p50["event"] / p50["rebuild"]),
                 Target("index memory / union table alone", "<=", INDEX_VS_TABLE,
                        traced["index"] / traced["table"])])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--per", type=int, default=100, help="blobs per image")
    parser.add_argument("--events", type=int, default=30)
    bench = BenchRun(parser, argv)
    args = bench.args
    if min(args.images, args.per, args.events) < 1:
        parser.error("--images, --per and --events must be at least 1")
    traced = memory(args.images, args.per)
    figures = asyncio.run(measure(args.images, args.per, args.events))
    bench.publish(section(args.images, args.per, args.events, figures, traced,
                          load_since(bench.load_before)))


if __name__ == "__main__":
    main()
