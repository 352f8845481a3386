"""Registry name -> upstream URL: defaults, containerd's hosts.toml, explicit mappings."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshmirror.containerd.hostsconfig import HEADER
from meshmirror.oci.reference import InvalidRegistryError
from meshmirror.upstream.endpoints import EndpointError, UpstreamEndpoints


def write_hosts(config: Path, registry: str, text: str) -> None:
    (config / registry).mkdir(parents=True)
    (config / registry / "hosts.toml").write_text(text)


def test_defaults() -> None:
    endpoints = UpstreamEndpoints()
    assert endpoints.url_for("docker.io") == "https://registry-1.docker.io"
    assert endpoints.url_for("ghcr.io") == "https://ghcr.io"
    assert endpoints.url_for("10.1.2.3:5050") == "https://10.1.2.3:5050"
    # Loopback registries speak plain HTTP, as containerd assumes for localhost.
    assert endpoints.url_for("127.0.0.1:5050") == "http://127.0.0.1:5050"
    assert endpoints.url_for("localhost:5050") == "http://localhost:5050"
    assert endpoints.url_for("[::1]:5050") == "http://[::1]:5050"


def test_hosts_toml_server_wins_over_default(tmp_path: Path) -> None:
    write_hosts(tmp_path, "docker.io", 'server = "http://127.0.0.1:5050/"\n'
                '[host."http://127.0.0.2:5000"]\n  capabilities = ["pull", "resolve"]\n')
    write_hosts(tmp_path, "quay.io", '[host."http://127.0.0.2:5000"]\n  capabilities = ["pull"]\n')
    write_hosts(tmp_path, "hub.local", 'server = "https://docker.io"\n')
    endpoints = UpstreamEndpoints(tmp_path)
    assert endpoints.url_for("docker.io") == "http://127.0.0.1:5050"
    assert endpoints.url_for("quay.io") == "https://quay.io"  # file without server
    assert endpoints.url_for("hub.local") == "https://registry-1.docker.io"
    assert endpoints.url_for("ghcr.io") == "https://ghcr.io"  # no file


def test_default_dir_only_when_the_registry_has_no_file(tmp_path: Path) -> None:
    write_hosts(tmp_path, "_default", 'server = "http://127.0.0.9:5000"\n')
    write_hosts(tmp_path, "quay.io", "")
    endpoints = UpstreamEndpoints(tmp_path)
    assert endpoints.url_for("ghcr.io") == "http://127.0.0.9:5000"
    assert endpoints.url_for("quay.io") == "https://quay.io"


def test_explicit_mapping_wins(tmp_path: Path) -> None:
    write_hosts(tmp_path, "docker.io", 'server = "http://127.0.0.1:5050"\n')
    endpoints = UpstreamEndpoints(tmp_path, {"docker.io": "http://127.0.0.3:7000"})
    assert endpoints.url_for("docker.io") == "http://127.0.0.3:7000"


@pytest.mark.parametrize("text", ['server = "ftp://x"\n', "server = 5\n", "server = \n",
                                  'server = "http://"\n'])
def test_bad_hosts_toml_is_an_endpoint_error(tmp_path: Path, text: str) -> None:
    write_hosts(tmp_path, "docker.io", text)
    with pytest.raises(EndpointError):
        UpstreamEndpoints(tmp_path).url_for("docker.io")


def test_bad_mapping_and_bad_registry() -> None:
    with pytest.raises(EndpointError):
        UpstreamEndpoints(overrides={"docker.io": "registry-1.docker.io"})
    with pytest.raises(InvalidRegistryError):
        UpstreamEndpoints().url_for("../etc")


def test_a_changed_hosts_toml_is_read_again(tmp_path: Path) -> None:
    endpoints = UpstreamEndpoints(tmp_path)
    write_hosts(tmp_path, "quay.io", 'server = "http://127.0.0.1:5050"\n')
    assert endpoints.url_for("quay.io") == "http://127.0.0.1:5050"
    (tmp_path / "quay.io" / "hosts.toml").write_text('server = "http://127.0.0.1:6060"\n')
    assert endpoints.url_for("quay.io") == "http://127.0.0.1:6060"
    (tmp_path / "quay.io" / "hosts.toml").unlink()
    assert endpoints.url_for("quay.io") == "https://quay.io"


def test_only_registries_whose_hosts_toml_reaches_this_node_are_mirrored(tmp_path: Path) -> None:
    def write(directory: str, text: str) -> None:
        (tmp_path / directory).mkdir()
        (tmp_path / directory / "hosts.toml").write_text(text)

    own = "http://10.0.0.7:5000"
    write("here.io", 'server = "https://here.io"\n[host."http://10.0.0.7:5000"]\n')
    write("loop.io", '[host."http://127.0.0.1:5000"]\n')
    write("there.io", 'server = "https://there.io"\n[host."http://10.0.0.8:5000"]\n')
    write("written.io", HEADER + '[host."http://192.168.1.1:30022"]\n')
    endpoints = UpstreamEndpoints(tmp_path, mirror_urls=(own,))
    assert endpoints.sends_here("here.io") and endpoints.sends_here("loop.io")
    assert endpoints.sends_here("written.io")  # `meshmirror configure` wrote it
    assert not endpoints.sends_here("there.io")
    assert not endpoints.sends_here("nowhere.io")  # no file, no _default
    write("_default", '[host."http://10.0.0.7:5000"]\n')
    assert endpoints.sends_here("nowhere.io")
    assert not endpoints.sends_here("there.io")  # its own file wins over _default
    # Without this node's URL (a client built bare) nothing can be told apart.
    assert UpstreamEndpoints(tmp_path).sends_here("there.io")
