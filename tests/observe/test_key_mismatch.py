"""Two real nodes started with different gossip keys: the split is visible.

Node b joins node a, but each holds its own key, so neither can read the other's
gossip. The mesh does not form, and both say why: the undecryptable counter rises
by source address, and `/status` carries a warning the status page shows as a
banner (checked in headless Chromium). The alert rule on that counter is tested in rules_test.yaml.
"""

from __future__ import annotations

import base64
import json
import os
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshmirror.mesh.state import Undecryptable
from tests.support.browser import launch_chromium
from tests.support.node import RunningNode, start_node
from tests.support.processes import stop, wait_until

pytestmark = [pytest.mark.real]


def _undecryptable(node: RunningNode) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{node.metrics}/metrics", timeout=2) as r:
        text = r.read().decode()
    return {sample.labels["source"]: sample.value
            for family in text_string_to_metric_families(text)
            if family.name == "meshmirror_mesh_undecryptable"
            for sample in family.samples if sample.name.endswith("_total")}


def _status(node: RunningNode) -> dict[str, object]:
    with urllib.request.urlopen(f"http://{node.metrics}/status", timeout=2) as r:
        status: dict[str, object] = json.load(r)
    return status


def _banner(node: RunningNode) -> str:
    """The warning banner's text as headless Chromium renders the status page."""
    from playwright.sync_api import sync_playwright

    host = node.metrics.rsplit(":", 1)[0]
    with sync_playwright() as p:
        browser = launch_chromium(p, host)
        try:
            page = browser.new_page()
            page.goto(f"http://{node.metrics}/", timeout=15_000)
            banner = page.locator("#warning")
            banner.wait_for(state="visible", timeout=15_000)
            text: str = banner.inner_text()
            assert "gossip key mismatch" in text
            return text
        finally:
            browser.close()


def _key(tmp: Path, name: str) -> Path:
    path = tmp / name
    path.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    return path


def _store(tmp: Path, name: str) -> str:
    (tmp / name).mkdir()
    return f"oci:{tmp / name}"


def test_nodes_with_different_keys_count_and_warn(tmp_path: Path) -> None:
    a = start_node(_store(tmp_path, "a"), tmp_path / "a.log",
                   ("--node-name", "a", "--gossip-key-file", str(_key(tmp_path, "ka"))))
    b = None
    try:
        b = start_node(_store(tmp_path, "b"), tmp_path / "b.log",
                       ("--node-name", "b", "--gossip-key-file", str(_key(tmp_path, "kb")),
                        "--join", a.mesh))
        a_host, b_host = a.mesh.rsplit(":", 1)[0], b.mesh.rsplit(":", 1)[0]
        wait_until(lambda: _undecryptable(a).get(b_host, 0) >= 1, 20,
                   "a counts b's undecryptable join")
        first = _undecryptable(a)[b_host]
        wait_until(lambda: _undecryptable(a)[b_host] > first, 30,
                   "the count keeps rising while b retries")
        status = _status(a)
        mesh = status["mesh"]
        assert isinstance(mesh, dict)
        seen = mesh["undecryptable"]
        assert seen["by_source"][b_host] >= first
        assert seen["warning"] is not None and b_host in seen["warning"]
        assert "gossip key mismatch" in seen["warning"]
        assert mesh["members_by_state"]["alive"] == 1  # the mesh did not form
        assert b_host in _banner(a)
        # b's replies from a, if any, are a's: b counts a only from a's address.
        assert set(_undecryptable(b)) <= {a_host}
    finally:
        if b is not None:
            stop(b.proc)
        stop(a.proc)


def test_matching_keys_warn_nothing(tmp_path: Path) -> None:
    key = str(_key(tmp_path, "k"))
    a = start_node(_store(tmp_path, "a"), tmp_path / "a.log",
                   ("--node-name", "a", "--gossip-key-file", key))
    b = None
    try:
        b = start_node(_store(tmp_path, "b"), tmp_path / "b.log",
                       ("--node-name", "b", "--gossip-key-file", key, "--join", a.mesh))
        wait_until(lambda: _status(a)["mesh"]["members_by_state"]["alive"] == 2,  # type: ignore[index]
                   20, "a and b form a mesh")
        assert _undecryptable(a) == {}
        assert _status(a)["mesh"]["undecryptable"]["warning"] is None  # type: ignore[index]
    finally:
        if b is not None:
            stop(b.proc)
        stop(a.proc)


def test_sources_are_bounded() -> None:
    seen = Undecryptable(limit=3)
    for i in range(100):
        seen.record(f"10.0.0.{i % 50}", float(i))
    assert len(seen.by_source) == 4
    assert seen.total == 100 and seen.last == 99.0
    assert seen.by_source["other"] == 100 - 3 * 2
