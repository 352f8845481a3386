"""``meshmirror demo``: a local mesh on loopback that shows peers sharing an image.

Three nodes (by default) run as real ``meshmirror run`` processes, each on its
own 127.0.0.x address with its own registry, metrics server, gossip port and
OCI-layout store. An image is seeded into the first node's store only; the demo
then pulls it, as containerd would, through the last node's registry, which
finds every blob through its peers' Bloom summaries and streams it from the node
that has it, verifying each digest. It prints where each blob came from
(measured from the nodes' metrics, not assumed), how fast, and how long the
summaries took to reach the puller, then keeps the mesh up until Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from meshmirror import eventloop
from meshmirror.oci import mediatypes
from meshmirror.oci.digest import Digest
from meshmirror.oci.imagebuilder import BuiltImage, build_image
from meshmirror.oci.manifest import parse_manifest

if TYPE_CHECKING:
    import aiohttp

DEMO_IMAGE = "docker.io/library/meshmirror-demo:1"
_START_TIMEOUT = 30.0
_CONVERGE_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class DemoConfig:
    """``meshmirror demo``'s settings. The module imports aiohttp only when the demo runs,
    so the command line can read these defaults cheaply."""

    nodes: int = 3
    # None: a temporary directory, removed afterwards.
    workdir: Path | None = None
    # Total size of the demo image's layers.
    image_size_mib: int = 64
    # Exit after the pull instead of keeping the mesh up.
    no_wait: bool = False


def free_port(host: str) -> int:
    """A port free for TCP and UDP on ``host`` now (gossip uses both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port = int(tcp.getsockname()[1])
        with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((host, port))
            return port
    raise RuntimeError(f"no free port on {host}")


@dataclass
class DemoNode:
    name: str
    host: str
    layout: Path
    registry_port: int
    metrics_port: int
    mesh_port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def registry_url(self) -> str:
        return f"http://{self.host}:{self.registry_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def start(self, join: str | None, log: Path) -> None:
        argv = [sys.executable, "-m", "meshmirror", "--log-level", "warning", "run",
                "--store", f"oci:{self.layout}", "--node-name", self.name,
                "--registry-addr", f"{self.host}:{self.registry_port}",
                "--metrics-addr", f"{self.host}:{self.metrics_port}",
                "--mesh-addr", f"{self.host}:{self.mesh_port}",
                # The demo's image has no upstream registry to ask.
                "--resolve-tags", "peers", "--private-images", "share"]
        if join:
            argv += ["--join", join]
        with log.open("ab") as out:
            self.process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)

    def stop(self) -> None:
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


async def _poll(check: Callable[[], Awaitable[bool]], within: float, what: str) -> float:
    """Seconds until ``check`` holds; TimeoutError naming ``what`` after ``within``."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > within:
            raise TimeoutError(f"{what} did not happen within {within:.0f}s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def local_bytes(session: aiohttp.ClientSession, node: DemoNode) -> float:
    """Body bytes ``node`` has served from its own store, from its /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    async with session.get(node.metrics_url) as response:
        text = await response.text()
    return sum(sample.value
               for family in text_string_to_metric_families(text)
               if family.name == "meshmirror_registry_response_bytes"
               for sample in family.samples
               if sample.name.endswith("_total") and sample.labels.get("source") == "local")


@dataclass(frozen=True)
class PulledBlob:
    digest: Digest
    size: int
    kind: str
    seconds: float
    source: str


async def pull(session: aiohttp.ClientSession, registry_url: str, image: BuiltImage,
               nodes: list[DemoNode]) -> list[PulledBlob]:
    """Pull ``image`` as containerd would, verifying every digest.

    Each object's source is measured: the node whose registry served that many
    more bytes from its own store during the request.
    """
    params = {"ns": image.registry}
    pulled: list[PulledBlob] = []

    async def served() -> dict[str, float]:
        return {node.name: await local_bytes(session, node) for node in nodes}

    async def fetch(kind: str, path: str, expected: Digest | None) -> bytes:
        before = await served()
        started = time.monotonic()
        async with session.get(f"{registry_url}{path}", params=params,
                               headers={"Accept": mediatypes.CONTAINERD_ACCEPT}) as response:
            if response.status != 200:
                raise RuntimeError(f"GET {path}: HTTP {response.status}")
            digest = expected or Digest.parse(response.headers["Docker-Content-Digest"])
            hasher = digest.hasher()
            chunks = []
            async for chunk in response.content.iter_chunked(1 << 20):
                hasher.update(chunk)
                chunks.append(chunk)
        seconds = time.monotonic() - started
        if hasher.hexdigest() != digest.hex:
            raise RuntimeError(f"{path}: content does not match {digest}")
        data = b"".join(chunks)
        after = await served()
        delta = {name: after[name] - before.get(name, 0.0) for name in after}
        source = max(delta, key=lambda name: delta[name])
        pulled.append(PulledBlob(digest, len(data), kind, seconds,
                                 source if delta[source] >= len(data) else "?"))
        return data

    repo = image.repository
    todo = [await fetch("manifest", f"/v2/{repo}/manifests/{image.tag}", None)]
    while todo:
        for child in parse_manifest(todo.pop()).children():
            if mediatypes.is_manifest_like(child.media_type):
                todo.append(await fetch("manifest", f"/v2/{repo}/manifests/{child.digest}",
                                        child.digest))
            else:
                kind = "config" if "config" in child.media_type else "layer"
                await fetch(kind, f"/v2/{repo}/blobs/{child.digest}", child.digest)
    return pulled


async def can_serve(session: aiohttp.ClientSession, node: DemoNode, image: BuiltImage) -> bool:
    """Whether ``node`` answers HEAD 200 for the tag (through its mirror).

    Blobs are not asked: a HEAD of a blob fetches and verifies it into the node's
    cache, so the pull that follows would be served from there, not from the peer.
    The tag's manifest is in the same summary as the blobs, so once it is found,
    so are they."""
    path = f"/v2/{image.repository}/manifests/{image.tag}"
    async with session.head(f"{node.registry_url}{path}",
                            params={"ns": image.registry}) as response:
        return response.status == 200


def _size(size: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


async def run_demo(config: DemoConfig, workdir: Path) -> int:
    import aiohttp

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    count = max(2, config.nodes)
    nodes = []
    for i in range(count):
        host = f"127.0.0.{11 + i}"
        layout = workdir / f"node{i + 1}"
        layout.mkdir(parents=True, exist_ok=True)
        nodes.append(DemoNode(f"node{i + 1}", host, layout, free_port(host), free_port(host),
                              free_port(host)))
    seed, puller = nodes[0], nodes[-1]
    print(f"meshmirror demo: {count} nodes on loopback; work directory {workdir}")
    try:
        async with aiohttp.ClientSession() as session:
            started = time.monotonic()
            for node in nodes:
                node.start(None if node is seed else f"{seed.host}:{seed.mesh_port}",
                           workdir / f"{node.name}.log")

            async def all_ready() -> bool:
                for node in nodes:
                    if node.process is not None and node.process.poll() is not None:
                        raise RuntimeError(f"{node.name} exited; see {workdir / node.name}.log")
                    try:
                        async with session.get(f"{node.registry_url}/readyz") as response:
                            if response.status != 200:
                                return False
                    except aiohttp.ClientError:
                        return False
                return True

            await _poll(all_ready, _START_TIMEOUT, "all nodes becoming ready")
            print(f"mesh up in {time.monotonic() - started:.1f}s:")
            for node in nodes:
                print(f"  {node.name}  registry {node.registry_url}  metrics {node.metrics_url}")

            sizes = [max(1, config.image_size_mib) * (1 << 20) * share // 8 for share in (4, 3, 1)]
            image = await asyncio.to_thread(build_image, DEMO_IMAGE, seed.layout, sizes, seed=7)
            total = sum(b.size for b in image.blobs())
            print(f"seeded {image.name} on {seed.name}: {len(image.blobs())} objects, "
                  f"{_size(total)}")
            converge_s = await _poll(lambda: can_serve(session, puller, image),
                                     _CONVERGE_TIMEOUT, f"{puller.name} finding the image")
            print(f"{puller.name} could serve the image {converge_s * 1000:.0f} ms after "
                  f"seeding (store noticed it, summary published, gossiped, fetched)")

            pull_started = time.monotonic()
            pulled = await pull(session, puller.registry_url, image, nodes)
            pull_s = time.monotonic() - pull_started
        print(f"pulled {image.name} through {puller.name}:")
        for blob in pulled:
            # A rate over a few hundred bytes only measures latency; show it for layers.
            rate = (f"{blob.size / blob.seconds / 1e6:7.0f} MB/s"
                    if blob.seconds and blob.size >= 1 << 20 else "")
            print(f"  {blob.kind:8} {str(blob.digest)[:19]}  {_size(blob.size):>10}  "
                  f"from {blob.source:6} {blob.seconds * 1000:7.1f} ms  {rate}")
        got = sum(b.size for b in pulled)
        print(f"total {_size(got)} in {pull_s:.2f}s, every digest verified")
        print(json.dumps({"converged_ms": round(converge_s * 1000, 1), "pull_bytes": got,
                          "pull_seconds": round(pull_s, 3),
                          "sources": sorted({b.source for b in pulled})}))
        if not config.no_wait:
            print("the mesh stays up; press Ctrl-C to stop")
            await stop.wait()
        return 0
    finally:
        for node in reversed(nodes):
            node.stop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)
        print("stopped")


def demo_command(config: DemoConfig) -> int:
    workdir = config.workdir or Path(tempfile.mkdtemp(prefix="meshmirror-demo-"))
    try:
        return eventloop.run(run_demo(config, workdir))
    except (RuntimeError, TimeoutError) as err:
        print(f"meshmirror demo: {err}", file=sys.stderr)
        return 1
    finally:
        if config.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
