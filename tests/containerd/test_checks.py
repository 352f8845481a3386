"""Startup checks: config parsing for every config layout, and socket/namespace against a
real containerd 1.6."""

from __future__ import annotations

import io
import os
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshmirror.containerd import checks
from meshmirror.containerd.checks import CheckResult, check_containerd_config
from meshmirror.containerd.config import ContainerdConfig
from tests.support.containerd import Containerd, versions_or_skip

V2_GOOD = """version = 2
[plugins."io.containerd.grpc.v1.cri".containerd]
  discard_unpacked_layers = false
[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "/etc/containerd/certs.d"
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return str(path)


def by_name(results: list[CheckResult]) -> dict[str, CheckResult]:
    return {r.name: r for r in results}


def test_v2_config_with_config_path_passes(tmp_path: Path) -> None:
    results = check_containerd_config(write(tmp_path, V2_GOOD), "/etc/containerd/certs.d/")
    assert all(r.ok and not r.skipped for r in results), [r.line() for r in results]
    assert len(results) == 2


@pytest.mark.parametrize(
    "text",
    [
        # v1: no version key, short plugin name
        '[plugins.cri.registry]\nconfig_path = "/etc/containerd/certs.d"\n',
        'version = 1\n[plugins.cri.registry]\nconfig_path = "/etc/containerd/certs.d"\n',
        # several directories, ours among them
        'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n'
        'config_path = "/etc/docker/certs.d:/etc/containerd/certs.d"\n',
        # containerd 2 layout
        "version = 3\n[plugins.'io.containerd.cri.v1.images'.registry]\n"
        "config_path = '/etc/containerd/certs.d'\n",
    ],
)
def test_config_path_found_in_every_layout(tmp_path: Path, text: str) -> None:
    results = by_name(check_containerd_config(write(tmp_path, text), "/etc/containerd/certs.d"))
    assert results["containerd config_path"].ok, results["containerd config_path"].line()


@pytest.mark.parametrize(
    "text",
    [
        "version = 2\n",
        'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\nconfig_path = ""\n',
        "[plugins.cri]\nsandbox_image = 'pause'\n",
        # v2 key in a v1 file is not where containerd looks
        '[plugins."io.containerd.grpc.v1.cri".registry]\nconfig_path = "/etc/containerd/certs.d"\n',
        "version = 3\n[plugins.'io.containerd.cri.v1.images'.registry]\nconfig_path = ''\n",
    ],
)
def test_missing_config_path_fails_with_the_line_to_add(tmp_path: Path, text: str) -> None:
    result = by_name(check_containerd_config(write(tmp_path, text), "/srv/certs.d"))[
        "containerd config_path"]
    assert not result.ok
    assert "never reads hosts.toml" in result.problem
    assert 'config_path = "/srv/certs.d"' in result.fix and "restart containerd" in result.fix


def test_config_path_elsewhere_than_ours_fails(tmp_path: Path) -> None:
    result = by_name(check_containerd_config(write(tmp_path, V2_GOOD), "/srv/certs.d"))[
        "containerd config_path"]
    assert not result.ok
    assert "/etc/containerd/certs.d" in result.problem and "/srv/certs.d" in result.problem
    assert "--containerd-registry-config-path" in result.fix


def test_config_path_with_deprecated_mirrors_fails(tmp_path: Path) -> None:
    text = V2_GOOD + ('[plugins."io.containerd.grpc.v1.cri".registry.mirrors."docker.io"]\n'
                      'endpoint = ["https://m.example"]\n')
    result = by_name(check_containerd_config(write(tmp_path, text), None))[
        "containerd config_path"]
    assert not result.ok and "mirrors" in result.problem


@pytest.mark.parametrize(
    "text",
    [
        V2_GOOD.replace("discard_unpacked_layers = false", "discard_unpacked_layers = true"),
        '[plugins.cri.containerd]\ndiscard_unpacked_layers = true\n'
        '[plugins.cri.registry]\nconfig_path = "/etc/containerd/certs.d"\n',
        "version = 3\n[plugins.'io.containerd.cri.v1.images']\ndiscard_unpacked_layers = true\n"
        "[plugins.'io.containerd.cri.v1.images'.registry]\n"
        "config_path = '/etc/containerd/certs.d'\n",
    ],
)
def test_discard_unpacked_layers_fails(tmp_path: Path, text: str) -> None:
    results = by_name(check_containerd_config(write(tmp_path, text), None))
    result = results["containerd discard_unpacked_layers"]
    assert not result.ok
    assert "nothing to share" in result.problem
    assert "discard_unpacked_layers = false" in result.fix
    assert results["containerd config_path"].ok


def test_unreadable_config_is_skipped_not_failed(tmp_path: Path) -> None:
    results = check_containerd_config(str(tmp_path / "absent.toml"), None)
    assert all(r.ok and r.skipped for r in results)
    assert results[0].line().startswith("skip  ")


def test_invalid_config_fails(tmp_path: Path) -> None:
    (result,) = check_containerd_config(write(tmp_path, "version = \n"), None)
    assert not result.ok and "not valid TOML" in result.problem


def test_cri_disabled_skips_config_checks(tmp_path: Path) -> None:
    text = 'version = 2\ndisabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
    results = check_containerd_config(write(tmp_path, text), None)
    assert all(r.skipped for r in results)
    assert "CRI plugin is disabled" in results[0].detail


# --- against a real containerd ----------------------------------------------------------


@pytest.fixture(scope="module")
def containerd() -> Iterator[Containerd]:
    with Containerd(cri=True, registry_config_path="/etc/containerd/certs.d") as c:
        c.ctr("namespaces", "create", "k8s.io", namespace="default")
        yield c


def containerd_for(sock: str, config: str, namespace: str = "k8s.io") -> ContainerdConfig:
    return ContainerdConfig(sock=sock, namespace=namespace, config=config)


@pytest.mark.real
def test_all_startup_checks_pass_on_a_good_containerd(containerd: Containerd) -> None:
    good = containerd_for(str(containerd.socket), str(containerd.config))
    results = checks.run_startup_checks(good)
    assert [r.ok and not r.skipped for r in results] == [True] * 4, [r.line() for r in results]
    assert "containerd 1.6" in results[0].detail
    out = io.StringIO()
    assert checks.startup_gate(good, out) == 0
    assert out.getvalue() == ""


@pytest.mark.real
def test_missing_namespace_is_reported_with_the_existing_ones(containerd: Containerd) -> None:
    result = checks.check_namespace(str(containerd.socket), "no-such-ns")
    assert not result.ok
    assert "'no-such-ns' does not exist" in result.problem and "k8s.io" in result.problem
    assert "--containerd-namespace" in result.fix


def test_missing_socket(tmp_path: Path) -> None:
    result = checks.check_socket(str(tmp_path / "containerd.sock"))
    assert not result.ok and "does not exist" in result.problem
    assert "--containerd-sock" in result.fix


def test_socket_path_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "containerd.sock").write_text("")
    result = checks.check_socket(str(tmp_path / "containerd.sock"))
    assert not result.ok and "is not a socket" in result.problem


def test_socket_nobody_listens_on(tmp_path: Path) -> None:
    path = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))  # bound, never listening: connect is refused
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    result = checks.check_socket(str(path), timeout=2.0)
    assert not result.ok and "does not answer" in result.problem
    assert "containerd is running" in result.fix


def test_socket_that_accepts_but_never_answers(tmp_path: Path) -> None:
    path = tmp_path / "mute.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        s.listen()
        result = checks.check_socket(str(path), timeout=0.5)
    assert not result.ok and "DEADLINE_EXCEEDED" in result.problem


def test_startup_gate_prints_one_line_per_problem(tmp_path: Path) -> None:
    config = write(tmp_path, 'version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd]\n'
                             "discard_unpacked_layers = true\n")
    out = io.StringIO()
    code = checks.startup_gate(containerd_for(str(tmp_path / "nope.sock"), config), out)
    lines = out.getvalue().splitlines()
    assert code == 1
    assert len(lines) == 3  # socket, config_path, discard; namespace is not a second symptom
    assert all(line.startswith("meshmirror: ") and "; fix: " in line for line in lines)
    assert "nope.sock does not exist" in lines[0]
    assert "config_path" in lines[1] and "discard_unpacked_layers" in lines[2]


@pytest.mark.real
def test_startup_gate_namespace_line_against_real_containerd(containerd: Containerd) -> None:
    out = io.StringIO()
    code = checks.startup_gate(
        containerd_for(str(containerd.socket), str(containerd.config), "missing"), out)
    assert code == 1
    (line,) = out.getvalue().splitlines()
    assert "namespace 'missing' does not exist" in line and "--containerd-namespace" in line


@pytest.mark.real
def test_real_containerd_config_without_config_path(tmp_path: Path) -> None:
    """containerd's own default config, as `containerd config default` prints it for 1.6."""
    default = subprocess.run(["containerd", "config", "default"], capture_output=True, text=True,
                             check=True, timeout=30).stdout
    results = by_name(check_containerd_config(write(tmp_path, default), None))
    assert not results["containerd config_path"].ok
    assert results["containerd discard_unpacked_layers"].ok


# --- containerd 2.x: the transfer service, version 3 keys, k3s/RKE2 places -----------

V3_LIST = ("version = 3\n[plugins.'io.containerd.cri.v1.images'.registry]\n"
           "config_path = '/etc/containerd/certs.d:/etc/docker/certs.d'\n")


@pytest.mark.parametrize(("text", "version"), [
    (V3_LIST, (2, 1)),
    (V3_LIST, (2, 2)),
    (V3_LIST, None),  # containerd not reachable: a version 3 file is taken as 2.1+
    # unset on containerd 2 means the default list
    ("version = 3\n[plugins.'io.containerd.cri.v1.images']\nsnapshotter = 'overlayfs'\n", (2, 2)),
    # a version 2 file on containerd 2.1 is migrated: the transfer service still pulls
    ('version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n'
     'config_path = "/etc/containerd/certs.d:/etc/docker/certs.d"\n', (2, 1)),
])
def test_transfer_service_with_a_config_path_list_fails(tmp_path: Path, text: str,
                                                        version: tuple[int, int] | None) -> None:
    results = by_name(check_containerd_config(write(tmp_path, text), None, version))
    result = results[checks.TRANSFER_CHECK]
    assert not result.ok and result.warning
    assert "use_local_image_pull" in result.problem and "ignores hosts.toml" in result.problem
    assert "use_local_image_pull = true" in result.fix
    assert 'config_path = "/etc/containerd/certs.d"' in result.fix
    assert result.line().startswith("FAIL  containerd transfer service: ")


@pytest.mark.parametrize(("text", "version"), [
    (V3_LIST.replace(":/etc/docker/certs.d", ""), (2, 1)),  # one directory
    (V3_LIST + "[plugins.'io.containerd.cri.v1.images']\nuse_local_image_pull = true\n", (2, 2)),
])
def test_transfer_service_passes_with_either_fix(tmp_path: Path, text: str,
                                                 version: tuple[int, int]) -> None:
    results = by_name(check_containerd_config(write(tmp_path, text), None, version))
    assert results[checks.TRANSFER_CHECK].ok, results[checks.TRANSFER_CHECK].line()


@pytest.mark.parametrize("version", [(1, 6), (1, 7), (2, 0)])
def test_transfer_service_not_checked_before_2_1(tmp_path: Path,
                                                 version: tuple[int, int]) -> None:
    text = V3_LIST if version >= (2, 0) else V2_GOOD.replace(
        '"/etc/containerd/certs.d"', '"/etc/containerd/certs.d:/etc/docker/certs.d"')
    names = by_name(check_containerd_config(write(tmp_path, text), None, version))
    assert checks.TRANSFER_CHECK not in names


def test_known_behaviours_table() -> None:
    assert checks.parse_version("v2.1.9") == (2, 1)
    assert checks.parse_version("1.6.20~ds1") == (1, 6)
    assert checks.parse_version("2.1.9+unknown") == (2, 1)
    assert checks.parse_version("dev") is None
    key = "transfer_service_ignores_config_path_list"
    assert checks.has_behaviour(key, (2, 1)) and checks.has_behaviour(key, (3, 0))
    assert checks.has_behaviour(key, (2, 0)) is False
    assert checks.has_behaviour(key, None) is None
    assert checks.has_behaviour("config_v3", (2, 0))


def test_v2_places_in_a_version_3_file_fail(tmp_path: Path) -> None:
    text = ('version = 3\n[plugins."io.containerd.grpc.v1.cri".registry]\n'
            'config_path = "/etc/containerd/certs.d"\n'
            '[plugins."io.containerd.grpc.v1.cri".containerd]\ndiscard_unpacked_layers = true\n')
    result = by_name(check_containerd_config(write(tmp_path, text), None, (2, 1)))[
        checks.V3_KEYS_CHECK]
    assert not result.ok and result.warning
    assert "registry.config_path" in result.problem and "discard_unpacked_layers" in result.problem
    assert "io.containerd.cri.v1.images" in result.fix


def test_v3_keys_in_place_pass(tmp_path: Path) -> None:
    text = V3_LIST.replace(":/etc/docker/certs.d", "")
    result = by_name(check_containerd_config(write(tmp_path, text), None, (2, 1)))[
        checks.V3_KEYS_CHECK]
    assert result.ok


def test_k3s_config_is_found_when_the_default_is_absent(tmp_path: Path) -> None:
    k3s = tmp_path / "k3s" / "config.toml"
    k3s.parent.mkdir()
    k3s.write_text("version = 2\n")  # k3s's generated file, here without config_path
    default = str(tmp_path / "etc-containerd-config.toml")  # absent
    distributions = [("RKE2", str(tmp_path / "rke2" / "config.toml")), ("k3s", str(k3s))]
    assert checks.locate_config(default, distributions, default) == (str(k3s), "k3s")
    assert checks.locate_config(default, distributions, "/other") == (default, None)


def test_k3s_config_named_directly_gets_the_template_hint(tmp_path: Path) -> None:
    k3s = tmp_path / "config.toml"
    k3s.write_text('version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd]\n'
                   "discard_unpacked_layers = true\n")
    results = by_name(check_containerd_config(str(k3s), None,
                                              distributions=[("k3s", str(k3s))]))
    assert "k3s rewrites" in results["containerd discard_unpacked_layers"].fix


def test_locate_config_prefers_the_given_file(tmp_path: Path) -> None:
    given = write(tmp_path, V2_GOOD)
    assert checks.locate_config(given, [("k3s", str(tmp_path / "k3s.toml"))]) == (given, None)


@pytest.mark.real
@pytest.mark.parametrize("version", versions_or_skip(("2.x",)))
def test_startup_checks_warn_and_serve(tmp_path: Path, version: str) -> None:
    """A transfer-service warning does not stop `run`; it is printed and returned."""
    with Containerd(version=version) as c:
        c.ctr("namespaces", "create", "k8s.io", namespace="default")
        config = write(tmp_path, V3_LIST)
        out = io.StringIO()
        code, results = checks.startup_checks(containerd_for(str(c.socket), config), out)
    assert code == 0
    assert "containerd 2." in results[0].detail
    (line,) = out.getvalue().splitlines()
    assert line.startswith("meshmirror: warning: ") and "use_local_image_pull" in line
    assert checks.conditions(results) == [{
        "check": checks.TRANSFER_CHECK,
        "problem": next(r.problem for r in results if r.name == checks.TRANSFER_CHECK),
        "fix": next(r.fix for r in results if r.name == checks.TRANSFER_CHECK)}]


def test_config_problem_metric() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(checks.ConfigProblemCollector([
        CheckResult(checks.TRANSFER_CHECK, False, problem="p", fix="f", warning=True),
        CheckResult(checks.V3_KEYS_CHECK, True),
        CheckResult("containerd socket", True)]))
    text = generate_latest(registry).decode()
    assert 'meshmirror_containerd_config_problem{check="transfer_service"} 1.0' in text
    assert 'meshmirror_containerd_config_problem{check="config_v3_keys"} 0.0' in text
    assert "socket" not in text


# --- what containerd 2 really runs with (loadconfig; held against `config dump` in
# test_loadconfig.py) ---------------------------------------------------------------

V3_UNSET = "version = 3\n[plugins.'io.containerd.cri.v1.images']\nsnapshotter = 'overlayfs'\n"


@pytest.mark.parametrize("version", [(2, 0), (2, 1), None])
def test_unset_config_path_before_2_2_reads_no_hosts_toml(tmp_path: Path,
                                                          version: tuple[int, int] | None) -> None:
    """2.0 and 2.1 default config_path to '' (`containerd config default` of 2.1.9)."""
    results = by_name(check_containerd_config(write(tmp_path, V3_UNSET), None, version))
    result = results["containerd config_path"]
    assert not result.ok and "never reads hosts.toml" in result.problem
    assert "config_path = \"/etc/containerd/certs.d\"" in result.fix


def test_unset_config_path_from_2_2_is_the_default_list(tmp_path: Path) -> None:
    results = by_name(check_containerd_config(write(tmp_path, V3_UNSET), None, (2, 2)))
    assert results["containerd config_path"].ok
    assert not results[checks.TRANSFER_CHECK].ok


V2_LIST = ('version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n'
           'config_path = "/etc/containerd/certs.d:/etc/docker/certs.d"\n')


@pytest.mark.parametrize(("text", "ok"), [
    # the fix, written where containerd 2 reads it, in a version 2 file
    (V2_LIST + "[plugins.'io.containerd.cri.v1.images']\nuse_local_image_pull = true\n", True),
    # the same key where a version 2 file keeps its CRI settings: containerd 2 ignores it
    (V2_LIST + '[plugins."io.containerd.grpc.v1.cri".containerd]\n'
               "use_local_image_pull = true\n", False),
    # settings the transfer service cannot honour make CRI pull locally by itself
    (V2_LIST + '[plugins."io.containerd.grpc.v1.cri"]\nmax_concurrent_downloads = 5\n', True),
    (V3_LIST + "[plugins.'io.containerd.cri.v1.images']\ndisable_snapshot_annotations = false\n",
     True),
    (V3_LIST + "[plugins.'io.containerd.cri.v1.images']\nimage_pull_with_sync_fs = true\n", True),
    (V3_LIST + "[plugins.'io.containerd.cri.v1.images']\nmax_concurrent_downloads = 3\n", False),
])
def test_transfer_service_as_containerd_2_1_decides(tmp_path: Path, text: str, ok: bool) -> None:
    result = by_name(check_containerd_config(write(tmp_path, text), None, (2, 1)))[
        checks.TRANSFER_CHECK]
    assert result.ok is ok, result.line()


def test_no_version_line_on_containerd_2_ignores_v2_places(tmp_path: Path) -> None:
    """containerd 2 reads a file without `version` as version 3 (config dump of 2.1.9)."""
    text = ('[plugins."io.containerd.grpc.v1.cri".registry]\n'
            'config_path = "/etc/containerd/certs.d"\n')
    on_16 = by_name(check_containerd_config(write(tmp_path, text), None, (1, 6)))
    on_21 = by_name(check_containerd_config(write(tmp_path, text), None, (2, 1)))
    assert not on_16["containerd config_path"].ok  # version 1 wants plugins.cri there
    result = on_21["containerd config_path"]
    assert not result.ok and "io.containerd.cri.v1.images" in result.fix


def test_mirrors_with_config_path_fail_on_containerd_2(tmp_path: Path) -> None:
    """2.x's ValidateImageConfig refuses both, as 1.x did: CRI does not start."""
    text = V3_LIST.replace(":/etc/docker/certs.d", "") \
        + "[plugins.'io.containerd.cri.v1.images'.registry.mirrors.'docker.io']\n" \
          "endpoint = ['https://m.example']\n"
    result = by_name(check_containerd_config(write(tmp_path, text), None, (2, 1)))[
        "containerd config_path"]
    assert not result.ok and "mirrors" in result.problem


def test_every_check_line_is_one_line(tmp_path: Path) -> None:
    for text in (V3_UNSET, V3_LIST, V2_LIST, "version = \n"):
        for version in ((1, 6), (2, 1), (2, 2), None):
            for result in check_containerd_config(write(tmp_path, text), None, version):
                assert "\n" not in result.line(), result.line()
