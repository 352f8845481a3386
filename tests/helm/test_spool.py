"""meshmirror.mirrorSpoolLimit: the spool volume, its mount and the two MESHMIRROR_* variables.

The value reaches two readers that must agree on it: ``meshmirror.flags.parse_size``
(through MESHMIRROR_MIRROR_SPOOL_LIMIT) and the API server (the volume's
sizeLimit, a Kubernetes quantity, which is stricter: "4GiB" is not one and "512m"
is half a byte). Each form the schema admits is rendered and read both ways.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshmirror import flags
from tests.helm import chart
from tests.helm.cmdline import parse_container

SPOOL_DIR = "/var/spool/meshmirror"
MI = 2**20


def spool_volume(manifests: list[chart.Manifest]) -> dict[str, Any] | None:
    found = [v for v in chart.pod_spec(manifests)["volumes"] if v["name"] == "spool"]
    assert len(found) <= 1
    return found[0] if found else None


def spool_mounts(manifests: list[chart.Manifest]) -> list[dict[str, Any]]:
    spec = chart.pod_spec(manifests)
    return [m for c in [*spec["initContainers"], *spec["containers"]]
            for m in c.get("volumeMounts", []) if m["name"] == "spool"]


def expected_size_limit(limit: int) -> int:
    """The margin the chart documents: whole MiB, plus an eighth and at least 64Mi."""
    mib = -(-limit // MI)
    return (mib + max(64, mib // 8)) * MI


def test_default_renders_volume_mount_and_env(helm: Path) -> None:
    manifests = chart.render()
    volume = spool_volume(manifests)
    assert volume == {"name": "spool", "emptyDir": {"sizeLimit": "4608Mi"}}
    # On the node's disk: medium Memory would count against the 128Mi memory limit.
    assert "medium" not in volume["emptyDir"]
    main = chart.container(manifests, "meshmirror")
    assert spool_mounts(manifests) == [{"name": "spool", "mountPath": SPOOL_DIR}]
    assert "spool" in {m["name"] for m in main["volumeMounts"]}
    env = chart.literal_env(main)
    assert env["MESHMIRROR_MIRROR_SPOOL_LIMIT"] == "4Gi"
    assert env["MESHMIRROR_MIRROR_SPOOL_DIR"] == SPOOL_DIR
    assert flags.parse_size(env["MESHMIRROR_MIRROR_SPOOL_LIMIT"]) == 4 * 2**30
    args = parse_container(main)
    assert args.mirror_spool_limit == 4 * 2**30
    assert args.mirror_spool_dir == Path(SPOOL_DIR)
    # The kubelet may count more than the budget (blocks, preallocation): never less room.
    assert chart.quantity_value(volume["emptyDir"]["sizeLimit"]) >= args.mirror_spool_limit


def test_spool_dir_is_not_under_the_small_tmp_volume(helm: Path) -> None:
    manifests = chart.render()
    volumes = {v["name"]: v for v in chart.pod_spec(manifests)["volumes"]}
    mounts = {m["name"]: m["mountPath"]
              for m in chart.container(manifests, "meshmirror")["volumeMounts"]}
    assert volumes["tmp"]["emptyDir"]["sizeLimit"] == "64Mi"
    assert not (SPOOL_DIR + "/").startswith(mounts["tmp"].rstrip("/") + "/")


@pytest.mark.parametrize(("value_files", "sets"), [
    (("spool-off.yaml",), ()),
    ((), ("meshmirror.mirrorSpoolLimit=0",)),
    ((), ("meshmirror.mirrorSpoolLimit=0Gi",)),
], ids=["values-file-0", "set-0", "set-0Gi"])
def test_limit_zero_renders_no_volume_and_no_mount(
    helm: Path, value_files: tuple[str, ...], sets: tuple[str, ...]
) -> None:
    manifests = chart.render(value_files, sets)
    assert spool_volume(manifests) is None
    assert spool_mounts(manifests) == []
    main = chart.container(manifests, "meshmirror")
    env = chart.literal_env(main)
    # 0 must still be passed: the process's own default would spool 4Gi into /tmp.
    assert flags.parse_size(env["MESHMIRROR_MIRROR_SPOOL_LIMIT"]) == 0
    assert "MESHMIRROR_MIRROR_SPOOL_DIR" not in env
    args = parse_container(main)
    assert args.mirror_spool_limit == 0
    assert args.mirror_spool_dir is None


def test_set_string_zero_is_zero(helm: Path) -> None:
    result = chart.run_helm(["template", chart.RELEASE, str(chart.CHART),
                             "--set-string", "meshmirror.mirrorSpoolLimit=0"])
    assert result.returncode == 0, result.stderr
    manifests = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert spool_volume(manifests) is None
    assert spool_mounts(manifests) == []
    env = chart.literal_env(chart.container(manifests, "meshmirror"))
    assert env["MESHMIRROR_MIRROR_SPOOL_LIMIT"] == "0"


# Strings as a user would write them; each must mean the same bytes to parse_size
# (the env, passed as written) and to the chart (the sizeLimit).
ADMITTED_FORMS = ["4Gi", "4GiB", "512Mi", "512MiB", "500M", "500MB", "1G", "2T", "1Ti",
                  "100Ki", "1k", "1K", "1kB", "7B", "1", "123456789", "999999999999999",
                  "999999Ti"]


@pytest.mark.parametrize("form", ADMITTED_FORMS)
def test_every_admitted_form_reaches_both_readers_alike(helm: Path, form: str) -> None:
    manifests = chart.render(sets=[f"meshmirror.mirrorSpoolLimit={form}"])
    main = chart.container(manifests, "meshmirror")
    rendered = chart.literal_env(main)["MESHMIRROR_MIRROR_SPOOL_LIMIT"]
    limit = flags.parse_size(form)
    assert flags.parse_size(rendered) == limit
    assert parse_container(main).mirror_spool_limit == limit
    volume = spool_volume(manifests)
    assert volume is not None
    size_limit = volume["emptyDir"]["sizeLimit"]
    assert isinstance(size_limit, str)
    assert chart.quantity_value(size_limit) == expected_size_limit(limit)


def test_plain_bytes_from_a_values_file_stay_digits(helm: Path, tmp_path: Path) -> None:
    """A large number in a values file is a float to Helm; toString would print
    4.294967296e+09, which parse_size refuses."""
    values = tmp_path / "bytes.yaml"
    values.write_text("meshmirror:\n  mirrorSpoolLimit: 6442450944\n")
    manifests = chart.render((str(values),))
    env = chart.literal_env(chart.container(manifests, "meshmirror"))
    assert env["MESHMIRROR_MIRROR_SPOOL_LIMIT"] == "6442450944"
    volume = spool_volume(manifests)
    assert volume is not None
    assert volume["emptyDir"]["sizeLimit"] == "6912Mi"


def test_custom_value_set_uses_a_non_quantity_form(helm: Path) -> None:
    """custom-registries.yaml writes 6GiB, which the sizeLimit must not copy."""
    manifests = chart.render(("custom-registries.yaml",))
    volume = spool_volume(manifests)
    assert volume is not None
    assert volume["emptyDir"]["sizeLimit"] == "6912Mi"
    args = parse_container(chart.container(manifests, "meshmirror"))
    assert args.mirror_spool_limit == 6 * 2**30
    assert args.mirror_spool_dir == Path(SPOOL_DIR)


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "meshmirror.mirrorSpoolLimit=lots"],
     'meshmirror.mirrorSpoolLimit: expected bytes or a size such as 4Gi or 512Mi, got "lots"'),
    (["--set", "meshmirror.mirrorSpoolLimit=512m"],
     'meshmirror.mirrorSpoolLimit: expected bytes or a size such as 4Gi or 512Mi, got "512m"'),
    (["--set-json", "meshmirror.mirrorSpoolLimit=1.5"],
     "meshmirror.mirrorSpoolLimit: expected a whole number of bytes from 0 to 999999999999999, "
     "got 1.5"),
    (["--set", "meshmirror.mirrorSpoolLimit=-1"],
     "meshmirror.mirrorSpoolLimit: expected a whole number of bytes from 0 to 999999999999999, "
     "got -1"),
    (["--set", "meshmirror.mirrorSpoolLimit=true"],
     "meshmirror.mirrorSpoolLimit: expected bytes or a size such as 4Gi or 512Mi, got true"),
])
def test_template_refuses_what_the_schema_would_when_it_is_skipped(
    helm: Path, args: list[str], message: str
) -> None:
    result = chart.run_helm(["template", chart.RELEASE, str(chart.CHART),
                             "--skip-schema-validation", *args])
    assert result.returncode != 0, f"helm accepted {args}"
    assert message in result.stderr, result.stderr


def test_quantity_reader_refuses_what_the_api_server_refuses() -> None:
    """The sizeLimit checks above can fail: a copied user form is not a quantity."""
    for bad in ["4GiB", "4gi", "512MB", "1K", "4 Gi", "", "Gi"]:
        with pytest.raises(ValueError, match="not a Kubernetes quantity"):
            chart.quantity_value(bad)
    assert chart.quantity_value("4608Mi") == 4608 * MI
    assert chart.quantity_value("512m") == Fraction(512, 1000)
    assert chart.quantity_value("1E3") == 1000
    assert chart.quantity_value("1.5G") == 1_500_000_000


def test_cache_limit_defaults_to_the_spool_limit_and_sizes_the_volume(helm: Path) -> None:
    """upstreamCacheLimit: empty passes nothing (the CLI takes the spool limit); a
    larger value reaches --upstream-cache-limit and grows the shared volume."""
    main = chart.container(chart.render(), "meshmirror")
    assert "MESHMIRROR_UPSTREAM_CACHE_LIMIT" not in chart.literal_env(main)
    assert parse_container(main).upstream_cache_limit is None
    manifests = chart.render(sets=["meshmirror.upstreamCacheLimit=8Gi"])
    main = chart.container(manifests, "meshmirror")
    assert chart.literal_env(main)["MESHMIRROR_UPSTREAM_CACHE_LIMIT"] == "8Gi"
    args = parse_container(main)
    assert (args.upstream_cache_limit, args.mirror_spool_limit) == (8 * 2**30, 4 * 2**30)
    volume = spool_volume(manifests)
    assert volume is not None
    assert chart.quantity_value(volume["emptyDir"]["sizeLimit"]) == expected_size_limit(8 * 2**30)
    smaller = spool_volume(chart.render(sets=["meshmirror.upstreamCacheLimit=1Gi"]))
    assert smaller == {"name": "spool", "emptyDir": {"sizeLimit": "4608Mi"}}


def test_bad_cache_limit_is_refused_by_schema_and_template(helm: Path) -> None:
    result = chart.run_helm(["template", chart.RELEASE, str(chart.CHART),
                             "--set", "meshmirror.upstreamCacheLimit=lots"])
    assert result.returncode != 0 and "/meshmirror/upstreamCacheLimit" in result.stderr
    result = chart.run_helm(["template", chart.RELEASE, str(chart.CHART),
                             "--skip-schema-validation",
                             "--set", "meshmirror.upstreamCacheLimit=lots"])
    assert result.returncode != 0
    assert ('meshmirror.upstreamCacheLimit: expected bytes or a size such as 4Gi or 512Mi, '
            'got "lots"') in result.stderr
