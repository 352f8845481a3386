"""The status page: two in-process nodes see each other, their registries and summaries."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest

from meshmirror.node import Node
from meshmirror.oci.imagebuilder import build_image
from meshmirror.runconfig import NodeConfig, PeeringConfig
from meshmirror.store.ocilayout import OciLayoutStore
from tests.support.ports import free_port, loopback_host

pytestmark = pytest.mark.real


def _node(layout: Path, name: str, join: tuple[tuple[str, int], ...]) -> tuple[Node, str, int]:
    host = loopback_host()
    registry, metrics, mesh = free_port(host), free_port(host), free_port(host)
    config = NodeConfig(
        store=f"oci:{layout}", registry_addr=(host, registry), metrics_addr=(host, metrics),
        peering=PeeringConfig(node_name=name, mesh_addr=(host, mesh),
                              http_base=f"http://{host}:{registry}", join=join))
    return Node(config, store=OciLayoutStore(layout, poll_interval=0.1)), host, mesh


async def test_status_shows_members_and_held_summaries(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    build_image("docker.io/library/status:1", tmp_path / "a", (10_000,), seed=5)
    a, a_host, a_mesh = _node(tmp_path / "a", "a", ())
    b, _, _ = _node(tmp_path / "b", "b", ((a_host, a_mesh),))
    async with a, b, aiohttp.ClientSession() as session:
        url = "http://{}:{}".format(*b.config.metrics_addr)
        deadline = time.monotonic() + 20
        while True:
            async with session.get(f"{url}/status") as response:
                status = await response.json()
            members = {m["name"]: m for m in status["mesh"]["members"]}
            peer = members.get("a")
            if peer and peer["held_epoch"] is not None and \
                    peer["held_epoch"] == peer["advertised_epoch"]:
                break
            assert time.monotonic() < deadline, status
            await asyncio.sleep(0.05)
        assert peer["state"] == "alive"
        assert peer["registry"] == "http://{}:{}".format(*a.config.registry_addr)
        assert peer["held_keys"] == 4  # manifest, config, layer and the tag
        assert status["mesh"]["node"] == "b" and status["store"]["keys"] == 0
        async with session.get(f"{url}/") as response:
            page = await response.text()
        # The page renders members from /status in the browser (tests/observe checks it).
        assert response.status == 200 and "/status" in page
