"""The container image builds from this checkout for linux/amd64 and linux/arm64,
runs on a real containerd, and its arm64 half runs under qemu-user-static.

The archive (one OCI image index) comes from the session fixture in conftest.py.
"""

from __future__ import annotations

import json
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshmirror import __version__
from tests.deploy.conftest import BUILD_TIMEOUT, IMAGE
from tests.support.containerd import Containerd

PLATFORMS = ("amd64", "arm64")
ELF_MACHINE = {"amd64": 0x3E, "arm64": 0xB7}  # e_machine: EM_X86_64, EM_AARCH64

pytestmark = [pytest.mark.real, pytest.mark.slow]


@pytest.fixture(scope="module")
def containerd(archive: Path) -> Iterator[Containerd]:
    with Containerd() as instance:
        # The node's own platform (amd64 here) is what ctr imports from the index.
        instance.ctr("images", "import", str(archive), timeout=300)
        yield instance


def blob(tar: tarfile.TarFile, digest: str) -> bytes:
    member = tar.extractfile("blobs/sha256/" + digest.removeprefix("sha256:"))
    assert member is not None, digest
    return member.read()


def oci_json(tar: tarfile.TarFile, digest: str) -> Any:
    return json.loads(blob(tar, digest))


def platform_manifests(tar: tarfile.TarFile) -> dict[str, tuple[Any, Any]]:
    """Each architecture's (manifest, config), read through the archive's one index."""
    member = tar.extractfile("index.json")
    assert member is not None
    (entry,) = json.loads(member.read())["manifests"]
    assert entry["mediaType"] == "application/vnd.oci.image.index.v1+json", entry
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == IMAGE
    found = {}
    for item in oci_json(tar, entry["digest"])["manifests"]:
        assert item["platform"]["os"] == "linux", item
        manifest = oci_json(tar, item["digest"])
        found[item["platform"]["architecture"]] = (manifest,
                                                   oci_json(tar, manifest["config"]["digest"]))
    return found


def run_in_image(containerd: Containerd, name: str, *argv: str) -> str:
    result = containerd.ctr("run", "--rm", "--net-host", IMAGE, name, *argv, timeout=120)
    return result.stdout


@pytest.mark.timeout(BUILD_TIMEOUT + 300)
def test_meshmirror_version_runs_in_the_image(containerd: Containerd) -> None:
    # The entrypoint is the console script: no argument but the flag.
    assert run_in_image(containerd, "version-entrypoint", "/opt/meshmirror/bin/meshmirror",
                        "--version").strip() == f"meshmirror {__version__}"
    # The chart calls it by name, through PATH.
    assert run_in_image(containerd, "version-path", "meshmirror",
                        "--version").strip() == f"meshmirror {__version__}"


@pytest.mark.timeout(BUILD_TIMEOUT + 300)
def test_image_holds_no_installer_and_no_wheels(containerd: Containerd) -> None:
    script = ("import importlib.util, pathlib, sys; "
              "print(sorted(m for m in ('pip', 'setuptools', 'wheel', 'ensurepip') "
              "if importlib.util.find_spec(m))); "
              "print(sorted(str(p) for p in pathlib.Path('/').glob('**/*.whl') "
              "if not str(p).startswith(('/proc', '/sys')))); "
              "print(sys.prefix)")
    lines = run_in_image(containerd, "contents", "/opt/meshmirror/bin/python", "-c",
                         script).splitlines()
    assert lines == ["[]", "[]", "/opt/meshmirror"]


@pytest.mark.timeout(BUILD_TIMEOUT + 300)
def test_index_lists_both_platforms_with_entrypoint_labels_and_size(archive: Path) -> None:
    with tarfile.open(archive) as tar:
        platforms = platform_manifests(tar)
    assert sorted(platforms) == sorted(PLATFORMS)
    sizes = {}
    for arch, (manifest, config) in platforms.items():
        assert config["architecture"] == arch and config["os"] == "linux"
        assert config["config"]["Entrypoint"] == ["/opt/meshmirror/bin/meshmirror"]
        labels = config["config"]["Labels"]
        assert labels["org.opencontainers.image.version"] == __version__
        assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
        assert labels["org.opencontainers.image.title"] == "meshmirror"
        assert labels["org.opencontainers.image.source"].startswith("https://")
        assert labels["org.opencontainers.image.description"]
        assert all(layer["mediaType"].endswith("tar+gzip") for layer in manifest["layers"])
        sizes[arch] = sum(layer["size"] for layer in manifest["layers"])
    print("compressed bytes per platform:", sizes)
    # The goal is under 100 MB per platform; past it, something big crept in.
    assert all(size < 100_000_000 for size in sizes.values()), sizes


def unpack(tar: tarfile.TarFile, manifest: Any, rootfs: Path) -> None:
    """The layers, in order, as a root filesystem (the image adds files only: no whiteouts)."""
    rootfs.mkdir()
    for layer in manifest["layers"]:
        subprocess.run(["tar", "-xz", "--numeric-owner", "-C", str(rootfs)],
                       input=blob(tar, layer["digest"]), check=True, timeout=300)
    assert not list(rootfs.rglob(".wh.*"))


@pytest.mark.timeout(BUILD_TIMEOUT + 300)
def test_arm64_rootfs_runs_meshmirror_under_qemu(archive: Path, tmp_path: Path) -> None:
    rootfs = tmp_path / "arm64"
    with tarfile.open(archive) as tar:
        manifest, _ = platform_manifests(tar)["arm64"]
        unpack(tar, manifest, rootfs)
    # The venv's python links to Debian's: an aarch64 ELF, which runs here only
    # through qemu-aarch64 (binfmt_misc).
    python = (rootfs / "usr/bin/python3.11").read_bytes()
    assert int.from_bytes(python[18:20], "little") == ELF_MACHINE["arm64"]

    def chroot(*argv: str) -> str:
        done = subprocess.run(["chroot", str(rootfs), *argv], capture_output=True, text=True,
                              timeout=300, check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert chroot("/opt/meshmirror/bin/meshmirror", "--version") == f"meshmirror {__version__}"
    # The compiled wheels are the arm64 ones: each extension module loads.
    assert chroot("/opt/meshmirror/bin/python", "-c",
                  "import platform, numpy, multidict._multidict, msgpack, yaml, aiohttp, "
                  "cryptography.hazmat.primitives.ciphers.aead, meshmirror.node; "
                  "print(platform.machine())") == "aarch64"
