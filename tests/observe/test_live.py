"""A real Prometheus and a real browser watch a running three-node cluster.

Three `meshmirror run --store oci:DIR` nodes on their own loopback addresses form a
mesh; an image is seeded on the first and pulled through the last, as containerd
would. Prometheus 2.42 scrapes all three: every dashboard query must return series
and every alert expression must evaluate. Headless Chromium keeps the puller's
status page open while the pull happens: the request shows up and the hit ratio
moves without a reload. `meshmirror members` lists the three, alive.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from meshmirror.demo import DEMO_IMAGE, DemoNode, can_serve, pull
from meshmirror.oci.imagebuilder import BuiltImage, build_image
from tests.support.browser import launch_chromium
from tests.support.node import NO_UPSTREAM
from tests.support.ports import free_port, loopback_host
from tests.support.processes import spawn, stop, wait_until

pytestmark = [pytest.mark.real, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "helm/meshmirror/dashboards/meshmirror.json"
RULES = ROOT / "helm/meshmirror/rules/meshmirror.rules.yaml"
SCREENSHOT = Path(os.environ.get("MESHMIRROR_STATUS_SCREENSHOT",
                                 tempfile.gettempdir() + "/meshmirror-status-page.png"))
CONVERGENCE_P99 = ("histogram_quantile(0.99, sum by (le) "
                   "(meshmirror_summary_propagation_seconds_bucket))")


@dataclass
class Cluster:
    nodes: list[DemoNode]
    processes: list[subprocess.Popen[bytes]]
    image: BuiltImage
    workdir: Path

    @property
    def puller(self) -> DemoNode:
        return self.nodes[-1]

    def log(self, node: DemoNode) -> Path:
        return self.workdir / f"{node.name}.log"


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body: bytes = response.read()
        return body


def _answers(url: str) -> bool:
    return bool(_get(url) is not None)


def _start(node: DemoNode, join: str | None, log: Path, hosts_dir: Path | None
           ) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "meshmirror", "--log-level", "info", "run",
            "--store", f"oci:{node.layout}", "--node-name", node.name,
            "--registry-addr", f"{node.host}:{node.registry_port}",
            "--metrics-addr", f"{node.host}:{node.metrics_port}",
            "--mesh-addr", f"{node.host}:{node.mesh_port}",
            "--mirror-resolve-timeout", "0.5", *NO_UPSTREAM]
    if join:
        argv += ["--join", join]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if hosts_dir is not None:
        env["MESHMIRROR_CONTAINERD_REGISTRY_CONFIG_PATH"] = str(hosts_dir)
    return spawn(argv, log, env=env)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    workdir = Path(tempfile.mkdtemp(prefix="observe-", dir="/tmp"))
    nodes = []
    for i in range(3):
        host = loopback_host()
        layout = workdir / f"node{i + 1}"
        layout.mkdir()
        nodes.append(DemoNode(f"node{i + 1}", host, layout, free_port(host), free_port(host),
                              free_port(host)))
    seed, puller = nodes[0], nodes[-1]
    # containerd's hosts dir on the puller, pointing docker.io at the puller's registry.
    hosts_dir = workdir / "certs.d"
    (hosts_dir / "docker.io").mkdir(parents=True)
    (hosts_dir / "docker.io" / "hosts.toml").write_text(
        f'server = "https://registry-1.docker.io"\n[host."{puller.registry_url}"]\n'
        '  capabilities = ["pull", "resolve"]\n')
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for node in nodes:
            join = None if node is seed else f"{seed.host}:{seed.mesh_port}"
            processes.append(_start(node, join, workdir / f"{node.name}.log",
                                    hosts_dir if node is puller else None))
        for node in nodes:
            wait_until(functools.partial(_answers, f"{node.registry_url}/readyz"), 30,
                       f"{node.name} ready", 0.1)
        image = build_image(DEMO_IMAGE, seed.layout, (2 << 20, 1 << 20), seed=11)
        yield Cluster(nodes, processes, image, workdir)
    finally:
        for proc in processes:
            stop(proc, timeout=10)
        if not os.environ.get("MESHMIRROR_E2E_KEEP"):
            shutil.rmtree(workdir, ignore_errors=True)


async def _pull_through_puller(cluster: Cluster) -> None:
    async with aiohttp.ClientSession() as session:
        deadline = time.monotonic() + 30
        while not await can_serve(session, cluster.puller, cluster.image):
            assert time.monotonic() < deadline, "the puller never found the image on a peer"
            await asyncio.sleep(0.1)
        await pull(session, cluster.puller.registry_url, cluster.image, cluster.nodes)


# -- Prometheus -------------------------------------------------------------------------


@dataclass
class Prometheus:
    url: str

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; AssertionError carrying Prometheus's error when it fails."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            answer = json.loads(_get(url, timeout=10))
        except urllib.error.HTTPError as err:
            answer = json.loads(err.read())
        assert answer["status"] == "success", f"{expr}: {answer.get('error')}"
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result


@pytest.fixture(scope="module")
def prometheus(cluster: Cluster) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus missing: scripts/bootstrap installs it", pytrace=False)
    directory = cluster.workdir / "prometheus"
    directory.mkdir()
    config = directory / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "meshmirror", "static_configs": [{"targets": [
            f"{n.host}:{n.metrics_port}" for n in cluster.nodes]}]}],
    }))
    port = free_port("127.0.0.1")
    proc = spawn([binary, f"--config.file={config}", f"--storage.tsdb.path={directory}/data",
                  f"--web.listen-address=127.0.0.1:{port}"], directory / "prometheus.log")
    try:
        server = Prometheus(f"http://127.0.0.1:{port}")
        wait_until(lambda: _get(f"{server.url}/-/ready") is not None, 30, "Prometheus ready",
                   0.2)
        wait_until(lambda: len(server.query("up == 1")) == 3, 30, "three targets up", 0.5)
        yield server
    finally:
        stop(proc, timeout=10)


def _dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    # Grafana fills $__rate_interval and the variables in ("All" is .*); Prometheus
    # needs a literal range and matcher.
    return [target["expr"].replace("$__rate_interval", "1m").replace("$node", ".*")
            .replace("$registry", ".*")
            for panel in dashboard["panels"] for target in panel["targets"]]


def _alert_expressions() -> list[tuple[str, str]]:
    rules = yaml.safe_load(RULES.read_text())
    return [(rule["alert"], rule["expr"]) for group in rules["groups"]
            for rule in group["rules"]]


# -- the browser --------------------------------------------------------------------------


def _stat(page: Any, key: str) -> str:
    text: str = page.locator(f'[data-stat="{key}"] .v').inner_text()
    return text


def test_status_page_prometheus_and_members(cluster: Cluster, prometheus: Prometheus) -> None:
    from playwright.sync_api import sync_playwright

    puller = cluster.puller
    blob_paths = [f"/v2/{cluster.image.repository}/blobs/{b.digest}"
                  for b in cluster.image.blobs() if "manifest" not in b.media_type]
    errors: list[str] = []
    with sync_playwright() as p:
        browser = launch_chromium(p, puller.host)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"http://{puller.host}:{puller.metrics_port}/", timeout=15_000)
            page.wait_for_selector('[data-stat="ready"]', timeout=15_000)
            page.wait_for_function(
                "document.querySelectorAll('[data-member]').length === 3", timeout=30_000)
            assert _stat(page, "hit ratio") == "\u2013", "no mirror request yet (an en dash)"
            loaded_at = page.evaluate("performance.timeOrigin")

            # Playwright's sync API runs a loop in this thread; the pull gets its own.
            with ThreadPoolExecutor(1) as executor:
                executor.submit(asyncio.run, _pull_through_puller(cluster)).result(120)

            page.wait_for_function(
                "paths => paths.every(p => document.querySelector("
                "`#recent tr[data-path=\"${p}\"]`))", arg=blob_paths, timeout=15_000)
            assert _stat(page, "hit ratio") == "100 %"
            assert _stat(page, "alive") == "3"
            assert page.evaluate("performance.timeOrigin") == loaded_at, "the page reloaded"
            rows = page.locator("#recent tbody tr").all_inner_texts()
            assert any("node1" in row and "hit" in row for row in rows), rows
            page.wait_for_function(
                "document.querySelectorAll('#plot-ratio polyline').length >= 1",
                timeout=15_000)
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
        finally:
            browser.close()
    assert not errors, errors

    # Prometheus: let a few scrapes land after the pull, then every panel has data.
    wait_until(lambda: bool(prometheus.query(
        'sum(meshmirror_mirror_requests_total{cache="hit"}) > 0')), 30, "hits scraped", 0.5)
    time.sleep(3)
    empty = [expr for expr in _dashboard_queries() if not prometheus.query(expr)]
    assert not empty, f"dashboard queries without series: {empty}"
    for _alert, expr in _alert_expressions():
        prometheus.query(expr)  # evaluates without error
    [points_here] = prometheus.query("meshmirror_hosts_config_points_here")
    assert points_here["value"][1] == "1"
    [p99] = prometheus.query(CONVERGENCE_P99)
    print(json.dumps({"test": "observe", "convergence_p99_seconds": float(p99["value"][1])}))

    # One JSON access-log line per request, blobs with handler "blob", bytes from a peer.
    blob_lines = []
    for line in cluster.log(puller).read_text().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("handler") == "blob" and record.get("method") == "GET":
                blob_lines.append(record)
    assert sorted(str(r["path"]) for r in blob_lines) == sorted(blob_paths)
    assert {r["source"] for r in blob_lines} == {"peer"}
    assert not [r for r in blob_lines if "reason" in r], "served requests have no reason"


def _members(cluster: Cluster, fmt: str) -> subprocess.CompletedProcess[str]:
    node = cluster.puller
    return subprocess.run(
        [sys.executable, "-m", "meshmirror", "members", "--addr",
         f"{node.host}:{node.metrics_port}", "--format", fmt],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)


def test_members_lists_all_three_alive(cluster: Cluster) -> None:
    done = _members(cluster, "json")
    assert done.returncode == 0, done.stderr
    members = json.loads(done.stdout)
    assert sorted((m["name"], m["state"]) for m in members) == [
        ("node1", "alive"), ("node2", "alive"), ("node3", "alive")]
    done = _members(cluster, "table")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:3] == ["Node", "Address", "Status"]
    assert sorted(line.split()[0] for line in lines[1:]) == ["node1", "node2", "node3"]
    assert all(line.split()[2] == "alive" for line in lines[1:])


def test_members_says_in_one_line_when_the_node_is_unreachable() -> None:
    port = free_port("127.0.0.1")
    done = subprocess.run([sys.executable, "-m", "meshmirror", "members", "--addr",
                           f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 1
    assert done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1
    assert done.stderr.startswith(f"meshmirror members: cannot reach http://127.0.0.1:{port}")
