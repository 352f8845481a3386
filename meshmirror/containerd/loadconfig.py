"""containerd's CRI image settings as containerd itself arrives at them.

Reading ``config.toml`` alone misses what decides whether pulls ask the mirror:
drop-in files named by ``imports``, the file's ``version`` (which containerd 2
takes from the last file that sets one, and assumes is 3 when none does), and
containerd 2's migration of version 2 settings into the version 3 images
plugin. Each of these differs between containerd 1.x and 2.x, so the loader
follows the generation the running containerd belongs to, as its source does
(1.7 ``services/server/config``, 2.x ``cmd/containerd/server/config`` and
``plugins/cri/images``). ``tests/containerd/test_loadconfig.py`` holds the model
against ``containerd config dump`` of each real version here.
"""

from __future__ import annotations

import copy
import glob
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

CRI_V1 = "cri"
CRI_V2 = "io.containerd.grpc.v1.cri"
CRI_V3_IMAGES = "io.containerd.cri.v1.images"
# containerd 2's version 1 names for the plugins meshmirror looks at (v1MigratePluginName).
_V1_NAMES = {CRI_V1: CRI_V2}
# Keys containerd 2 moves from the version 2 CRI plugin into the images plugin.
_MIGRATED = ("registry", "image_decryption", "max_concurrent_downloads",
             "image_pull_progress_timeout", "image_pull_with_sync_fs", "stats_collect_period")
# Keys moved from its ``containerd`` table; containerd 2 moves them only when that table
# also has ``runtimes`` (it returns early otherwise), which a test shows on 2.1.9.
_MIGRATED_FROM_CONTAINERD = ("snapshotter", "disable_snapshot_annotations",
                             "discard_unpacked_layers")


class ConfigLoadError(Exception):
    """A file containerd would read cannot be parsed; the message names it."""


@dataclass(frozen=True, slots=True)
class ImageSettings:
    """Where containerd's CRI plugin finds hosts.toml, and how it pulls."""

    # The version containerd treats the whole config as, after imports.
    version: int
    # containerd 2's loading rules (version 3 images plugin, deep-merged imports).
    containerd2: bool
    registry: Mapping[str, Any]
    # discard_unpacked_layers, use_local_image_pull, max_concurrent_downloads, ...
    images: Mapping[str, Any]
    # The TOML headers a fix is written under, in this config's version.
    registry_section: str
    images_section: str
    disabled_plugins: tuple[str, ...]
    # Every file read, the main file first.
    files: tuple[str, ...] = ()
    # Imports that could not be read here (in a pod: not mounted); their settings are unknown.
    unreadable: tuple[str, ...] = ()
    main: Mapping[str, Any] = field(default_factory=dict)


def table(data: Mapping[str, Any], *keys: str) -> Mapping[str, Any]:
    node: Any = data
    for key in keys:
        node = node.get(key, {}) if isinstance(node, Mapping) else {}
    return node if isinstance(node, Mapping) else {}


def _read(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as err:
        raise ConfigLoadError(f"{path} is not valid TOML ({err})") from err


def _imports(parent: str, data: Mapping[str, Any], unreadable: list[str]) -> list[str]:
    """containerd's resolveImports: relative to the importing file's directory, globs sorted.

    A glob whose directory is absent here goes to ``unreadable``: on the node it may
    hold drop-ins that a pod without that mount cannot see.
    """
    out: list[str] = []
    raw = data.get("imports", [])
    for name in raw if isinstance(raw, list) else []:
        if not isinstance(name, str):
            continue
        path = os.path.normpath(name)
        if not os.path.isabs(path):
            path = os.path.join(os.path.dirname(parent), path)
        if "*" in path and not os.path.isdir(os.path.dirname(path)):
            unreadable.append(path)
        out.extend(sorted(glob.glob(path)) if "*" in path else [path])
    return out


def _deep_merge(into: dict[str, Any], other: Mapping[str, Any]) -> None:
    """containerd 2's merge of plugin tables: tables merged key by key, later values win."""
    for key, value in other.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)


def _plugins(data: Mapping[str, Any]) -> dict[str, Any]:
    plugins = data.get("plugins", {})
    return dict(plugins) if isinstance(plugins, Mapping) else {}


def _names(data: Mapping[str, Any], key: str) -> list[str]:
    raw = data.get(key, [])
    return [p for p in raw if isinstance(p, str)] if isinstance(raw, list) else []


def load_image_settings(config_file: str, containerd2: bool | None) -> ImageSettings:
    """The CRI image settings containerd would run with, following ``imports``.

    ``containerd2`` None (the version is unknown) follows the main file: version 3
    only loads on containerd 2. Raises OSError when the main file cannot be read and
    ConfigLoadError when a file is not TOML; an unreadable import is listed in
    ``unreadable`` (containerd itself would refuse to start without it).
    """
    main = _read(config_file)
    if containerd2 is None:
        containerd2 = main.get("version") == 3
    pending, seen, files, unreadable = [config_file], set(), [], []
    plugins: dict[str, Any] = {}
    disabled: list[str] = []
    # 1.x starts from version 1 (no version line); 2.x from 3, and versions 0 and 1
    # are migrated to the version loaded so far rather than setting it.
    version = 3 if containerd2 else 1
    while pending:
        path, pending = pending[0], pending[1:]
        if path in seen:
            continue
        seen.add(path)
        try:
            data = main if path == config_file else _read(path)
        except OSError:
            unreadable.append(path)
            continue
        files.append(path)
        file_version = data.get("version", 0)
        file_version = file_version if isinstance(file_version, int) else 0
        file_plugins = _plugins(data)
        file_disabled = _names(data, "disabled_plugins")
        if containerd2 and file_version in (0, 1):
            file_plugins = {_V1_NAMES.get(k, k): v for k, v in file_plugins.items()}
            file_disabled = [_V1_NAMES.get(p, p) for p in file_disabled]
        elif file_version:
            version = file_version
        if containerd2:
            _deep_merge(plugins, file_plugins)
        else:  # 1.x replaces each plugin's table with the later file's
            plugins.update(copy.deepcopy(file_plugins))
        disabled.extend(p for p in file_disabled if p not in disabled)
        pending.extend(_imports(path, data, unreadable))
    if containerd2:
        images = _migrated_images(plugins, version)
        registry = table(images, "registry")
        if version < 3:
            registry_section = f'[plugins."{CRI_V2}".registry]'
        else:
            registry_section = f"[plugins.'{CRI_V3_IMAGES}'.registry]"
        images_section = f"[plugins.'{CRI_V3_IMAGES}']"
    else:
        plugin_id = CRI_V1 if version == 1 else CRI_V2
        cri = table(plugins, plugin_id)
        registry, images = table(cri, "registry"), dict(cri)
        # 1.x keeps discard_unpacked_layers in the CRI plugin's containerd table.
        images.update(table(cri, "containerd"))
        registry_section = f'[plugins."{plugin_id}".registry]'
        images_section = f'[plugins."{plugin_id}".containerd]'
    return ImageSettings(version, containerd2, registry, images, registry_section,
                         images_section, tuple(disabled), tuple(files), tuple(unreadable),
                         main)


def _migrated_images(plugins: Mapping[str, Any], version: int) -> dict[str, Any]:
    """containerd 2's images plugin config; below version 3, with the v2 settings moved in."""
    images = copy.deepcopy(dict(table(plugins, CRI_V3_IMAGES)))
    if version >= 3:
        return images
    old = table(plugins, CRI_V2)
    images.update({k: copy.deepcopy(old[k]) for k in _MIGRATED if k in old})
    containerd = table(old, "containerd")
    if "runtimes" in containerd:
        images.update({k: containerd[k] for k in _MIGRATED_FROM_CONTAINERD if k in containerd})
    return images
