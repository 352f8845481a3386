"""A test node that fails to start leaves no process behind (the caller never got the
node, so nothing else would stop its containerd)."""

from __future__ import annotations

import socket

import pytest

from tests.e2e.cluster import E2ENode


def test_a_node_whose_meshmirror_cannot_listen_stops_its_containerd() -> None:
    node = E2ENode("node-taken")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind((node.host, node.registry_port))
        taken.listen(1)
        with pytest.raises(RuntimeError, match="cannot listen"):
            node.start()
    assert not node.containerd.running
    assert not node.meshmirror_running
