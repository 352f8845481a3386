"""The loader's model of containerd's config against ``containerd config dump`` itself.

Each case is a main config with drop-ins; the real binary of each version merges,
migrates and prints what its CRI plugin will run with, and
``load_image_settings`` must arrive at the same config_path, discard_unpacked_layers
and use_local_image_pull. These are the places where a config that looks right
silently keeps pulls away from the mirror on one version and not another.
"""

from __future__ import annotations

import os
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from meshmirror.containerd.checks import check_containerd_config
from meshmirror.containerd.loadconfig import CRI_V2, CRI_V3_IMAGES, load_image_settings
from tests.support.containerd import Containerd, versions_or_skip

pytestmark = pytest.mark.real

# Absolute: 1.6.20 resolves a relative glob against its working directory (later 1.6
# and 1.7 patch releases against the config's directory, as the loader does).
V2_LIST = ('version = 2\nimports = ["{dir}/conf.d/*.toml"]\n'
           '[plugins."io.containerd.grpc.v1.cri".registry]\n'
           'config_path = "/etc/containerd/certs.d:/etc/docker/certs.d"\n')
RUNC = ('[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]\n'
        'runtime_type = "io.containerd.runc.v2"\n')

# name: (main config, {drop-in name: text}, versions it loads on)
CASES: dict[str, tuple[str, dict[str, str], tuple[str, ...]]] = {
    # a v2 file may set containerd 2's images table directly; 2.x honours it
    "v2 file with the images table": (
        V2_LIST + f"[plugins.'{CRI_V3_IMAGES}']\nuse_local_image_pull = true\n", {}, ("2.x",)),
    # one version 3 drop-in makes the whole config version 3: the v2 config_path is lost
    "v3 drop-in in a v2 config": (
        V2_LIST, {"a.toml": f"version = 3\n[plugins.'{CRI_V3_IMAGES}']\n"
                            "discard_unpacked_layers = true\n"}, ("2.x",)),
    # 2.x moves the containerd table's keys only when runtimes are set too
    "v2 discard without runtimes": (
        V2_LIST + f'[plugins."{CRI_V2}".containerd]\ndiscard_unpacked_layers = true\n', {},
        ("1.6", "1.7", "2.x")),
    "v2 discard with runtimes": (
        V2_LIST + f'[plugins."{CRI_V2}".containerd]\ndiscard_unpacked_layers = true\n' + RUNC,
        {}, ("1.6", "1.7", "2.x")),
    # a drop-in touching one CRI key: 1.x replaces the whole plugin table (config_path
    # gone), 2.x merges key by key
    "v2 drop-in with one CRI key": (
        V2_LIST + RUNC, {"a.toml": f'version = 2\n[plugins."{CRI_V2}".containerd]\n'
                                   "discard_unpacked_layers = true\n"},
        ("1.6", "1.7", "2.x")),
    # the last file wins, even with false and ''
    "v3 drop-in turning the fix off": (
        f"version = 3\nimports = ['conf.d/*.toml']\n[plugins.'{CRI_V3_IMAGES}']\n"
        f"use_local_image_pull = true\n[plugins.'{CRI_V3_IMAGES}'.registry]\n"
        "config_path = '/etc/containerd/certs.d:/etc/docker/certs.d'\n",
        {"z.toml": f"version = 3\n[plugins.'{CRI_V3_IMAGES}']\nuse_local_image_pull = false\n"},
        ("2.x",)),
    # relative to the importing file's directory (1.7.24, 2.x)
    "v3 drop-in setting the fix": (
        f"version = 3\nimports = ['conf.d/*.toml']\n[plugins.'{CRI_V3_IMAGES}'.registry]\n"
        "config_path = '/etc/containerd/certs.d:/etc/docker/certs.d'\n",
        {"z.toml": f"[plugins.'{CRI_V3_IMAGES}']\nuse_local_image_pull = true\n"}, ("2.x",)),
    # no version line: containerd 2 reads it as version 3, so the v2 key is ignored
    "no version line, v2 key": (
        f'[plugins."{CRI_V2}".registry]\nconfig_path = "/etc/containerd/certs.d"\n', {},
        ("1.6", "1.7", "2.x")),
    "version 1, short plugin name": (
        'version = 1\n[plugins.cri.registry]\nconfig_path = "/etc/containerd/certs.d"\n', {},
        ("1.6", "1.7", "2.x")),
}


def dump(version: str, config: Path) -> dict[str, Any]:
    containerd = Containerd(version=version)  # only for its binary and environment
    try:
        binary = str(containerd.bin_dir / "containerd") if containerd.bin_dir else "containerd"
        out = subprocess.run([binary, "--config", str(config), "config", "dump"],
                             capture_output=True, text=True, timeout=30, check=True,
                             env=containerd.env, cwd="/", stdin=subprocess.DEVNULL)
    finally:
        containerd.close()
    return tomllib.loads(out.stdout)


def effective(dumped: dict[str, Any], version: str) -> dict[str, Any]:
    plugins = dumped["plugins"]
    if version.startswith("2"):
        images = plugins[CRI_V3_IMAGES]
        return {"config_path": images["registry"]["config_path"],
                "discard_unpacked_layers": images["discard_unpacked_layers"],
                "use_local_image_pull": images["use_local_image_pull"]}
    cri = plugins.get(CRI_V2, {})
    return {"config_path": cri.get("registry", {}).get("config_path", ""),
            "discard_unpacked_layers": cri.get("containerd", {}).get(
                "discard_unpacked_layers", False)}


@pytest.mark.parametrize("version", versions_or_skip())
@pytest.mark.parametrize("case", list(CASES))
def test_loader_matches_containerd_config_dump(tmp_path: Path, version: str, case: str) -> None:
    main, drop_ins, versions = CASES[case]
    if version not in versions:
        pytest.skip(f"containerd {version} refuses this config")
    config = tmp_path / "config.toml"
    config.write_text(main.replace("{dir}", str(tmp_path)))
    (tmp_path / "conf.d").mkdir()
    for name, text in drop_ins.items():
        (tmp_path / "conf.d" / name).write_text(text)
    real = effective(dump(version, config), version)
    loaded = load_image_settings(str(config), containerd2=version.startswith("2"))
    model = {"config_path": loaded.registry.get("config_path", ""),
             "discard_unpacked_layers": loaded.images.get("discard_unpacked_layers", False)}
    if version.startswith("2"):
        model["use_local_image_pull"] = loaded.images.get("use_local_image_pull", False)
    print(f"{case} on {version}: {real}")
    assert model == real


def test_imports_are_followed_by_the_checks(tmp_path: Path) -> None:
    """EKS-style: the fix lives in a drop-in; doctor sees it, and sees it undone."""
    main, drop_ins, _ = CASES["v3 drop-in setting the fix"]
    config = tmp_path / "config.toml"
    config.write_text(main)
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "z.toml").write_text(drop_ins["z.toml"])
    names = {r.name: r for r in check_containerd_config(str(config), None, (2, 1))}
    assert names["containerd transfer service"].ok
    (tmp_path / "conf.d" / "zz.toml").write_text(
        f"[plugins.'{CRI_V3_IMAGES}']\nuse_local_image_pull = false\n")
    names = {r.name: r for r in check_containerd_config(str(config), None, (2, 1))}
    assert not names["containerd transfer service"].ok


def test_unreadable_imports_are_reported(tmp_path: Path) -> None:
    """In a pod only config.toml is mounted: doctor says it cannot see the drop-ins."""
    config = tmp_path / "config.toml"
    config.write_text(f"version = 3\nimports = ['{tmp_path}/absent/*.toml', 'missing.toml']\n"
                      f"[plugins.'{CRI_V3_IMAGES}'.registry]\n"
                      "config_path = '/etc/containerd/certs.d'\n")
    names = {r.name: r for r in check_containerd_config(str(config), None, (2, 1))}
    imports = names["containerd imports"]
    assert imports.skipped and "absent" in imports.detail and "missing.toml" in imports.detail
    assert names["containerd config_path"].ok
    assert os.path.basename(str(config)) in imports.detail
