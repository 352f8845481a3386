"""`meshmirror doctor` against a real containerd 1.6, a real hosts.toml and a real registry.

A docker-registry stands in for this node's registry listener: doctor only asks it
`GET /v2/`, which meshmirror and Distribution both answer with 200.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from meshmirror.cli import main
from meshmirror.containerd.doctor import points_at_this_node
from tests.support.containerd import Containerd
from tests.support.distribution import DistributionRegistry
from tests.support.ports import free_port, loopback_host
from tests.support.scripted_http import LocalHTTPServer


@dataclass
class Node:
    containerd: Containerd
    registry: DistributionRegistry
    certs: Path
    capsys: pytest.CaptureFixture[str]
    flags: dict[str, str] = field(default_factory=dict)

    def doctor(self, **overrides: str) -> tuple[int, list[str]]:
        flags = {
            "--containerd-sock": str(self.containerd.socket),
            "--containerd-namespace": "k8s.io",
            "--containerd-config": str(self.containerd.config),
            "--containerd-registry-config-path": str(self.certs),
            "--mirrored-registries": "docker.io,quay.io",
            "--registry-addr": self.registry.address,
        }
        for key, value in overrides.items():
            flags["--" + key.replace("_", "-")] = value
        argv = ["doctor"] + [part for item in flags.items() for part in item]
        self.capsys.readouterr()
        code = main(argv)
        captured = self.capsys.readouterr()
        return code, (captured.out + captured.err).splitlines()


@pytest.fixture(scope="module")
def services() -> Iterator[tuple[Containerd, DistributionRegistry, Path]]:
    with DistributionRegistry() as registry:
        certs = Path(registry.dir) / "certs.d"
        with Containerd(cri=True, registry_config_path=str(certs)) as containerd:
            containerd.ctr("namespaces", "create", "k8s.io", namespace="default")
            yield containerd, registry, certs


@pytest.fixture
def node(services: tuple[Containerd, DistributionRegistry, Path],
         capsys: pytest.CaptureFixture[str]) -> Iterator[Node]:
    containerd, registry, certs = services
    assert main(["configure", "--containerd-registry-config-path", str(certs),
                 "--mirrored-registries", "docker.io,quay.io",
                 "--mirror-targets", registry.url]) == 0
    yield Node(containerd, registry, certs, capsys)
    assert main(["cleanup", "--containerd-registry-config-path", str(certs)]) == 0
    if not registry.running:
        registry.start()


def failures(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("FAIL")]


def only_failure(lines: list[str], name: str) -> str:
    failed = failures(lines)
    assert len(failed) == 1, lines
    assert failed[0].startswith(f"FAIL  {name}: ") and " -> fix: " in failed[0]
    return failed[0]


@pytest.mark.real
def test_all_checks_pass(node: Node) -> None:
    code, lines = node.doctor()
    assert code == 0, lines
    assert [line.split(":")[0] for line in lines[:-1]] == [
        "ok    containerd socket", "ok    containerd namespace", "ok    containerd config_path",
        "ok    containerd discard_unpacked_layers", "ok    hosts.toml docker.io",
        "ok    hosts.toml quay.io", "ok    registry"]
    assert lines[-1] == "all checks passed"
    assert f"tries {node.registry.url}" in lines[4]


@pytest.mark.real
def test_mirror_targets_flag_must_all_be_present(node: Node) -> None:
    code, lines = node.doctor(mirror_targets=f"{node.registry.url},http://127.0.0.1:1")
    assert code == 1
    failed = failures(lines)
    assert [f.split(":")[0] for f in failed] == ["FAIL  hosts.toml docker.io",
                                                 "FAIL  hosts.toml quay.io"]
    assert "lacks the mirror targets http://127.0.0.1:1" in failed[0]
    assert lines[-1] == "2 problem(s) found"


@pytest.mark.real
def test_node_port_targets_given_to_doctor_count_as_this_node(node: Node) -> None:
    """In a pod, hosts.toml names the hostPort and NodePort, never the registry's own
    port; doctor reads those targets from the same MESHMIRROR_MIRROR_TARGETS."""
    targets = "http://192.0.2.10:30022,http://192.0.2.10:30023"
    assert main(["configure", "--containerd-registry-config-path", str(node.certs),
                 "--mirrored-registries", "docker.io,quay.io", "--mirror-targets", targets]) == 0
    code, lines = node.doctor()  # without the targets: not this node's port
    assert len(failures(lines)) == 2
    code, lines = node.doctor(mirror_targets=targets)
    assert code == 0, lines
    assert "tries http://192.0.2.10:30022, http://192.0.2.10:30023 first" in lines[4]


@pytest.mark.real
def test_an_entry_ahead_of_this_nodes_targets_fails(node: Node) -> None:
    assert main(["configure", "--containerd-registry-config-path", str(node.certs),
                 "--mirrored-registries", "docker.io,quay.io",
                 "--mirror-targets", f"http://192.0.2.99:5000,{node.registry.url}"]) == 0
    code, lines = node.doctor(mirror_targets=node.registry.url)
    assert code == 1
    line = failures(lines)[0]
    assert f"tries http://192.0.2.99:5000 before this node's mirror targets {node.registry.url}" \
        in line and "meshmirror configure" in line


@pytest.mark.real
def test_missing_socket(node: Node, tmp_path: Path) -> None:
    code, lines = node.doctor(containerd_sock=str(tmp_path / "containerd.sock"))
    assert code == 1
    line = only_failure(lines, "containerd socket")
    assert "does not exist" in line and "--containerd-sock" in line
    assert lines[1].startswith("skip  containerd namespace")


@pytest.mark.real
def test_missing_namespace(node: Node) -> None:
    code, lines = node.doctor(containerd_namespace="nope")
    assert code == 1
    assert "--containerd-namespace" in only_failure(lines, "containerd namespace")


@pytest.mark.real
def test_config_without_config_path(node: Node, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    text = node.containerd.config.read_text()
    config.write_text(text.split('[plugins."io.containerd.grpc.v1.cri".registry]')[0])
    code, lines = node.doctor(containerd_config=str(config))
    assert code == 1
    line = only_failure(lines, "containerd config_path")
    assert f'add config_path = "{node.certs}"' in line


@pytest.mark.real
def test_config_discarding_layers(node: Node, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(node.containerd.config.read_text() + (
        '[plugins."io.containerd.grpc.v1.cri".containerd]\n  discard_unpacked_layers = true\n'))
    code, lines = node.doctor(containerd_config=str(config))
    assert code == 1
    assert "discard_unpacked_layers = false" in only_failure(
        lines, "containerd discard_unpacked_layers")


@pytest.mark.real
def test_hosts_written_where_containerd_does_not_look(node: Node, tmp_path: Path) -> None:
    code, lines = node.doctor(containerd_registry_config_path=str(tmp_path / "elsewhere"))
    assert code == 1
    failed = failures(lines)
    assert [f.split(":")[0] for f in failed] == [
        "FAIL  containerd config_path", "FAIL  hosts.toml docker.io", "FAIL  hosts.toml quay.io"]
    assert f"containerd reads hosts.toml from {node.certs}" in failed[0]
    assert "does not exist" in failed[1] and "meshmirror configure" in failed[1]


@pytest.mark.real
def test_registry_without_hosts_file(node: Node) -> None:
    code, lines = node.doctor(mirrored_registries="docker.io,ghcr.io")
    assert code == 1
    line = only_failure(lines, "hosts.toml ghcr.io")
    assert "--mirrored-registries ghcr.io" in line


@pytest.mark.real
def test_hosts_file_pointing_elsewhere(node: Node) -> None:
    other = f"http://{loopback_host()}:{free_port()}"
    assert main(["configure", "--containerd-registry-config-path", str(node.certs),
                 "--mirrored-registries", "docker.io,quay.io", "--mirror-targets", other]) == 0
    code, lines = node.doctor()
    assert code == 1
    assert len(failures(lines)) == 2
    line = failures(lines)[0]
    assert line.startswith("FAIL  hosts.toml docker.io: ")
    assert "does not send pulls to this node's registry" in line and other in line


@pytest.mark.real
def test_registry_down(node: Node) -> None:
    node.registry.stop()
    code, lines = node.doctor()
    assert code == 1
    line = only_failure(lines, "registry")
    assert f"cannot connect to {node.registry.address}" in line and "meshmirror run" in line


class _NotARegistry(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.mark.real
def test_something_else_on_the_registry_port(node: Node) -> None:
    host = loopback_host()
    server = LocalHTTPServer((host, free_port(host)), _NotARegistry)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        address = f"{host}:{server.server_port}"
        assert main(["configure", "--containerd-registry-config-path", str(node.certs),
                     "--mirrored-registries", "docker.io,quay.io",
                     "--mirror-targets", f"http://{address}"]) == 0
        code, lines = node.doctor(registry_addr=address)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert code == 1
    assert "answered 404, not 200" in only_failure(lines, "registry")


@pytest.mark.real
def test_bad_registry_addr_is_a_usage_error(node: Node) -> None:
    code, lines = node.doctor(registry_addr="nope:port")
    assert code == 2
    assert len(lines) == 1 and "--registry-addr" in lines[0]


def test_points_at_this_node() -> None:
    host = loopback_host()
    assert points_at_this_node(f"http://{host}:5000", host, 5000)
    assert not points_at_this_node(f"http://{host}:5001", host, 5000)
    assert not points_at_this_node("http://127.0.0.1:5000", host, 5000)
    # Listening on every address: any address of this machine is this node.
    assert points_at_this_node(f"http://{host}:5000", "", 5000)
    assert points_at_this_node("http://localhost:5000", "", 5000)
    assert points_at_this_node("https://127.0.0.1", "", 443)
    assert not points_at_this_node("http://192.0.2.10:5000", "", 5000)  # TEST-NET, not ours


@pytest.mark.real
def test_hosts_toml_managed_by_the_node_owner_is_information(node: Node) -> None:
    """containerdMirrorAdd=false: nothing wrote hosts.toml, and that is not doctor's to fail."""
    assert main(["cleanup", "--containerd-registry-config-path", str(node.certs)]) == 0
    code, lines = node.doctor()
    assert code == 1 and len(failures(lines)) == 2  # missing hosts.toml, when meshmirror owns it
    code, lines = node.doctor(containerd_mirror_add="false")
    assert code == 0, lines
    info = [line for line in lines if line.startswith("info  hosts.toml ")]
    assert len(info) == 2 and all("managed outside meshmirror" in line for line in info), lines
    assert "does not exist" in info[0]
    assert lines[-1] == "all checks passed"


def test_containerd_mirror_add_reads_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from meshmirror import cli

    monkeypatch.setenv("MESHMIRROR_CONTAINERD_MIRROR_ADD", "false")
    assert cli.parse_args(["doctor"]).containerd_mirror_add is False
    monkeypatch.delenv("MESHMIRROR_CONTAINERD_MIRROR_ADD")
    assert cli.parse_args(["doctor"]).containerd_mirror_add is True


def test_lookup_dirs_follow_containerds_host_paths(tmp_path: Path) -> None:
    """host_port_ before host:port before _default (hostPaths in containerd 1.6 to 2.x)."""
    from meshmirror.containerd.doctor import check_shadowing, lookup_dirs
    from meshmirror.containerd.hostsconfig import EVERY_REGISTRY, MirroredRegistry

    assert lookup_dirs("127.0.0.1:5050") == ["127.0.0.1_5050_", "127.0.0.1:5050", "_default"]
    assert lookup_dirs("ghcr.io") == ["ghcr.io", "_default"]
    mine = MirroredRegistry("127.0.0.1:5050", "http://127.0.0.1:5050")
    (tmp_path / "127.0.0.1:5050").mkdir()
    (tmp_path / "127.0.0.1:5050" / "hosts.toml").write_text(
        '[host."http://127.0.0.1:5000"]\ncapabilities = ["pull"]\n')
    (tmp_path / "127.0.0.1_5050_").mkdir()
    (tmp_path / "127.0.0.1_5050_" / "hosts.toml").write_text('server = "http://x:1"\n')
    (tmp_path / "ghcr.io").mkdir()  # not mirrored, so not this node's business
    (tmp_path / "ghcr.io" / "hosts.toml").write_text('server = "https://ghcr.io"\n')
    found = check_shadowing(tmp_path, [mine], ("127.0.0.1", 5000))
    assert [r.name for r in found] == ["hosts.toml 127.0.0.1_5050_"]
    assert "\n" not in found[0].line()
    # certificates only: containerd still takes the directory over _default
    (tmp_path / "quay.io").mkdir()
    (tmp_path / "quay.io" / "ca.crt").write_text("")
    found = check_shadowing(tmp_path, [EVERY_REGISTRY, mine], ("127.0.0.1", 5000))
    assert [r.name for r in found] == ["hosts.toml 127.0.0.1_5050_", "hosts.toml ghcr.io",
                                       "hosts.toml quay.io"]
    assert "holds no hosts.toml" in found[2].problem


def test_ipv6_host_headers() -> None:
    from meshmirror.containerd.doctor import ipv6_host_headers

    text = ('server = "https://[fd00::9]:443"\n[host."http://[::1]:5000"]\n'
            "[host.'http://[fd00::5]:30022']\n[host.\"http://10.0.0.1:30022\"]\n"
            '[host."http://\\u005B::1\\u005D:5"]\n')
    assert ipv6_host_headers(text) == ['[host."http://[::1]:5000"]',
                                       "[host.'http://[fd00::5]:30022']",
                                       '[host."http://\\u005B::1\\u005D:5"]']
