"""The chart's DaemonSet pod, as `helm template` renders it, run for real on two nodes.

Each node is a private containerd 1.6 with CRI on, reading hosts.toml from its own
certs.d, on its own loopback address. The pod runs from the built image with
`ctr run`: init containers first, then the main container, with host networking,
the pod's volumes bound to the node's folders, the rendered env with the downward
API filled with the node's IP and name, and the gossip Secret written where it is
mounted. What a kubelet and CNI would add is emulated plainly:

- two nodes share one machine's ports, so the listeners bind the node's address
  (``meshmirror.listenOnPodIP=true``; with host networking the pod IP is the node
  IP);
- the hostPort and the NodePort are TCP relays from the node's address to the
  container's registry port (what the portmap plugin and kube-proxy do);
- the containerd config the pod mounts is the node's, with its host folders
  written as the pod sees them (on a real node the two are the same paths).

Then: a CRI PullImage on node 2 of an image node 1 holds succeeds with the
upstream stopped, from node 1; node 2's container is killed and started again in
place (a liveness restart, no init containers) and puts back its hosts.toml; the
next pull again goes through the mirror; `meshmirror doctor` inside the container
passes every check; and the post-delete hook's cleanup restores every node's
certs.d byte for byte.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from meshmirror.oci.imagebuilder import BuiltImage, build_image
from tests.deploy.conftest import IMAGE
from tests.helm import chart
from tests.support.containerd import SYSTEM_VERSION, Containerd, versions_or_skip
from tests.support.distribution import DistributionRegistry
from tests.support.processes import wait_until
from tests.support.proxy import CountingProxy

pytestmark = [pytest.mark.real, pytest.mark.slow]

OPERATOR_HOSTS = b'server = "https://registry.example.org"\n# the operator\'s own entry\n'


@dataclass
class Node:
    name: str
    ip: str
    root: Path
    containerd: Containerd
    certs: Path
    volumes: dict[str, Path] = field(default_factory=dict)
    containers: list[str] = field(default_factory=list)

    def ctr(self, *args: str, check: bool = True,
            timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return self.containerd.ctr(*args, check=check, timeout=timeout)


def certs_snapshot(root: Path) -> dict[str, bytes | None]:
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def pod_view_config(node: Node, mounts: dict[str, str]) -> Path:
    """The node's containerd config with its host folders as the pod sees them."""
    text = node.containerd.config.read_text()
    for host, pod in mounts.items():
        text = text.replace(host, pod)
    path = node.root / "config-pod-view.toml"
    path.write_text(text)
    return path


def run_args(cont: dict[str, Any], env: dict[str, str]) -> list[str]:
    """The container's argv, less ``--join-dns``: the cluster's DNS name exists only in
    a cluster, and asking this machine's resolver for it would send a query off the
    machine. The peers are named with ``--join`` instead (extraArgs)."""
    argv = [*cont.get("command", []), *cont.get("args", [])]
    return [chart.expand_var_refs(a, env) for a in argv if not a.startswith("--join-dns=")]


def container_env(cont: dict[str, Any], node: Node) -> dict[str, str]:
    fields = {"spec.nodeName": node.name, "status.podIP": node.ip, "status.hostIP": node.ip}
    env: dict[str, str] = {}
    for item in cont.get("env", []):
        if "value" in item:
            env[item["name"]] = chart.expand_var_refs(item["value"], env, keep_unknown=True)
        else:
            env[item["name"]] = fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def ctr_run(node: Node, cont: dict[str, Any], cid: str, *,
            detach: bool) -> subprocess.CompletedProcess[str]:
    env = container_env(cont, node)
    options = ["--net-host"]
    for mount in cont.get("volumeMounts", []):
        src = node.volumes[mount["name"]]
        mode = "ro" if mount.get("readOnly") else "rw"
        options.append(f"--mount=type=bind,src={src},dst={mount['mountPath']},"
                       f"options=rbind:{mode}")
    options += [f"--env={k}={v}" for k, v in env.items()]
    # The container's memory limit, as the kubelet would set it: the pod must work in it.
    if (limit := cont.get("resources", {}).get("limits", {}).get("memory")) is not None:
        options.append(f"--memory-limit={int(chart.quantity_value(str(limit)))}")
    node.containers.append(cid)
    if detach:  # its output, for the failure message of whatever goes wrong later
        options.append(f"--log-uri=file://{node.root / (cid + '.log')}")
    return node.ctr("run", *(["-d"] if detach else ["--rm"]), *options, IMAGE, cid,
                    *run_args(cont, env), check=False, timeout=120)


def metric(node_ip: str, port: int, pattern: str) -> float:
    with urllib.request.urlopen(f"http://{node_ip}:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if re.match(pattern, line):
            total += float(line.rsplit(" ", 1)[1])
    return total


def ready(node_ip: str, port: int) -> bool:
    with urllib.request.urlopen(f"http://{node_ip}:{port}/readyz", timeout=2) as response:
        return bool(response.status == 200)


def make_node(stack: ExitStack, tmp: Path, name: str, ip: str, archive_path: Path,
              version: str = SYSTEM_VERSION) -> Node:
    root = tmp / name
    certs = root / "certs.d"
    (certs / "registry.example.org").mkdir(parents=True)
    (certs / "registry.example.org" / "hosts.toml").write_bytes(OPERATOR_HOSTS)
    containerd = stack.enter_context(Containerd(cri=True, registry_config_path=str(certs),
                                                version=version))
    containerd.ctr("images", "import", str(archive_path), timeout=300)
    node = Node(name, ip, root, containerd, certs)
    for sub in ("tmp", "spool", "gossip"):
        (root / sub).mkdir()
    stack.callback(remove_containers, node)
    return node


def remove_containers(node: Node) -> None:
    for cid in reversed(node.containers):
        node.ctr("task", "kill", "-s", "SIGKILL", cid, check=False)
        node.ctr("task", "rm", "-f", cid, check=False)
        node.ctr("container", "rm", cid, check=False)


def bind_pod_volumes(node: Node, pod: dict[str, Any], gossip_key: str | None) -> None:
    """Each of the pod's volumes as a folder or file of this node."""
    paths = {"/run/containerd/containerd.sock": node.containerd.socket,
             "/var/lib/containerd/io.containerd.content.v1.content": node.containerd.content_path,
             "/etc/containerd/certs.d": node.certs}
    config = pod_view_config(node, {str(host): pod_path for pod_path, host in paths.items()})
    paths["/etc/containerd/config.toml"] = config
    for volume in pod["volumes"]:
        if "hostPath" in volume:
            node.volumes[volume["name"]] = paths[volume["hostPath"]["path"]]
        elif "secret" in volume:
            assert gossip_key is not None
            (item,) = volume["secret"]["items"]
            key_file = node.root / "gossip" / item["path"]
            key_file.write_text(gossip_key)
            key_file.chmod(0o400)
            node.volumes[volume["name"]] = node.root / "gossip"
        else:
            node.volumes[volume["name"]] = node.root / volume["name"]
            node.volumes[volume["name"]].mkdir(exist_ok=True)


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[tuple[DistributionRegistry, BuiltImage, BuiltImage]]:
    with DistributionRegistry(host="127.0.0.1") as registry:
        images = []
        for n, tag in enumerate(("1.0", "2.0")):
            image = build_image(f"{registry.address}/team/app:{tag}", tmp_path / f"layout{tag}",
                                (400_000, 30_000), seed=11 + n)
            subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                            f"oci:{image.layout}:{tag}",
                            f"docker://{registry.address}/team/app:{tag}"],
                           check=True, capture_output=True, timeout=120)
            images.append(image)
        yield registry, images[0], images[1]


@pytest.mark.timeout(900)
def seen_public(ip: str, port: int, image: BuiltImage) -> bool:
    """A manifest HEAD through the node's mirror answered 200 (so it asked the upstream)."""
    url = (f"http://{ip}:{port}/v2/{image.repository}/manifests/{image.digest}"
           f"?ns={image.registry}")
    request = urllib.request.Request(url, method="HEAD")
    with urllib.request.urlopen(request, timeout=5) as response:
        return bool(response.status == 200)


# What runs where: the defaults and two-nodes value sets on the system's containerd
# 1.6; the switches (hosts.toml left to the node's owner, containerdMirrorAdd=false)
# on containerd 2.x, whose config version 3 the pod's checks and doctor then read.
CASES = [
    pytest.param((), SYSTEM_VERSION, id="defaults"),
    pytest.param(("two-nodes.yaml",), SYSTEM_VERSION, id="two-nodes"),
    *(pytest.param(("switches.yaml",), p.values[0], id=f"switches-{p.id}", marks=p.marks)
      for p in versions_or_skip(("2.x",))),
]


def owner_hosts_toml(node: Node, host_port: int) -> None:
    """What a node's owner writes with containerdMirrorAdd=false (Talos machine config,
    user data): every registry through this node's mirror first."""
    path = node.certs / "_default" / "hosts.toml"
    path.parent.mkdir(parents=True)
    path.write_text(f'[host."http://{node.ip}:{host_port}"]\n'
                    '  capabilities = ["pull", "resolve"]\n')


@pytest.mark.parametrize(("value_files", "version"), CASES)
def test_rendered_pod_on_two_nodes(
    archive: Path,  # the image index, built once per session (conftest.py)
    upstream: tuple[DistributionRegistry, BuiltImage, BuiltImage],
    tmp_path: Path, value_files: tuple[str, ...], version: str,
) -> None:
    registry, first, second = upstream
    started = time.monotonic()
    ips = ["127.0.0.21", "127.0.0.22"]
    mesh_port = chart.container(chart.render(value_files), "meshmirror")["ports"][1]
    assert mesh_port["name"] == "mesh-tcp"
    # The headless Service's name resolves nowhere here: extraArgs names the peers.
    sets = ["meshmirror.listenOnPodIP=true",
            *(f"extraArgs[{n}]=--join={ip}:{mesh_port['containerPort']}"
              for n, ip in enumerate(ips))]
    manifests = chart.render(value_files, sets=sets)
    pod = chart.pod_spec(manifests)
    main = chart.container(manifests, "meshmirror")
    ports = {p["name"]: p for p in main["ports"]}
    registry_port = ports["registry"]["containerPort"]
    metrics_port = ports["metrics"]["containerPort"]
    node_port = chart.one(chart.installed(manifests), "Service",
                          f"{chart.RELEASE}-meshmirror-registry")["spec"]["ports"][0]["nodePort"]
    secret = chart.one(manifests, "Secret")
    gossip_key = base64.b64decode(next(iter(secret["data"].values()))).decode()
    mirror_add = "MESHMIRROR_WRITE_HOSTS_CONFIG" in chart.literal_env(main)

    with ExitStack() as stack:
        nodes = [make_node(stack, tmp_path, f"node-{n + 1}", ip, archive, version)
                 for n, ip in enumerate(ips)]
        if not mirror_add:
            for node in nodes:
                owner_hosts_toml(node, ports["registry"]["hostPort"])
        before = {node.name: certs_snapshot(node.certs) for node in nodes}
        for node in nodes:
            bind_pod_volumes(node, pod, gossip_key)
            # hostPort and NodePort: relays to the container's registry port.
            for port in (ports["registry"]["hostPort"], node_port):
                stack.enter_context(CountingProxy(node.ip, registry_port, host=node.ip,
                                                  port=port))
            for init in pod.get("initContainers", []):
                done = ctr_run(node, init, f"{node.name}-{init['name']}", detach=False)
                assert done.returncode == 0, done.stderr
            done = ctr_run(node, main, f"{node.name}-meshmirror", detach=True)
            assert done.returncode == 0, done.stderr
        for ip in ips:
            wait_until(partial(ready, ip, registry_port), 60, f"/readyz on {ip}")
        node1, node2 = nodes
        hosts2 = node2.certs / "_default" / "hosts.toml"
        written = hosts2.read_bytes()
        assert f'"http://{node2.ip}:{ports["registry"]["hostPort"]}"'.encode() in written

        # Node 1 pulls both images while the upstream is up; node 2 then has only peers.
        for image in (first, second):
            node1.containerd.cri_pull(image.name)
            # Node 2's mirror shares a repository from peers only once the upstream has
            # said it is public (--private-images-unknown deny, the default): here a
            # manifest HEAD while the upstream is up, as any earlier pull would.
            wait_until(partial(seen_public, ips[1], registry_port, image), 20,
                       f"node 2 learning {image.repository} is public")
        registry.stop()

        def pull_on_node2(image: BuiltImage) -> None:
            reference = f"{image.registry}/{image.repository}@{image.digest}"
            wait_until(lambda: bool(node2.containerd.cri_pull(reference, timeout=20)), 40,
                       f"node 2 pulling {reference} from node 1")

        hit = r'meshmirror_mirror_requests_total\{.*cache="hit".*\}'
        pull_on_node2(first)
        content = set(node2.ctr("content", "ls", "--quiet").stdout.split())
        assert first.digests() <= content
        assert metric(node2.ip, metrics_port, hit) >= 1

        # A liveness restart: the container dies and starts again in the same pod.
        cid = f"{node2.name}-meshmirror"
        node2.ctr("task", "kill", "-s", "SIGKILL", cid)
        wait_until(lambda: "STOPPED" in node2.ctr("task", "ls").stdout, 20, "task stopped")
        assert hosts2.read_bytes() == written, "nothing removes the entry when a container stops"
        if mirror_add:
            hosts2.unlink()  # lost while the container was down: run writes it again
        node2.ctr("task", "rm", cid)
        node2.ctr("task", "start", "-d", cid)
        wait_until(partial(ready, node2.ip, registry_port), 60, "node 2's /readyz after restart")
        assert hosts2.read_bytes() == written
        pull_on_node2(second)
        assert second.digests() <= set(node2.ctr("content", "ls", "--quiet").stdout.split())
        assert metric(node2.ip, metrics_port, hit) >= 1  # counted since the restart

        doctor = node2.ctr("task", "exec", "--exec-id", "doctor", cid, "meshmirror", "doctor",
                           check=False)
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        assert doctor.stdout.strip().endswith("all checks passed"), doctor.stdout
        assert "FAIL" not in doctor.stdout and "skip" not in doctor.stdout, doctor.stdout
        assert ("info  hosts.toml" in doctor.stdout) is not mirror_add, doctor.stdout

        # helm uninstall: the pods go, then the post-delete hook cleans every node.
        if not mirror_add:  # no hook: the owner's hosts.toml stays as the owner wrote it
            assert not chart.hooks(manifests)
            for node in nodes:
                remove_containers(node)
                node.containers.clear()
                assert certs_snapshot(node.certs) == before[node.name], node.name
            return
        hook = chart.one(chart.hooks(manifests), "DaemonSet")["spec"]["template"]["spec"]
        for node in nodes:
            remove_containers(node)
            node.containers.clear()
            bind_pod_volumes(node, hook, None)
            for init in hook["initContainers"]:
                done = ctr_run(node, init, f"{node.name}-{init['name']}", detach=False)
                assert done.returncode == 0, done.stderr
            assert certs_snapshot(node.certs) == before[node.name], node.name
    assert os.path.isdir(tmp_path)
    assert time.monotonic() - started < 180
