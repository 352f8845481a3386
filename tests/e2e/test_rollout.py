"""A rollout on real containerd: every node pulls a new image at once, the upstream serves it once.

Three containerd 1.6 nodes, each with its meshmirror, pull through a counting
proxy in front of a token-auth Distribution (Docker Hub's kind: anonymous pull
of ``pub/app``, credentials for ``team/secret``). Nobody holds the public image
yet, so each blob's owner fetches it from the upstream and the others read it
through the owner while it downloads (`meshmirror.mirror.rollout`). The private
image is pulled in the same batch with a pull secret and never fetched by
meshmirror. Then the owner of the largest layer is ``kill -9``'d mid-download
and every pull still completes.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from meshmirror.oci.imagebuilder import BuiltImage, build_image
from meshmirror.routing.owner import owner_of
from tests.e2e.cluster import E2ENode, image_bytes, record_figures, wait_mesh
from tests.support.distribution import DistributionRegistry, TokenAuth
from tests.support.metrics import metric
from tests.support.processes import wait_until
from tests.support.proxy import CountingProxy
from tests.support.skopeo import push_layout
from tests.support.token_server import ISSUER, SERVICE, TokenServer

pytestmark = [pytest.mark.real, pytest.mark.slow]

MiB = 1024 * 1024
PUBLIC, PRIVATE, TAG = "pub/app", "team/secret", "1"
USER = ("alice", "alice-secret")
PULL_TIMEOUT = 90.0


@dataclass
class Rollout:
    nodes: list[E2ENode]
    proxy: CountingProxy
    registry: str  # the proxy's address: the registry name every node pulls from
    tmp: Path
    tokens: TokenServer
    upstream: DistributionRegistry

    def image(self, repository: str, layers: tuple[int, ...], seed: int) -> BuiltImage:
        layout = self.tmp / f"{repository.replace('/', '-')}-{seed}"
        image = build_image(f"{self.registry}/{repository}:{TAG}", layout, layers, seed=seed)
        push_layout(layout, TAG, self.upstream.address, repository, USER)
        return image


@pytest.fixture
def rollout(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Rollout]:
    """Three nodes; an indirect parameter gives `meshmirror run` flags for each and the
    upstream proxy's rate in bytes/s."""
    extra, rate = getattr(request, "param", ((), 20e6))
    with TokenServer(tmp_path, public={PUBLIC}, pusher=USER) as tokens, \
            DistributionRegistry(auth=TokenAuth(tokens.realm, SERVICE, ISSUER,
                                                tokens.rootcertbundle)) as upstream, \
            CountingProxy(upstream.host, upstream.port, rate=rate) as proxy:
        nodes: list[E2ENode] = []
        try:
            # The token server is another loopback host: realms there need allowing.
            allow = ("--upstream-allow-hosts", str(urlsplit(tokens.realm).hostname), *extra)
            first = E2ENode("node-1", extra_args=allow)
            nodes = [first, *(E2ENode(f"node-{i}", join=first.mesh_address, extra_args=allow)
                              for i in (2, 3))]
            for node in nodes:
                node.start()
                node.configure(proxy.url, [node.registry_url])
            wait_mesh(nodes)
            yield Rollout(nodes, proxy, proxy.address, tmp_path, tokens, upstream)
        finally:
            for node in nodes:
                node.close()


def _pull_all(nodes: list[E2ENode], image: BuiltImage, user: str | None = None
              ) -> dict[str, subprocess.Popen[bytes]]:
    return {node.name: node.start_pull(image.name,
                                       node.dir / f"pull-{image.name.split('/')[1]}.log",
                                       user=user)
            for node in nodes}


def _wait(procs: dict[str, subprocess.Popen[bytes]]) -> dict[str, int]:
    deadline = time.monotonic() + PULL_TIMEOUT
    codes = {}
    try:
        for name, proc in procs.items():
            codes[name] = proc.wait(max(1.0, deadline - time.monotonic()))
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    return codes


def _fetched_by_mirrors(nodes: list[E2ENode]) -> float:
    return sum(metric(n.metrics(), "meshmirror_rollout_upstream_bytes_total")
               for n in nodes if n.meshmirror_running)


def test_a_batched_rollout_fetches_the_public_image_once(rollout: Rollout) -> None:
    nodes = rollout.nodes
    public = rollout.image(PUBLIC, (6 * MiB, 8 * MiB, 10 * MiB), seed=61)
    private = rollout.image(PRIVATE, (2 * MiB, 1 * MiB), seed=62)
    rollout.proxy.reset()
    started = time.monotonic()
    # The whole batch at once: the public image anonymously, the private one with the
    # pull secret, on every node.
    procs = _pull_all(nodes, public)
    secret = {f"secret-{k}": v for k, v in _pull_all(nodes, private, ":".join(USER)).items()}
    codes = _wait({**procs, **secret})
    seconds = time.monotonic() - started
    assert set(codes.values()) == {0}, {
        n.name: (n.dir / "pull-pub.log").read_text()[-1500:] for n in nodes}
    for node in nodes:
        node.verify_image(public)
        node.verify_image(private)
    public_bytes, private_bytes = image_bytes(public), image_bytes(private)
    upstream = rollout.proxy.bytes_to_clients
    by_mirrors = _fetched_by_mirrors(nodes)
    # containerd fetched the private image itself on each node, with its secret ...
    from_upstream_for_public = upstream - len(nodes) * private_bytes
    metrics = [n.metrics() for n in nodes]
    peaks = [metric(m, "meshmirror_rollout_readers_peak") for m in metrics]
    refused = sum(metric(m, "meshmirror_mirror_outcomes_total", result="refused")
                  for m in metrics)
    record_figures("rollout", {
        "case": "batched", "nodes": len(nodes), "public_bytes": public_bytes,
        "private_bytes": private_bytes, "upstream_bytes": upstream,
        "fetched_by_mirrors": by_mirrors,
        "public_upstream_ratio": round(from_upstream_for_public / public_bytes, 3),
        "readers_peak": peaks, "seconds": round(seconds, 2)})
    # ... and the public one came from the upstream about once, fetched by the mirrors.
    assert from_upstream_for_public <= 1.05 * public_bytes, (upstream, public_bytes)
    assert public_bytes * 0.95 <= by_mirrors <= 1.05 * public_bytes, by_mirrors
    # Private: refused by every mirror that was asked, and fetched by none of them
    # (their upstream bytes are the public image's alone, checked above).
    assert refused > 0
    assert max(peaks) <= 8


# Fan-out 2 and a layer over 2 x 16 MiB: the layer comes as 2 stripes, each with its
# own root; the killed owner is stripe 0's (the whole blob's rendezvous owner).
@pytest.mark.parametrize("rollout", [(("--rollout-fanout", "2"), 20e6)], indirect=True)
def test_the_owner_killed_mid_download_every_pull_completes(rollout: Rollout) -> None:
    nodes = rollout.nodes
    big = 34 * MiB
    public = rollout.image(PUBLIC, (2 * MiB, big), seed=63)
    largest = max(public.platforms[0].layers, key=lambda layer: layer.size)
    owner_name = owner_of(str(largest.digest), [n.name for n in nodes])
    owner = next(n for n in nodes if n.name == owner_name)
    others = [n for n in nodes if n is not owner]
    rollout.proxy.reset()
    procs = _pull_all(nodes, public)
    # Kill the owner once it has fetched part (not all) of the largest layer.
    wait_until(lambda: metric(owner.metrics(), "meshmirror_rollout_upstream_bytes_total")
               > big // 8, 30, f"{owner.name} to fetch a quarter of its stripe")
    fetched_before_kill = metric(owner.metrics(), "meshmirror_rollout_upstream_bytes_total")
    owner.kill_meshmirror()
    assert fetched_before_kill < big, "the owner finished before the kill"
    codes = _wait(procs)
    # The other nodes' pulls complete on their first attempt.
    for node in others:
        assert codes[node.name] == 0, (node.dir / "pull-pub.log").read_text()[-1500:]
        node.verify_image(public)
    # The owner's own pull lost its mirror mid-body; like the kubelet, pull again: with
    # its mirror gone, containerd goes to the upstream itself.
    if codes[owner.name] != 0:
        again = owner.pull(public.name, timeout=PULL_TIMEOUT)
        assert again.ok, again.output
    owner.verify_image(public)
    total = image_bytes(public)
    upstream = rollout.proxy.bytes_to_clients
    striped = sum(metric(n.metrics(), "meshmirror_rollout_striped_blobs_total")
                  for n in others)
    record_figures("rollout", {
        "case": "owner_killed", "owner": owner.name, "image_bytes": total,
        "striped_blobs_on_survivors": striped,
        "owner_fetched_before_kill": fetched_before_kill, "upstream_bytes": upstream,
        "upstream_ratio": round(upstream / total, 3),
        "owner_pull_retried": codes[owner.name] != 0})
    assert striped >= 1, "the layer came as stripes"
    # Bounded: at most the image once per node (today's cost without a mirror).
    assert upstream <= len(nodes) * total * 1.05


# A 34 MiB layer: 2 stripes of 17 MiB (at least 16 MiB each), each fetched by its own
# root, stripe 0's after the bounded probe that learns the size
# (`mirror.rollout.TreeSource`). The default fan-out: room for every reader at once.
@pytest.mark.parametrize("rollout", [((), 50e6)], indirect=True)
def test_a_striped_blob_asks_the_upstream_for_each_byte_once(rollout: Rollout) -> None:
    nodes = rollout.nodes
    public = rollout.image(PUBLIC, (1 * MiB, 34 * MiB), seed=65)
    rollout.proxy.reset()
    codes = _wait(_pull_all(nodes, public))
    for node in nodes:
        assert codes[node.name] == 0, (node.dir / "pull-pub.log").read_text()[-1500:]
        node.verify_image(public)
    total = image_bytes(public)
    upstream = rollout.proxy.bytes_to_clients
    striped = sum(metric(n.metrics(), "meshmirror_rollout_striped_blobs_total") for n in nodes)
    record_figures("rollout", {
        "case": "striped_once", "image_bytes": total, "upstream_bytes": upstream,
        "over_image": upstream - total, "striped_blobs": striped})
    assert striped >= len(nodes), "the layer came as stripes on every node"
    # The image once plus the answers' headers (a few hundred bytes each, for a few
    # dozen requests): an open-ended first range overshot stripe 0 by what the
    # upstream's socket buffers held, about 0.7 MB per 50 MiB layer.
    # What went wrong, if the rollout was not healthy: the mirrors' own log lines.
    trouble = [f"{n.name}: {r.get('msg')}" for n in nodes for r in n.log_records()
               if str(r.get("logger", "")).startswith("meshmirror.mirror")]
    assert total <= upstream <= total + 64 * 1024, (upstream, total, trouble[-20:])


# An upstream at 1 MB/s for the whole cluster, and mirrors that give a fetch 1 s plus
# its size at 4 MiB/s: too slow for the mirrors' bound, not for containerd.
@pytest.mark.parametrize("rollout", [(("--mirror-deadline", "1s", "--mirror-min-rate", "4Mi"),
                                      1e6)], indirect=True)
def test_a_slow_upstream_is_bounded_then_a_miss_and_every_pull_completes(
        rollout: Rollout) -> None:
    nodes = rollout.nodes
    public = rollout.image(PUBLIC, (3 * MiB, 1 * MiB), seed=64)
    largest = max(public.platforms[0].layers, key=lambda layer: layer.size)
    rollout.proxy.reset()
    codes = _wait(_pull_all(nodes, public))
    for node in nodes:
        assert codes[node.name] == 0, (node.dir / "pull-pub.log").read_text()[-1500:]
        node.verify_image(public)
    # The largest layer's owner gave up within its bound: its readers (every node's
    # containerd, the owner's too) got a miss, so each containerd fetched it itself.
    misses = sum(metric(n.metrics(), "meshmirror_mirror_misses_total", reason="upstream_failed")
                 for n in nodes)
    fetched = _fetched_by_mirrors(nodes)
    total = image_bytes(public)
    upstream = rollout.proxy.bytes_to_clients
    record_figures("rollout", {
        "case": "slow_upstream", "image_bytes": total, "upstream_bytes": upstream,
        "fetched_by_mirrors": fetched, "upstream_failed_misses": misses})
    assert misses >= len(nodes)
    # Each containerd then fetched the largest layer itself. (Whether the owner's own
    # fetch, which its readers had left, still ended in the cache is a race with the
    # bound, not part of the rule: a loaded CI run saw it complete.)
    assert upstream >= len(nodes) * largest.size
