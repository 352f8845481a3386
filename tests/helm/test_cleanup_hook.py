"""The post-delete hook that restores every node's hosts.toml on `helm uninstall`.

Its objects exist only at uninstall, reach every node the DaemonSet ran on, leave
nothing behind, and its readiness relay really tells a cleaned node from one that
is not: the chart's own script is run here against local listeners.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from tests.helm import chart
from tests.support.ports import free_port, loopback_host
from tests.support.processes import spawn, stop, wait_until

FULLNAME = f"{chart.RELEASE}-meshmirror"
SCRIPT = chart.CHART / "files" / "cleanup-wait.py"


def test_hook_objects_only_on_uninstall_and_deleted_after(helm: Path) -> None:
    manifests = chart.render()
    hooks = chart.hooks(manifests)
    assert sorted((h["kind"], h["metadata"]["name"]) for h in hooks) == [
        ("DaemonSet", f"{FULLNAME}-cleanup"), ("Pod", f"{FULLNAME}-cleanup-wait"),
        ("Service", f"{FULLNAME}-cleanup")]
    for hook in hooks:
        annotations = hook["metadata"]["annotations"]
        assert annotations["helm.sh/hook"] == "post-delete"
        assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
    weights = {h["kind"]: int(h["metadata"]["annotations"]["helm.sh/hook-weight"]) for h in hooks}
    assert weights["Pod"] > weights["DaemonSet"], "the wait starts after the cleanup pods"
    assert not chart.hooks(chart.render(("k3s-minimal.yaml",)))


def test_cleanup_runs_where_the_mirror_ran(helm: Path) -> None:
    manifests = chart.render(("custom-registries.yaml",))
    main = chart.pod_spec(manifests)
    hook = chart.one(chart.hooks(manifests), "DaemonSet")["spec"]["template"]["spec"]
    for key in ("nodeSelector", "tolerations", "priorityClassName"):
        assert hook.get(key) == main.get(key), key
    (cleanup,) = hook["initContainers"]
    assert cleanup["args"] == ["cleanup"]
    assert cleanup["image"] == chart.container(manifests, "meshmirror")["image"]
    volume = {v["name"]: v for v in hook["volumes"]}["containerd-certs"]
    assert volume["hostPath"]["path"] == "/etc/containerd/certs.d"
    assert "serviceAccountName" not in hook, "the release's ServiceAccount is gone by then"
    service = chart.one(chart.hooks(manifests), "Service")["spec"]
    assert service["clusterIP"] == "None" and service["publishNotReadyAddresses"] is True
    assert service["selector"].items() <= chart.one(chart.hooks(manifests), "DaemonSet")[
        "spec"]["template"]["metadata"]["labels"].items()
    wait = chart.one(chart.hooks(manifests), "Pod")
    assert wait["spec"]["restartPolicy"] == "Never"
    assert wait["spec"]["activeDeadlineSeconds"] == 300
    (container,) = wait["spec"]["containers"]
    assert container["args"][1] == f"{FULLNAME}-cleanup.{chart.NAMESPACE}.svc.cluster.local"
    assert container["command"][3] == SCRIPT.read_text()


def _accepts(host: str, port: int) -> bool:
    with socket.create_connection((host, port), timeout=1):
        return True


def _serve(host: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    proc = spawn([sys.executable, "-B", str(SCRIPT), "serve", host, str(port)], log)
    wait_until(lambda: _accepts(host, port), 10, f"cleanup relay on {host}:{port}")
    return proc


def test_wait_ends_only_when_every_node_answers(tmp_path: Path) -> None:
    """`wait` resolves a name to its addresses (here localhost: 127.0.0.1 only) and
    needs three good rounds in a row."""
    port = free_port("127.0.0.1")
    waiter = spawn([sys.executable, "-B", str(SCRIPT), "wait", "localhost", str(port)],
                   tmp_path / "wait.log")
    try:
        # Nothing answers yet: the wait goes on.
        assert waiter.poll() is None
        subprocess.run(["sleep", "2.5"], check=True)
        assert waiter.poll() is None
        relay = _serve("127.0.0.1", port, tmp_path / "serve.log")
        try:
            assert waiter.wait(timeout=20) == 0
        finally:
            stop(relay)
    finally:
        stop(waiter)
    assert "node(s) cleaned up" in (tmp_path / "wait.log").read_text()


def test_relay_answers_readyz_only(tmp_path: Path) -> None:
    host = loopback_host()
    port = free_port(host)
    relay = _serve(host, port, tmp_path / "serve.log")
    try:
        import urllib.error
        import urllib.request

        with urllib.request.urlopen(f"http://{host}:{port}/readyz", timeout=2) as response:
            assert response.status == 200
        try:
            urllib.request.urlopen(f"http://{host}:{port}/other", timeout=2)
            raise AssertionError("expected 404")
        except urllib.error.HTTPError as err:
            assert err.code == 404
    finally:
        stop(relay)
