"""Which URL a request's registry means when meshmirror asks the upstream itself.

containerd sends the registry a pull was for as ``?ns=<registry>``. The URL to
ask is what containerd itself would have used: the ``server`` of that
registry's ``hosts.toml`` when there is one (an operator may point ``docker.io``
at an internal proxy), else ``https://<registry>``, with Docker Hub's registry
API living on ``registry-1.docker.io`` rather than ``docker.io``. An explicit
mapping wins over both, for tests and for operators who need it.

The same files say which registries this node mirrors at all: those whose
hosts.toml (the registry's own, else ``_default``'s) has a ``[host."..."]``
entry that reaches this node. Only those are asked anything upstream, so a
client's ``?ns=`` cannot make the node talk to a host of the client's choosing.
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from meshmirror.addresses import parse_host_port
from meshmirror.containerd.hostsconfig import HEADER as CONFIGURE_HEADER
from meshmirror.oci.reference import DOCKER_HUB, validate_registry

DOCKER_HUB_API = "https://registry-1.docker.io"
HOSTS_FILE = "hosts.toml"
DEFAULT_HOST_DIR = "_default"
_MAX_HOSTS_FILE = 1024 * 1024
# How a node's own registry may be named in a hosts.toml entry besides its address.
_LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})


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


def entry_reaches(entry: str, own_url: str) -> bool:
    """Whether a hosts.toml ``[host."URL"]`` entry reaches the registry at ``own_url``:
    the same port, on this node's address or on loopback."""
    own = urlsplit(own_url)
    parts = urlsplit(entry if "://" in entry else f"http://{entry}")
    try:
        same_port = parts.port == own.port
    except ValueError:
        return False
    return same_port and parts.hostname in _LOOPBACK_NAMES | {own.hostname}


@dataclass(frozen=True, slots=True)
class HostsFile:
    """What one hosts.toml says: its ``server`` (None without one) and its host entries."""

    server: str | None
    hosts: tuple[str, ...]
    # Written by `meshmirror configure`: its entries are the mesh's mirrors, whatever
    # address this node's own registry goes by.
    by_meshmirror: bool = False


class _Absent:
    """No hosts.toml at that path (as opposed to one without a ``server``)."""


ABSENT = _Absent()


def read_hosts_toml(path: Path) -> HostsFile | _Absent:
    """One hosts.toml, or :data:`ABSENT` without the file.

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
    hosts = document.get("host")
    entries = tuple(hosts) if isinstance(hosts, dict) else ()
    ours = raw.startswith(CONFIGURE_HEADER.encode())
    server = document.get("server")
    if server is None:
        return HostsFile(None, entries, ours)
    if not isinstance(server, str):
        raise EndpointError(f"{path}: server is not a string")
    return HostsFile(_normalise_server(server, str(path)), entries, ours)


class UpstreamEndpoints:
    """Registry name -> base URL (no trailing slash; ``/v2/...`` is appended to it)."""

    def __init__(self, config_path: Path | None = None,
                 overrides: Mapping[str, str] | None = None,
                 mirror_urls: Sequence[str] = ()) -> None:
        """``config_path``: containerd's registry ``config_path`` (``/etc/containerd/certs.d``);
        ``mirror_urls``: this node's registry as peers and hosts.toml entries name it."""
        self._config_path = config_path
        self._mirror_urls = tuple(mirror_urls)
        # A parsed hosts.toml per path, kept while the file's size and mtime stay the
        # same: a lookup costs a stat, not a read and a TOML parse, per request.
        self._parsed: dict[Path, tuple[tuple[int, int], HostsFile]] = {}
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
        hosts = self._hosts_file(registry)
        if hosts is not None and hosts.server is not None:
            return hosts.server
        return default_server(registry)

    def sends_here(self, registry: str) -> bool:
        """Whether containerd's hosts.toml for ``registry`` has an entry reaching this node
        (or was written by ``meshmirror configure``).

        True for a registry mapped explicitly, and when this node's URL or the
        configuration directory is not known (a client built without them).
        """
        validate_registry(registry)
        if registry in self._overrides or not self._mirror_urls or self._config_path is None:
            return True
        hosts = self._hosts_file(registry)
        return hosts is not None and (hosts.by_meshmirror or any(
            entry_reaches(entry, own) for entry in hosts.hosts for own in self._mirror_urls))

    def _hosts_file(self, registry: str) -> HostsFile | None:
        """The hosts.toml containerd uses for ``registry``: its own, else ``_default``'s."""
        if self._config_path is None:
            return None
        for directory in (registry, DEFAULT_HOST_DIR):
            hosts = self._read(self._config_path / directory / HOSTS_FILE)
            if not isinstance(hosts, _Absent):
                return hosts
        return None

    def _read(self, path: Path) -> HostsFile | _Absent:
        """`read_hosts_toml`, read again only when the file changed."""
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
        hosts = read_hosts_toml(path)
        if not isinstance(hosts, _Absent):
            self._parsed[path] = (version, hosts)
        return hosts
