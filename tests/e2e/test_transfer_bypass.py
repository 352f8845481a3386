"""containerd 2.1+'s transfer service and a config_path list: caught, explained, fixed.

containerd 2.1 and later pull CRI images through the transfer service unless
``use_local_image_pull = true``; the transfer service ignores hosts.toml when
config_path lists several directories (2.2's and EKS's default). On the real
containerd 2.x, three configs:

- a list, transfer service: ``doctor`` fails naming use_local_image_pull, ``run``
  warns (log, status page, metric), and a CRI pull sends nothing to the mirror;
- the same list with ``use_local_image_pull = true``: doctor is clean and the pull
  goes through the mirror;
- one directory, transfer service: doctor is clean and the pull is mirrored;
- the list with ``max_concurrent_downloads = 4``, which the transfer service cannot
  honour: CRI falls back to its own pull, so doctor is clean and the pull mirrored.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import grpc
import pytest

from meshmirror.oci.imagebuilder import build_image
from tests.e2e.cluster import E2ENode
from tests.support.containerd import versions_or_skip
from tests.support.distribution import DistributionRegistry
from tests.support.metrics import metric
from tests.support.proxy import CountingProxy
from tests.support.skopeo import push_layout

pytestmark = [pytest.mark.real, pytest.mark.slow]

LIST = "list"
LIST_LOCAL_PULL = "list+use_local_image_pull"
SINGLE = "single"
# A setting the transfer service cannot honour: CRI falls back to pulling locally by
# itself (2.1's CheckLocalImagePullConfigs), so the list is read after all.
LIST_FALLBACK = "list+max_concurrent_downloads"
IMAGES_CONFIG = {LIST_LOCAL_PULL: "use_local_image_pull = true",
                 LIST_FALLBACK: "max_concurrent_downloads = 4"}


def doctor(node: E2ENode, upstream_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshmirror", "doctor",
         "--containerd-sock", str(node.containerd.socket),
         "--containerd-config", str(node.containerd.config),
         "--containerd-registry-config-path", str(node.hosts_dir),
         "--mirrored-registries", upstream_url,
         "--mirror-targets", node.registry_url,
         "--registry-addr", node.registry_address],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("version", versions_or_skip(("2.x",)))
@pytest.mark.parametrize("case", [LIST, LIST_LOCAL_PULL, LIST_FALLBACK, SINGLE])
def test_transfer_service_and_config_path(version: str, case: str, tmp_path: Path) -> None:
    other = tempfile.mkdtemp(prefix="certs-", dir=str(tmp_path))  # the list's second entry
    with DistributionRegistry() as upstream, \
            CountingProxy(upstream.host, upstream.port) as proxy:
        layout = tmp_path / "layout"
        image = build_image(f"{proxy.address}/bypass/app:1", layout,
                            layer_sizes=(200_000,), seed=21)
        push_layout(layout, "1", upstream.address, "bypass/app")
        node = E2ENode("node-1", containerd_version=version, cri=True,
                       extra_config_paths=() if case == SINGLE else (other,),
                       images_config=IMAGES_CONFIG.get(case, ""))
        try:
            node.start()
            node.configure(proxy.url, [node.registry_url])
            checked = doctor(node, proxy.url)
            status = node.status()
            problem = metric(node.metrics(), "meshmirror_containerd_config_problem",
                             check="transfer_service")
            before = len(node.log_records())
            try:
                node.containerd.cri_pull(image.name, timeout=30)
                pulled = True
            except grpc.RpcError:
                pulled = False  # straight to a plain-HTTP upstream: that may fail too
            asked = node.requests_logged(before)
        finally:
            node.close()

    print(f"case={case} doctor={checked.returncode} pulled={pulled} "
          f"mirror_requests={len(asked)} upstream_connections={proxy.connections}")
    if case == LIST:
        assert checked.returncode == 1, checked.stdout
        failed = [line for line in checked.stdout.splitlines() if line.startswith("FAIL")]
        assert len(failed) == 1 and failed[0].startswith("FAIL  containerd transfer service:")
        assert "use_local_image_pull = true" in failed[0]
        # run started anyway, and said so where an operator looks.
        assert [c["check"] for c in status["conditions"]] == ["containerd transfer service"]
        assert "use_local_image_pull" in status["conditions"][0]["fix"]
        assert problem == 1
        assert asked == [], asked  # the mirror was never asked
        assert proxy.connections > 0 or not pulled  # containerd went to the upstream instead
    else:
        assert checked.returncode == 0, checked.stdout
        assert "ok    containerd transfer service" in checked.stdout
        assert status["conditions"] == []
        assert problem == 0
        assert pulled
        assert len(asked) >= len(image.blobs()), asked  # manifest, config, layer: all asked
