"""A private, real containerd for a test: its own root, state and socket.

The system's containerd is 1.6; ``version="1.7"`` or ``"2.x"`` runs the Debian
trixie or sid build that ``scripts/bootstrap`` unpacked under tools/ (its bin
dir first on PATH, so it finds its own shim). :func:`available_versions` says
which are there; :func:`versions_or_skip` turns the matrix into pytest params
that skip, with the bootstrap command, where a build is missing.

CRI is off unless asked for, because with CRI on containerd re-labels and
re-creates image records in k8s.io, which makes event tests noisy. With CRI on,
``cri_pull`` pulls as the kubelet does.
The directory lives under /tmp with a short name because a unix socket path
must fit in 108 bytes and pytest's tmp_path often does not.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import pytest

from tests.support.ports import free_port, loopback_host
from tests.support.processes import spawn, stop, wait_until

NAMESPACE = "k8s.io"
SYSTEM_VERSION = "1.6"
VERSIONS = ("1.6", "1.7", "2.x")
_TOOLS = Path(__file__).resolve().parents[2] / "tools"


def bin_dir(version: str) -> Path | None:
    """Where ``version``'s binaries are; None for the system's (found on PATH)."""
    if version == SYSTEM_VERSION:
        return None
    if version not in VERSIONS:
        raise ValueError(f"unknown containerd version {version!r}; known: {VERSIONS}")
    return _TOOLS / f"containerd-{version}" / "usr" / "bin"


def available(version: str) -> bool:
    directory = bin_dir(version)
    if directory is None:
        return shutil.which("containerd") is not None
    return (directory / "containerd").is_file()


def versions_or_skip(versions: tuple[str, ...] = VERSIONS) -> list[Any]:
    """pytest params, one per version; a missing build skips with how to get it."""
    return [pytest.param(v, id=f"containerd-{v}", marks=() if available(v) else
                         pytest.mark.skip(reason=f"containerd {v} not unpacked under tools/; "
                                                 "run scripts/bootstrap"))
            for v in versions]
_CRI_PULL_IMAGE = "/runtime.v1.ImageService/PullImage"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _proto_string(field: int, value: bytes) -> bytes:
    """One length-delimited protobuf field: enough to build CRI's small requests."""
    return _varint(field << 3 | 2) + _varint(len(value)) + value


class Containerd:
    def __init__(
        self, *, cri: bool = False, registry_config_path: str | None = None, extra_config: str = "",
        version: str = SYSTEM_VERSION, images_config: str = "",
    ) -> None:
        """``images_config``: extra lines of CRI's image section (v2's ``[plugins."...cri"]``,
        v3's ``[plugins.'io.containerd.cri.v1.images']``), e.g. ``use_local_image_pull``."""
        self.version = version
        self.bin_dir = bin_dir(version)
        self.dir = Path(tempfile.mkdtemp(prefix="ctrd-", dir="/tmp"))
        self.root = self.dir / "root"
        self.state = self.dir / "state"
        self.socket = self.dir / "containerd.sock"
        self.config = self.dir / "config.toml"
        self.log = self.dir / "containerd.log"
        self.content_path = self.root / "io.containerd.content.v1.content"
        self._proc: subprocess.Popen[bytes] | None = None
        v3 = version.startswith("2")
        lines = [
            "version = 3" if v3 else "version = 2",
            f'root = "{self.root}"',
            f'state = "{self.state}"',
            "[grpc]",
            f'  address = "{self.socket}"',
            "[ttrpc]",
            f'  address = "{self.dir}/ttrpc.sock"',
        ]
        # NRI (on by default in 2.x) listens on one machine-wide socket: off, so
        # several instances can run side by side.
        disabled = ['"io.containerd.nri.v1.nri"']
        if not cri:
            disabled.append('"io.containerd.grpc.v1.cri"')
        lines.insert(1, f"disabled_plugins = [{', '.join(disabled)}]")
        if cri:
            images = "[plugins.'io.containerd.cri.v1.images']" if v3 else \
                '[plugins."io.containerd.grpc.v1.cri"]'
            lines += [images, *(f"  {line}" for line in images_config.splitlines())]
            if registry_config_path is not None:
                lines += [images[:-1] + ".registry]", f'  config_path = "{registry_config_path}"']
        self.config.write_text("\n".join(lines) + "\n" + extra_config)

    @property
    def env(self) -> dict[str, str]:
        """The environment to run this version's programs in: its bin dir first on PATH."""
        if self.bin_dir is None:
            return dict(os.environ)
        return {**os.environ, "PATH": f"{self.bin_dir}:{os.environ.get('PATH', '')}"}

    @property
    def ctr_binary(self) -> str:
        return "ctr" if self.bin_dir is None else str(self.bin_dir / "ctr")

    def start(self, timeout: float = 15.0) -> Containerd:
        binary = "containerd" if self.bin_dir is None else str(self.bin_dir / "containerd")
        self._proc = spawn([binary, "--config", str(self.config)], self.log, env=self.env)
        try:
            wait_until(
                lambda: self.ctr("version", check=False).returncode == 0,
                timeout,
                f"containerd on {self.socket} (log: {self.log})",
            )
        except TimeoutError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self._proc is not None:
            stop(self._proc)
            self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def ctr(
        self, *args: str, check: bool = True, timeout: float = 120.0, namespace: str = NAMESPACE
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ctr`` against this instance; raises with ctr's stderr when ``check``."""
        result = subprocess.run(
            [self.ctr_binary, "--address", str(self.socket), "--namespace", namespace, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"ctr {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}"
            )
        return result

    def cri_pull(self, reference: str, timeout: float = 60.0) -> str:
        """Pull as the kubelet does: CRI ``ImageService.PullImage`` (needs ``cri=True``).

        The pull runs inside containerd, through the hosts.toml under
        ``registry_config_path``. Returns the image's reference as CRI reports it
        (its config digest); a failed pull raises ``grpc.RpcError``.
        """
        # PullImageRequest{image: ImageSpec{image: reference}}; PullImageResponse{image_ref}.
        request = _proto_string(1, _proto_string(1, reference.encode()))
        with grpc.insecure_channel(f"unix://{self.socket}") as channel:
            call = channel.unary_unary(_CRI_PULL_IMAGE, request_serializer=None,
                                       response_deserializer=None)
            reply: bytes = call(request, timeout=timeout)
        return reply[2:].decode() if reply else ""

    def close(self) -> None:
        self.stop()
        # A test that ran containers removes them first, so no overlay mount is left.
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Containerd:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def dead_upstream() -> str:
    """A loopback address nobody listens on: a hosts.toml ``server`` a pull must not need."""
    host = loopback_host()
    return f"{host}:{free_port(host)}"


def write_hosts(hosts_dir: Path, registry: str, upstream: str, mirror: str) -> None:
    """A hosts.toml for ``registry`` under ``hosts_dir``: ``mirror`` first, then ``upstream``."""
    (hosts_dir / registry).mkdir(parents=True)
    (hosts_dir / registry / "hosts.toml").write_text(
        f'server = "http://{upstream}"\n\n'
        f'[host."http://{mirror}"]\n'
        '  capabilities = ["pull", "resolve"]\n'
    )
