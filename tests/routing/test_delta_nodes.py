"""Summary deltas between real ``meshmirror run`` processes.

Two nodes on OCI-layout stores: the holder publishes, the watcher fetches. A new
image on the holder reaches the watcher as a delta; a holder killed and
restarted on the same addresses publishes from a fresh log, so the watcher,
still holding the old life's epoch, gets the whole filter (and stops routing
what the holder no longer has). A hostile member (a gossip member of the test's
own whose registry is a scripted HTTP server) answers delta requests with a
malformed or oversized delta: the watcher refuses it, asks for the whole
filter, and stays healthy.
"""

from __future__ import annotations

import json
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from meshmirror.mesh.config import MeshConfig
from meshmirror.mesh.tags import encode_tags
from meshmirror.mesh.transport import MeshNode
from meshmirror.oci.imagebuilder import build_image, remove_index_entries
from meshmirror.peering import TAG_EPOCH, TAG_HTTP, TAG_KEYS
from meshmirror.routing.summary import (
    DELTA_HEADER_SIZE,
    DELTA_MEDIA_TYPE,
    MEDIA_TYPE_V3,
    SummaryDelta,
    etag_for,
)
from tests.routing.fakes import digest_key
from tests.routing.servers import make_summary
from tests.support.http import timed_sha256
from tests.support.metrics import metric, scrape
from tests.support.node import RunningNode, held_epoch, start_node
from tests.support.ports import free_port, loopback_host
from tests.support.processes import stop, wait_until
from tests.support.scripted_http import Reply, Request, ScriptedHTTPServer

pytestmark = [pytest.mark.real]

# The watcher keeps no blob it fetched: every GET asks its router again.
NO_CACHE = ("--upstream-cache-limit", "0")


def summary_fetches(node: RunningNode) -> dict[str, float]:
    metrics = scrape(node.metrics)
    return {result: metric(metrics, "meshmirror_peer_summary_fetches_total", result=result)
            for result in ("ok", "delta", "error", "not_modified")}


def blob_url(node: RunningNode, repository: str, digest: object) -> str:
    return f"http://{node.address}/v2/{repository}/blobs/{digest}?ns=docker.io"


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[tuple[Path, list[RunningNode]]]:
    """The holder (on ``layout``, with one image) and the watcher; a test that restarts
    the holder puts the new process in its place, for cleanup."""
    layout = tmp_path / "holder"
    build_image("docker.io/library/old:1", layout, [2048], seed=1)
    empty = tmp_path / "watcher"
    empty.mkdir()
    running: list[RunningNode] = []
    try:
        running.append(start_node(f"oci:{layout}", tmp_path / "holder.log",
                                  ("--node-name", "holder")))
        running.append(start_node(f"oci:{empty}", tmp_path / "watcher.log",
                                  ("--node-name", "watcher", "--join", running[0].mesh,
                                   *NO_CACHE)))
        yield layout, running
    finally:
        for node in running:
            stop(node.proc)


def test_a_new_image_arrives_as_a_delta_and_a_restarted_holder_sends_its_whole_filter(
        nodes: tuple[Path, list[RunningNode]], tmp_path: Path) -> None:
    layout, (holder, watcher) = nodes
    old = build_image("docker.io/library/old:1", layout, [2048], seed=1)  # the same bytes again
    old_layer = old.platforms[0].layers[0].digest
    old_url = blob_url(watcher, "library/old", old_layer)
    wait_until(lambda: timed_sha256(old_url)[0] == str(old_layer),
               30, "the watcher to route the holder's first image")
    before = summary_fetches(watcher)

    new = build_image("docker.io/library/new:1", layout, [2048], seed=2)
    new_layer = new.platforms[0].layers[0].digest
    new_url = blob_url(watcher, "library/new", new_layer)
    wait_until(lambda: timed_sha256(new_url)[0] == str(new_layer),
               30, "the watcher to route the holder's new image")
    after = summary_fetches(watcher)
    assert after["delta"] > before["delta"]
    assert after["ok"] == before["ok"]  # no whole filter was needed
    assert after["error"] == before["error"]
    held_before_restart = held_epoch(watcher, "holder")
    assert held_before_restart is not None

    # Killed: no leave, so the watcher keeps the old life's epoch. While down, the
    # holder loses its first image.
    holder.proc.send_signal(signal.SIGKILL)
    holder.proc.wait(10)
    assert remove_index_entries(layout, "docker.io/library/old:1") > 0
    restarted = start_node(f"oci:{layout}", tmp_path / "holder2.log", ("--node-name", "holder"),
                           same_as=holder)
    nodes[1][0] = restarted
    wait_until(lambda: (held_epoch(watcher, "holder") or 0) > held_before_restart, 60,
               "the watcher to hold the restarted holder's summary")
    final = summary_fetches(watcher)
    assert final["ok"] > after["ok"]  # the whole filter: no delta reaches back that far
    assert final["error"] == after["error"]
    assert timed_sha256(blob_url(watcher, "library/new", new_layer))[0] == str(new_layer)
    # The old image's layer left the holder's filter with the rebuild.
    assert timed_sha256(blob_url(watcher, "library/old", old_layer))[0] is None


def _bad_delta(kind: str) -> Reply:
    if kind == "malformed":
        good = SummaryDelta(base_epoch=5, epoch=6, k=7, m=1024, reduction=1, count=1,
                            born_at_ms=0, positions=np.array([3], dtype=np.uint64)).encode()
        # Promises four billion positions in a one-byte body.
        body = good[:DELTA_HEADER_SIZE - 8] + b"\xff\xff\xff\xff" + good[DELTA_HEADER_SIZE - 4:]
        return Reply(200, (("Content-Type", DELTA_MEDIA_TYPE), ("ETag", etag_for(6))), body)
    # Announces 1 GiB: refused on the header, nothing read or allocated.
    return Reply(200, (("Content-Type", DELTA_MEDIA_TYPE), ("ETag", etag_for(6))), b"",
                 length=1 << 30)


@pytest.mark.parametrize("kind", ["malformed", "oversized"])
def test_a_hostile_delta_is_refused_and_the_whole_filter_fetched_instead(
        tmp_path: Path, kind: str) -> None:
    claimed_first, claimed_later = digest_key("first"), digest_key("later")
    epoch = [5]

    def respond(request: Request) -> Reply:
        held = request.headers.get("if-none-match")
        if held == etag_for(epoch[0]):
            return Reply(304)
        if held is not None and DELTA_MEDIA_TYPE in request.headers.get("accept", ""):
            return _bad_delta(kind)
        keys = [claimed_first] if epoch[0] == 5 else [claimed_first, claimed_later]
        body = make_summary(keys, epoch=epoch[0]).encode()
        return Reply(200, (("Content-Type", MEDIA_TYPE_V3), ("ETag", etag_for(epoch[0]))), body)

    empty = tmp_path / "watcher"
    empty.mkdir()
    watcher = start_node(f"oci:{empty}", tmp_path / "watcher.log",
                         ("--node-name", "watcher", *NO_CACHE))
    host = loopback_host()
    port = free_port(host)
    rogue: MeshNode | None = None
    try:
        with ScriptedHTTPServer(respond) as server:
            def meta() -> bytes:
                return encode_tags({TAG_HTTP: server.url, TAG_EPOCH: str(epoch[0])})

            wh, wp = watcher.mesh.rsplit(":", 1)
            rogue = MeshNode(MeshConfig(), name="rogue", bind=(host, port), meta=meta(),
                             join=[(wh, int(wp))])
            rogue.start()
            wait_until(lambda: held_epoch(watcher, "rogue") == 5, 30,
                       "the watcher to hold the rogue's first summary")
            before = summary_fetches(watcher)
            epoch[0] = 6
            rogue.update_meta(meta())
            wait_until(lambda: held_epoch(watcher, "rogue") == 6, 30,
                       "the watcher to fetch the rogue's summary whole")
            after = summary_fetches(watcher)
            assert after["error"] >= before["error"] + 1
            assert after["ok"] == before["ok"] + 1
            assert after["delta"] == before["delta"]
            asked = [r for r in server.requests if r.headers.get("if-none-match") == etag_for(5)]
            assert DELTA_MEDIA_TYPE in asked[0].headers["accept"]
            assert DELTA_MEDIA_TYPE not in asked[-1].headers["accept"]
        with urllib.request.urlopen(f"http://{watcher.address}/healthz", timeout=5) as r:
            assert r.status == 200
        assert watcher.proc.poll() is None
    finally:
        if rogue is not None:
            rogue.stop(leave=False, timeout=5)
        stop(watcher.proc)


def test_a_member_advertising_an_absurd_key_count_does_not_stop_the_node_following_the_mesh(
        tmp_path: Path) -> None:
    """A rogue's ``keys`` tag of 400 digits once raised OverflowError in the node's
    membership follower and ended it: a member joining after it was never learned.
    Here the watcher still fetches a later member's summary, and ignores the rogue's."""
    summary = make_summary([digest_key("late")], epoch=7)

    def respond(request: Request) -> Reply:
        if request.headers.get("if-none-match") == etag_for(7):
            return Reply(304)
        return Reply(200, (("Content-Type", MEDIA_TYPE_V3), ("ETag", etag_for(7))),
                     summary.encode())

    empty = tmp_path / "watcher"
    empty.mkdir()
    watcher = start_node(f"oci:{empty}", tmp_path / "watcher.log", ("--node-name", "watcher"))
    members: list[MeshNode] = []
    try:
        with ScriptedHTTPServer(respond) as server:
            wh, wp = watcher.mesh.rsplit(":", 1)
            for name, keys in (("rogue", "9" * 400), ("late", "1")):
                host = loopback_host()
                member = MeshNode(MeshConfig(), name=name, bind=(host, free_port(host)),
                                  meta=encode_tags({TAG_HTTP: server.url, TAG_EPOCH: "7",
                                                    TAG_KEYS: keys}),
                                  join=[(wh, int(wp))])
                member.start()
                members.append(member)
                if name == "rogue":
                    wait_until(lambda: any(m["name"] == "rogue" for m in status(watcher)), 30,
                               "the watcher to know the rogue")
            wait_until(lambda: held_epoch(watcher, "late") == 7, 30,
                       "the watcher to hold the later member's summary")
            assert held_epoch(watcher, "rogue") is None
        assert watcher.proc.poll() is None
    finally:
        for member in members:
            member.stop(leave=False, timeout=5)
        stop(watcher.proc)


def status(node: RunningNode) -> list[dict[str, object]]:
    with urllib.request.urlopen(f"http://{node.metrics}/status", timeout=5) as r:
        members: list[dict[str, object]] = json.load(r)["mesh"]["members"]
    return members
