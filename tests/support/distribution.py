"""A real CNCF Distribution registry (Debian ``docker-registry``) for a test.

Used as the upstream that containerd falls back to, as the baseline in the
registry benchmark, and as a push target for skopeo. Storage lives in a fresh
temporary directory; the process runs in its own process group and is always
stopped, with every wait bounded.

Three kinds, by ``auth``: None (public, no auth), :class:`TokenAuth` (answers
``401 Bearer`` as Docker Hub does; pair it with ``tests.support.token_server``)
and :class:`HtpasswdAuth` (answers ``401 Basic``: a private registry).
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import bcrypt

from tests.support.ports import free_port, loopback_host
from tests.support.processes import spawn, stop, wait_until
from tests.support.tls import make_server_cert


@dataclass(frozen=True)
class TokenAuth:
    """``auth: token``: JWTs from ``realm``, signed by a key whose cert is in ``rootcertbundle``."""

    realm: str
    service: str
    issuer: str
    rootcertbundle: Path

    def config(self) -> str:
        return ("auth:\n  token:\n"
                f"    realm: {self.realm}\n    service: {self.service}\n"
                f"    issuer: {self.issuer}\n    rootcertbundle: {self.rootcertbundle}\n")


@dataclass(frozen=True)
class HtpasswdAuth:
    """``auth: htpasswd``: Basic credentials checked against bcrypt hashes in ``path``."""

    path: Path
    realm: str = "meshmirror-test"

    @classmethod
    def write(cls, path: Path, users: Mapping[str, str]) -> HtpasswdAuth:
        """An htpasswd file for ``users`` (cost 4, the least bcrypt allows: tests, not secrets)."""
        lines = (f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()}\n"
                 for user, password in users.items())
        path.write_text("".join(lines))
        return cls(path)

    def config(self) -> str:
        return f"auth:\n  htpasswd:\n    realm: {self.realm}\n    path: {self.path}\n"


class DistributionRegistry:
    """``with DistributionRegistry() as reg:`` serves on ``reg.address`` until the block ends."""

    def __init__(self, host: str | None = None, port: int | None = None,
                 auth: TokenAuth | HtpasswdAuth | None = None, tls: bool = False,
                 access_log: bool = False, proxy_remote: str | None = None) -> None:
        """``tls``: serve HTTPS with a fresh self-signed cert (``self.tls_cert``);
        ``access_log``: log each request, for `requests_seen`; ``proxy_remote``: run as
        Distribution's pull-through cache of that registry URL (``proxy: remoteurl``),
        which stores and hashes what it forwards: the baseline a mirror competes with."""
        self.host = host or loopback_host()
        self.port = port or free_port(self.host)
        self.dir = Path(tempfile.mkdtemp(prefix="distribution-"))
        self.storage = self.dir / "storage"
        self.config = self.dir / "config.yml"
        self.log = self.dir / "registry.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self.storage.mkdir()
        self.tls_cert = make_server_cert(self.dir, self.host) if tls else None
        self.config.write_text(
            "version: 0.1\n"
            f"log:\n  level: error\n  accesslog:\n    disabled: {str(not access_log).lower()}\n"
            "storage:\n"
            f"  filesystem:\n    rootdirectory: {self.storage}\n"
            "  delete:\n    enabled: true\n"
            "  maintenance:\n    uploadpurging:\n      enabled: false\n"
            f"http:\n  addr: \"{self.host}:{self.port}\"\n"  # quoted: [::1]:P is YAML flow
            + (f"  tls:\n    certificate: {self.tls_cert.cert}\n"
               f"    key: {self.tls_cert.key}\n" if self.tls_cert is not None else "")
            + (auth.config() if auth is not None else "")
            + (f"proxy:\n  remoteurl: {proxy_remote}\n" if proxy_remote is not None else "")
        )
        self.auth = auth

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls_cert is not None else 'http'}://{self.address}"

    def requests_seen(self, method: str, path_prefix: str) -> int:
        """Requests whose method and path match, from the access log (``access_log=True``):
        what really reached the registry, whatever any client of it counted."""
        needle = f'"{method} {path_prefix}'
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return sum(needle in line for line in text.splitlines())

    def _answers(self) -> bool:
        """Up when /v2/ answers 200, or 401 when the registry has auth."""
        context = (ssl.create_default_context(cafile=str(self.tls_cert.cert))
                   if self.tls_cert is not None else None)
        try:
            with urllib.request.urlopen(f"{self.url}/v2/", timeout=1,
                                        context=context) as response:
                return bool(response.status == 200)
        except urllib.error.HTTPError as err:
            return self.auth is not None and err.code == 401

    def start(self, timeout: float = 15.0) -> DistributionRegistry:
        self._proc = spawn(["docker-registry", "serve", str(self.config)], self.log)
        try:
            wait_until(self._answers, timeout, f"docker-registry on {self.address} "
                                               f"(log: {self.log})")
        except TimeoutError:
            self.close()
            raise
        return self

    def stop(self) -> None:
        """Stop the process but keep storage, e.g. to make the upstream 'go down'."""
        if self._proc is not None:
            stop(self._proc)
            self._proc = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int:
        """The running process's id (for a benchmark's CPU figures)."""
        assert self._proc is not None, "start it first"
        return self._proc.pid

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> DistributionRegistry:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
