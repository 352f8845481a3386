"""Checks that a node's containerd can work with meshmirror, each with its fix.

``meshmirror run --store containerd`` calls :func:`startup_gate` before it
starts anything, so a misconfigured node fails at once with one line per
problem instead of serving nothing; ``meshmirror doctor`` runs the same checks
and more. Each check returns a :class:`CheckResult` rather than raising, so a
caller can print every problem in one go.

containerd is asked through its gRPC API with hand-encoded messages (Version
and Namespaces.List take a single string field at most), so the checks need no
generated stubs and stay synchronous: they run before any event loop exists
(`rpc.call_blocking`, on the same framing as the store's client, not grpcio, whose
import alone was 9 MiB of a node's resident memory).
"""

from __future__ import annotations

import os
import re
import stat
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from meshmirror.containerd.config import ContainerdConfig
from meshmirror.containerd.loadconfig import (
    CRI_V1,
    CRI_V2,
    CRI_V3_IMAGES,
    ConfigLoadError,
    ImageSettings,
    load_image_settings,
    table,
)
from meshmirror.containerd.rpc import RpcError, call_blocking

NAMESPACE_METADATA = "containerd-namespace"
_VERSION_METHOD = "/containerd.services.version.v1.Version/Version"
_NAMESPACE_LIST_METHOD = "/containerd.services.namespaces.v1.Namespaces/List"
DEFAULT_TIMEOUT = 3.0
# Where k3s and RKE2 keep the config their embedded containerd runs with. Each rewrites
# config.toml at every start, from config.toml.tmpl when that exists.
DISTRIBUTION_CONFIGS = (
    ("k3s", "/var/lib/rancher/k3s/agent/etc/containerd/config.toml"),
    ("RKE2", "/var/lib/rancher/rke2/agent/etc/containerd/config.toml"),
)
TRANSFER_CHECK = "containerd transfer service"
IMPORTS_CHECK = "containerd imports"
# containerd 2.2's config_path when the config leaves it empty (and sets no mirrors).
DEFAULT_CONFIG_PATH_LIST = "/etc/containerd/certs.d:/etc/docker/certs.d"
V3_KEYS_CHECK = "containerd config version 3 keys"


@dataclass(frozen=True, slots=True)
class KnownBehaviour:
    """A containerd behaviour a check depends on, and the versions that have it.

    One table, so a new containerd release is one row to review, and
    docs/compatibility.md can say the same thing the checks do.
    """

    key: str
    since: tuple[int, int]
    until: tuple[int, int] | None  # first version without it; None: still there
    what: str
    reference: str

    def applies(self, version: tuple[int, int] | None) -> bool | None:
        """Whether ``version`` has it; None when the version is unknown."""
        if version is None:
            return None
        return self.since <= version and (self.until is None or version < self.until)


KNOWN_BEHAVIOURS = (
    KnownBehaviour(
        "config_v3", (2, 0), None,
        "config version 3: CRI image settings (registry.config_path, "
        "discard_unpacked_layers, use_local_image_pull) live under "
        "[plugins.'io.containerd.cri.v1.images']; the v2 places under "
        "[plugins.\"io.containerd.grpc.v1.cri\"] are ignored in a version 3 file",
        "containerd docs/PLUGINS.md, RELEASES.md (2.0)"),
    KnownBehaviour(
        "transfer_service_ignores_config_path_list", (2, 1), None,
        "CRI pulls go through the transfer service unless use_local_image_pull = true; "
        "the transfer service ignores hosts.toml when config_path lists several "
        "directories, so the mirror is never asked",
        "containerd#12415, containerd#12636, spegel#1272"),
    KnownBehaviour(
        "transfer_service_local_pull_fallback", (2, 1), None,
        "CRI pulls without the transfer service (and so reads a config_path list) when the "
        "config sets something it cannot honour: disable_snapshot_annotations = false, "
        "discard_unpacked_layers = true, registry mirrors/configs/auths, "
        "max_concurrent_downloads other than 3, image_pull_with_sync_fs = true",
        "containerd internal/cri/config CheckLocalImagePullConfigs (2.1)"),
    KnownBehaviour(
        "default_config_path_list", (2, 2), None,
        "an empty or unset config_path (with no registry.mirrors) means "
        "/etc/containerd/certs.d:/etc/docker/certs.d; before 2.2 it means no hosts.toml",
        "containerd internal/cri/config/config_unix.go (2.2), plugins/cri/images (2.3)"),
    KnownBehaviour(
        "config_loading_v2", (2, 0), None,
        "a file without a version line (or version 1) is read as version 3, so v2 places "
        "are ignored; imports are merged key by key, the last file's value winning (1.x "
        "replaces a plugin's whole table); a version 2 file's CRI settings are moved into "
        "the images plugin, its containerd-table ones only when runtimes are also set",
        "containerd cmd/containerd/server/config, plugins/cri/images configMigration; "
        "containerd config dump of 1.6.20, 1.7.24, 2.1.9"),
    KnownBehaviour(
        "other_platform_manifests_kept", (2, 0), None,
        "pulls and imports keep every platform's manifest (pulls also their configs), "
        "so the node shares them too",
        "seen with containerd 2.1.9"),
)
_BEHAVIOURS = {b.key: b for b in KNOWN_BEHAVIOURS}


def parse_version(text: str) -> tuple[int, int] | None:
    """(major, minor) of a containerd version string ("v2.1.9", "1.6.20~ds1"); None if not one."""
    match = re.match(r"v?(\d+)\.(\d+)", text.strip())
    return (int(match[1]), int(match[2])) if match else None


def has_behaviour(key: str, version: tuple[int, int] | None) -> bool | None:
    return _BEHAVIOURS[key].applies(version)


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One check's outcome; ``problem`` and ``fix`` are one line each when it failed."""

    name: str
    ok: bool
    detail: str = ""  # what was found, for the ok case
    problem: str = ""
    fix: str = ""
    skipped: bool = False  # could not be checked (e.g. config unreadable); not a failure
    # A failure ``run`` warns about and serves anyway (peers can still use this node),
    # while ``doctor`` fails on it.
    warning: bool = False
    # Reported for information only: the node's owner, not meshmirror, manages it.
    info: bool = False

    def line(self) -> str:
        """The one-line form printed by ``run`` and ``doctor``."""
        if self.info:
            return f"info  {self.name}: {self.detail}"
        if self.skipped:
            return f"skip  {self.name}: {self.detail}"
        if self.ok:
            return f"ok    {self.name}: {self.detail}"
        return f"FAIL  {self.name}: {self.problem} -> fix: {self.fix}"


def _passed(name: str, detail: str) -> CheckResult:
    return CheckResult(name, True, detail=detail)


def _failed(name: str, problem: str, fix: str, warning: bool = False) -> CheckResult:
    return CheckResult(name, False, problem=problem, fix=fix, warning=warning)


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
    metadata = ((NAMESPACE_METADATA, namespace),) if namespace else ()
    return call_blocking(socket_path, method, request, metadata, timeout)


def version_of(result: CheckResult) -> tuple[int, int] | None:
    """The containerd version a passed socket check found ("... (containerd 2.1.9)")."""
    match = re.search(r"\(containerd (\S+)\)$", result.detail) if result.ok else None
    return parse_version(match[1]) if match else None


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
    except RpcError as err:
        return _failed(name, f"containerd does not answer on {socket_path} ({err.name})",
                       "check that containerd is running (systemctl status containerd) and "
                       "listening on that socket")
    version = _decode_string_field(reply, 1) or "unknown version"
    return _passed(name, f"{socket_path} answers (containerd {version})")


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
    except RpcError as err:
        return _failed(name, f"cannot list containerd's namespaces ({err.name})",
                       "check that containerd is running and answering on its socket")
    if namespace not in names:
        existing = ", ".join(sorted(names)) or "none"
        return _failed(name, f"namespace {namespace!r} does not exist in containerd "
                             f"(it has: {existing})",
                       "set --containerd-namespace (MESHMIRROR_CONTAINERD_NAMESPACE) to the "
                       "namespace your images are in (k8s.io for Kubernetes)")
    return _passed(name, f"{namespace!r} exists")


def locate_config(config_file: str,
                  distributions: Sequence[tuple[str, str]] = DISTRIBUTION_CONFIGS,
                  default: str = ContainerdConfig().config) -> tuple[str, str | None]:
    """(the config to read, the distribution it belongs to or None).

    When the default /etc/containerd/config.toml does not exist, k3s's and RKE2's
    places are tried, so doctor checks the config their containerd really runs with.
    """
    for distribution, path in distributions:
        if os.path.normpath(config_file) == os.path.normpath(path):
            return config_file, distribution
    if config_file == default and not os.path.exists(config_file):
        for distribution, path in distributions:
            if os.path.exists(path):
                return path, distribution
    return config_file, None


def _edit_hint(config_file: str, distribution: str | None) -> str:
    """Where a fix must be written for it to last."""
    if distribution is None:
        return ""
    template = os.path.join(os.path.dirname(config_file), "config-v3.toml.tmpl")
    return (f" ({distribution} rewrites {config_file} at every start: put the change in "
            f"{config_file}.tmpl, or {template} with containerd 2, based on the generated "
            "file)")


def check_containerd_config(config_file: str,
                            registry_config_path: str | None = None,
                            containerd_version: tuple[int, int] | None = None,
                            distributions: Sequence[tuple[str, str]] = DISTRIBUTION_CONFIGS,
                            ) -> list[CheckResult]:
    """containerd's config uses hosts.toml (config_path) and keeps unpacked layers.

    Without ``config_path`` CRI pulls never read hosts.toml, so the mirror is
    never asked; with ``discard_unpacked_layers`` containerd deletes layer blobs
    after unpacking, so this node has nothing to share. The settings are the ones
    containerd arrives at (loadconfig: imports, version, 2.x's migration). An
    unreadable config is skipped, not failed: in a pod it is often simply not
    mounted. ``containerd_version`` (from the socket) selects the known behaviours
    that apply (KNOWN_BEHAVIOURS).
    """
    path_name = "containerd config_path"
    discard_name = "containerd discard_unpacked_layers"
    config_file, distribution = locate_config(config_file, distributions)
    hint = _edit_hint(config_file, distribution)
    containerd2 = None if containerd_version is None else containerd_version >= (2, 0)
    try:
        loaded = load_image_settings(config_file, containerd2)
    except OSError as err:
        reason = f"{config_file} not readable ({err.strerror}); skipped"
        return [_skipped(path_name, reason), _skipped(discard_name, reason)]
    except ConfigLoadError as err:
        return [_failed(path_name, str(err), "fix the file, or point --containerd-config at "
                                             "containerd's real config")]
    version = loaded.version
    if version not in (1, 2, 3):
        return [_skipped(path_name, f"{config_file}: config version {version} unknown; skipped")]
    if {CRI_V1, CRI_V2, CRI_V3_IMAGES} & set(loaded.disabled_plugins):
        reason = (f"the CRI plugin is disabled in {config_file}, so only clients given "
                  "--hosts-dir read hosts.toml; skipped")
        return [_skipped(path_name, reason), _skipped(discard_name, reason)]
    results: list[CheckResult] = []
    if loaded.unreadable:
        results.append(_skipped(IMPORTS_CHECK, f"{', '.join(loaded.unreadable)} (imported by "
                                               f"{config_file}) not readable here; the "
                                               "checks below do not see what they set"))
    section = loaded.registry_section
    paths = config_paths(loaded, containerd_version)
    mirrors = table(loaded.registry, "mirrors")
    if not paths:
        never = "containerd never reads hosts.toml"
        if loaded.containerd2 and containerd_version is None:
            never += f" on 2.0 and 2.1 (2.2 and later read {DEFAULT_CONFIG_PATH_LIST})"
        results.append(_failed(
            path_name, f"{config_file} does not set config_path in {section}, so {never}",
            f"add config_path = \"{registry_config_path or '/etc/containerd/certs.d'}\" under "
            f"{section} and restart containerd{hint}"))
    elif mirrors:
        results.append(_failed(
            path_name, f"{section} sets both config_path and the deprecated mirrors table; "
                       "containerd refuses that combination and its CRI plugin does not start",
            f"move the entries of {section[:-1]}.mirrors] into hosts.toml files and delete it"))
    elif registry_config_path is not None and \
            os.path.normpath(registry_config_path) not in {os.path.normpath(p) for p in paths}:
        results.append(_failed(
            path_name, f"containerd reads hosts.toml from {':'.join(paths)}, but meshmirror "
                       f"writes {registry_config_path}",
            f"set --containerd-registry-config-path to {paths[0]}, or config_path in "
            f"{section} to {registry_config_path}"))
    else:
        results.append(_passed(path_name, f"hosts.toml read from {':'.join(paths)}"))
    if loaded.images.get("discard_unpacked_layers") is True:
        results.append(_failed(
            discard_name, f"{config_file} sets discard_unpacked_layers = true: containerd "
                          "deletes layers after unpacking, so this node has nothing to share",
            f"set discard_unpacked_layers = false under {loaded.images_section} and restart "
            f"containerd{hint}"))
    else:
        results.append(_passed(discard_name, "layers are kept after unpacking"))
    if version == 3:
        results.append(_check_v3_keys(config_file, loaded.main, hint))
    transfer = _check_transfer_service(config_file, containerd_version, loaded, paths, hint)
    if transfer is not None:
        results.append(transfer)
    return results


def config_paths(loaded: ImageSettings,
                 containerd_version: tuple[int, int] | None) -> list[str]:
    """The directories CRI reads hosts.toml from; empty when it reads none.

    containerd 2.2 and later fill an empty config_path with their default list when
    no mirrors are set; before, and when the version is unknown, empty means none.
    """
    raw = loaded.registry.get("config_path")
    paths = [p for p in raw.split(":") if p] if isinstance(raw, str) else []
    if not paths and loaded.containerd2 and not table(loaded.registry, "mirrors") and \
            has_behaviour("default_config_path_list", containerd_version):
        paths = DEFAULT_CONFIG_PATH_LIST.split(":")
    return paths


def _check_v3_keys(config_file: str, config: Mapping[str, Any], hint: str) -> CheckResult:
    """A version 3 file with image settings in their v2 places: containerd 2 ignores them."""
    old = table(config, "plugins", CRI_V2)
    misplaced = [f"registry.{k}" for k in ("config_path", "mirrors", "configs")
                 if k in table(old, "registry")]
    misplaced += [k for k in ("discard_unpacked_layers", "snapshotter")
                  if k in table(old, "containerd")]
    if not misplaced:
        return _passed(V3_KEYS_CHECK, "image settings are in their version 3 places")
    return _failed(
        V3_KEYS_CHECK,
        f"{config_file} is version 3 but sets {', '.join(misplaced)} under "
        f"[plugins.\"{CRI_V2}\"], which containerd 2 ignores",
        f"move them under [plugins.'{CRI_V3_IMAGES}'] (registry.config_path under "
        f"[plugins.'{CRI_V3_IMAGES}'.registry]) and restart containerd{hint}",
        warning=True)


def local_pull_reasons(images: Mapping[str, Any]) -> list[str]:
    """The settings that make containerd >= 2.1's CRI pull without the transfer service.

    ``use_local_image_pull = true``, or any setting the transfer service cannot honour,
    on which CRI falls back to pulling locally by itself (CheckLocalImagePullConfigs in
    containerd's internal/cri/config, 2.1 and later); defaults as DefaultImageConfig.
    """
    registry = table(images, "registry")
    found = [
        ("use_local_image_pull = true", images.get("use_local_image_pull") is True),
        ("disable_snapshot_annotations = false",
         images.get("disable_snapshot_annotations") is False),
        ("discard_unpacked_layers = true", images.get("discard_unpacked_layers") is True),
        ("registry.mirrors", bool(table(registry, "mirrors"))),
        ("registry.configs", bool(table(registry, "configs"))),
        ("registry.auths", bool(table(registry, "auths"))),
        (f"max_concurrent_downloads = {images.get('max_concurrent_downloads')}",
         images.get("max_concurrent_downloads", 3) != 3),
        ("image_pull_with_sync_fs = true", images.get("image_pull_with_sync_fs") is True),
    ]
    return [name for name, present in found if present]


def _check_transfer_service(config_file: str, containerd_version: tuple[int, int] | None,
                            loaded: ImageSettings, paths: Sequence[str],
                            hint: str) -> CheckResult | None:
    """containerd >= 2.1 pulls through its transfer service, which ignores a config_path list.

    None when it cannot matter: containerd known to be older, or a 1.x config with
    the version unknown. A version 3 file with the version unknown (containerd not
    reachable) is checked as if it were 2.1 or later: the fix is harmless on 2.0.
    """
    applies = has_behaviour("transfer_service_ignores_config_path_list", containerd_version)
    if applies is False or (applies is None and not loaded.containerd2):
        return None
    reasons = local_pull_reasons(loaded.images)
    if reasons:
        return _passed(TRANSFER_CHECK, f"{reasons[0]}: CRI pulls without the transfer "
                                       "service and reads hosts.toml")
    if not paths:
        return _skipped(TRANSFER_CHECK, "no config_path; see the config_path check")
    if len(paths) == 1:
        return _passed(TRANSFER_CHECK, f"the transfer service reads hosts.toml from the single "
                                       f"config_path {paths[0]}")
    return _failed(
        TRANSFER_CHECK,
        f"{config_file}: config_path lists several directories ({':'.join(paths)}) and "
        "use_local_image_pull is not true, so containerd's transfer service ignores "
        "hosts.toml and CRI pulls never ask the mirror",
        f"set use_local_image_pull = true under {loaded.images_section}, or set config_path "
        f"to one directory (config_path = \"{paths[0]}\" under {loaded.registry_section}), "
        f"and restart containerd{hint}",
        warning=True)


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
    results.extend(check_containerd_config(containerd.config, registry_config_path,
                                           version_of(results[0])))
    return results


def startup_checks(containerd: ContainerdConfig,
                   out: TextIO | None = None) -> tuple[int, list[CheckResult]]:
    """Run the startup checks; print one line per problem.

    Returns 1 when a blocking check failed, else 0, with every check that is not
    blocking (warnings included): ``run`` serves anyway and reports those in its
    log, its status page and ``meshmirror_containerd_config_problem``.
    """
    stream = out if out is not None else sys.stderr
    results = run_startup_checks(containerd)
    failures = [r for r in results if not r.ok and not r.warning]
    for result in failures:
        print(f"meshmirror: {result.problem}; fix: {result.fix}", file=stream)
    for result in results:
        if not result.ok and result.warning:
            print(f"meshmirror: warning: {result.problem}; fix: {result.fix}", file=stream)
    return (1 if failures else 0), [r for r in results if r.ok or r.warning]


def startup_gate(containerd: ContainerdConfig, out: TextIO | None = None) -> int:
    """Run the startup checks; print one line per problem and return 1 if one blocks."""
    return startup_checks(containerd, out)[0]


# The checks that warn rather than block, by their metric label.
WARNING_CHECKS = {TRANSFER_CHECK: "transfer_service", V3_KEYS_CHECK: "config_v3_keys"}


class ConfigProblemCollector(Collector):
    """``meshmirror_containerd_config_problem{check}``: 1 while a startup warning stands.

    The checks ran once at startup (containerd's config only changes with a
    restart of containerd, which the operator then follows by restarting the pod);
    every check that can warn is exported, 0 when it passed, so an alert can tell
    "fine" from "not checked".
    """

    def __init__(self, results: Sequence[CheckResult]) -> None:
        self.results = {r.name: r for r in results if r.name in WARNING_CHECKS}

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        for name, result in sorted(self.results.items()):
            if not result.skipped:
                family.add_metric([WARNING_CHECKS[name]], 0.0 if result.ok else 1.0)
        return [family]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "meshmirror_containerd_config_problem",
            "1 while a startup check found containerd's config keeps pulls from the mirror "
            "(e.g. the transfer service ignoring hosts.toml); the fix is in the log and "
            "on the status page",
            labels=["check"])


def conditions(results: Sequence[CheckResult]) -> list[dict[str, str]]:
    """The failed warnings, as the status page shows them."""
    return [{"check": r.name, "problem": r.problem, "fix": r.fix}
            for r in results if not r.ok and r.warning]

