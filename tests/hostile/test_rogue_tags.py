"""A mesh member whose tags hold numbers this node cannot read must not stop the node
from following every other member.

Without a gossip key, any pod that reaches the mesh port can join. A member whose
``epoch`` tag was a digit that `int` refuses ("\\xb2": `str.isdigit` takes it) used
to end the task that applies membership events: the node then never learned of a
member that joined later, nor of one that left.

Real ``meshmirror run`` nodes and a real ``python -m meshmirror.mesh`` member.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.support.metrics import read_metric
from tests.support.node import RunningNode, start_node
from tests.support.ports import free_port, loopback_host
from tests.support.processes import spawn, stop, wait_until

pytestmark = [pytest.mark.real]


def _gauge(node: RunningNode, name: str) -> float:
    return read_metric(node.metrics, name)


def _status(node: RunningNode) -> int:
    with urllib.request.urlopen(f"http://{node.metrics}/status", timeout=5) as response:
        response.read()
        return int(response.status)


def _members(node: RunningNode) -> set[str]:
    with urllib.request.urlopen(f"http://{node.metrics}/status", timeout=5) as response:
        return {m["name"] for m in json.loads(response.read())["mesh"]["members"]}


def test_a_member_with_unreadable_numbers_in_its_tags_stops_nothing(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    first = start_node(f"oci:{tmp_path / 'a'}", tmp_path / "a.log", ("--node-name", "a"))
    rogue = later = None
    try:
        host = loopback_host()
        rogue = spawn([sys.executable, "-m", "meshmirror.mesh", "--bind",
                       f"{host}:{free_port(host)}", "--name", "rogue", "--join", first.mesh,
                       "--tag", f"http=http://{host}:1", "--tag", "epoch=\u00b2",
                       "--tag", "keys=" + "9" * 40], tmp_path / "rogue.log")
        wait_until(lambda: "rogue" in _members(first), 20, "the node to know the rogue", 0.1)
        assert _status(first) == 200
        later = start_node(f"oci:{tmp_path / 'b'}", tmp_path / "b.log",
                           ("--node-name", "b", "--join", first.mesh))
        wait_until(lambda: "b" in _members(first)
                   and _gauge(first, "meshmirror_peer_directory_peers") == 1, 20,
                   "the node to learn of the member that joined after the rogue", 0.1)
        # The rogue's key count is unreadable, so its summary cannot be budgeted: it is
        # known as a member, and never routed to.
        assert _gauge(first, "meshmirror_peer_directory_peers") == 1
        assert _status(first) == 200
    finally:
        for proc in (later.proc if later else None, rogue, first.proc):
            if proc is not None:
                stop(proc)
