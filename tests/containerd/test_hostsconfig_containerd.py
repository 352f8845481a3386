"""containerd (1.6, 1.7 and 2.x) pulling through the hosts.toml `meshmirror configure` wrote.

An upstream docker-registry holds an image built offline; a second docker-registry
holding the same image stands in for a live mirror. `ctr images pull --hosts-dir`
runs containerd's own hosts.toml resolver code (the same code CRI uses), so what
passes here is what a kubelet pull does on a node.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshmirror.cli import main
from meshmirror.containerd.checks import check_socket, version_of
from meshmirror.containerd.doctor import check_hosts_parse, check_shadowing
from meshmirror.containerd.hostsconfig import EVERY_REGISTRY, parse_registry
from meshmirror.oci.imagebuilder import BuiltImage, build_image
from tests.support.containerd import Containerd
from tests.support.distribution import DistributionRegistry
from tests.support.ports import free_dual_stack_port, free_port, loopback_host

pytestmark = pytest.mark.real


@pytest.fixture
def containerd_version(matrix_version: str) -> str:
    """This module runs on every containerd version (see conftest)."""
    return matrix_version

REPO = "team/app"
TAG = "1.0"


@dataclass
class Setup:
    upstream: DistributionRegistry
    mirror: DistributionRegistry
    image: BuiltImage
    containerd: Containerd
    hosts_dir: Path

    @property
    def reference(self) -> str:
        return f"{self.upstream.address}/{REPO}:{TAG}"


def push(layout: Path, registry: DistributionRegistry) -> None:
    subprocess.run(
        ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:{TAG}",
         f"docker://{registry.address}/{REPO}:{TAG}"],
        check=True, capture_output=True, timeout=120, stdin=subprocess.DEVNULL)


@pytest.fixture
def setup(tmp_path: Path, containerd_version: str) -> Iterator[Setup]:
    with DistributionRegistry() as upstream, DistributionRegistry() as mirror, \
            Containerd(version=containerd_version) as containerd:
        image = build_image(f"{upstream.address}/{REPO}:{TAG}", tmp_path / "layout",
                            (300_000, 70_000, 1_000), seed=7)
        push(image.layout, upstream)
        push(image.layout, mirror)
        yield Setup(upstream, mirror, image, containerd, tmp_path / "certs.d")


def configure(hosts_dir: Path, *flags: str) -> None:
    assert main(["configure", "--containerd-registry-config-path", str(hosts_dir), *flags]) == 0


def pull(s: Setup, reference: str | None = None) -> subprocess.CompletedProcess[str]:
    return s.containerd.ctr("images", "pull", "--hosts-dir", str(s.hosts_dir),
                            reference or s.reference, check=False, timeout=120)


def resolver_messages(s: Setup, result: subprocess.CompletedProcess[str]) -> str:
    """What the hosts.toml resolver said: ctr's stderr, and containerd's log, where
    containerd 2's ctr pulls (inside the daemon, through its transfer service)."""
    return result.stderr + s.containerd.log.read_text(errors="replace")


def assert_image_complete(s: Setup) -> None:
    """Every blob of the image is in containerd's content store, and the tag points right."""
    content = set(s.containerd.ctr("content", "ls", "--quiet").stdout.split())
    assert s.image.digests() <= content
    listing = s.containerd.ctr("images", "ls").stdout
    assert str(s.image.digest) in listing and s.reference in listing


def test_pull_falls_back_to_server_when_the_mirror_is_down(setup: Setup) -> None:
    dead = f"http://{loopback_host()}:{free_port()}"  # nothing listens there
    configure(setup.hosts_dir, "--mirrored-registries", setup.upstream.url,
              "--mirror-targets", dead)
    result = pull(setup)
    assert result.returncode == 0, result.stderr
    said = resolver_messages(setup, result)
    assert "trying next host" in said and dead.removeprefix("http://") in said
    assert_image_complete(setup)


def test_pull_goes_through_a_live_mirror_with_upstream_stopped(setup: Setup) -> None:
    configure(setup.hosts_dir, "--mirrored-registries", setup.upstream.url,
              "--mirror-targets", setup.mirror.url)
    setup.upstream.stop()
    result = pull(setup)
    assert result.returncode == 0, result.stderr
    assert_image_complete(setup)


def test_mirror_targets_are_tried_in_order(setup: Setup) -> None:
    dead = f"http://{loopback_host()}:{free_port()}"
    configure(setup.hosts_dir, "--mirrored-registries", setup.upstream.url,
              "--mirror-targets", f"{dead},{setup.mirror.url}")
    setup.upstream.stop()
    result = pull(setup)
    assert result.returncode == 0, result.stderr
    # The first was tried, then the second.
    assert dead.removeprefix("http://") in resolver_messages(setup, result)
    assert_image_complete(setup)


def test_default_hosts_file_covers_unnamed_registries(setup: Setup) -> None:
    configure(setup.hosts_dir, "--mirror-targets", setup.mirror.url)
    assert (setup.hosts_dir / "_default" / "hosts.toml").is_file()
    setup.upstream.stop()
    result = pull(setup)
    assert result.returncode == 0, result.stderr
    assert_image_complete(setup)


def test_a_registry_directory_shadows_default_and_doctor_says_so(setup: Setup) -> None:
    """containerd takes <registry>/hosts.toml over _default/hosts.toml: one written by
    another tool after `configure` takes that registry's pulls off the mirror."""
    configure(setup.hosts_dir, "--mirror-targets", setup.mirror.url)
    other = setup.hosts_dir / setup.upstream.address
    other.mkdir()
    (other / "hosts.toml").write_text(f'server = "{setup.upstream.url}"\n')
    setup.upstream.stop()
    assert pull(setup).returncode != 0  # the mirror, which holds the image, was not asked
    found = check_shadowing(setup.hosts_dir, [EVERY_REGISTRY], ("127.0.0.1", 5000),
                            (setup.mirror.url,))
    assert [r.name for r in found] == [f"hosts.toml {setup.upstream.address}"]
    assert "instead of _default/hosts.toml" in found[0].problem
    assert f"remove {other}" in found[0].fix
    shutil.rmtree(other)  # the fix
    assert not check_shadowing(setup.hosts_dir, [EVERY_REGISTRY], ("127.0.0.1", 5000),
                               (setup.mirror.url,))
    result = pull(setup)
    assert result.returncode == 0, result.stderr
    assert_image_complete(setup)


def test_mirror_on_an_ipv6_literal(setup: Setup) -> None:
    """`[host."http://[::1]:P"]`, as configure writes an IPv6 target: containerd 2 pulls
    from a mirror listening only on ::1 with the upstream stopped; 1.6 and 1.7 cannot
    decode the header, ignore the file and fail, and doctor's check says so."""
    mirror6 = DistributionRegistry(host="[::1]", port=free_dual_stack_port())
    # skopeo 1.9 cannot name an IPv6 registry: the mirror starts on the upstream's content.
    shutil.rmtree(mirror6.storage)
    shutil.copytree(setup.upstream.storage, mirror6.storage)
    registry = parse_registry(setup.upstream.url)
    with mirror6:
        configure(setup.hosts_dir, "--mirrored-registries", setup.upstream.url,
                  "--mirror-targets", f"http://[::1]:{mirror6.port}")
        assert f'[host."http://[::1]:{mirror6.port}"]' in (
            setup.hosts_dir / setup.upstream.address / "hosts.toml").read_text()
        setup.upstream.stop()
        result = pull(setup)
        version = version_of(check_socket(str(setup.containerd.socket)))
        assert version is not None
        found = check_hosts_parse(setup.hosts_dir, [registry], version)
        if version >= (2, 0):
            assert result.returncode == 0, result.stderr
            assert_image_complete(setup)
            assert found == []
        else:
            assert result.returncode != 0
            assert "failed to decode hosts.toml" in resolver_messages(setup, result)
            assert [r.name for r in found] == [f"hosts.toml {setup.upstream.address}"]
            assert "cannot parse an IPv6 address" in found[0].problem
            assert "host name" in found[0].fix


def test_without_resolve_tags_only_digests_come_from_the_mirror(setup: Setup) -> None:
    configure(setup.hosts_dir, "--mirrored-registries", setup.upstream.url,
              "--mirror-targets", setup.mirror.url, "--resolve-tags", "false")
    setup.upstream.stop()
    # A tag needs a host with "resolve": only the (stopped) server has it.
    by_tag = pull(setup)
    assert by_tag.returncode != 0
    by_digest = pull(setup, f"{setup.upstream.address}/{REPO}@{setup.image.digest}")
    assert by_digest.returncode == 0, by_digest.stderr
    content = set(setup.containerd.ctr("content", "ls", "--quiet").stdout.split())
    assert setup.image.digests() <= content


def test_cleanup_takes_the_mirror_out_of_the_path(setup: Setup) -> None:
    configure(setup.hosts_dir, "--mirrored-registries", setup.upstream.url,
              "--mirror-targets", setup.mirror.url)
    assert main(["cleanup", "--containerd-registry-config-path", str(setup.hosts_dir)]) == 0
    assert list(setup.hosts_dir.iterdir()) == []
    setup.upstream.stop()
    result = pull(setup)
    assert result.returncode != 0  # nothing but the stopped upstream is left to ask
