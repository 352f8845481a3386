"""Checks that a node's containerd can work with meshmirror, each with its fix.

``meshmirror run --store containerd`` calls :func:`startup_gate` before it
starts anything, so a misconfigured node fails at once with one line per
problem instead of serving nothing; ``meshmirror doctor`` runs the same checks
and more. Each check returns a :class:`CheckResult` rather than raising, so a
caller can print every problem in one go.

containerd is asked through its gRPC API with hand-encoded messages (Version
and Namespaces.List take a single string field at most), so the checks need no
generated stubs and stay synchronous: they run before any event loop exists.
"""

from __future__ import annotations

import os
import stat
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TextIO

import grpc

from meshmirror.containerd.config import ContainerdConfig

NAMESPACE_METADATA = "containerd-namespace"
_VERSION_METHOD = "/containerd.services.version.v1.Version/Version"
_NAMESPACE_LIST_METHOD = "/containerd.services.namespaces.v1.Namespaces/List"
_CRI_V1 = "cri"
_CRI_V2 = "io.containerd.grpc.v1.cri"
_CRI_V3_IMAGES = "io.containerd.cri.v1.images"
DEFAULT_TIMEOUT = 3.0


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One check's outcome; ``problem`` and ``fix`` are one line each when it failed."""

    name: str
    ok: bool
    detail: str = ""  # what was found, for the ok case
    problem: str = ""
    fix: str = ""
    skipped: bool = False  # could not be checked (e.g. config unreadable); not a failure

    def line(self) -> str:
        """The one-line form printed by ``run`` and ``doctor``."""
        if self.skipped:
            return f"skip  {self.name}: {self.detail}"
        if self.ok:
            return f"ok    {self.name}: {self.detail}"
        return f"FAIL  {self.name}: {self.problem} -> fix: {self.fix}"


def _passed(name: str, detail: str) -> CheckResult:
    return CheckResult(name, True, detail=detail)


def _failed(name: str, problem: str, fix: str) -> CheckResult:
    return CheckResult(name, False, problem=problem, fix=fix)


def _skipped(name: str, detail: str) -> CheckResult:
    return CheckResult(name, True, detail=detail, skipped=True)


def _fields(message: bytes) -> list[tuple[int, bytes]]:
    """The length-delimited fields of a protobuf message, in order; others are skipped."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(message):
        key, pos = _varint(message, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(message, pos)
        elif wire == 2:
            length, pos = _varint(message, pos)
            out.append((field, message[pos : pos + length]))
            pos += length
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    return out


def _decode_string_field(message: bytes, number: int) -> str:
    """The first string field ``number`` of a protobuf message; '' when absent."""
    for field, value in _fields(message):
        if field == number:
            return value.decode(errors="replace")
    return ""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(data):
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise ValueError("truncated varint")


def _unary(socket_path: str, method: str, request: bytes, namespace: str | None,
           timeout: float) -> bytes:
    metadata = ((NAMESPACE_METADATA, namespace),) if namespace else None
    with grpc.insecure_channel(f"unix://{socket_path}") as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        response: bytes = call(request, timeout=timeout, metadata=metadata)
        return response


def check_socket(socket_path: str, timeout: float = DEFAULT_TIMEOUT) -> CheckResult:
    """The socket exists, is a socket, and containerd answers a Version call on it."""
    name = "containerd socket"
    fix_flag = "--containerd-sock (MESHMIRROR_CONTAINERD_SOCK)"
    try:
        mode = os.stat(socket_path).st_mode
    except FileNotFoundError:
        return _failed(name, f"{socket_path} does not exist",
                       f"start containerd, or point {fix_flag} at its socket "
                       "([grpc] address in its config)")
    except PermissionError:
        return _failed(name, f"{socket_path} cannot be reached (permission denied)",
                       "run meshmirror as root or mount the socket's directory into the pod")
    if not stat.S_ISSOCK(mode):
        return _failed(name, f"{socket_path} is not a socket",
                       f"point {fix_flag} at containerd's socket ([grpc] address)")
    try:
        reply = _unary(socket_path, _VERSION_METHOD, b"", None, timeout)
    except grpc.RpcError as err:
        return _failed(name, f"containerd does not answer on {socket_path} "
                             f"({_code_name(err)})",
                       "check that containerd is running (systemctl status containerd) and "
                       "listening on that socket")
    version = _decode_string_field(reply, 1) or "unknown version"
    return _passed(name, f"{socket_path} answers (containerd {version})")


def _code_name(err: grpc.RpcError) -> str:
    code = err.code() if isinstance(err, grpc.Call) else None
    return code.name if code is not None else type(err).__name__


def list_namespaces(socket_path: str, timeout: float = DEFAULT_TIMEOUT) -> list[str]:
    """Names of containerd's namespaces (Namespaces.List: repeated Namespace{name=1} = 1).

    List rather than Get, because containerd 1.6 answers Get for a namespace that
    does not exist with an empty record instead of NOT_FOUND.
    """
    reply = _unary(socket_path, _NAMESPACE_LIST_METHOD, b"", None, timeout)
    return [_decode_string_field(ns, 1) for field, ns in _fields(reply) if field == 1]


def check_namespace(socket_path: str, namespace: str,
                    timeout: float = DEFAULT_TIMEOUT) -> CheckResult:
    """The namespace whose images meshmirror shares exists in containerd."""
    name = "containerd namespace"
    try:
        names = list_namespaces(socket_path, timeout)
    except grpc.RpcError as err:
        return _failed(name, f"cannot list containerd's namespaces ({_code_name(err)})",
                       "check that containerd is running and answering on its socket")
    if namespace not in names:
        existing = ", ".join(sorted(names)) or "none"
        return _failed(name, f"namespace {namespace!r} does not exist in containerd "
                             f"(it has: {existing})",
                       "set --containerd-namespace (MESHMIRROR_CONTAINERD_NAMESPACE) to the "
                       "namespace your images are in (k8s.io for Kubernetes)")
    return _passed(name, f"{namespace!r} exists")


def _table(data: Mapping[str, Any], *keys: str) -> Mapping[str, Any]:
    node: Any = data
    for key in keys:
        node = node.get(key, {}) if isinstance(node, Mapping) else {}
    return node if isinstance(node, Mapping) else {}


def _cri_sections(
    config: Mapping[str, Any],
) -> tuple[int, str, Mapping[str, Any], Mapping[str, Any]]:
    """(version, plugin id, registry table, table holding discard_unpacked_layers)."""
    version = config.get("version", 1)
    plugins = _table(config, "plugins")
    if version == 3:
        images = _table(plugins, _CRI_V3_IMAGES)
        return 3, _CRI_V3_IMAGES, _table(images, "registry"), images
    plugin_id = _CRI_V1 if version == 1 else _CRI_V2
    cri = _table(plugins, plugin_id)
    return int(version), plugin_id, _table(cri, "registry"), _table(cri, "containerd")


def check_containerd_config(config_file: str,
                            registry_config_path: str | None = None) -> list[CheckResult]:
    """containerd's config uses hosts.toml (config_path) and keeps unpacked layers.

    Without ``config_path`` CRI pulls never read hosts.toml, so the mirror is
    never asked; with ``discard_unpacked_layers`` containerd deletes layer blobs
    after unpacking, so this node has nothing to share. Both are read from the
    v1, v2 and v3 (containerd 2) layouts. An unreadable config is skipped, not
    failed: in a pod it is often simply not mounted.
    """
    path_name = "containerd config_path"
    discard_name = "containerd discard_unpacked_layers"
    try:
        with open(config_file, "rb") as f:
            config = tomllib.load(f)
    except OSError as err:
        reason = f"{config_file} not readable ({err.strerror}); skipped"
        return [_skipped(path_name, reason), _skipped(discard_name, reason)]
    except tomllib.TOMLDecodeError as err:
        problem = f"{config_file} is not valid TOML ({err})"
        return [_failed(path_name, problem, "fix the file, or point --containerd-config at "
                                            "containerd's real config")]
    version, plugin_id, registry, discard_table = _cri_sections(config)
    if version not in (1, 2, 3):
        return [_skipped(path_name, f"{config_file}: config version {version} unknown; skipped")]
    disabled = config.get("disabled_plugins", [])
    if isinstance(disabled, list) and ({plugin_id, _CRI_V1, _CRI_V2} & set(disabled)):
        reason = (f"the CRI plugin is disabled in {config_file}, so only clients given "
                  "--hosts-dir read hosts.toml; skipped")
        return [_skipped(path_name, reason), _skipped(discard_name, reason)]
    results: list[CheckResult] = []
    section = f'[plugins."{plugin_id}".registry]'
    raw_path = registry.get("config_path")
    if isinstance(raw_path, str) and raw_path:
        paths = [p for p in raw_path.split(":") if p]
    elif version == 3 and raw_path is None:
        # containerd 2 reads hosts.toml from these unless told otherwise.
        paths = ["/etc/containerd/certs.d", "/etc/docker/certs.d"]
    else:
        paths = []
    if not paths:
        results.append(_failed(
            path_name, f"{config_file} does not set config_path in {section}, so containerd "
                       "never reads hosts.toml",
            f"add config_path = \"{registry_config_path or '/etc/containerd/certs.d'}\" under "
            f"{section} and restart containerd"))
    elif registry_config_path is not None and \
            os.path.normpath(registry_config_path) not in {os.path.normpath(p) for p in paths}:
        results.append(_failed(
            path_name, f"containerd reads hosts.toml from {':'.join(paths)}, but meshmirror "
                       f"writes {registry_config_path}",
            f"set --containerd-registry-config-path to {paths[0]}, or config_path in "
            f"{section} to {registry_config_path}"))
    elif _table(registry, "mirrors") and version != 3:
        results.append(_failed(
            path_name, f"{section} sets both config_path and the deprecated mirrors table; "
                       "containerd refuses that combination",
            f"move the entries of {section[:-1]}.mirrors] into hosts.toml files and delete it"))
    else:
        results.append(_passed(path_name, f"hosts.toml read from {':'.join(paths)}"))
    if discard_table.get("discard_unpacked_layers") is True:
        results.append(_failed(
            discard_name, f"{config_file} sets discard_unpacked_layers = true: containerd "
                          "deletes layers after unpacking, so this node has nothing to share",
            "set discard_unpacked_layers = false and restart containerd"))
    else:
        results.append(_passed(discard_name, "layers are kept after unpacking"))
    return results


def run_startup_checks(containerd: ContainerdConfig,
                       registry_config_path: str | None = None) -> list[CheckResult]:
    """Every check ``run --store containerd`` needs: socket, namespace, config.

    The namespace check is skipped when the socket check failed, so one root
    cause prints one line.
    """
    results = [check_socket(containerd.sock)]
    if results[0].ok:
        results.append(check_namespace(containerd.sock, containerd.namespace))
    else:
        results.append(_skipped("containerd namespace", "containerd not reachable; skipped"))
    results.extend(check_containerd_config(containerd.config, registry_config_path))
    return results


def startup_gate(containerd: ContainerdConfig, out: TextIO | None = None) -> int:
    """Run the startup checks; print one line per failure and return 1, else return 0."""
    stream = out if out is not None else sys.stderr
    failures = [r for r in run_startup_checks(containerd) if not r.ok]
    for result in failures:
        print(f"meshmirror: {result.problem}; fix: {result.fix}", file=stream)
    return 1 if failures else 0

