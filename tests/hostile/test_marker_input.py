"""Malformed `X-Meshmirror-Auth` values sent from a member's address (a process in a
member's network namespace): each is a refused marker and the request is served as a
client's, never a 500 or a traceback per request.

Real ``meshmirror run`` nodes with a gossip key, joined in a mesh.
"""

from __future__ import annotations

import base64
import http.client
import os
from pathlib import Path

import pytest

from meshmirror.mirror.marker import AUTH_HEADER, PEER_HEADER, TREE_HEADER
from tests.support.metrics import metric, read_metric, scrape
from tests.support.node import RunningNode, start_node
from tests.support.processes import stop, wait_until

pytestmark = [pytest.mark.real]

DIGEST = "sha256:" + "cd" * 32


def _alive(node: RunningNode) -> float:
    metrics = scrape(node.metrics)
    return metric(metrics, "meshmirror_mesh_members", state="alive")


def _status_from(source: str, node: RunningNode, auth: str) -> int:
    host, port = node.address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=20,
                                            source_address=(source, 0))
    try:
        connection.putrequest("GET", f"/v2/pub/app/blobs/{DIGEST}",
                              skip_accept_encoding=True)
        for name, value in ((PEER_HEADER, "1"), (TREE_HEADER, "node-0")):
            connection.putheader(name, value)
        connection.putheader(AUTH_HEADER, auth.encode("latin-1"))
        connection.endheaders()
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def test_malformed_auth_values_from_a_member_address_are_refused_not_errors(
        tmp_path: Path) -> None:
    key_file = tmp_path / "gossip.key"
    key_file.write_text(base64.b64encode(os.urandom(32)).decode())
    nodes: list[RunningNode] = []
    try:
        for i in range(2):
            store = tmp_path / f"node-{i}"
            store.mkdir()
            join = ("--join", nodes[0].mesh) if nodes else ()
            nodes.append(start_node(f"oci:{store}", tmp_path / f"node-{i}.log",
                                    ("--node-name", f"node-{i}", "--gossip-key-file",
                                     str(key_file), *join)))
        wait_until(lambda: all(_alive(n) == 2 for n in nodes), 30, "the mesh", 0.1)
        member = nodes[0].address.rsplit(":", 1)[0]
        values = [
            "v1 \xb2 " + "0" * 64 + " node-0",         # a digit int() does not take
            "v1 " + "9" * 5000 + " " + "0" * 64 + " node-0",  # past int()'s digit limit
            "v1 \u0660 00 node-0".encode().decode("latin-1"),  # Arabic-Indic zero, UTF-8
        ]
        for value in values:
            assert _status_from(member, nodes[1], value) == 404, value
        refused = read_metric(nodes[1].metrics, "meshmirror_peer_markers_refused_total",
                              reason="malformed")
        assert refused == len(values)
        log = (tmp_path / "node-1.log").read_text()
        assert "Traceback" not in log
    finally:
        for node in nodes:
            stop(node.proc)
