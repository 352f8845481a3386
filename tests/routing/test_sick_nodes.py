"""A peer restarted with its wall clock behind, against a real ``meshmirror run``
node: its new life advertises an epoch before the one the node holds (epochs are
wall-clock ms), through real gossip, and the node fetches its summary whole again
instead of keeping the old life's filter until the peer's clock catches up."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshmirror.mesh.config import MeshConfig
from meshmirror.mesh.tags import encode_tags
from meshmirror.mesh.transport import MeshNode
from meshmirror.peering import TAG_EPOCH, TAG_HTTP, TAG_KEYS
from meshmirror.routing.summary import MEDIA_TYPE_V3, etag_for
from tests.routing.fakes import digest_key
from tests.routing.servers import make_summary
from tests.support.node import held_epoch, start_node
from tests.support.ports import free_port, loopback_host
from tests.support.processes import stop, wait_until
from tests.support.scripted_http import Reply, Request, ScriptedHTTPServer

pytestmark = [pytest.mark.real]


def test_a_peer_whose_epochs_go_back_is_fetched_whole_again(tmp_path: Path) -> None:
    epoch = [5_000]

    def respond(request: Request) -> Reply:
        if request.headers.get("if-none-match") == etag_for(epoch[0]):
            return Reply(304)
        body = make_summary([digest_key(epoch[0])], epoch=epoch[0]).encode()
        return Reply(200, (("Content-Type", MEDIA_TYPE_V3), ("ETag", etag_for(epoch[0]))), body)

    empty = tmp_path / "watcher"
    empty.mkdir()
    watcher = start_node(f"oci:{empty}", tmp_path / "watcher.log", ("--node-name", "watcher"))
    host = loopback_host()
    peer: MeshNode | None = None
    try:
        with ScriptedHTTPServer(respond) as server:
            def meta() -> bytes:
                return encode_tags({TAG_HTTP: server.url, TAG_EPOCH: str(epoch[0]),
                                    TAG_KEYS: "1"})

            wh, wp = watcher.mesh.rsplit(":", 1)
            peer = MeshNode(MeshConfig(), name="peer", bind=(host, free_port(host)),
                            meta=meta(), join=[(wh, int(wp))])
            peer.start()
            wait_until(lambda: held_epoch(watcher, "peer") == 5_000, 30,
                       "the watcher to hold the peer's first summary")
            epoch[0] = 1_000  # restarted, its clock behind its old epochs
            peer.update_meta(meta())
            wait_until(lambda: held_epoch(watcher, "peer") == 1_000, 30,
                       "the watcher to fetch the peer's new life whole")
            asked = [r.headers.get("if-none-match") for r in server.requests]
            assert asked[-1] is None  # whole, not "do you still have 5000"
        assert watcher.proc.poll() is None
    finally:
        if peer is not None:
            peer.stop(leave=False, timeout=5)
        stop(watcher.proc)
