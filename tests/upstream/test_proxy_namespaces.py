"""Through a real forward proxy: the node asks the upstream where containerd would.

Three network namespaces joined by veth pairs, nothing routed between the ends:
the node's (with only the proxy's address beyond its loopback), the proxy's
(tinyproxy, reaching both), and the registry's (Distribution over TLS). So the
registry is reachable from the node only through the proxy; loopback is never
proxied, which is why it cannot simply sit on 127.0.0.N. Every address here is
dialled from inside a namespace.

- With ``HTTPS_PROXY`` set, upstream-first tag resolution works and the proxy's
  log has the CONNECT.
- Without it, the node reports the upstream down.
- With ``NO_PROXY`` naming the registry (a CIDR), the proxy sees nothing.
"""

from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshmirror.oci.imagebuilder import build_image
from tests.support.distribution import DistributionRegistry
from tests.support.metrics import Metrics, metric, scrape
from tests.support.netns import NetNamespace, link
from tests.support.node import RunningNode, start_node
from tests.support.processes import stop, wait_until
from tests.support.skopeo import push_layout
from tests.support.tinyproxy import Tinyproxy

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(shutil.which("tinyproxy") is None or os.geteuid() != 0,
                       reason="needs tinyproxy (scripts/bootstrap) and root for namespaces"),
]

NODE_SIDE, PROXY_NODE_SIDE = "10.203.0.1", "10.203.0.2"
PROXY_REGISTRY_SIDE, REGISTRY = "10.203.0.5", "10.203.0.6"
PROXY_PORT, REGISTRY_PORT = 8888, 5000
UPSTREAM = f"{REGISTRY}:{REGISTRY_PORT}"
REPO, TAG = "proxied/app", "1"
# Only what these variables say reaches the node: none inherited from this machine.
_PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy",
                    "no_proxy", "ALL_PROXY", "all_proxy")


@dataclass
class World:
    node_ns: NetNamespace
    proxy: Tinyproxy
    registry: DistributionRegistry
    hosts_dir: Path
    tmp: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("proxied")
    spaces: list[NetNamespace] = []
    proxy: Tinyproxy | None = None
    registry: DistributionRegistry | None = None
    try:
        node_ns, proxy_ns, registry_ns = (NetNamespace(r) for r in ("node", "proxy", "reg"))
        spaces += [node_ns, proxy_ns, registry_ns]
        link(node_ns, f"{NODE_SIDE}/30", proxy_ns, f"{PROXY_NODE_SIDE}/30")
        link(proxy_ns, f"{PROXY_REGISTRY_SIDE}/30", registry_ns, f"{REGISTRY}/30")
        image = build_image(f"{UPSTREAM}/{REPO}:{TAG}", tmp / "layout")
        with registry_ns.inside():
            registry = DistributionRegistry(REGISTRY, REGISTRY_PORT, tls=True).start()
            push_layout(image.layout, TAG, UPSTREAM, REPO)
        with proxy_ns.inside():
            proxy = Tinyproxy(PROXY_NODE_SIDE, PROXY_PORT, allow="10.203.0.0/29",
                              connect_ports=(REGISTRY_PORT,)).start()
        yield World(node_ns, proxy, registry, tmp / "hosts", tmp)
    finally:
        if proxy is not None:
            proxy.close()
        if registry is not None:
            registry.close()
        for space in spaces:
            space.close()


def _node(world: World, name: str, proxy_env: dict[str, str]) -> RunningNode:
    """A node in the node namespace whose hosts.toml sends the registry's pulls to it."""
    env = {k: v for k, v in os.environ.items() if k not in _PROXY_VARIABLES}
    assert world.registry.tls_cert is not None
    env.update(proxy_env, SSL_CERT_FILE=str(world.registry.tls_cert.cert))
    hosts_dir = world.tmp / f"hosts-{name}"
    (world.tmp / name).mkdir()
    node = start_node(f"oci:{world.tmp / name}", world.tmp / f"{name}.log", extra=(
        "--resolve-tags", "upstream-first", "--private-images", "upstream-only",
        "--containerd-registry-config-path", str(hosts_dir),
        "--upstream-connect-timeout", "1s", "--upstream-timeout", "3s"), env=env)
    (hosts_dir / UPSTREAM).mkdir(parents=True)
    (hosts_dir / UPSTREAM / "hosts.toml").write_text(
        f'server = "https://{UPSTREAM}"\n\n[host."http://{node.address}"]\n'
        '  capabilities = ["pull", "resolve"]\n')
    return node


def _look_up_tag(node: RunningNode) -> int:
    url = f"http://{node.address}/v2/{REPO}/manifests/{TAG}?ns={UPSTREAM}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"),
                                    timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return err.code


def _metrics(node: RunningNode) -> Metrics:
    return scrape(node.metrics)


def _answers(node: RunningNode, result: str) -> float:
    return metric(_metrics(node), "meshmirror_upstream_answers_total", registry=UPSTREAM,
                  result=result)


def _connects(world: World) -> list[tuple[str, str]]:
    return [r for r in world.proxy.requests() if r[0] == "CONNECT"]


def _scenario(world: World, name: str, proxy_env: dict[str, str]) -> tuple[RunningNode, int]:
    """Start a node, look the tag up three times; the node (still running) and its status."""
    with world.node_ns.inside():
        node = _node(world, name, proxy_env)
        statuses = [_look_up_tag(node) for _ in range(3)]
    assert len(set(statuses)) == 1, statuses
    return node, statuses[0]


def test_https_proxy_carries_upstream_first_tag_resolution(world: World) -> None:
    before = len(_connects(world))
    node, status = _scenario(world, "proxied", {"HTTPS_PROXY": f"{PROXY_NODE_SIDE}:{PROXY_PORT}"})
    try:
        with world.node_ns.inside():
            # The upstream named the tag's digest; no peer holds it, so this node, the
            # only member and so its owner, fetched the manifest through the proxy too.
            # A brief cache: one question, not three.
            assert status == 200
            assert _answers(node, "answered") == 3
            up = metric(_metrics(node), "meshmirror_upstream_up", registry=UPSTREAM)
            assert up == 1
    finally:
        stop(node.proc)
    tunnels = _connects(world)[before:]
    assert tunnels and all(target == UPSTREAM for _, target in tunnels), tunnels


def test_without_the_proxy_the_node_reports_the_upstream_down(world: World) -> None:
    before = len(world.proxy.requests())
    node, status = _scenario(world, "direct", {})
    try:
        with world.node_ns.inside():
            assert status == 404
            assert _answers(node, "answered") == 0
            assert _answers(node, "connection") + _answers(node, "circuit_open") == 3
            assert metric(_metrics(node), "meshmirror_upstream_up", registry=UPSTREAM) == 0
    finally:
        stop(node.proc)
    assert world.proxy.requests()[before:] == []


def test_no_proxy_naming_the_registry_keeps_the_proxy_out(world: World) -> None:
    before = len(world.proxy.requests())
    node, _ = _scenario(world, "excluded", {"HTTPS_PROXY": f"http://{PROXY_NODE_SIDE}:{PROXY_PORT}",
                                            "NO_PROXY": "example.com,10.203.0.4/30"})
    try:
        with world.node_ns.inside():
            assert _answers(node, "answered") == 0
            wait_until(lambda: _answers(node, "connection") >= 1, 5, "a direct attempt")
    finally:
        stop(node.proc)
    assert world.proxy.requests()[before:] == []
