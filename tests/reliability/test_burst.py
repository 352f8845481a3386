"""A burst of 200 concurrent 64 MiB pulls through one node is served from its peer.

Real processes on loopback: a holder node with one 64 MiB layer and the node
under test, empty, joined to it. 200 clients GET the layer at once through the
node under test; every one must get the whole blob with the right digest (no
404 from timeouts that fire under our own load), the holder must have been asked
for it once (one fetch per blob per node, see mirror/flight.py), the node's
peak RSS during the burst (VmHWM from /proc, reset before it) must stay within
its idle RSS plus 64 MiB, and its spool within its limit.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from tests.support.metrics import read_metric
from tests.support.node import RunningNode, blob_requests, holder_and_puller
from tests.support.processes import proc_status, wait_until

pytestmark = [pytest.mark.real]

MiB = 1024 * 1024
LAYER = 64 * MiB
CLIENTS = 200
SPOOL_LIMIT = 1024 * MiB
BURST_TIMEOUT_S = 150


async def pull_all(url: str, clients: int, spool_peak: list[float],
                   node: RunningNode) -> list[tuple[int, str | None]]:
    """(status, sha256) of ``clients`` concurrent GETs, while sampling the spool gauge."""
    timeout = aiohttp.ClientTimeout(total=BURST_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector,
                                     auto_decompress=False) as session:

        async def one() -> tuple[int, str | None]:
            async with session.get(url) as response:
                if response.status != 200:
                    return response.status, None
                digest = hashlib.sha256()
                async for chunk in response.content.iter_chunked(MiB):
                    digest.update(chunk)
                return 200, f"sha256:{digest.hexdigest()}"

        done = asyncio.Event()

        async def sample() -> None:
            while not done.is_set():
                value = await asyncio.to_thread(read_metric, node.metrics,
                                                "meshmirror_mirror_spool_bytes")
                spool_peak[0] = max(spool_peak[0], value)
                await asyncio.sleep(0.5)

        sampler = asyncio.create_task(sample())
        try:
            return await asyncio.gather(*(one() for _ in range(clients)))
        finally:
            done.set()
            await sampler


def test_200_concurrent_64mib_pulls_are_served_from_the_peer(tmp_path: Path) -> None:
    with holder_and_puller(tmp_path, "docker.io/library/big:1", [LAYER, 1024],
                           "--mirror-spool-dir", str(tmp_path),
                           "--mirror-spool-limit", str(SPOOL_LIMIT),
                           seed=3) as (holder, node, image):
        layer, warm_up = image.platforms[0].layers
        url = f"http://{node.address}/v2/library/big/blobs/{layer.digest}?ns=docker.io"
        warm_url = url.replace(str(layer.digest), str(warm_up.digest))

        def routed() -> bool:
            # A HEAD through peers is a verified fetch: it warms every code path once
            # (on another blob, so the burst's starts from nothing).
            request = urllib.request.Request(warm_url, method="HEAD")
            with urllib.request.urlopen(request, timeout=30) as r:
                return bool(r.status == 200)

        wait_until(routed, 30, "the node to find the blob through the holder's summary")
        time.sleep(1)
        idle = proc_status(node.proc.pid)["VmRSS"]
        Path(f"/proc/{node.proc.pid}/clear_refs").write_text("5")  # resets VmHWM to VmRSS
        spool_peak = [0.0]
        began = time.monotonic()
        results = asyncio.run(pull_all(url, CLIENTS, spool_peak, node))
        took = time.monotonic() - began
        peak = proc_status(node.proc.pid)["VmHWM"]
        served = sum(1 for status, digest in results
                     if status == 200 and digest == str(layer.digest))
        spooled = read_metric(node.metrics, "meshmirror_mirror_blob_bodies_total", mode="spool")
        streamed = read_metric(node.metrics, "meshmirror_mirror_blob_bodies_total", mode="stream")
        print(f"\nburst: {served}/{CLIENTS} served in {took:.1f} s; RSS idle "
              f"{idle / MiB:.0f} MiB, peak {peak / MiB:.0f} MiB (+{(peak - idle) / MiB:.0f}); "
              f"spool peak {spool_peak[0] / MiB:.0f} MiB of {SPOOL_LIMIT / MiB:.0f}; "
              f"bodies {spooled:.0f} spooled, {streamed:.0f} streamed")
        assert served == CLIENTS, sorted({status for status, _ in results})
        assert len(blob_requests(holder, str(layer.digest))) == 1, "the peer is asked once"
        assert peak - idle <= 64 * MiB
        assert spool_peak[0] <= SPOOL_LIMIT
