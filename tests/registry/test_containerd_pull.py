"""containerd 1.6 pulls through a hosts.toml mirror entry pointing at `meshmirror run`.

The ``server`` of the hosts.toml is a port nobody listens on, so the pull can
only succeed if our registry answers the resolve (HEAD by tag with ``?ns=``)
and every fetch. containerd verifies every digest as it writes content.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs

import pytest

from meshmirror.oci.imagebuilder import build_image
from tests.support.containerd import Containerd, dead_upstream, write_hosts
from tests.support.node import RunningNode, start_node
from tests.support.processes import stop

pytestmark = pytest.mark.real


@pytest.fixture
def containerd() -> Iterator[Containerd]:
    with Containerd() as instance:
        yield instance


@pytest.mark.parametrize("registry", ["upstream", "docker.io"])
def test_ctr_pull_through_mirror_while_upstream_is_down(
        tmp_path: Path, containerd: Containerd, registry: str) -> None:
    upstream = dead_upstream()
    registry = upstream if registry == "upstream" else registry
    layout = tmp_path / "layout"
    layout.mkdir()
    image = build_image(f"{registry}/library/demo:1", layout, layer_sizes=(1_500_000, 20_000),
                        seed=11)
    node: RunningNode = start_node(f"oci:{layout}", tmp_path / "node.log")
    try:
        hosts_dir = tmp_path / "hosts"
        write_hosts(hosts_dir, registry, upstream, node.address)
        containerd.ctr("images", "pull", "--hosts-dir", str(hosts_dir), image.name,
                       timeout=120)
    finally:
        assert stop(node.proc) == 0

    listed = containerd.ctr("images", "ls").stdout
    line = next(row for row in listed.splitlines() if row.startswith(image.name + " "))
    assert str(image.digest) in line
    content = containerd.ctr("content", "ls", "-q").stdout.split()
    for record in image.blobs():
        assert str(record.digest) in content
        data = subprocess.run(
            ["ctr", "--address", str(containerd.socket), "-n", "k8s.io", "content", "get",
             str(record.digest)], capture_output=True, timeout=60, check=True).stdout
        assert hashlib.sha256(data).hexdigest() == record.digest.hex

    requests = [line for line in node.log_lines() if line.get("msg") == "request"]
    resolve = [r for r in requests if r["handler"] == "manifest" and r["method"] == "HEAD"]
    assert resolve and resolve[0]["path"] == "/v2/library/demo/manifests/1"
    assert parse_qs(str(resolve[0]["query"])) == {"ns": [registry]}
    assert resolve[0]["status"] == 200
    assert all(r["status"] == 200 for r in requests if r["handler"] in ("manifest", "blob"))


def test_ctr_pull_falls_back_past_a_mirror_that_misses(
        tmp_path: Path, containerd: Containerd) -> None:
    """Our 404 sends containerd to the next host: here the real upstream, a Distribution."""
    from tests.support.distribution import DistributionRegistry

    served = tmp_path / "served"
    served.mkdir()
    empty = tmp_path / "empty"
    empty.mkdir()
    with DistributionRegistry() as upstream:
        image = build_image(f"{upstream.address}/team/app:2", served, layer_sizes=(50_000,),
                            seed=5)
        push = subprocess.run(
            ["skopeo", "--insecure-policy", "copy", "--dest-tls-verify=false",
             "--preserve-digests", f"oci:{served}:2", f"docker://{upstream.address}/team/app:2"],
            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert push.returncode == 0, push.stderr
        # Without the designated fetch: alone, this node would own every cold blob and
        # serve it from the upstream itself (see mirror/rollout.py).
        node = start_node(f"oci:{empty}", tmp_path / "node.log", ("--rollout-fanout", "0"))
        try:
            hosts_dir = tmp_path / "hosts"
            write_hosts(hosts_dir, upstream.address, upstream.address, node.address)
            containerd.ctr("images", "pull", "--hosts-dir", str(hosts_dir), image.name,
                           timeout=120)
        finally:
            assert stop(node.proc) == 0
    assert str(image.digest) in containerd.ctr("images", "ls").stdout
    requests = [line for line in node.log_lines() if line.get("msg") == "request"]
    pulls = [r for r in requests if r["handler"] in ("manifest", "blob")]
    assert pulls and all(r["status"] == 404 for r in pulls)
