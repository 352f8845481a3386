"""Faults with real processes: a peer killed mid-stream, a peer serving corrupt bytes,
every peer gone.

One module-scoped cluster of three containerd 1.6 + meshmirror nodes. Node 1 and
node 3 hold the images (imported with ``ctr images import``); node 2 pulls with
``ctr images pull`` through its own mirror. Tests run in file order and each one
first heals the cluster (restarts killed meshmirrors) and removes the image from
node 2.

Choosing who serves: the router ranks candidates by requests in flight before
anything else, so holding slow streams open from node 2's mirror to node 3 (a
blob only node 3 has, responses left unread) makes node 2 ask node 1 first.
That is how the corrupt-peer tests make sure the bad peer is really asked. The
blocker blob is just larger than node 2's spool budget, so node 2 streams it
(a spooled one would be fetched whole at once and stop counting as in flight),
while the big image's layer still fits and is held until verified.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from meshmirror.oci.imagebuilder import BuiltImage, build_image
from tests.e2e.cluster import E2ENode, PullResult, record_figures, wait_mesh
from tests.e2e.conftest import BIG_LAYER, MiB, Upstream
from tests.support.metrics import Metrics, metric
from tests.support.processes import wait_until
from tests.support.proxy import CountingProxy
from tests.support.skopeo import push_layout

pytestmark = [pytest.mark.real, pytest.mark.slow]

# The puller's mirror is fed through this so the kill lands mid-stream.
SLOW_PULL_RATE = 40 * MiB
CORRUPT_TEST_RESOLVE_TIMEOUT = 2.0
# Tries at making node 2 fetch from node 1 first (hedging may still pick node 3).
CORRUPT_ATTEMPTS = 3
# Node 2 holds the big layer until verified but must stream the blocker.
PULLER_SPOOL_LIMIT = BIG_LAYER + 1 * MiB
BLOCKER_LAYER = BIG_LAYER + 2 * MiB
# Tries at landing a kill -9 while node 2 spools the layer (it takes well under a second).
KILL_ATTEMPTS = 5


@dataclass
class Cluster:
    upstream: Upstream
    n1: E2ENode
    n2: E2ENode
    n3: E2ENode
    big: BuiltImage
    small: BuiltImage  # four small layers, verified whole by the mirror before sending
    blocker: BuiltImage  # one layer only node 3 holds, streamed by node 2 (see above)
    mid: BuiltImage  # in upstream and on nodes 1 and 3, for the all-peers-gone case
    slow_hosts: Path
    slow_proxy: CountingProxy
    restore: list[Callable[[], None]] = field(default_factory=list)

    @property
    def nodes(self) -> list[E2ENode]:
        return [self.n1, self.n2, self.n3]

    def heal(self) -> None:
        """Every meshmirror running and in the mesh; corrupted blobs repaired."""
        for undo in self.restore:
            undo()
        self.restore.clear()
        for node in self.nodes:
            if not node.meshmirror_running:
                alive = next(n for n in self.nodes if n.meshmirror_running and n is not node)
                node.start_meshmirror(join=alive.mesh_address)
        wait_mesh(self.nodes)

    def fresh_puller(self) -> None:
        """Restart node 2's meshmirror: a new router with no penalties from earlier tests.

        With a longer first-byte bound, so the hedge (half of it) does not race
        node 3 against a node 1 that is merely slow on this loaded machine.
        """
        self.n2.resolve_timeout = CORRUPT_TEST_RESOLVE_TIMEOUT
        self.restart_puller("--mirror-spool-limit", str(PULLER_SPOOL_LIMIT))

    def restart_puller(self, *extra_args: str) -> None:
        """Restart node 2's meshmirror with these extra flags (joining a running peer)."""
        self.n2.stop_meshmirror()
        self.n2.extra_args = (*PEER_TAGS, *extra_args)
        alive = next(n for n in (self.n1, self.n3) if n.meshmirror_running)
        self.n2.start_meshmirror(join=alive.mesh_address)
        wait_mesh(self.nodes)
        _wait_routes(self.n2, (self.big, self.small, self.blocker))

    def corrupt(self, node: E2ENode, digest: str) -> None:
        """Flip one byte in the middle of the blob file meshmirror serves from."""
        self.restore.append(node.corrupt_blob(digest))


def _layer(image: BuiltImage, index: int = 0) -> str:
    return str(image.platforms[0].layers[index].digest)


def _head_ok(node: E2ENode, image: BuiltImage, digest: str) -> bool:
    conn = http.client.HTTPConnection(node.host, node.registry_port, timeout=5)
    try:
        conn.request("HEAD", f"/v2/{image.repository}/blobs/{digest}?ns={image.registry}")
        return conn.getresponse().status == 200
    finally:
        conn.close()


def _wait_routes(node: E2ENode, images: tuple[BuiltImage, ...]) -> None:
    """``node``'s mirror finds a peer for each image's first layer."""
    for image in images:
        try:
            wait_until(functools.partial(_head_ok, node, image, _layer(image)), 15,
                       f"{node.name} to route {image.name}")
        except TimeoutError as err:
            raise TimeoutError(f"{err}; its log ends:\n{node.log_tail()}") from None


@contextlib.contextmanager
def _busy(node: E2ENode, image: BuiltImage, streams: int = 3) -> Iterator[None]:
    """Hold ``streams`` mirrored streams of ``image``'s first layer open through ``node``,
    unread, so the peer serving them counts that many requests in flight.

    Three, because ctr fetches the config and layers concurrently: node 1 can have
    a request or two in flight from the same pull, and must still look less busy.
    """
    conns = []
    try:
        for _ in range(streams):
            conn = http.client.HTTPConnection(node.host, node.registry_port, timeout=10)
            conns.append(conn)
            conn.request("GET", f"/v2/{image.repository}/blobs/{_layer(image)}"
                                f"?ns={image.registry}")
            response = conn.getresponse()
            assert response.status == 200, response.status
        yield
    finally:
        for conn in conns:
            conn.close()


# The images live on the peers only (the upstream never holds most of them), so tags
# resolve through peers: these tests are about faults in transfers, not tag freshness.
PEER_TAGS = ("--resolve-tags", "peers")


def _delta(after: Metrics, before: Metrics, name: str, **labels: str) -> float:
    return metric(after, name, **labels) - metric(before, name, **labels)


@pytest.fixture(scope="module")
def cluster(upstream: Upstream, big_image: BuiltImage,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("faults")
    small = build_image(f"{upstream.address}/e2e/small:1", base / "small",
                        layer_sizes=(1 * MiB, 2 * MiB, 3 * MiB, 1 * MiB + 123), seed=301,
                        archive=base / "small.tar")
    blocker = build_image(f"{upstream.address}/e2e/blocker:1", base / "blocker",
                          layer_sizes=(BLOCKER_LAYER,), seed=302, archive=base / "blocker.tar")
    mid = build_image(f"{upstream.address}/e2e/mid:1", base / "mid",
                      layer_sizes=(4 * MiB, 4 * MiB, 4 * MiB), seed=303,
                      archive=base / "mid.tar")
    push_layout(base / "mid", "1", upstream.registry.address, "e2e/mid")
    nodes: list[E2ENode] = []
    slow_proxy: CountingProxy | None = None
    try:
        peers = PEER_TAGS
        n1 = E2ENode("fault-1", extra_args=peers).start()
        nodes.append(n1)
        n2 = E2ENode("fault-2", join=n1.mesh_address,
                     extra_args=(*peers, "--mirror-spool-limit", str(PULLER_SPOOL_LIMIT))).start()
        nodes.append(n2)
        n3 = E2ENode("fault-3", join=n1.mesh_address, extra_args=peers).start()
        nodes.append(n3)
        for node in nodes:
            node.configure(upstream.proxy.url, [node.registry_url])
        for node in (n1, n3):
            for image in (big_image, small, mid):
                assert image.archive is not None
                node.import_archive(image.archive)
        assert blocker.archive is not None
        n3.import_archive(blocker.archive)
        slow_proxy = CountingProxy(n2.host, n2.registry_port, rate=SLOW_PULL_RATE).start()
        slow_hosts = n2.dir / "slow-hosts"
        n2.configure(upstream.proxy.url, [slow_proxy.url], hosts_dir=slow_hosts)
        c = Cluster(upstream, n1, n2, n3, big_image, small, blocker, mid, slow_hosts,
                    slow_proxy)
        wait_mesh(nodes)
        # Node 2's router knows where everything is before any test starts.
        _wait_routes(n2, (big_image, small, blocker, mid))
        yield c
    finally:
        if slow_proxy is not None:
            slow_proxy.stop()
        for node in nodes:
            node.close()


def _pull_and_kill_the_server(c: Cluster, kill_after: int
                              ) -> tuple[float, float, E2ENode | None]:
    """Pull the big image on node 2 through the slow proxy; kill -9 the peer serving it
    once node 2 has ``kill_after`` bytes from peers. (bytes at the kill, seconds the
    pull took after it, the victim); the victim is None if the transfer ended first."""
    c.n2.remove_image(c.big.name, c.big.digests())
    before = c.n2.metrics()
    log = c.n2.dir / "pull-killed.log"
    proc = c.n2.start_pull(c.big.name, log, hosts_dir=c.slow_hosts)
    victim: E2ENode | None = None
    try:
        wait_until(lambda: proc.poll() is not None or _delta(
                       c.n2.metrics(), before, "meshmirror_mirror_peer_bytes_total") >= kill_after,
                   60, f"node 2 to fetch {kill_after} bytes from a peer", 0.005)
        serving = [n for n in (c.n1, c.n3)
                   if metric(n.metrics(), "meshmirror_http_requests_inflight") >= 1]
        at_kill = _delta(c.n2.metrics(), before, "meshmirror_mirror_peer_bytes_total")
        if serving and at_kill < c.big.platforms[0].layers[0].size:
            victim = serving[0]
            victim.kill_meshmirror()
        killed_at = time.monotonic()
        code = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert code == 0, log.read_text()[-2000:]
    c.n2.verify_image(c.big)
    return at_kill, time.monotonic() - killed_at, victim


@pytest.mark.parametrize("mode", ["spooled", "streamed"])
def test_serving_peer_killed_mid_transfer(cluster: Cluster, mode: str) -> None:
    """kill -9 of the peer serving a 200 MiB layer; the pull completes from the other.

    Streamed (``--mirror-spool-limit 0``) the slow proxy between containerd and node
    2 paces the whole chain, so the kill lands mid-stream every time. Spooled, node 2
    fetches the layer from the peer as fast as it can before answering, so the kill
    may land after it is done (node 2's byte counter trails what its reader thread has
    already received); then the pull is merely clean, no break is seen, and we try
    again.
    """
    c = cluster
    c.heal()
    if mode == "streamed":
        c.restart_puller("--mirror-spool-limit", "0")
    spool_limit = "0" if mode == "streamed" else str(PULLER_SPOOL_LIMIT)
    victim: E2ENode | None = None
    attempts = 0
    broke_mid_transfer = False
    try:
        while not broke_mid_transfer and attempts < KILL_ATTEMPTS:
            attempts += 1
            c.heal()
            if attempts > 1:  # node 2's blob cache holds the layer now; a new process has none
                c.restart_puller("--mirror-spool-limit", spool_limit)
            before = c.n2.metrics()
            at_kill, finished_after_kill, victim = _pull_and_kill_the_server(
                c, 40 * MiB if mode == "streamed" else 16 * MiB)
            after = c.n2.metrics()  # before any restart resets node 2's counters
            broke_mid_transfer = victim is not None and _delta(
                after, before, "meshmirror_mirror_peer_failures_total", reason="broken") >= 1
    finally:
        if mode == "streamed":
            c.heal()  # the victim may be node 3, the only holder of the blocker
            c.restart_puller("--mirror-spool-limit", str(PULLER_SPOOL_LIMIT))
    assert victim is not None, f"the transfer always ended before the kill ({attempts} tries)"
    broken = _delta(after, before, "meshmirror_mirror_peer_failures_total", reason="broken")
    assert broken >= 1, "the break was not seen as a peer failure"
    assert _delta(after, before, "meshmirror_mirror_outcomes_total", kind="blob",
                  result="hit") >= 1
    # The rest came from the other holder, asked with Range from the byte reached.
    survivor = c.n3 if victim is c.n1 else c.n1
    resumed = [r for r in _layer_requests(survivor, _layer(c.big)) if r.get("status") == 206]
    assert resumed, f"{survivor.name} never served a Range request"
    record_figures(f"fault_peer_killed_{mode}", {
        "victim": victim.name, "attempts": attempts,
        "peer_bytes_at_kill_MiB": round(at_kill / MiB, 1),
        "pull_finished_after_kill_s": round(finished_after_kill, 2),
        "broken_failures": broken,
        "peer_bytes_total_MiB": round(
            _delta(after, before, "meshmirror_mirror_peer_bytes_total") / MiB, 1),
    })


@dataclass
class _LiarPull:
    """Node 2's pull of an image whose copy on node 1 is corrupt."""

    result: PullResult
    before: Metrics
    after: Metrics
    mismatches: float
    attempts: int
    log_mark: int  # node 2's log records before this pull


def _pull_with_the_liar_first(c: Cluster, image: BuiltImage) -> _LiarPull:
    """Pull ``image`` on node 2, node 3 made to look busy, until node 1's corrupt copy
    was really tried (at most CORRUPT_ATTEMPTS pulls); every pull must succeed and
    store only blobs that hash to their digests.

    Ranking, not the test, picks the peer: on a loaded machine node 3 can still win
    node 2's first choice, and then the pull is simply clean; so try again.
    """
    attempts = 0
    while True:
        attempts += 1
        c.fresh_puller()
        c.n2.remove_image(image.name, image.digests())
        before = c.n2.metrics()
        log_mark = len(c.n2.log_records())
        with _busy(c.n2, c.blocker):  # node 3 looks busy: node 2 asks node 1 first
            result = c.n2.pull(image.name)
        after = c.n2.metrics()
        assert result.ok, result.output
        c.n2.verify_image(image)  # every stored blob hashes to its digest
        mismatches = _delta(after, before, "meshmirror_mirror_peer_failures_total",
                            reason="digest_mismatch")
        if mismatches or attempts == CORRUPT_ATTEMPTS:
            assert mismatches >= 1, f"node 1's corrupt copy was never tried in {attempts} pulls"
            return _LiarPull(result, before, after, mismatches, attempts, log_mark)


def test_corrupt_small_blobs_come_from_the_good_peer(cluster: Cluster) -> None:
    c = cluster
    c.heal()
    for layer in c.small.platforms[0].layers:
        c.corrupt(c.n1, str(layer.digest))
    pull = _pull_with_the_liar_first(c, c.small)
    # Small blobs are verified whole before sending: no response was cut short.
    for layer in c.small.platforms[0].layers:
        assert not any(r.get("aborted") for r in _layer_requests(c.n2, str(layer.digest)))
    record_figures("fault_corrupt_small", {"pull_s": round(pull.result.seconds, 2),
                                           "digest_mismatches": pull.mismatches})


def _layer_requests(node: E2ENode, digest: str, since: int = 0) -> list[dict[str, object]]:
    """GETs of ``digest`` in ``node``'s access log, from its ``since``-th record on."""
    return [r for r in node.log_records()[since:] if r.get("msg") == "request"
            and r.get("method") == "GET" and str(r.get("path", "")).endswith(digest)]


def test_corrupt_large_blob_comes_from_the_good_peer(cluster: Cluster) -> None:
    """A blob past the in-memory limit, corrupt on node 1: the first pull completes.

    Node 2's mirror holds the blob in a spool file until it verifies, so
    containerd never receives node 1's bytes: the mismatch sends the mirror to
    node 3 (from byte 0) before a single byte is answered, node 1 is penalised
    and not asked again. (Streaming instead, as with ``--mirror-spool-limit 0``,
    aborts the response; containerd 1.6 resumes with Range, keeps the corrupt
    prefix in its ingest and fails that pull at commit: this test's previous
    form measured exactly that.)
    """
    c = cluster
    c.heal()
    layer = _layer(c.big)
    c.corrupt(c.n1, layer)
    pull = _pull_with_the_liar_first(c, c.big)
    requests = _layer_requests(c.n2, layer, since=pull.log_mark)
    spooled = _delta(pull.after, pull.before, "meshmirror_mirror_blob_bodies_total", mode="spool")
    c.n2.remove_image(c.big.name, c.big.digests())
    again = c.n2.pull(c.big.name)  # node 1 is still corrupt and still ranked first
    after = c.n2.metrics()
    record_figures("fault_corrupt_large", {
        "attempts": pull.attempts, "pull_s": round(pull.result.seconds, 2),
        "digest_mismatches": pull.mismatches,
        "requests": [(r.get("status"), r.get("bytes"), r.get("aborted", False))
                     for r in requests],
        "spooled": spooled,
    })
    # One request, answered whole: nothing was aborted, nothing resumed.
    assert [(r.get("status"), r.get("aborted", False)) for r in requests] == [(200, False)], \
        requests
    assert spooled >= 1
    assert again.ok, again.output
    assert _delta(after, pull.after, "meshmirror_mirror_peer_failures_total",
                  reason="digest_mismatch") == 0, "the penalised peer was asked again"


def test_all_peers_gone_pulls_go_upstream_without_delay(cluster: Cluster) -> None:
    c = cluster
    c.heal()
    runs = 3

    def timed(direct: bool = False) -> list[float]:
        times = []
        for _ in range(runs):
            c.n2.remove_image(c.mid.name, c.mid.digests())
            result = c.n2.pull(c.mid.name, direct=direct)
            assert result.ok, result.output
            c.n2.verify_image(c.mid)
            times.append(result.seconds)
        return times

    direct = timed(direct=True)
    before = c.n2.metrics()
    c.n1.kill_meshmirror()
    c.n3.kill_meshmirror()
    dead_peers = timed()
    refused = _delta(c.n2.metrics(), before, "meshmirror_mirror_peer_failures_total",
                     reason="connect")
    c.n2.kill_meshmirror()
    dead_mirror = timed()
    base = statistics.median(direct)
    figures = {
        "direct_s": direct, "mirror_with_dead_peers_s": dead_peers,
        "dead_mirror_target_s": dead_mirror, "dead_peer_connects_refused": refused,
        "ratio_dead_peers": round(statistics.median(dead_peers) / base, 2),
        "ratio_dead_mirror": round(statistics.median(dead_mirror) / base, 2),
    }
    record_figures("fault_all_peers_gone", figures)
    # Generous: the bound is a refused connection or one resolve timeout per request.
    assert statistics.median(dead_peers) <= 3 * base + 2.0, figures
    assert statistics.median(dead_mirror) <= 3 * base + 2.0, figures
