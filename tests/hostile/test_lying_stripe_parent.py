"""A stripe's parent that answers its range from the wrong offset is left out of that
stripe's tree, not believed (#16, a sick peer).

A rollout reads a large blob as stripes, each a ``Range`` tree request to its parent in
that stripe's tree. A parent that answers 206 but with a ``Content-Range`` that does
not start where it was asked (here: the blob's first bytes, as a server that ignores
the range's start would) used to have its bytes written into the stripe: the blob then
failed its digest and the client got a miss. The peer mirror's own resume checks the
start (`mirror.fetch`); the tree now does too, and the stripe goes to its next parent.

A real ``meshmirror run`` node, a real Distribution upstream, and a mesh member (a real
``python -m meshmirror.mesh``) whose HTTP side is the test's own.
"""

from __future__ import annotations

import hashlib
import re
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from meshmirror.oci.imagebuilder import build_image
from meshmirror.routing.owner import FanoutTree, stripe_count, stripe_range
from meshmirror.routing.summary import MEDIA_TYPE
from tests.reliability.rogue import claiming_summary
from tests.support.distribution import DistributionRegistry
from tests.support.metrics import metric, scrape
from tests.support.node import RunningNode, start_node
from tests.support.ports import free_port, loopback_host
from tests.support.processes import spawn, stop, wait_until
from tests.support.scripted_http import Reply, Request, ScriptedHTTPServer
from tests.support.skopeo import push_layout

pytestmark = [pytest.mark.real]

MiB = 1024 * 1024
REPO, TAG = "pub/app", "1"
FANOUT = 2
SIZE = 34 * MiB  # two stripes at F = 2


def _holds_summary(node: RunningNode) -> bool:
    metrics = scrape(node.metrics)
    return (metric(metrics, "meshmirror_peer_directory_peers") == 1
            and metric(metrics, "meshmirror_peer_summaries_share") >= 1)


@pytest.mark.parametrize("lie", ["wrong_offset", "wrong_bytes"])
def test_a_stripe_parent_that_sends_the_wrong_bytes_is_left_out(lie: str, tmp_path: Path
                                                                 ) -> None:
    """``wrong_offset``: a 206 from byte 0 whatever the range asked: seen in the headers,
    the parent is left out at once and the first pull is served. ``wrong_bytes``: the
    right headers, zeros for a body: only the blob's digest can tell; that pull is a
    miss (containerd goes to the upstream), and the members that sent bytes of it are
    left out of the blob's trees, so the next pull is served."""
    image = build_image(f"example.com/{REPO}:{TAG}", tmp_path / "image", (SIZE,), seed=47)
    layer = image.platforms[0].layers[0]
    digest = str(layer.digest)
    data = (image.layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()
    assert stripe_count(len(data), FANOUT) == 2
    # A name for the sick member that makes it stripe 1's root, and the node stripe 0's.
    rogue_name = next(
        f"sick-{i}" for i in range(10_000)
        if FanoutTree(digest, ["node", f"sick-{i}"], FANOUT, 0).placement("node").parent is None
        and FanoutTree(digest, ["node", f"sick-{i}"], FANOUT, 1).placement(
            f"sick-{i}").parent is None)
    summary = claiming_summary(["sha256:" + "00" * 32], epoch=1)
    asked: list[str] = []

    def sick(request: Request) -> Reply:
        if request.path.startswith("/_mesh/v1/summary"):
            return Reply(200, (("ETag", f'"{summary.epoch}"'), ("Content-Type", MEDIA_TYPE)),
                         summary.encode())
        match = re.fullmatch(r"bytes=(\d+)-(\d+)", request.headers.get("range", ""))
        if "/blobs/" not in request.path or match is None:
            return Reply(404)
        asked.append(request.headers["range"])
        first, last = int(match.group(1)), int(match.group(2))
        if lie == "wrong_offset":  # the length asked for, but from byte 0
            return Reply(206, (("Content-Range", f"bytes 0-{last - first}/{len(data)}"),
                               ("Docker-Content-Digest", digest)), data[:last - first + 1])
        return Reply(206, (("Content-Range", f"bytes {first}-{last}/{len(data)}"),
                           ("Docker-Content-Digest", digest)), bytes(last - first + 1))

    with DistributionRegistry() as upstream, ScriptedHTTPServer(sick) as http:
        push_layout(image.layout, TAG, upstream.address, REPO)
        (tmp_path / "store").mkdir()
        node = start_node(f"oci:{tmp_path / 'store'}", tmp_path / "node.log",
                          ("--node-name", "node", "--mirrored-registries", upstream.address,
                           "--resolve-tags", "upstream-first",
                           "--private-images", "upstream-only",
                           "--rollout-fanout", str(FANOUT)))
        host = loopback_host()
        member = None
        try:
            member = spawn([sys.executable, "-m", "meshmirror.mesh", "--bind",
                            f"{host}:{free_port(host)}", "--name", rogue_name,
                            "--join", node.mesh, "--tag", f"http={http.url}",
                            "--tag", f"epoch={summary.epoch}",
                            "--tag", f"keys={summary.count}"], tmp_path / "sick.log")
            wait_until(lambda: _holds_summary(node), 20, "the sick member's summary", 0.1)
            url = f"http://{node.address}/v2/{REPO}/blobs/{digest}?ns={upstream.address}"
            if lie == "wrong_bytes":
                with pytest.raises(urllib.error.HTTPError) as miss:
                    urllib.request.urlopen(url, timeout=60)
                assert miss.value.code == 404
            with urllib.request.urlopen(url, timeout=60) as response:
                got = hashlib.sha256(response.read()).hexdigest()
            assert f"sha256:{got}" == digest
            first, last = stripe_range(len(data), 2, 1)
            assert asked == [f"bytes={first}-{last - 1}"]  # asked once, then left out
        finally:
            if member is not None:
                stop(member)
            stop(node.proc)
