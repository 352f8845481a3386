"""Which URL a request's registry means when meshmirror asks the upstream itself.

containerd sends the registry a pull was for as ``?ns=<registry>``. The URL to
ask is what containerd itself would have used: the ``server`` of that
registry's ``hosts.toml`` when there is one (an operator may point ``docker.io``
at an internal proxy), else ``https://<registry>``, with Docker Hub's registry
API living on ``registry-1.docker.io`` rather than ``docker.io``. An explicit
mapping wins over both, for tests and for operators who need it.
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from meshmirror.addresses import parse_host_port
from meshmirror.oci.reference import DOCKER_HUB, validate_registry

DOCKER_HUB_API = "https://registry-1.docker.io"
HOSTS_FILE = "hosts.toml"
DEFAULT_HOST_DIR = "_default"
_MAX_HOSTS_FILE = 1024 * 1024


class EndpointError(ValueError):
    """A hosts.toml or mapping whose ``server`` is not an http(s) URL."""


def _normalise_server(server: str, source: str) -> str:
    parts = urlsplit(server.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query:
        raise EndpointError(f"{source}: server {server[:200]!r} is not an http(s) URL")
    if parts.netloc == DOCKER_HUB:
        return DOCKER_HUB_API
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def default_server(registry: str) -> str:
    """The URL with no configuration: HTTPS on the registry's own name.

    A registry on this machine's loopback is spoken to in plain HTTP, as containerd
    does for localhost registries without a hosts.toml ``server``.
    """
    if registry == DOCKER_HUB:
        return DOCKER_HUB_API
    return f"http://{registry}" if _is_loopback(registry) else f"https://{registry}"


def _is_loopback(registry: str) -> bool:
    host, _ = parse_host_port(registry, default_port=443)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Absent:
    """No hosts.toml at that path (as opposed to one without a ``server``)."""


ABSENT = _Absent()


def server_from_hosts_toml(path: Path) -> str | _Absent | None:
    """The ``server`` of one hosts.toml; None without the key, :data:`ABSENT` without the file.

    A file that exists but cannot be read or parsed raises :class:`EndpointError`:
    guessing a different upstream than containerd uses would be worse than saying so.
    """
    try:
        with path.open("rb") as f:
            raw = f.read(_MAX_HOSTS_FILE + 1)
    except FileNotFoundError:
        return ABSENT
    except OSError as err:
        raise EndpointError(f"{path}: {err}") from err
    if len(raw) > _MAX_HOSTS_FILE:
        raise EndpointError(f"{path}: larger than {_MAX_HOSTS_FILE} bytes")
    try:
        document = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise EndpointError(f"{path}: {err}") from err
    server = document.get("server")
    if server is None:
        return None
    if not isinstance(server, str):
        raise EndpointError(f"{path}: server is not a string")
    return _normalise_server(server, str(path))


class UpstreamEndpoints:
    """Registry name -> base URL (no trailing slash; ``/v2/...`` is appended to it)."""

    def __init__(self, config_path: Path | None = None,
                 overrides: Mapping[str, str] | None = None) -> None:
        """``config_path``: containerd's registry ``config_path`` (``/etc/containerd/certs.d``)."""
        self._config_path = config_path
        # A parsed hosts.toml per path, kept while the file's size and mtime stay the
        # same: a lookup costs a stat, not a read and a TOML parse, per request.
        self._parsed: dict[Path, tuple[tuple[int, int], str | None]] = {}
        self._overrides = {registry: _normalise_server(url, f"mapping for {registry}")
                           for registry, url in (overrides or {}).items()}

    def url_for(self, registry: str) -> str:
        """Re-read hosts.toml on each call, as containerd does on each pull.

        containerd reads ``<config_path>/<registry>/hosts.toml`` and, only when that
        file is absent, ``<config_path>/_default/hosts.toml``; a file without a
        ``server`` means the registry's own default.
        """
        validate_registry(registry)
        if registry in self._overrides:
            return self._overrides[registry]
        if self._config_path is not None:
            for directory in (registry, DEFAULT_HOST_DIR):
                server = self._server_of(self._config_path / directory / HOSTS_FILE)
                if server is not ABSENT:
                    return server if isinstance(server, str) else default_server(registry)
        return default_server(registry)

    def _server_of(self, path: Path) -> str | _Absent | None:
        """`server_from_hosts_toml`, read again only when the file changed."""
        try:
            stat = path.stat()
        except FileNotFoundError:
            self._parsed.pop(path, None)
            return ABSENT
        except OSError as err:
            raise EndpointError(f"{path}: {err}") from err
        version = (stat.st_mtime_ns, stat.st_size)
        cached = self._parsed.get(path)
        if cached is not None and cached[0] == version:
            return cached[1]
        server = server_from_hosts_toml(path)
        if not isinstance(server, _Absent):
            self._parsed[path] = (version, server)
        return server
