"""End to end without the mesh: containerd B pulls from meshmirror serving containerd A.

containerd A pulls an image from a real Distribution registry; ``meshmirror run
--store containerd`` serves A's content; containerd B, configured by ``meshmirror
configure`` to use A's meshmirror, pulls the same image after the upstream is
stopped. containerd B verifies every digest as it writes; the test checks them again.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from meshmirror.oci.imagebuilder import build_image
from tests.support.containerd import Containerd
from tests.support.distribution import DistributionRegistry
from tests.support.node import start_node
from tests.support.processes import stop

pytestmark = [pytest.mark.real, pytest.mark.slow]


def test_containerd_b_pulls_from_meshmirror_serving_containerd_a(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    layout.mkdir()
    with DistributionRegistry() as upstream, Containerd() as a, Containerd() as b:
        image = build_image(f"{upstream.address}/team/app:2", layout,
                            layer_sizes=(3_000_000, 700_000, 5_000), seed=21)
        subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                        f"oci:{layout}:2", f"docker://{image.name}"], check=True, timeout=120)
        a.ctr("images", "pull", "--plain-http", image.name, timeout=120)

        node = start_node("containerd", tmp_path / "node-a.log", (
            "--containerd-sock", str(a.socket), "--containerd-content-path",
            str(a.content_path), "--containerd-config", str(a.config), "--mesh-addr", "off"))
        try:
            upstream.stop()
            hosts = tmp_path / "certs.d"
            configure = subprocess.run(
                [sys.executable, "-m", "meshmirror", "configure",
                 "--containerd-registry-config-path", str(hosts),
                 "--mirrored-registries", f"http://{upstream.address}",
                 "--mirror-targets", f"http://{node.address}"],
                capture_output=True, text=True, timeout=60)
            assert configure.returncode == 0, configure.stderr
            b.ctr("images", "pull", "--hosts-dir", str(hosts), image.name, timeout=120)
        finally:
            assert stop(node.proc) == 0

        listed = b.ctr("images", "ls").stdout
        assert any(row.startswith(image.name + " ") and str(image.digest) in row
                   for row in listed.splitlines()), listed
        for record in image.blobs():
            data = subprocess.run(
                ["ctr", "--address", str(b.socket), "-n", "k8s.io", "content", "get",
                 str(record.digest)], capture_output=True, timeout=60, check=True).stdout
            assert hashlib.sha256(data).hexdigest() == record.digest.hex
        served = [line for line in node.log_lines()
                  if line.get("msg") == "request" and line.get("handler") == "blob"]
        assert {line["status"] for line in served} == {200}
        assert len(served) >= 3, "every layer and the config came from A's meshmirror"
