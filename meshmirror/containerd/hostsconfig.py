"""``meshmirror configure`` and ``meshmirror cleanup``: containerd's hosts.toml.

containerd looks up ``<config_path>/<registry host>/hosts.toml`` (then
``_default/hosts.toml``) on every pull and tries each ``[host."..."]`` entry in
order before ``server``. ``configure`` points those entries at meshmirror;
``cleanup`` puts the node back exactly as it was. Behaviour follows Spegel's
``AddMirrorConfiguration``/``CleanupMirrorConfiguration``, which users know:

* Whatever the configuration directory held is moved (renamed, so bytes, modes
  and certificate files are untouched) into ``<config_path>/_backup`` before
  the first write, and never again: a second ``configure`` reads the backup
  and produces byte-identical files, so it changes nothing.
* ``--prepend-existing`` keeps the backed-up ``[host.*]`` entries after ours,
  and copies the registry directory's other files (certificates referenced by
  relative or absolute path) next to the new hosts.toml. The old file's
  server-level settings (``ca``, ``skip_verify``, ``header`` ...) are kept
  only when its ``server`` is the one we write, since they describe how to
  reach that server and would be wrong for any other.
* ``cleanup`` with no backup present restores nothing: it says so, and removes
  only the hosts.toml files that carry meshmirror's header line (and their
  directories when that leaves them empty). Certificates copied by
  ``--prepend-existing`` carry no marker and are left alone.

Both commands are safe to re-run after a crash: the backup is assembled in
``_backup.partial`` and renamed into place once complete, and ``cleanup``
renames ``_backup`` to ``_backup.restoring`` before moving entries out, so an
interrupted run never mistakes half-restored files for meshmirror's own.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shutil
import stat
import sys
import tempfile
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import tomli_w

from meshmirror.addresses import AddressError, parse_host_port
from meshmirror.flags import UsageError, decimal, split_list

BACKUP_DIR = "_backup"
PARTIAL_BACKUP_DIR = "_backup.partial"
RESTORING_DIR = "_backup.restoring"
DEFAULT_HOST_DIR = "_default"
HOSTS_FILE = "hosts.toml"
# containerd 1.7+ honours it; 1.6 ignores the key (see tests), so it is harmless there.
DIAL_TIMEOUT = "200ms"
HEADER = "# Written by `meshmirror configure`; `meshmirror cleanup` restores what was here.\n"
DOCKER_HUB_SERVER = "https://registry-1.docker.io"

_RESERVED = {BACKUP_DIR, PARTIAL_BACKUP_DIR, RESTORING_DIR}
# RFC 1123 labels, or an IPv4 address; an IPv6 host comes in brackets.
_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


class HostsConfigError(Exception):
    """The configuration directory holds something configure cannot work with."""


@dataclass(frozen=True, slots=True)
class MirroredRegistry:
    """One registry whose pulls go through the mirrors first."""

    directory: str  # the name containerd looks up: host[:port] or _default
    server: str | None  # None for _default: containerd then uses the pulled host


EVERY_REGISTRY = MirroredRegistry(DEFAULT_HOST_DIR, None)
"""containerd's fallback entry, used for a registry without a directory of its own."""


@dataclass(frozen=True, slots=True)
class HostsConfig:
    """What ``configure`` writes; ``cleanup`` reads only ``config_path``."""

    # Whether the mirror may resolve tags (capability "resolve"): the node's --resolve-tags.
    resolve_tags: bool
    config_path: Path = Path("/etc/containerd/certs.d")
    registries: tuple[MirroredRegistry, ...] = (EVERY_REGISTRY,)
    # Mirror URLs written into hosts.toml, in order; configure needs at least one.
    targets: tuple[str, ...] = ()
    # Keep the backed-up [host.*] entries after ours.
    prepend_existing: bool = False


@dataclass(frozen=True, slots=True)
class PlannedFile:
    relative: str
    content: bytes
    mode: int


def _valid_host(netloc: str) -> bool:
    """``host[:port]`` as containerd names a registry: DNS name, IPv4 or [IPv6], port 1-65535."""
    if netloc.endswith(":"):
        return False
    try:
        host, port = parse_host_port(netloc, default_host="", default_port=443)
    except AddressError:
        return False
    if port == 0:
        return False
    if netloc.startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return False
        return True
    return bool(_HOSTNAME_RE.match(host))


def parse_registry(text: str) -> MirroredRegistry:
    """A ``--mirrored-registries`` value: ``host[:port]``, ``http(s)://host[:port]`` or _default.

    The one normaliser of a registry's name: ``https://docker.io/`` and ``docker.io``
    both become the directory ``docker.io``, which is also the name containerd
    passes in ``?ns=`` and so what ``run`` matches mirrored requests against.
    """
    what = f"--mirrored-registries {text!r}"
    if text == DEFAULT_HOST_DIR:
        return EVERY_REGISTRY
    if "://" in text:
        parts = urlsplit(text)
        if parts.scheme not in ("http", "https"):
            raise UsageError(f"{what}: scheme must be http or https, e.g. https://ghcr.io")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise UsageError(f"{what}: give only the registry, no path or query, e.g. "
                             f"{parts.scheme}://{parts.netloc}")
        if "@" in parts.netloc or not _valid_host(parts.netloc):
            raise UsageError(f"{what}: not a registry host[:port], e.g. https://ghcr.io")
        netloc = parts.netloc
        server = f"{parts.scheme}://{netloc}"
    else:
        if not _valid_host(text):
            raise UsageError(f"{what}: not a registry host[:port] or http(s) URL, "
                             "e.g. ghcr.io or https://127.0.0.1:5000")
        netloc = text
        server = f"https://{netloc}"
    if server == "https://docker.io":
        server = DOCKER_HUB_SERVER
    return MirroredRegistry(netloc, server)


def bracket_ipv6_host(url: str) -> str:
    """``url`` with a bare IPv6 host put in brackets: ``http://fd00::5:30022`` becomes
    ``http://[fd00::5]:30022``.

    A node's IP reaches a mirror target through one template, ``http://$(NODE_IP):PORT``,
    which cannot know the address family; on an IPv6 node the URL is unusable until
    bracketed. A host with several colons is read as an IPv6 address followed by a
    port when that reading is valid (the chart always appends a port), else as an
    address alone. Anything else is returned unchanged.
    """
    scheme, sep, rest = url.partition("://")
    netloc, slash, tail = rest.partition("/")
    if not sep or netloc.startswith("[") or netloc.count(":") < 2 or "@" in netloc:
        return url
    host, _, port = netloc.rpartition(":")
    for candidate, suffix in ((host, f":{port}"), (netloc, "")):
        if suffix and decimal(port) is None:
            continue
        try:
            ipaddress.IPv6Address(candidate)
        except ValueError:
            continue
        return f"{scheme}://[{candidate}]{suffix}{slash}{tail}"
    return url


def parse_mirror_target(text: str) -> str:
    """A ``--mirror-targets`` value: an http(s) URL to a meshmirror, normalised without '/'
    and with a bare IPv6 host bracketed."""
    what = f"--mirror-targets {text!r}"
    parts = urlsplit(bracket_ipv6_host(text))
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"{what}: want an http(s) URL such as http://127.0.0.1:5000")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise UsageError(f"{what}: give only scheme://host:port, without a path or query")
    if "@" in parts.netloc or not _valid_host(parts.netloc):
        raise UsageError(f"{what}: {parts.netloc!r} is not a host[:port]")
    return f"{parts.scheme}://{parts.netloc}"


def parse_registries(values: Sequence[str] | None) -> list[MirroredRegistry]:
    """Every ``--mirrored-registries`` value, for ``run``, ``configure``, ``cleanup`` and
    ``doctor`` alike; none means every registry (``_default``)."""
    texts = split_list(values)
    registries = [parse_registry(t) for t in texts] or [EVERY_REGISTRY]
    seen: set[str] = set()
    for registry in registries:
        if registry.directory in seen:
            raise UsageError(f"--mirrored-registries names {registry.directory} twice; "
                             "give each registry once")
        seen.add(registry.directory)
    return registries


def parse_targets(values: Sequence[str] | None, *, required: bool = True) -> list[str]:
    """``--mirror-targets``, without repeats; configure needs one, doctor checks any given."""
    targets = [parse_mirror_target(t) for t in split_list(values)]
    if required and not targets:
        raise UsageError("--mirror-targets is required: the URL of this node's meshmirror, "
                         "e.g. http://127.0.0.1:5000")
    return list(dict.fromkeys(targets))


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as err:
        raise HostsConfigError(f"{path} is not valid TOML ({err}); fix or remove it") from err


def render_hosts(
    registry: MirroredRegistry,
    targets: Sequence[str],
    resolve_tags: bool,
    existing: Mapping[str, Any] | None = None,
) -> bytes:
    """The hosts.toml text for one registry: our targets first, then kept entries."""
    capabilities = ["pull", "resolve"] if resolve_tags else ["pull"]
    document: dict[str, Any] = {}
    if registry.server is not None:
        document["server"] = registry.server
    if existing is not None and existing.get("server") == registry.server:
        for key, value in existing.items():
            if key not in ("server", "host"):
                document[key] = value
    hosts: dict[str, Any] = {
        target: {"capabilities": capabilities, "dial_timeout": DIAL_TIMEOUT} for target in targets
    }
    if existing is not None:
        old_hosts = existing.get("host", {})
        if not isinstance(old_hosts, dict):
            raise HostsConfigError("existing hosts.toml has a 'host' key that is not a table")
        for url, entry in old_hosts.items():
            hosts.setdefault(url, entry)
    document["host"] = hosts
    return (HEADER + tomli_w.dumps(document)).encode()


def _backup_root(config_path: Path) -> Path | None:
    """Where the pre-meshmirror configuration is (or will be, after backup)."""
    for name in (BACKUP_DIR, PARTIAL_BACKUP_DIR):
        if (config_path / name).is_dir():
            return config_path / name
    return None


def plan_configuration(
    config_path: Path,
    registries: Sequence[MirroredRegistry],
    targets: Sequence[str],
    resolve_tags: bool,
    prepend_existing: bool,
) -> list[PlannedFile]:
    """Every file configure should leave in the directory, computed before touching it.

    Existing configuration is read from the backup when there is one, else from
    where it sits now (it is about to be backed up), so a first and a second run
    see the same input.
    """
    source = _backup_root(config_path) or config_path
    planned: list[PlannedFile] = []
    for registry in registries:
        existing: dict[str, Any] | None = None
        registry_dir = source / registry.directory
        if prepend_existing and (registry_dir / HOSTS_FILE).is_file():
            existing = _load_toml(registry_dir / HOSTS_FILE)
            planned.extend(_companion_files(registry_dir, registry.directory))
        content = render_hosts(registry, targets, resolve_tags, existing)
        planned.append(PlannedFile(f"{registry.directory}/{HOSTS_FILE}", content, 0o644))
    return planned


def _companion_files(registry_dir: Path, directory: str) -> Iterable[PlannedFile]:
    """Certificates and keys beside an existing hosts.toml, which its entries may name."""
    for path in sorted(registry_dir.rglob("*")):
        if path.is_file() and not path.is_symlink() and path.relative_to(registry_dir) != Path(
            HOSTS_FILE
        ):
            rel = path.relative_to(registry_dir).as_posix()
            yield PlannedFile(
                f"{directory}/{rel}", path.read_bytes(), stat.S_IMODE(path.stat().st_mode)
            )


def _move(src: Path, dst: Path) -> None:
    """Rename, falling back to copy-then-delete across filesystems (e.g. a mounted subdir)."""
    try:
        os.rename(src, dst)
    except OSError as err:
        if err.errno != 18:  # EXDEV
            raise
        if src.is_dir() and not src.is_symlink():
            shutil.copytree(src, dst, symlinks=True, copy_function=shutil.copy2)
            shutil.copystat(src, dst)
            shutil.rmtree(src)
        else:
            shutil.copy2(src, dst, follow_symlinks=False)
            src.unlink()


def backup_existing(config_path: Path) -> bool:
    """Move the directory's content to _backup once; True when this call made the backup."""
    backup = config_path / BACKUP_DIR
    if backup.is_dir():
        return False
    partial = config_path / PARTIAL_BACKUP_DIR
    partial.mkdir(mode=0o755, exist_ok=True)
    for entry in sorted(config_path.iterdir()):
        if entry.name in _RESERVED:
            continue
        _move(entry, partial / entry.name)
    _fsync_dir(partial)
    os.rename(partial, backup)
    _fsync_dir(config_path)
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, content: bytes, mode: int) -> bool:
    """Replace ``path`` by rename so containerd never reads half a file; False if unchanged."""
    with contextlib.suppress(FileNotFoundError):
        st = path.lstat()
        if stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == mode \
                and path.read_bytes() == content:
            return False
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(path.parent)
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def apply_plan(config_path: Path, planned: Sequence[PlannedFile]) -> list[str]:
    """Make the directory hold exactly ``planned`` (beside the backup); returns what changed."""
    wanted = {p.relative for p in planned}
    wanted_dirs = {p.relative.split("/", 1)[0] for p in planned}
    changed: list[str] = []
    for entry in sorted(config_path.iterdir()):
        if entry.name in _RESERVED:
            continue
        if entry.name not in wanted_dirs or not entry.is_dir() or entry.is_symlink():
            _remove(entry)
            changed.append(f"removed {entry}")
            continue
        for sub in sorted(entry.rglob("*"), reverse=True):
            rel = sub.relative_to(config_path).as_posix()
            if sub.is_dir() and not sub.is_symlink():
                if not any(w.startswith(rel + "/") for w in wanted):
                    _remove(sub)
            elif rel not in wanted:
                sub.unlink()
                changed.append(f"removed {sub}")
    for item in planned:
        target = config_path / item.relative
        if write_atomic(target, item.content, item.mode):
            changed.append(f"wrote {target}")
    return changed


def configure(
    config_path: Path,
    registries: Sequence[MirroredRegistry],
    targets: Sequence[str],
    resolve_tags: bool = True,
    prepend_existing: bool = False,
) -> list[str]:
    """Back up once, then write hosts.toml for every registry; returns what changed."""
    if (config_path / RESTORING_DIR).exists():
        raise HostsConfigError(f"{config_path / RESTORING_DIR} is left from an interrupted "
                               "cleanup; run `meshmirror cleanup` again first")
    if config_path.exists() and not config_path.is_dir():
        raise HostsConfigError(f"{config_path} is not a directory; "
                               "fix --containerd-registry-config-path")
    # Plan first: bad existing TOML must fail before anything moves.
    planned = plan_configuration(config_path, registries, targets, resolve_tags, prepend_existing)
    config_path.mkdir(mode=0o755, parents=True, exist_ok=True)
    changed = []
    if backup_existing(config_path):
        changed.append(f"backed up existing configuration to {config_path / BACKUP_DIR}")
    return changed + apply_plan(config_path, planned)


def _is_ours(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.readline() == HEADER.encode()
    except OSError:
        return False


def cleanup(config_path: Path) -> list[str]:
    """Put back exactly what configure found; returns what was done."""
    backup = config_path / BACKUP_DIR
    restoring = config_path / RESTORING_DIR
    partial = config_path / PARTIAL_BACKUP_DIR
    done: list[str] = []
    if not restoring.is_dir() and partial.is_dir() and not backup.is_dir():
        # configure died while backing up: nothing of ours was written yet.
        backup_existing(config_path)
    if backup.is_dir():
        for entry in sorted(config_path.iterdir()):
            if entry.name not in _RESERVED:
                _remove(entry)
        os.rename(backup, restoring)
        _fsync_dir(config_path)
    if restoring.is_dir():
        for entry in sorted(restoring.iterdir()):
            _move(entry, config_path / entry.name)
            done.append(f"restored {config_path / entry.name}")
        restoring.rmdir()
        _fsync_dir(config_path)
        done.append(f"removed {backup}")
        return done
    done.append(f"no backup at {backup}: nothing to restore; removing only files "
                "meshmirror wrote")
    if not config_path.is_dir():
        return done
    for hosts in sorted(config_path.glob(f"*/{HOSTS_FILE}")):
        if _is_ours(hosts):
            hosts.unlink()
            done.append(f"removed {hosts}")
            with contextlib.suppress(OSError):
                hosts.parent.rmdir()  # only when now empty
    return done


def configure_command(config: HostsConfig) -> int:
    try:
        changed = configure(config.config_path, config.registries, config.targets,
                            config.resolve_tags, config.prepend_existing)
    except (HostsConfigError, OSError) as err:
        print(f"meshmirror configure: {err}", file=sys.stderr)
        return 1
    for line in changed or [f"{config.config_path} already configured; nothing changed"]:
        print(line)
    return 0


def cleanup_command(config: HostsConfig) -> int:
    try:
        done = cleanup(config.config_path)
    except OSError as err:
        print(f"meshmirror cleanup: {err}", file=sys.stderr)
        return 1
    for line in done:
        print(line)
    return 0
