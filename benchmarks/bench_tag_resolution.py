"""What upstream-first tag resolution adds to a tag lookup, against peers-only, in one run.

Both resolve ``bench/app:1`` through the same `PeerMirror` code and the same
peer (a real HTTP server on loopback holding the manifest by tag and digest).
Peers-only asks the peer for the tag; upstream-first first asks a real
Distribution registry (anonymous HEAD, as against a public registry) for the
tag's digest, then the peer for that digest. Cases alternate round by round.

Usage: ``python -m benchmarks.bench_tag_resolution [--rounds N] [--no-write]``
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
from prometheus_client import CollectorRegistry

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
from meshmirror.mirror.metrics import MirrorMetrics
from meshmirror.mirror.options import MirrorOptions, TagResolution
from meshmirror.mirror.peer_mirror import PeerMirror
from meshmirror.oci.imagebuilder import build_image
from meshmirror.oci.mediatypes import OCI_MANIFEST
from meshmirror.routing.router import InMemoryRouter
from meshmirror.upstream import UpstreamClient, UpstreamEndpoints
from tests.mirror.peers import Behaviour, FakePeer
from tests.support.distribution import DistributionRegistry
from tests.support.skopeo import push_layout

REPO, TAG = "bench/app", "1"


async def _run(registry: DistributionRegistry, manifest: bytes, digest: str,
               rounds: int) -> dict[str, list[float]]:
    peer = await FakePeer("holder", Behaviour(manifests={
        TAG: (OCI_MANIFEST, manifest), digest: (OCI_MANIFEST, manifest)})).start()
    name = registry.address
    try:
        async with aiohttp.ClientSession(auto_decompress=False) as session, \
                UpstreamClient(UpstreamEndpoints(overrides={name: registry.url})) as upstream:
            mirrors = {}
            for mode in (TagResolution.PEERS, TagResolution.UPSTREAM_FIRST):
                metrics_registry = CollectorRegistry()
                router = InMemoryRouter(registry=metrics_registry, seed=1)
                router.set_keys(peer.peer, [digest, f"{name}/{REPO}:{TAG}"])
                mirrors[mode.value] = PeerMirror(
                    router, session, options=MirrorOptions(resolve_tags=mode),
                    metrics=MirrorMetrics(metrics_registry), upstream=upstream,
                    mesh_encrypted=True)
            times: dict[str, list[float]] = {mode: [] for mode in mirrors}
            for _ in range(5):  # warm connections, the visibility cache
                for mirror in mirrors.values():
                    assert await mirror.open_manifest(name, REPO, TAG, False) is not None
            for _ in range(rounds):
                for mode, mirror in mirrors.items():
                    start = time.perf_counter()
                    content = await mirror.open_manifest(name, REPO, TAG, False)
                    times[mode].append(time.perf_counter() - start)
                    assert content is not None and str(content.digest) == digest
            for mirror in mirrors.values():
                mirror.close()
            return times
    finally:
        await peer.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="bench-tags-") as tmp:
        image = build_image(f"example.com/{REPO}:{TAG}", Path(tmp) / "layout")
        manifest = (image.layout / "blobs" / "sha256" / image.digest.hex).read_bytes()
        with DistributionRegistry() as registry:
            push_layout(image.layout, TAG, registry.address, REPO)
            times = asyncio.run(_run(registry, manifest, str(image.digest), args.rounds))
    med = {mode: statistics.median(v) for mode, v in times.items()}
    p90 = {mode: statistics.quantiles(v, n=10)[-1] for mode, v in times.items()}
    ratio = med["upstream-first"] / med["peers"]
    rows = [[mode, f"{med[mode] * 1e3:.2f}", f"{p90[mode] * 1e3:.2f}"] for mode in times]
    section = Section(
        name="bench_tag_resolution", title="Tag resolution: upstream-first against peers-only",
        command=f"python -m benchmarks.bench_tag_resolution --rounds {args.rounds}",
        date=utc_now(), load=load_since(load_before),
        setup="One PeerMirror per mode, the same loopback peer; upstream-first also asks a "
              "real Distribution (anonymous HEAD) for the tag's digest.",
        tables=[Table(["mode", "median ms", "p90 ms"], rows)],
        notes=[f"upstream-first / peers median: {ratio:.2f}x (one upstream round trip added; "
               "containerd without a mirror makes that round trip itself)"],
        targets=[Target("upstream-first tag lookup / peers-only", "<=", 3.0, ratio)])
    print(section.render())
    if not args.no_write:
        write_section(section, args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
