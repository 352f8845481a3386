"""A sick peer on the spliced hop: the pull falls back, the liar is blamed, nothing leaks.

Real processes on loopback: an honest `meshmirror run` holding an image, the node under
test (``puller``, its blob cache on, so every hop is spliced from the peer's socket into
a cache file and hashed from there), and per case a rogue mesh member
(`rogue.BODY_KINDS`) that claims the blob and then misframes the real bytes: half then
a close or a reset (the pull resumes on the holder, the spliced file carried on at the
byte reached), the whole blob plus a megabyte more, random bytes of the right length,
chunked or gzip-compressed bodies (which must never be spliced as if plain).

Each case pulls a blob the puller never held and checks: the client gets the blob whole
with the right digest; the rogue, when it sent anything wrong, is blamed and the holder
never; the rogue's connections are closed (a duplicated socket left open would hold one) and
the puller's pipes and threads come back to where they were.
"""

from __future__ import annotations

import contextlib
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.reliability.rogue import BODY_KINDS, Rogue, claiming_summary
from tests.support.containerd import Containerd, dead_upstream, write_hosts
from tests.support.http import timed_sha256
from tests.support.node import RunningNode, held_epoch, holder_and_puller
from tests.support.processes import wait_until

pytestmark = [pytest.mark.real]

LAYER = 3 * 1024 * 1024 + 17
# Every byte a rogue sends of these is the blob's own, framed as HTTP says: not a lie.
HONEST_BYTES = frozenset({"long"})


@dataclass
class Cluster:
    holder: RunningNode
    puller: RunningNode
    layout: Path
    digests: dict[str, str]  # per kind, a blob the puller has not held yet
    workdir: Path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("sick-hop")
    # One layer per case and one to find the holder with.
    with holder_and_puller(workdir, "docker.io/library/sick:1",
                           [LAYER] * (len(BODY_KINDS) + 1), "--mirror-spool-dir",
                           str(workdir), seed=23, puller="puller") as (holder, puller, image):
        layers = [str(layer.digest) for layer in image.platforms[0].layers]
        url = blob_url(puller, layers[-1])
        wait_until(lambda: timed_sha256(url)[0] == layers[-1], 30,
                   "the puller to find the holder's blobs")
        yield Cluster(holder, puller, workdir / "seeded",
                      dict(zip(BODY_KINDS, layers, strict=False)), workdir)


def blob_url(node: RunningNode, digest: str) -> str:
    return f"http://{node.address}/v2/library/sick/blobs/{digest}?ns=docker.io"


def blamed(node: RunningNode, peer: str) -> int:
    return sum(f"peer {peer} failed" in line for line in node.log.read_text().splitlines())


def pipes_and_threads(pid: int) -> tuple[int, int]:
    """The process's open pipes (the spliced hop's own) and its threads. (Its descriptors
    in all grow by design: each cached blob keeps its file open.)"""
    pipes = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            pipes += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:")
    return pipes, len(os.listdir(f"/proc/{pid}/task"))


@pytest.mark.parametrize("kind", [kind for kind in BODY_KINDS if kind != "huge"])
def test_a_sick_peer_on_the_spliced_hop_never_hurts_the_pull(cluster: Cluster,
                                                              kind: str) -> None:
    digest = cluster.digests[kind]
    blob = (cluster.layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()
    name = f"rogue-{kind}"
    puller = cluster.puller
    before = pipes_and_threads(puller.proc.pid)
    holder_blamed = blamed(puller, "holder")
    with Rogue(kind, claiming_summary([digest], epoch=7), len(blob), join=puller.mesh,
               log=cluster.workdir / f"{name}.log", name=name, blob=blob) as rogue:
        wait_until(lambda: held_epoch(puller, name) == 7, 30,
                   f"the puller to hold {name}'s summary")
        assert timed_sha256(blob_url(puller, digest))[0] == digest
        assert rogue.state.blob_requests >= 1, "the case must exercise the rogue"
        wait_until(lambda: rogue.state.open_connections == 0, 5,
                   "the rogue's connections to be closed")
        if kind not in HONEST_BYTES:
            assert blamed(puller, name) >= 1
        # The blob is in the cache now, whole and verified: asked again, nobody is asked.
        asked = rogue.state.blob_requests
        assert timed_sha256(blob_url(puller, digest))[0] == digest
        assert rogue.state.blob_requests == asked
    assert blamed(puller, "holder") == holder_blamed
    # The rogue's connections closed (above) means the pump's duplicate socket is too.
    wait_until(lambda: pipes_and_threads(puller.proc.pid) <= before, 10,
               f"the puller's pipes and threads to be back at {before}")


def test_a_peer_announcing_more_than_the_cache_holds_gets_no_unverified_byte_sent(
        cluster: Cluster) -> None:
    """64 GiB announced: the cache cannot take it, so the blob would be streamed, its
    bytes sent before they verify. The client was sent the rogue's random bytes (hundreds
    of megabytes for a 3 MiB blob) and the holder, resumed to past its end, was blamed
    for its 416. The holder disagreeing about the size, the answer is a 404 instead."""
    digest = cluster.digests["huge"]
    blob = (cluster.layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()
    puller = cluster.puller
    holder_blamed = blamed(puller, "holder")
    with Rogue("huge", claiming_summary([digest], epoch=7), len(blob), join=puller.mesh,
               log=cluster.workdir / "rogue-huge.log", name="rogue-huge", blob=blob) as rogue:
        wait_until(lambda: held_epoch(puller, "rogue-huge") == 7, 30,
                   "the puller to hold rogue-huge's summary")
        with (pytest.raises(urllib.error.HTTPError) as answered,
              urllib.request.urlopen(blob_url(puller, digest), timeout=30) as response):
            pytest.fail(f"answered {response.status} with "
                        f"{response.headers['Content-Length']} bytes announced")
        assert answered.value.code == 404
    assert blamed(puller, "holder") == holder_blamed
    assert rogue.state.blob_requests >= 1


def test_containerd_pulls_through_a_peer_that_lies_about_the_size(tmp_path: Path) -> None:
    """containerd 1.6, asking the puller (its hosts.toml's upstream is a dead port), while
    a rogue claims the layer and sends it gzip-compressed with the compressed length:
    the layer must come from the holder, verified, with the blob's own length (a 404
    sends containerd to the dead upstream and the pull fails)."""
    with holder_and_puller(tmp_path, "docker.io/library/liar:1", [LAYER],
                           "--mirror-spool-dir", str(tmp_path), seed=29,
                           puller="puller") as (_, puller, image):
        layer = image.platforms[0].layers[0]
        blob = (tmp_path / "seeded" / "blobs" / "sha256" / layer.digest.hex).read_bytes()
        wait_until(lambda: held_epoch(puller, "holder") is not None, 30,
                   "the puller to hold the holder's summary")
        with Rogue("gzip", claiming_summary([str(layer.digest)], epoch=7), len(blob),
                   join=puller.mesh, log=tmp_path / "rogue.log", name="rogue-gzip",
                   blob=blob) as rogue, Containerd() as containerd:
            wait_until(lambda: held_epoch(puller, "rogue-gzip") == 7, 30,
                       "the puller to hold the rogue's summary")
            hosts = tmp_path / "hosts"
            write_hosts(hosts, "docker.io", dead_upstream(), puller.address)
            containerd.ctr("images", "pull", "--hosts-dir", str(hosts), image.name,
                           timeout=120)
            assert rogue.state.blob_requests >= 1, "the case must exercise the rogue"
            assert str(layer.digest) in containerd.ctr("content", "ls", "-q").stdout.split()
        assert blamed(puller, "rogue-gzip") >= 1
        assert blamed(puller, "holder") == 0
