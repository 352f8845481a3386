"""What upstream-first tag resolution adds to a tag lookup, against peers-only, in one run.

Both resolve ``bench/app:1`` through the same `PeerMirror` code and the same
peer (a real HTTP server on loopback holding the manifest by tag and digest).
Peers-only asks the peer for the tag; upstream-first first asks a real
Distribution registry (anonymous HEAD, as against a public registry) for the
tag's digest, then the peer for that digest. A third case is a plain aiohttp
HEAD of the tag to the same Distribution: the least one upstream round trip
costs, so the section can say whether upstream-first adds more than that.
The upstream client's session counts the connections it opens and the
requests it sends, so the section also says whether the token was cached and
the connection reused. Cases alternate round by round.

Usage: ``python -m benchmarks.bench_tag_resolution [--rounds N] [--no-write]``
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from prometheus_client import CollectorRegistry

from benchmarks.results import BenchRun, Section, Table, Target, load_since, utc_now
from meshmirror.mirror.metrics import MirrorMetrics
from meshmirror.mirror.options import MirrorConfig, TagResolution
from meshmirror.mirror.peer_mirror import PeerMirror
from meshmirror.oci.imagebuilder import build_image
from meshmirror.oci.mediatypes import CONTAINERD_ACCEPT, OCI_MANIFEST
from meshmirror.registry.fallback import FallbackContent
from meshmirror.routing.router import InMemoryRouter
from meshmirror.upstream import UpstreamClient, UpstreamEndpoints
from tests.mirror.peers import Behaviour, FakePeer
from tests.support.distribution import DistributionRegistry
from tests.support.skopeo import push_layout

REPO, TAG = "bench/app", "1"


PEERS, UPSTREAM_FIRST, PLAIN_HEAD = "peers", "upstream-first", "plain HEAD to the upstream"


@dataclass
class _Traffic:
    """What the upstream client's session did: connections opened, requests sent."""

    connections: int = 0
    requests: int = 0

    def trace(self) -> aiohttp.TraceConfig:
        config = aiohttp.TraceConfig()

        async def connected(*_: object) -> None:
            self.connections += 1

        async def requested(*_: object) -> None:
            self.requests += 1

        config.on_connection_create_end.append(connected)
        config.on_request_start.append(requested)
        return config


@dataclass
class Figures:
    times: dict[str, list[float]]
    # During the measured upstream-first lookups only.
    upstream_connections: int
    upstream_requests: int


async def _run(registry: DistributionRegistry, manifest: bytes, digest: str,
               rounds: int) -> Figures:
    peer = await FakePeer("holder", Behaviour(manifests={
        TAG: (OCI_MANIFEST, manifest), digest: (OCI_MANIFEST, manifest)})).start()
    name = registry.address
    traffic = _Traffic()
    try:
        async with aiohttp.ClientSession(auto_decompress=False) as session, \
                aiohttp.ClientSession(trace_configs=[traffic.trace()]) as upstream_session, \
                UpstreamClient(UpstreamEndpoints(overrides={name: registry.url}),
                               session=upstream_session) as upstream:
            mirrors = {}
            for mode in (TagResolution.PEERS, TagResolution.UPSTREAM_FIRST):
                metrics_registry = CollectorRegistry()
                router = InMemoryRouter(registry=metrics_registry, seed=1)
                router.set_keys(peer.peer, [digest, f"{name}/{REPO}:{TAG}"])
                mirrors[mode.value] = PeerMirror(
                    router, session, options=MirrorConfig(resolve_tags=mode),
                    metrics=MirrorMetrics(metrics_registry), upstream=upstream,
                    mesh_encrypted=True)
            async with aiohttp.ClientSession() as plain_session:
                times = await _rounds(mirrors, plain_session, name, digest,
                                      f"{registry.url}/v2/{REPO}/manifests/{TAG}", rounds,
                                      traffic)
            for mirror in mirrors.values():
                mirror.close()
            return times
    finally:
        await peer.stop()


async def _rounds(mirrors: dict[str, PeerMirror], plain_session: aiohttp.ClientSession,
                  name: str, digest: str, url: str, rounds: int,
                  traffic: _Traffic) -> Figures:
    headers = {"Accept": CONTAINERD_ACCEPT}

    async def plain_head() -> None:
        async with plain_session.head(url, headers=headers) as response:
            assert response.status == 200

    for _ in range(5):  # warm connections, the token and visibility caches
        for mirror in mirrors.values():
            assert isinstance(await mirror.open_manifest(name, REPO, TAG, False), FallbackContent)
        await plain_head()
    times: dict[str, list[float]] = {PEERS: [], UPSTREAM_FIRST: [], PLAIN_HEAD: []}
    connections = requests = 0
    for _ in range(rounds):
        for mode, mirror in mirrors.items():
            before = (traffic.connections, traffic.requests)
            start = time.perf_counter()
            content = await mirror.open_manifest(name, REPO, TAG, False)
            times[mode].append(time.perf_counter() - start)
            assert isinstance(content, FallbackContent) and str(content.digest) == digest
            if mode == UPSTREAM_FIRST:
                connections += traffic.connections - before[0]
                requests += traffic.requests - before[1]
        start = time.perf_counter()
        await plain_head()
        times[PLAIN_HEAD].append(time.perf_counter() - start)
    return Figures(times, connections, requests)


def section(rounds: int, figures: Figures, load: str) -> Section:
    """The RESULTS.md block: each case's median and p90, the ratio the target checks, and
    what the added time is made of."""
    times = figures.times
    med = {mode: statistics.median(v) for mode, v in times.items()}
    p90 = {mode: statistics.quantiles(v, n=10)[-1] for mode, v in times.items()}
    ratio = med[UPSTREAM_FIRST] / med[PEERS]
    added = med[UPSTREAM_FIRST] - med[PEERS]
    rows = [[mode, f"{med[mode] * 1e3:.2f}", f"{p90[mode] * 1e3:.2f}"] for mode in times]
    per_lookup = figures.upstream_requests / max(1, len(times[UPSTREAM_FIRST]))
    notes = [f"upstream-first / peers median: {ratio:.2f}x; it adds {added * 1e3:.2f} ms, "
             f"{added / med[PLAIN_HEAD]:.2f}x one plain HEAD to the same upstream "
             "(containerd without a mirror makes that round trip itself)",
             f"upstream requests per upstream-first lookup: {per_lookup:.2f}; connections "
             f"opened during them: {figures.upstream_connections} (no extra request, the "
             "connection kept alive; with a token registry the token is cached too, see "
             "bench_upstream_resolve)"]
    if ratio > 3.0:
        notes.append(
            "why the 3x target is missed: what upstream-first adds is the upstream's own "
            f"answer to one HEAD, and that alone takes {med[PLAIN_HEAD] / med[PEERS]:.1f}x "
            "the whole peers-only lookup (an in-process peer); the client is already at one "
            "request per lookup on a kept-alive connection, so no client-side change gets "
            "under 3x. Only asking the upstream and the peer at once would, at the cost of "
            "asking peers for tags the upstream may not confirm")
    return Section(
        name="bench_tag_resolution", title="Tag resolution: upstream-first against peers-only",
        command=f"python -m benchmarks.bench_tag_resolution --rounds {rounds}",
        date=utc_now(), load=load,
        setup="One PeerMirror per mode, the same loopback peer; upstream-first also asks a "
              "real Distribution (anonymous HEAD) for the tag's digest. The plain HEAD is "
              "aiohttp alone against the same Distribution, in the same rounds.",
        tables=[Table(["mode", "median ms", "p90 ms"], rows)],
        notes=notes,
        targets=[Target("upstream-first tag lookup / peers-only", "<=", 3.0, ratio),
                 Target("upstream-first added time / one plain HEAD to the upstream", "<=",
                        1.2, added / med[PLAIN_HEAD])])


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    bench = BenchRun(parser)
    args = bench.args
    with tempfile.TemporaryDirectory(prefix="bench-tags-") as tmp:
        image = build_image(f"example.com/{REPO}:{TAG}", Path(tmp) / "layout")
        manifest = (image.layout / "blobs" / "sha256" / image.digest.hex).read_bytes()
        with DistributionRegistry() as registry:
            push_layout(image.layout, TAG, registry.address, REPO)
            figures = asyncio.run(_run(registry, manifest, str(image.digest), args.rounds))
    result = section(args.rounds, figures, load_since(bench.load_before))
    bench.publish(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
