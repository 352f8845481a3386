"""``meshmirror demo``: a local mesh on loopback that shows peers sharing an image.

Three nodes (by default) run in this process, each a full `Node` with its own
127.0.0.x address, registry, metrics server, gossip thread and OCI-layout
store. An image is seeded on the first node only; a small OCI client then pulls
it through the last node's registry, which finds every blob through the peers'
Bloom summaries and streams it from the node that has it. The demo prints where
each blob came from, how fast, and how long the summaries took to converge, then
keeps the mesh up (its addresses printed) until Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from meshmirror.logging import configure_logging
from meshmirror.mesh.config import MeshConfig
from meshmirror.node import Node, NodeConfig
from meshmirror.oci import mediatypes
from meshmirror.oci.digest import Digest
from meshmirror.oci.imagebuilder import BuiltImage, build_image
from meshmirror.oci.manifest import parse_manifest
from meshmirror.peering import PeeringConfig
from meshmirror.store.ocilayout import OciLayoutStore

DEMO_IMAGE = "docker.io/library/meshmirror-demo:1"


def free_port(host: str) -> int:
    """A TCP port that is free on ``host`` now (UDP shares it for gossip)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port = int(tcp.getsockname()[1])
        with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((host, port))
            return port
    raise RuntimeError(f"no free port on {host}")


@dataclass
class LocalNode:
    name: str
    host: str
    node: Node
    store: OciLayoutStore
    layout: Path

    @property
    def registry_url(self) -> str:
        return f"http://{self.host}:{self.node.config.registry_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.node.config.metrics_port}"

    def local_bytes(self) -> float:
        """Body bytes this node's registry has served from its own store."""
        total = 0.0
        for family in self.node.metrics_registry.collect():
            if family.name == "meshmirror_registry_response_bytes":
                total += sum(sample.value for sample in family.samples
                             if sample.name.endswith("_total")
                             and sample.labels.get("source") == "local")
        return total


@dataclass
class LocalCluster:
    """N nodes on 127.0.0.x in this process; also the fixture of the end-to-end tests."""

    workdir: Path
    size: int = 3
    first_host: int = 11
    mesh: MeshConfig = field(default_factory=MeshConfig)
    nodes: list[LocalNode] = field(default_factory=list)

    async def start(self) -> None:
        seeds: tuple[tuple[str, int], ...] = ()
        for i in range(self.size):
            host = f"127.0.0.{self.first_host + i}"
            layout = self.workdir / f"node{i + 1}"
            layout.mkdir(parents=True, exist_ok=True)
            store = OciLayoutStore(layout, poll_interval=0.1)
            registry_port, metrics_port, mesh_port = (free_port(host) for _ in range(3))
            peering = PeeringConfig(
                node_name=f"node{i + 1}", mesh_bind=(host, mesh_port),
                http_base=f"http://{host}:{registry_port}", join=seeds, mesh=self.mesh)
            config = NodeConfig(store=f"oci:{layout}", registry_host=host,
                                registry_port=registry_port, metrics_host=host,
                                metrics_port=metrics_port, peering=peering)
            node = Node(config, store=store)
            await node.start()
            self.nodes.append(LocalNode(f"node{i + 1}", host, node, store, layout))
            seeds = seeds or ((host, mesh_port),)

    async def stop(self) -> None:
        for local in reversed(self.nodes):
            await local.node.stop()
        self.nodes.clear()

    async def wait_converged(self, keys: Sequence[str], holder: LocalNode, within: float
                             ) -> float:
        """Seconds until every other node holds a summary of ``holder`` containing ``keys``."""
        started = time.monotonic()
        deadline = started + within
        while True:
            if all(self._knows(local, holder, keys) for local in self.nodes if local is not holder):
                return time.monotonic() - started
            if time.monotonic() > deadline:
                raise TimeoutError(f"summaries did not converge within {within:.0f}s")
            await asyncio.sleep(0.02)

    def _knows(self, local: LocalNode, holder: LocalNode, keys: Sequence[str]) -> bool:
        """Whether ``local``'s router already names ``holder`` for every key."""
        peering = local.node.peering
        if peering is None:
            return False
        limit = len(self.nodes)
        return all(any(peer.name == holder.name for peer in peering.router.candidates(key, limit))
                   for key in keys)


@dataclass(frozen=True)
class PulledBlob:
    digest: Digest
    size: int
    kind: str
    seconds: float
    source: str


def served_bytes(cluster: LocalCluster) -> dict[str, float]:
    return {local.name: local.local_bytes() for local in cluster.nodes}


async def pull(session: aiohttp.ClientSession, registry_url: str, image: BuiltImage,
               served: Callable[[], dict[str, float]]) -> list[PulledBlob]:
    """Pull ``image`` as containerd would, verifying every digest; ns selects the registry.

    Each object's source is measured, not assumed: the node whose registry served
    that many more bytes from its own store during the request.
    """
    params = {"ns": image.registry}
    pulled: list[PulledBlob] = []

    async def fetch(kind: str, path: str, expected: Digest | None) -> bytes:
        before = served()
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
        if hasher.hexdigest() != digest.hex:
            raise RuntimeError(f"{path}: content does not match {digest}")
        data = b"".join(chunks)
        after = served()
        delta = {name: after[name] - before.get(name, 0.0) for name in after}
        source = max(delta, key=lambda name: delta[name]) if delta else "?"
        if delta.get(source, 0.0) < len(data):
            source = "?"
        pulled.append(PulledBlob(digest, len(data), kind, time.monotonic() - started, source))
        return data

    repo = image.repository
    root = await fetch("manifest", f"/v2/{repo}/manifests/{image.tag}", None)
    todo = [root]
    while todo:
        document = parse_manifest(todo.pop())
        for child in document.children():
            if mediatypes.is_manifest_like(child.media_type):
                todo.append(await fetch("manifest", f"/v2/{repo}/manifests/{child.digest}",
                                        child.digest))
            else:
                kind = "config" if "config" in child.media_type else "layer"
                await fetch(kind, f"/v2/{repo}/blobs/{child.digest}", child.digest)
    return pulled


def _format_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size} B"


async def run_demo(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="meshmirror-demo-"))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    cluster = LocalCluster(workdir, size=max(2, args.nodes))
    try:
        print(f"meshmirror demo: {cluster.size} nodes on loopback, work directory {workdir}")
        started = time.monotonic()
        await cluster.start()
        for local in cluster.nodes:
            print(f"  {local.name}: registry {local.registry_url}  "
                  f"metrics {local.metrics_url}/metrics")
        seed, client_node = cluster.nodes[0], cluster.nodes[-1]
        layer_mib = max(1, args.image_size_mib)
        sizes = [layer_mib * 1024 * 1024 * share // 8 for share in (4, 3, 1)]
        image = await asyncio.to_thread(build_image, DEMO_IMAGE, seed.layout, sizes, seed=7)
        seeded_at = time.monotonic()
        print(f"seeded {image.name} ({len(image.blobs())} blobs, "
              f"{_format_size(sum(b.size for b in image.blobs()))}) on {seed.name}")
        converge_s = await cluster.wait_converged(sorted(image.keys()), seed, within=30)
        print(f"summaries converged: every node knew {seed.name}'s new keys "
              f"{converge_s * 1000:.0f} ms after seeding "
              f"({(seeded_at - started):.1f}s to start the mesh)")
        async with aiohttp.ClientSession() as session:
            pull_started = time.monotonic()
            pulled = await pull(session, client_node.registry_url, image,
                                lambda: served_bytes(cluster))
            total_s = time.monotonic() - pull_started
        print(f"pulled {image.name} through {client_node.name}'s mirror:")
        for blob in pulled:
            rate = blob.size / blob.seconds / 1e6 if blob.seconds > 0 else 0.0
            print(f"  {blob.kind:8} {str(blob.digest)[:19]}  {_format_size(blob.size):>10}  "
                  f"from {blob.source}  {blob.seconds * 1000:7.1f} ms  {rate:8.1f} MB/s")
        total = sum(b.size for b in pulled)
        print(f"total {_format_size(total)} in {total_s * 1000:.0f} ms "
              f"({total / total_s / 1e6:.1f} MB/s), every digest verified")
        print(json.dumps({"summary_convergence_ms": round(converge_s * 1000, 1),
                          "pull_bytes": total, "pull_seconds": round(total_s, 4)}))
        if args.no_wait:
            return 0
        print("mesh is up; press Ctrl-C to stop")
        await stop.wait()
        return 0
    finally:
        await cluster.stop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        print("stopped")


def demo_command(args: argparse.Namespace) -> int:
    configure_logging("warning" if args.log_level == "info" else args.log_level)
    return asyncio.run(run_demo(args))
