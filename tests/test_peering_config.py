"""`meshmirror run`'s peering flags: what they become, and one-line errors for bad ones."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from meshmirror.cli import build_parser, main, mesh_addresses, peering_config
from meshmirror.flags import UsageError, parse_size
from meshmirror.mirror.options import TagResolution
from meshmirror.runconfig import PeeringConfig


def config(*flags: str) -> PeeringConfig | None:
    args = build_parser().parse_args(
        ["run", "--store", "oci:/tmp", "--registry-addr", "127.0.0.5:5000", *flags])
    return peering_config(args)


def test_flags_become_mesh_and_mirror_settings(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("dGhpcyBpcyAxNiBieXRlcw==\n")
    got = config("--mesh-addr", "127.0.0.5:7000", "--join", "127.0.0.6:7000,127.0.0.7",
                 "--join", "127.0.0.8:7001", "--registry-filters", ":latest$",
                 "--mirrored-registries", "https://docker.io,ghcr.io",
                 "--mirror-resolve-timeout", "0.2", "--mirror-first-byte-timeout", "1.5",
                 "--resolve-tags", "false", "--gossip-key-file", str(key), "--node-name", "n5")
    assert got is not None
    assert got.mesh_addr == ("127.0.0.5", 7000)
    assert got.join == (("127.0.0.6", 7000), ("127.0.0.7", 7946), ("127.0.0.8", 7001))
    assert got.http_base == "http://127.0.0.5:5000"
    assert got.node_name == "n5"
    assert got.mirror.mirrored_registries == frozenset({"docker.io", "ghcr.io"})
    assert got.mirror.registry_filters == (re.compile(":latest$"),)
    assert (got.mirror.connect_timeout, got.mirror.first_byte_timeout) == (0.2, 1.5)
    assert got.mirror.hedge_delay == pytest.approx(0.1)
    assert got.mirror.resolve_tags is TagResolution.OFF


def test_spool_flags(tmp_path: Path) -> None:
    got = config("--mirror-spool-dir", str(tmp_path), "--mirror-spool-limit", "512Mi")
    assert got is not None
    assert (got.mirror.spool_dir, got.mirror.spool_limit) == (tmp_path, 512 << 20)
    default = config()
    assert default is not None and default.mirror.spool_limit == 4 << 30
    assert default.mirror.spool_dir is None  # the system's temporary directory
    off = config("--mirror-spool-dir", str(tmp_path / "missing"), "--mirror-spool-limit", "0")
    assert off is not None and off.mirror.spool_limit == 0, "no spool: directory not needed"


@pytest.mark.parametrize(("text", "size"), [
    ("0", 0), ("1073741824", 1 << 30), ("4Gi", 4 << 30), ("4GiB", 4 << 30), ("512Mi", 512 << 20),
    ("512M", 512 * 10**6), ("2k", 2000), (" 8 MiB ", 8 << 20),
])
def test_sizes_read_as_a_person_writes_them(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_mesh_off_serves_the_local_store_only() -> None:
    assert config("--mesh-addr", "off") is None


def test_wildcard_bind_advertises_a_concrete_address() -> None:
    advertise, http_base = mesh_addresses(("0.0.0.0", 7946), None, ("0.0.0.0", 5000))
    assert advertise is not None and advertise[0] not in {"0.0.0.0", ""}
    assert advertise[1] == 7946
    assert http_base == f"http://{advertise[0]}:5000"
    advertise, http_base = mesh_addresses(("0.0.0.0", 7946), "10.1.2.3", ("0.0.0.0", 5000))
    assert advertise == ("10.1.2.3", 7946)
    assert http_base == "http://10.1.2.3:5000"
    _, http_base = mesh_addresses(("::1", 7946), None, ("::", 5000))
    assert http_base == "http://[::1]:5000"


@pytest.mark.parametrize(("flags", "message"), [
    (("--registry-filters", "(unclosed"), "not a regex"),
    (("--gossip-key-file", "/nonexistent/key"), "no such file"),
    (("--mirror-resolve-timeout", "0"), "must be > 0"),
    (("--mirror-resolve-retries", "0"), "retries >= 1"),
    (("--summary-fp-rate", "1.5"), "between 0 and 1"),
    (("--join", "host:notaport"), "not a number"),
    (("--mirror-spool-dir", "/nonexistent/spool"), "not a directory"),
])
def test_bad_flags_are_usage_errors(flags: tuple[str, ...], message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        config(*flags)


def test_bad_flag_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--store", "oci:/tmp", "--registry-filters", "(x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("meshmirror: --registry-filters")


def test_bad_size_exits_2_saying_what_to_write(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--store", "oci:/tmp", "--mirror-spool-limit", "lots"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["meshmirror: --mirror-spool-limit 'lots': expected a size such as 4Gi or "
                   "512MiB"]
