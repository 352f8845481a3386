"""``meshmirror doctor``: every check a node needs, each printed with its fix.

It runs the startup checks of ``run`` (containerd socket, namespace, config),
then what only a whole node shows: hosts.toml exists for each mirrored
registry and sends pulls to this node's registry first, and that registry
answers ``GET /v2/``. Exit 0 only when nothing failed; checks that could not
be made (an unreadable containerd config in a pod) print ``skip`` and do not
fail, because doctor cannot know whether they matter.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

from meshmirror.addresses import format_host_port, is_wildcard
from meshmirror.containerd.checks import CheckResult, run_startup_checks, version_of
from meshmirror.containerd.config import DoctorConfig
from meshmirror.containerd.hostsconfig import DEFAULT_HOST_DIR, HOSTS_FILE, MirroredRegistry

DEFAULT_TIMEOUT = 2.0
__all__ = ["DoctorConfig", "doctor_command", "run_doctor"]


def registry_endpoint(registry_addr: tuple[str, int]) -> tuple[str, int]:
    """(host, port) with host '' when the registry listens on every address."""
    host, port = registry_addr
    return ("" if is_wildcard(host) else host), port


def _is_local_address(host: str) -> bool:
    """Whether ``host`` is an address of this machine: binding to it only works if so."""
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
        except OSError:
            return False
        return any(_is_local_address(str(info[4][0])) for info in infos)
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((str(ip), 0))
    except OSError:
        return False
    return True


def points_at_this_node(target: str, registry_host: str, registry_port: int) -> bool:
    """A hosts.toml entry URL reaches this node's registry listener."""
    parts = urlsplit(target)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return False
    host = parts.hostname or ""
    if port != registry_port:
        return False
    if registry_host:
        return host == registry_host.strip("[]")
    return _is_local_address(host)


def check_hosts_file(
    config_path: Path,
    registry: MirroredRegistry,
    registry_addr: tuple[str, int],
    expected_targets: Sequence[str] = (),
) -> CheckResult:
    """``<config_path>/<registry>/hosts.toml`` exists and tries this node's mirror."""
    name = f"hosts.toml {registry.directory}"
    path = config_path / registry.directory / HOSTS_FILE
    configure_fix = (f"run `meshmirror configure --containerd-registry-config-path {config_path}"
                     f" --mirror-targets http://<this node>:{registry_endpoint(registry_addr)[1]}"
                     + ("" if registry.server is None
                        else f" --mirrored-registries {registry.directory}") + "`")
    try:
        with path.open("rb") as f:
            data: dict[str, Any] = tomllib.load(f)
    except FileNotFoundError:
        return CheckResult(name, False, problem=f"{path} does not exist, so containerd pulls "
                                                f"{registry.directory} without the mirror",
                           fix=configure_fix)
    except (OSError, tomllib.TOMLDecodeError) as err:
        return CheckResult(name, False, problem=f"{path} cannot be read ({err})",
                           fix=configure_fix)
    hosts = data.get("host", {})
    hosts = hosts if isinstance(hosts, dict) else {}
    pulls = [url for url, entry in hosts.items()
             if isinstance(entry, dict) and "pull" in entry.get("capabilities", ["pull"])]
    if expected_targets:
        return _check_expected_targets(name, path, pulls, expected_targets, configure_fix)
    registry_host, registry_port = registry_endpoint(registry_addr)
    ours = [url for url in pulls if points_at_this_node(url, registry_host, registry_port)]
    if not ours:
        listed = ", ".join(hosts) or "no [host] entries"
        return CheckResult(name, False,
                           problem=f"{path} does not send pulls to this node's registry "
                                   f"({format_host_port(*registry_addr)}); it lists {listed}",
                           fix=configure_fix)
    return CheckResult(name, True, detail=f"{path} tries {ours[0]}")


def _check_expected_targets(name: str, path: Path, pulls: Sequence[str],
                            expected: Sequence[str], fix: str) -> CheckResult:
    """hosts.toml tries the given targets first, in their order.

    The targets given to doctor are the ones this node's ``configure``/``run`` was
    told to write (in a pod: the same MESHMIRROR_MIRROR_TARGETS), so they stand for
    this node's registry even when their port is not the registry's own: the chart's
    hostPort and NodePort both lead to it, a mapping only Kubernetes knows. Any other
    entry ahead of them would make containerd try it first.
    """
    head = list(pulls[: len(expected)])
    if head == list(expected):
        return CheckResult(name, True, detail=f"{path} tries {', '.join(expected)} first")
    missing = [t for t in expected if t not in pulls]
    if missing:
        problem = f"{path} lacks the mirror targets {', '.join(missing)}"
    else:
        problem = (f"{path} tries {', '.join(head)} before this node's mirror targets "
                   f"{', '.join(expected)}")
    return CheckResult(name, False, problem=problem, fix=fix)


def lookup_dirs(registry: str) -> list[str]:
    """The directories containerd tries for ``registry``, in order (hostPaths, containerd
    1.6 to 2.x): ``host_port_`` before ``host:port``, then ``_default``."""
    host, sep, port = registry.rpartition(":")
    ahead = [f"{host}_{port}_"] if sep and host and not registry.endswith("]") else []
    return [*ahead, registry, DEFAULT_HOST_DIR]


def check_shadowing(config_path: Path, registries: Sequence[MirroredRegistry],
                    registry_addr: tuple[str, int],
                    expected_targets: Sequence[str] = ()) -> list[CheckResult]:
    """Directories containerd picks ahead of the ones meshmirror wrote, lacking the mirror.

    containerd uses the first of ``host_port_``, ``host:port`` and ``_default`` that
    exists, so a ``docker.io/hosts.toml`` written later by another tool (k3s's
    registries.yaml, user data) takes docker.io's pulls away from ``_default``
    silently, and a ``host_port_`` directory does the same to ``host:port``.
    """
    written = {r.directory for r in registries}
    try:
        present = sorted(entry.name for entry in config_path.iterdir() if entry.is_dir())
    except OSError:
        return []
    results = []
    for name in present:
        if name in written or name.startswith("_"):
            continue
        shadowed = [r.directory for r in registries
                    if name in lookup_dirs(r.directory)[:-1] or
                    (r.directory == DEFAULT_HOST_DIR and name not in written)]
        # A directory without hosts.toml (certificates only) shadows as much: containerd
        # then pulls that registry with its certificates and no mirror.
        if not shadowed:
            continue
        found = check_hosts_file(config_path, MirroredRegistry(name, None), registry_addr,
                                 expected_targets)
        if found.ok:
            continue
        path = config_path / name / HOSTS_FILE
        why = (found.problem.removeprefix(f"{path} ") if path.exists() else
               f"holds no {HOSTS_FILE}, so containerd pulls {name} without the mirror")
        results.append(CheckResult(
            f"hosts.toml {name}", False,
            problem=f"{path.parent} is used for {name} instead of {shadowed[0]}/{HOSTS_FILE} "
                    f"and {why}",
            fix=f"remove {config_path / name} so containerd falls back to "
                f"{shadowed[0]}/{HOSTS_FILE}, or list this node's mirror targets first in it"))
    return results


def ipv6_host_headers(text: str) -> list[str]:
    """The ``[host."..."]`` headers whose key holds a bracket (an IPv6 address).

    containerd 1.6 and 1.7 parse hosts.toml with go-toml v1, whose table-header lexer
    stops at the first ``]`` even inside quotes (escaped as ``\\u005D`` too): the file
    fails to decode and containerd pulls as if it did not exist. containerd 2 reads it.
    No other form works on both (an inline ``[host]`` table is ignored by 2.x), so
    configure writes the standard one and doctor says where it cannot work.
    """
    found = []
    for line in text.splitlines():
        header = line.strip()
        if not header.startswith("[host.") or header.startswith("[["):
            continue
        key = header[len("[host."):].strip()
        quote = key[:1]
        if quote in ("'", '"'):
            end = key.find(quote, 1)
            inner = key[1:end] if end > 0 else key[1:]
            if "]" in inner or "[" in inner or "\\u005" in inner.lower():
                found.append(header)
    return found


def check_hosts_parse(config_path: Path, registries: Sequence[MirroredRegistry],
                      containerd_version: tuple[int, int] | None) -> list[CheckResult]:
    """hosts.toml files containerd 1.x cannot decode because of an IPv6 mirror address."""
    if containerd_version is None or containerd_version >= (2, 0):
        return []
    results = []
    for registry in registries:
        path = config_path / registry.directory / HOSTS_FILE
        try:
            headers = ipv6_host_headers(path.read_text(errors="replace"))
        except OSError:
            continue
        if headers:
            version = ".".join(map(str, containerd_version))
            results.append(CheckResult(
                f"hosts.toml {registry.directory}", False,
                problem=f"{path} has {headers[0]}: containerd {version} cannot parse an IPv6 "
                        "address in a [host] header, so it ignores the file and pulls "
                        "without the mirror",
                fix="give the mirror targets a host name instead of an IPv6 address "
                    "(--mirror-targets; the chart's service.registry.mirrorHost), or upgrade "
                    "containerd to 2.x"))
    return results


def check_registry(registry_addr: tuple[str, int],
                   timeout: float = DEFAULT_TIMEOUT) -> CheckResult:
    """This node's registry accepts a TCP connection and answers ``GET /v2/`` with 200."""
    name = "registry"
    host, port = registry_endpoint(registry_addr)
    connect_host = host.strip("[]") or "127.0.0.1"
    where = f"{connect_host}:{port}" if ":" not in connect_host else f"[{connect_host}]:{port}"
    fix = ("start `meshmirror run` on this node, or set --registry-addr to the address it "
           "listens on")
    conn = http.client.HTTPConnection(connect_host, port, timeout=timeout)
    try:
        try:
            conn.connect()
        except OSError as err:
            return CheckResult(name, False, problem=f"cannot connect to {where} ({err})", fix=fix)
        try:
            conn.request("GET", "/v2/")
            response = conn.getresponse()
            response.read(4096)
        except (OSError, http.client.HTTPException) as err:
            return CheckResult(name, False, problem=f"{where} accepted a connection but did not "
                                                    f"answer GET /v2/ ({err})", fix=fix)
    finally:
        conn.close()
    if response.status != 200:
        return CheckResult(name, False,
                           problem=f"GET http://{where}/v2/ answered {response.status}, not 200",
                           fix="make sure --registry-addr is meshmirror's registry, not another "
                               "service on that port")
    return CheckResult(name, True, detail=f"GET http://{where}/v2/ answered 200")


def run_doctor(config: DoctorConfig) -> list[CheckResult]:
    """Every check, in the order a person fixing the node would want them."""
    config_path = config.hosts.config_path
    results = run_startup_checks(config.containerd, registry_config_path=str(config_path))
    hosts = [check_hosts_file(config_path, r, config.registry_addr, config.hosts.targets)
             for r in config.hosts.registries]
    hosts += check_shadowing(config_path, config.hosts.registries, config.registry_addr,
                             config.hosts.targets)
    hosts += check_hosts_parse(config_path, config.hosts.registries, version_of(results[0]))
    if not config.containerd_mirror_add:
        hosts = [as_information(r) for r in hosts]
    results.extend(hosts)
    results.append(check_registry(config.registry_addr))
    return results


def as_information(result: CheckResult) -> CheckResult:
    """A hosts.toml check for a node whose owner manages hosts.toml: what it found, no verdict."""
    found = result.detail if result.ok else f"{result.problem} (would be fixed by: {result.fix})"
    return CheckResult(result.name, True, detail=f"{found}; hosts.toml is managed outside "
                                                 "meshmirror (--containerd-mirror-add false)",
                       info=True)


def doctor_command(config: DoctorConfig, out: TextIO | None = None) -> int:
    stream = out if out is not None else sys.stdout
    results = run_doctor(config)
    for result in results:
        print(result.line(), file=stream)
    failed = sum(not r.ok for r in results)
    print(f"{failed} problem(s) found" if failed else "all checks passed", file=stream)
    return 1 if failed else 0
