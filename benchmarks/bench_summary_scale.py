"""Summaries at scale: filter size on the wire, delta size, routing memory, subset hit ratio.

    python -m benchmarks.bench_summary_scale [--seed 1] [--containerd] [--no-write]

Four measurements, each against its baseline in the same run:

* filter size: a filter built for 1,000, 20,000 and 100,000 digest keys, its
  wire size per key (version 3, range-reduced, against version 1's power of
  two) and its false-positive rate measured on 100,000 keys never added;
* delta size: a node of 21,500 keys stores an 8-layer image (8 layers, config,
  manifest, tag: 11 keys); the delta a peer holding the previous epoch fetches,
  against the whole filter it fetched before deltas;
* routing memory: a real node process (`python -m meshmirror run --store oci:DIR`)
  serving 100,000 digest keys (1,000 images of 98 layers), alone (the baseline),
  then joined to 100 and to 5,000 peers of 21,500 keys each (see `FakeCluster`):
  its RSS and peak RSS from /proc once it holds every summary it chose; with
  ``--containerd``, also a node over a private containerd holding the same images
  (``--store containerd``, what a cluster runs), alone and at 5,000 peers;
* the subset's hit-ratio cost: with the subset held, the chance that content
  held by h of 5,000 nodes is found, computed from the subset the directory
  actually chose (every node's own choice, sampled), against holding all.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from aiohttp import web

from benchmarks.bench_router import digest_key
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
from meshmirror.mesh.config import MeshConfig
from meshmirror.mesh.messages import NodeState, PushNodeState, PushPull
from meshmirror.mesh.tags import encode_tags
from meshmirror.mesh.wire import StreamDecoder, encode_stream
from meshmirror.routing.bloom import MASK, BloomFilter
from meshmirror.routing.directory import SUMMARY_BUDGET_BYTES
from meshmirror.routing.summary import (
    MEDIA_TYPE_V3,
    SUMMARY_PATH,
    VERSION_RANGE,
    Summary,
    SummaryDelta,
    etag_for,
)
from tests.support.containerd import NAMESPACE, Containerd
from tests.support.metrics import metric, scrape
from tests.support.node import start_node
from tests.support.ports import free_port
from tests.support.processes import proc_status, stop, wait_until

PEER_KEYS = 21_500
CLUSTER = 5_000


def filter_sizes() -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    probes = [digest_key(f"probe-{i}") for i in range(100_000)]
    for keys in (1_000, 20_000, 100_000):
        members = [digest_key(f"member-{i}") for i in range(keys)]
        ranged = BloomFilter.build(members)
        legacy = BloomFilter.build(members, reduction=MASK)
        cells: list[str] = [f"{keys:,}"]
        for bloom in (ranged, legacy):
            summary = Summary(epoch=1, k=bloom.k, m=bloom.m, count=keys, born_at_ms=0,
                              bits=bloom.bits.tobytes(), reduction=bloom.reduction)
            wire = len(summary.encode())
            fp = sum(p in bloom for p in probes) / len(probes)
            cells += [f"{wire * 8 / keys:.2f}", f"{fp * 100:.2f}%"]
        rows.append(tuple(cells))
    return rows


def delta_size() -> tuple[int, int]:
    members = [digest_key(f"member-{i}") for i in range(PEER_KEYS)]
    bloom = BloomFilter.build(members)
    full = len(Summary(epoch=1, k=bloom.k, m=bloom.m, count=PEER_KEYS, born_at_ms=0,
                       bits=bloom.bits.tobytes()).encode())
    image = [digest_key(f"image-{i}") for i in range(10)] + ["docker.io/library/app:2"]
    fresh = bloom.add_fresh(image)
    delta = SummaryDelta(base_epoch=1, epoch=2, k=bloom.k, m=bloom.m, reduction=bloom.reduction,
                         count=PEER_KEYS + len(image), born_at_ms=0, positions=fresh)
    return full, len(delta.encode())


# -- routing memory: a real `meshmirror run` process ----------------------------------

IMAGES = 1_000
LAYERS = 98  # + manifest + config: 100 keys an image, 100,000 in all
MEMBER_PORT = 9  # the discard port: nothing answers the node's probes of them


def write_layout(root: Path, images: int = IMAGES) -> int:
    """An OCI layout of `IMAGES` images of `LAYERS` tiny distinct layers each, written
    directly (one index.json at the end): 100,000 digest keys in a few seconds. The
    digests are what matters to the node's memory, not the layers' sizes."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> dict[str, object]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    manifests = []
    for image in range(images):
        config = put(json.dumps({"architecture": "amd64", "os": "linux",
                                 "rootfs": {"type": "layers", "diff_ids": []},
                                 "image": image}).encode())
        layers = [{"mediaType": "application/vnd.oci.image.layer.v1.tar", **put(
            f"layer {image}/{n}".encode())} for n in range(LAYERS)]
        manifest = put(json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
            "layers": layers}).encode())
        manifests.append({"mediaType": "application/vnd.oci.image.manifest.v1+json",
                          **manifest, "annotations": {
                              "org.opencontainers.image.ref.name":
                                  f"127.0.0.1:5000/bench/app{image}:v1"}})
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (root / "index.json").write_text(json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests}))
    return images * (LAYERS + 3)  # + each image's tag


class FakeCluster:
    """What the node sees of a cluster of ``peers`` other nodes, all on loopback, in a
    thread of its own: a seed that answers the node's join with every member alive
    (memberlist push-pull, each advertising a summary of `PEER_KEYS` keys), and one
    summary endpoint that serves a real filter of that size for all of them. The
    members' own gossip addresses (127.1.x.y) answer nothing; the node probes a few
    of them during a run and finds them dead, as it would a cluster shrinking."""

    def __init__(self, peers: int) -> None:
        self.peers = peers
        bloom = BloomFilter.build([digest_key(f"peer-{i}") for i in range(PEER_KEYS)])
        self._payload = Summary(epoch=1, k=bloom.k, m=bloom.m, count=PEER_KEYS, born_at_ms=0,
                                bits=bloom.bits.tobytes()).encode(VERSION_RANGE)
        self.http_port = free_port()
        self.seed_port = free_port()
        self.fetches = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise TimeoutError("fake cluster did not start")

    def _states(self) -> tuple[PushNodeState, ...]:
        base = f"http://127.0.0.1:{self.http_port}"
        return tuple(PushNodeState(
            f"member-{n}", bytes((127, 1, n // 250, n % 250 + 2)), MEMBER_PORT,
            encode_tags({"http": base, "epoch": "1", "keys": str(PEER_KEYS)}), 1,
            NodeState.ALIVE, MeshConfig().vsn) for n in range(self.peers))

    async def _summary(self, request: web.Request) -> web.Response:
        self.fetches += 1
        return web.Response(body=self._payload, content_type=MEDIA_TYPE_V3,
                            headers={"ETag": etag_for(1)})

    async def _join(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = StreamDecoder(None, b"")
        try:
            async with asyncio.timeout(10):
                while decoder.feed(await reader.read(65536)) is None:
                    pass
                writer.write(encode_stream(PushPull(join=False, nodes=self._states()),
                                           keyring=None))
                await writer.drain()
        finally:
            writer.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get(SUMMARY_PATH, self._summary)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1",
                                                  self.http_port).start())
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._join, "127.0.0.1", self.seed_port))
        self._ready.set()
        self._loop.run_forever()

    def close(self) -> None:
        async def shut() -> None:
            self._server.close()
            await self._runner.cleanup()
            self._loop.stop()
        asyncio.run_coroutine_threadsafe(shut(), self._loop)
        self._thread.join(10)


def with_containerd(layout: Path, scratch: Path) -> Containerd:
    """A private containerd holding the layout's images (``ctr images import``), its root
    under ``scratch`` (/dev/shm: containerd fsyncs every blob it commits)."""
    archive = scratch / "layout.tar"
    subprocess.run(["tar", "-C", str(layout), "-cf", str(archive), "."], check=True)
    ctrd = Containerd()
    (scratch / "root").mkdir()
    ctrd.root.symlink_to(scratch / "root")
    try:
        ctrd.start()
        ctrd.ctr("images", "import", "--no-unpack", "--all-platforms", str(archive),
                 timeout=1800)
    except BaseException:
        ctrd.close()
        raise
    archive.unlink()
    return ctrd


def memory(peers: int, layout: Path, logs: Path, containerd: Containerd | None = None,
           keys: int = 0) -> dict[str, float]:
    """Peak RSS of `meshmirror run` serving ``layout`` (or ``containerd``'s images) that
    joined ``peers`` others and holds the summaries it chooses of them, once its own
    summary has ``keys`` keys."""
    cluster = FakeCluster(peers)
    store = f"oci:{layout}"
    extra: tuple[str, ...] = ("--join", f"127.0.0.1:{cluster.seed_port}")
    if containerd is not None:
        store = "containerd"
        extra += ("--containerd-sock", str(containerd.socket),
                  "--containerd-namespace", NAMESPACE,
                  "--containerd-content-path", str(containerd.content_path),
                  "--containerd-config", str(containerd.config),
                  "--containerd-registry-config-path", str(logs / "certs.d"))
    node = start_node(store, logs / f"node-{peers}-{store[:3]}.log", extra)
    try:
        def settled() -> bool:
            # Its own summary of the store's keys is published, and those of its peers held.
            with urllib.request.urlopen(f"http://{node.address}{SUMMARY_PATH}",
                                        timeout=5) as own:
                own.read()
            got = scrape(node.metrics)
            if metric(got, "meshmirror_summary_keys") < keys:
                return False
            return peers == 0 or (
                metric(got, "meshmirror_peer_directory_peers") >= peers * 0.99
                and metric(got, "meshmirror_peer_summaries_share") == 1.0
                and metric(got, "meshmirror_peer_summary_held_bytes") > 0)

        wait_until(settled, 300, f"the node to hold its chosen summaries of {peers} peers",
                   interval=0.5)
        time.sleep(2)  # what it holds, held for a while: steady state, not a snapshot
        got = scrape(node.metrics)
        status = proc_status(node.proc.pid)
        figures = {"held": metric(got, "meshmirror_peer_directory_selected"),
                   "filter_bytes": metric(got, "meshmirror_peer_summary_held_bytes"),
                   "members": metric(got, "meshmirror_peer_directory_peers"),
                   "rss": float(status["VmRSS"]), "peak": float(status["VmHWM"])}
    finally:
        stop(node.proc)
        cluster.close()
    return figures


def subset_hit_ratio(held: int, seed: int, trials: int = 20_000) -> list[tuple[str, ...]]:
    """P(content held by h random nodes is among a node's ``held`` peers of 5,000)."""
    rng = np.random.default_rng(seed)
    rows: list[tuple[str, ...]] = []
    for holders in (1, 3, 10, 50, 250):
        found = 0
        for _ in range(trials):
            who = rng.choice(CLUSTER - 1, size=holders, replace=False)
            found += bool(np.any(who < held))  # the subset is any `held` of the others
        exact = 1 - np.prod([(CLUSTER - 1 - held - i) / (CLUSTER - 1 - i)
                             for i in range(holders)])
        rows.append((f"{holders} ({holders / CLUSTER:.2%})", f"{found / trials:.4f}",
                     f"{exact:.6f}", "1"))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--containerd", action="store_true",
                        help="also measure a node over a private containerd (~3 minutes more)")
    parser.add_argument("--no-write", action="store_true", help="print the section only")
    args = parser.parse_args(argv)
    load_before = load_average()
    sizes = filter_sizes()
    for row in sizes:
        print(" | ".join(row), flush=True)
    full, delta = delta_size()
    print(f"full {full} B, delta {delta} B", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-summary-scale-") as tmp:
        layout = Path(tmp) / "layout"
        started = time.monotonic()
        own_keys = write_layout(layout)
        print(f"layout of {own_keys:,} keys in {time.monotonic() - started:.0f} s", flush=True)
        mem = {}
        for label, peers in (("alone (the baseline)", 0), ("100 peers, all held", 100),
                             (f"{CLUSTER:,} peers, the chosen subset held", CLUSTER)):
            mem[label] = memory(peers, layout, Path(tmp))
            print(label, mem[label], flush=True)
        if args.containerd:
            with tempfile.TemporaryDirectory(prefix="bench-summary-scale-",
                                             dir="/dev/shm") as shm:
                ctrd = with_containerd(layout, Path(shm))
                try:
                    (Path(tmp) / "certs.d").mkdir()
                    for label, peers in (("containerd node, alone", 0),
                                         (f"containerd node, {CLUSTER:,} peers", CLUSTER)):
                        mem[label] = memory(peers, layout, Path(tmp), ctrd, keys=own_keys)
                        print(label, mem[label], flush=True)
                finally:
                    ctrd.close()
    alone = mem["alone (the baseline)"]
    subset_mem = mem[f"{CLUSTER:,} peers, the chosen subset held"]
    held = int(subset_mem["held"])
    hits = subset_hit_ratio(held, args.seed)
    ctrd_alone = mem.get("containerd node, alone")
    ctrd_cluster = mem.get(f"containerd node, {CLUSTER:,} peers")

    def baseline(label: str) -> dict[str, float]:
        return ctrd_alone if ctrd_alone is not None and label.startswith("containerd") else alone

    mib = 2.0**20
    section = Section(
        name="bench_summary_scale", title="Summaries at scale: size, deltas, routing memory",
        command=f"python -m benchmarks.bench_summary_scale --seed {args.seed}"
                + (" --containerd" if args.containerd else ""),
        date=utc_now(), load=load_since(load_before),
        setup=("Filters built for n digest keys at the 1% target; the false-positive rate "
               "measured on 100,000 keys never added. Wire size is the whole encoded "
               "summary (40-byte header, and for version 3 the empty vouch count):"),
        tables=[
            Table(("keys", "v3 bits/key on the wire", "v3 actual FP", "v1 (power of two) "
                   "bits/key", "v1 actual FP"), sizes),
            Table(("a node of 21,500 keys stores an 8-layer image (11 keys)", "bytes"),
                  [("whole filter (version 3), what every peer fetched before deltas",
                    f"{full:,}"),
                   ("delta from the previous epoch", f"{delta:,}"),
                   ("ratio", f"{full / delta:.0f}x")]),
            Table((f"`meshmirror run --store oci:` serving {own_keys:,} keys ({IMAGES:,} "
                   "images), joined to a cluster of peers of 21,500 keys each (containerd "
                   "rows: `--store containerd`, the same images in a private containerd)",
                   "members",
                   "peers held", "filters held", "RSS over alone", "RSS", "peak RSS"),
                  [(label, f"{f['members']:,.0f}", f"{f['held']:,.0f}",
                    f"{f['filter_bytes'] / mib:.1f} MiB",
                    f"{(f['rss'] - baseline(label)['rss']) / mib:+.1f} MiB"
                    if f is not baseline(label) else "-",
                    f"{f['rss'] / mib:.0f} MiB", f"{f['peak'] / mib:.0f} MiB")
                   for label, f in mem.items()]),
            Table(("content held by h of 5,000 nodes", "found (sampled)", "found (exact)",
                   "found holding all"), hits)],
        notes=["Each row is a real node process as a user runs it (`python -m meshmirror "
               "run`, its registry, metrics and gossip listening on loopback), measured from "
               "/proc (VmRSS, VmHWM) once its directory holds every summary it chose and two "
               "seconds later. Its peers are a loopback stand-in: a seed answering its join "
               "with every member alive (memberlist push-pull, each member advertising 21,500 "
               "keys) and one endpoint serving a real 21,500-key filter for all of them, so "
               "membership, the directory's choice, the fetches, decoding and installing are "
               "the node's own code at full size.",
               f"The directory holds {held:,} of {CLUSTER:,} peers' summaries within its "
               f"{SUMMARY_BUDGET_BYTES >> 20} MiB budget: anything held by 1% of nodes or "
               "more is found with "
               "certainty for practical purposes; content on a handful of nodes may be "
               "missed and is then fetched upstream (the cost of the bound). In a rollout "
               "every node stores the same image, so the subset costs it no hits.",
               "Before, at 5,000 peers all held: 127.8 MiB of filters alone (236 MiB peak in "
               "an earlier run of this benchmark).",
               "Where a node's memory goes, measured apart (/proc/self/status of a process "
               "that imports what a node imports, then loads the same layout; tracemalloc "
               "of the store): the interpreter with the modules a node over an OCI layout "
               "imports (numpy, aiohttp, cryptography, hypercorn, prometheus_client) ~65 "
               "MiB, a third of it shared libraries (a node over containerd imports no "
               "more: its gRPC calls are framed on h2, which hypercorn already loads); the "
               "OCI layout's 100,000 "
               "blobs 10.3 MiB RSS (a sorted table of raw digests with one packed size and "
               "media type each, 3.9 MiB, and the manifests' children, 4.2 MiB, both flat "
               "buffers: store/digests.py; the key set a view over the table); the "
               "publisher's key hashes and filters ~6 MiB. Before this: the layout 18.8 "
               "MiB (a dict of raw digests to ints and tuples of children), and grpc "
               "imported by every node, together 17 MiB more at every row of the table "
               "(5,000 peers: 129.1 MiB). 5,000 members beyond the held filters cost ~9.5 "
               "MiB (gossip state and its retransmit queue, the directory, peer "
               "addresses).",
               *(["The containerd rows: the same 1,000 images imported into a private "
                  "containerd (`ctr images import`, its root on /dev/shm), the node run as a "
                  "cluster runs it (`--store containerd`), measured once its own summary "
                  f"holds all {own_keys:,} keys. Its store keeps the union of the images' "
                  "blobs (a count each) and the manifests' children, which the image "
                  "records name rather than copy: ~10 MiB RSS at 101,000 keys (9.1 MiB "
                  "traced), and a periodic re-sync changes it in place. Its gRPC calls "
                  "to containerd are framed on h2 (containerd/rpc.py), not grpcio. Before "
                  "(cffaa4d): grpcio's import 9 MiB, a table per image beside the union and "
                  "the children (~26 MiB RSS), a second index built at each re-sync: alone "
                  "102 MiB (peak 109), at 5,000 peers 133 MiB (peak 139). On the tree "
                  "before the compact tables (d79d531): alone 142 MiB (peak 184), at 5,000 "
                  "peers 171 MiB (peak 218)."]
                 if ctrd_alone is not None else [])],
        targets=[Target("v3 bits per key on the wire at 20,000 keys", "<=", 10.5,
                        float(sizes[1][1]), ""),
                 Target("what 5,000 peers cost a node (RSS over alone: membership, directory, "
                        "filters)", "<=", 32, (subset_mem["rss"] - alone["rss"]) / mib,
                        " MiB"),
                 Target("peak RSS, 100,000 keys and 100 peers", "<=", 128,
                        mem["100 peers, all held"]["peak"] / mib, " MiB"),
                 Target("peak RSS, 100,000 keys and 5,000 peers", "<=", 128,
                        subset_mem["peak"] / mib, " MiB"),
                 *([Target("peak RSS, containerd node, 100,000 keys and 5,000 peers", "<=",
                           128, ctrd_cluster["peak"] / mib, " MiB")]
                   if ctrd_cluster is not None else [])])
    print(section.render())
    if not args.no_write:
        write_section(section, args.results)


if __name__ == "__main__":
    main()
