"""configure/cleanup on real directories: exact restore, idempotence, ordering, bad input."""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshmirror.cli import main
from meshmirror.containerd import hostsconfig
from meshmirror.containerd.hostsconfig import MirroredRegistry, render_hosts
from meshmirror.flags import UsageError

Snapshot = dict[str, tuple[str, int, bytes | str]]

EXISTING_DOCKER = b"""# the operator's own file, comments and all
server = "https://registry-1.docker.io"
ca = "upstream-ca.crt"

[host."https://mirror-a.internal"]
  capabilities = ["pull", "resolve"]
  ca = "ca.crt"
  client = [["client.cert", "client.key"]]
  [host."https://mirror-a.internal".header]
    x-custom = ["one", "two"]

[host."https://mirror-b.internal/v2/upstream"]
  capabilities = ["pull"]
  skip_verify = true
  override_path = true
"""

EXISTING_QUAY = b"""server = "https://quay.example"
[host."http://quay-cache:8080"]
capabilities = ["pull"]
"""


def snapshot(root: Path) -> Snapshot:
    """Every entry under root with its type, mode and content (or link target)."""
    out: Snapshot = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st_ = path.lstat()
            rel = path.relative_to(root).as_posix()
            if stat.S_ISLNK(st_.st_mode):
                out[rel] = ("link", 0, os.readlink(path))
            elif stat.S_ISDIR(st_.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st_.st_mode), b"")
            else:
                out[rel] = ("file", stat.S_IMODE(st_.st_mode), path.read_bytes())
    return out


def inodes(root: Path) -> dict[str, tuple[int, int]]:
    return {
        p.relative_to(root).as_posix(): (p.lstat().st_ino, p.lstat().st_mtime_ns)
        for p in root.rglob("*")
    }


@pytest.fixture
def existing(tmp_path: Path) -> Path:
    """A certs.d as an operator leaves it: hosts files, certificates, odd modes, a symlink."""
    root = tmp_path / "certs.d"
    docker = root / "docker.io"
    docker.mkdir(parents=True)
    (docker / "hosts.toml").write_bytes(EXISTING_DOCKER)
    for name, mode, data in [
        ("ca.crt", 0o600, b"-----BEGIN CERTIFICATE-----\nAAA\n"),
        ("upstream-ca.crt", 0o644, b"-----BEGIN CERTIFICATE-----\nBBB\n"),
        ("client.cert", 0o640, b"cert\x00\xff binary"),
        ("client.key", 0o400, b"-----BEGIN PRIVATE KEY-----\nCCC\n"),
    ]:
        (docker / name).write_bytes(data)
        (docker / name).chmod(mode)
    (docker / "extra").mkdir(mode=0o700)
    (docker / "extra" / "notes.txt").write_text("kept")
    docker.chmod(0o750)
    quay = root / "quay.example"
    quay.mkdir()
    (quay / "hosts.toml").write_bytes(EXISTING_QUAY)
    (root / "README").write_text("operator notes\n")
    (root / "ghcr.io").symlink_to("quay.example")
    return root


def run(*args: str) -> int:
    return main(list(args))


def configure(root: Path, *extra: str) -> int:
    return run("configure", "--containerd-registry-config-path", str(root), *extra)


def hosts_of(path: Path) -> dict[str, object]:
    data = tomllib.loads(path.read_text())
    return data


def host_entries(parsed: dict[str, object]) -> dict[str, dict[str, object]]:
    """A parsed hosts.toml's ``[host."<url>"]`` tables by URL, in file order."""
    hosts = parsed["host"]
    assert isinstance(hosts, dict)
    for url, entry in hosts.items():
        assert isinstance(url, str) and isinstance(entry, dict), (url, entry)
    return hosts


def test_configure_then_cleanup_restores_everything_byte_for_byte(existing: Path) -> None:
    before = snapshot(existing)
    assert configure(existing, "--mirrored-registries", "docker.io,https://quay.example",
                     "--mirror-targets", "http://127.0.0.1:5000") == 0
    # The original moved whole into _backup, modes and symlink included.
    backup = snapshot(existing / "_backup")
    assert backup == before
    assert sorted(p.name for p in existing.iterdir()) == ["_backup", "docker.io", "quay.example"]
    assert run("cleanup", "--containerd-registry-config-path", str(existing)) == 0
    assert snapshot(existing) == before


def test_second_configure_changes_nothing(existing: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    flags = ["--mirrored-registries", "docker.io", "--mirrored-registries", "quay.example",
             "--mirror-targets", "http://127.0.0.2:5000,http://127.0.0.3:5000",
             "--prepend-existing", "true"]
    assert configure(existing, *flags) == 0
    first = snapshot(existing)
    first_inodes = inodes(existing)
    capsys.readouterr()
    assert configure(existing, *flags) == 0
    assert "nothing changed" in capsys.readouterr().out
    assert snapshot(existing) == first
    assert inodes(existing) == first_inodes  # not even rewritten in place


def test_hosts_file_shape(tmp_path: Path) -> None:
    root = tmp_path / "certs.d"
    assert configure(root, "--mirrored-registries", "docker.io,http://127.0.0.1:5050,ghcr.io",
                     "--mirror-targets", "http://127.0.0.2:5000/", "--mirror-targets",
                     "https://mirror.local:5443") == 0
    docker = (root / "docker.io" / "hosts.toml").read_text()
    assert docker.startswith(hostsconfig.HEADER)
    parsed = tomllib.loads(docker)
    assert parsed["server"] == "https://registry-1.docker.io"
    assert list(parsed["host"]) == ["http://127.0.0.2:5000", "https://mirror.local:5443"]
    for entry in parsed["host"].values():
        assert entry == {"capabilities": ["pull", "resolve"], "dial_timeout": "200ms"}
    assert hosts_of(root / "127.0.0.1:5050" / "hosts.toml")["server"] == "http://127.0.0.1:5050"
    assert hosts_of(root / "ghcr.io" / "hosts.toml")["server"] == "https://ghcr.io"
    assert stat.S_IMODE((root / "ghcr.io" / "hosts.toml").stat().st_mode) == 0o644
    assert (root / "_backup").is_dir() and not any((root / "_backup").iterdir())


def test_docker_io_url_form_maps_to_registry_1(tmp_path: Path) -> None:
    assert configure(tmp_path, "--mirrored-registries", "https://docker.io",
                     "--mirror-targets", "http://127.0.0.2:5000") == 0
    assert hosts_of(tmp_path / "docker.io" / "hosts.toml")["server"] == \
        "https://registry-1.docker.io"


def test_default_when_no_registry_named(tmp_path: Path) -> None:
    assert configure(tmp_path, "--mirror-targets", "http://127.0.0.2:5000") == 0
    parsed = hosts_of(tmp_path / "_default" / "hosts.toml")
    # No server: containerd then falls back to the registry being pulled from.
    assert "server" not in parsed
    assert list(host_entries(parsed)) == ["http://127.0.0.2:5000"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_backup", "_default"]


def test_resolve_tags_false_gives_pull_only(tmp_path: Path) -> None:
    assert configure(tmp_path, "--mirror-targets", "http://127.0.0.2:5000",
                     "--resolve-tags", "false") == 0
    parsed = hosts_of(tmp_path / "_default" / "hosts.toml")
    assert host_entries(parsed)["http://127.0.0.2:5000"]["capabilities"] == ["pull"]


def test_prepend_existing_keeps_old_entries_after_ours(existing: Path) -> None:
    assert configure(existing, "--mirrored-registries", "docker.io,quay.example",
                     "--mirror-targets", "http://127.0.0.2:5000,http://127.0.0.3:5000",
                     "--prepend-existing=true") == 0
    docker = hosts_of(existing / "docker.io" / "hosts.toml")
    old = tomllib.loads(EXISTING_DOCKER.decode())
    assert list(host_entries(docker)) == ["http://127.0.0.2:5000", "http://127.0.0.3:5000",
                                           "https://mirror-a.internal",
                                           "https://mirror-b.internal/v2/upstream"]
    assert host_entries(docker)["https://mirror-a.internal"] == old["host"]["https://mirror-a.internal"]
    # Same server as before, so its TLS settings still apply and are kept.
    assert docker["ca"] == "upstream-ca.crt"
    # Certificates the kept entries name sit beside the new file with their modes.
    for name in ("ca.crt", "upstream-ca.crt", "client.cert", "client.key", "extra/notes.txt"):
        new, orig = existing / "docker.io" / name, existing / "_backup" / "docker.io" / name
        assert new.read_bytes() == orig.read_bytes()
        assert stat.S_IMODE(new.stat().st_mode) == stat.S_IMODE(orig.stat().st_mode)
    quay = hosts_of(existing / "quay.example" / "hosts.toml")
    assert quay["server"] == "https://quay.example"
    assert list(host_entries(quay)) == ["http://127.0.0.2:5000", "http://127.0.0.3:5000",
                                        "http://quay-cache:8080"]


def test_prepend_drops_server_settings_of_a_different_server(tmp_path: Path) -> None:
    (tmp_path / "docker.io").mkdir()
    (tmp_path / "docker.io" / "hosts.toml").write_text(
        'server = "https://other.example"\nskip_verify = true\n'
        '[host."https://m.internal"]\ncapabilities = ["pull"]\n')
    assert configure(tmp_path, "--mirrored-registries", "docker.io", "--mirror-targets",
                     "http://127.0.0.2:5000", "--prepend-existing", "true") == 0
    parsed = hosts_of(tmp_path / "docker.io" / "hosts.toml")
    assert parsed["server"] == "https://registry-1.docker.io"
    assert "skip_verify" not in parsed
    assert list(host_entries(parsed)) == ["http://127.0.0.2:5000", "https://m.internal"]


def test_without_prepend_old_entries_are_gone_but_backed_up(existing: Path) -> None:
    assert configure(existing, "--mirrored-registries", "docker.io",
                     "--mirror-targets", "http://127.0.0.2:5000") == 0
    assert sorted(p.name for p in (existing / "docker.io").iterdir()) == ["hosts.toml"]
    assert list(host_entries(hosts_of(existing / "docker.io" / "hosts.toml"))) == \
        ["http://127.0.0.2:5000"]
    assert (existing / "_backup" / "docker.io" / "hosts.toml").read_bytes() == EXISTING_DOCKER


def test_changed_flags_on_rerun_remove_stale_registries(existing: Path) -> None:
    before = snapshot(existing)
    assert configure(existing, "--mirrored-registries", "docker.io,quay.example",
                     "--mirror-targets", "http://127.0.0.2:5000") == 0
    backup = snapshot(existing / "_backup")
    assert configure(existing, "--mirrored-registries", "docker.io",
                     "--mirror-targets", "http://127.0.0.3:5000", "--resolve-tags=false") == 0
    assert sorted(p.name for p in existing.iterdir()) == ["_backup", "docker.io"]
    parsed = hosts_of(existing / "docker.io" / "hosts.toml")
    assert parsed["host"] == {"http://127.0.0.3:5000": {"capabilities": ["pull"],
                                                        "dial_timeout": "200ms"}}
    assert snapshot(existing / "_backup") == backup  # never overwritten
    assert run("cleanup", "--containerd-registry-config-path", str(existing)) == 0
    assert snapshot(existing) == before


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--mirror-targets", "ftp://127.0.0.2:5000"], "want an http(s) URL"),
        (["--mirror-targets", "127.0.0.2:5000"], "want an http(s) URL"),
        (["--mirror-targets", "http://127.0.0.2:5000/v2/x"], "without a path"),
        (["--mirror-targets", "http://127.0.0.2:99999"], "is not a host[:port]"),
        (["--mirror-targets", "http://user:pw@127.0.0.2:5000"], "is not a host[:port]"),
        ([], "--mirror-targets is required"),
        (["--mirror-targets", "http://127.0.0.2:5000", "--mirrored-registries", "a b"],
         "not a registry host[:port]"),
        (["--mirror-targets", "http://127.0.0.2:5000", "--mirrored-registries", "ghcr.io/org"],
         "not a registry host[:port]"),
        (["--mirror-targets", "http://127.0.0.2:5000", "--mirrored-registries",
          "https://ghcr.io/org"], "no path"),
        (["--mirror-targets", "http://127.0.0.2:5000", "--mirrored-registries", "oci://ghcr.io"],
         "scheme must be http or https"),
        (["--mirror-targets", "http://127.0.0.2:5000", "--mirrored-registries", "ghcr.io:"],
         "not a registry host[:port]"),
        (["--mirror-targets", "http://127.0.0.2:5000", "--mirrored-registries",
          "docker.io,https://docker.io"], "names docker.io twice"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    existing: Path, flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = snapshot(existing)
    assert configure(existing, *flags) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1
    assert snapshot(existing) == before


def test_bad_input_does_not_create_the_directory(tmp_path: Path) -> None:
    assert configure(tmp_path / "certs.d", "--mirror-targets", "nope") == 2
    assert not (tmp_path / "certs.d").exists()


def test_invalid_existing_toml_with_prepend_fails_before_touching_anything(
    existing: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (existing / "quay.example" / "hosts.toml").write_text("server = \n")
    before = snapshot(existing)
    assert configure(existing, "--mirrored-registries", "quay.example", "--mirror-targets",
                     "http://127.0.0.2:5000", "--prepend-existing", "true") == 1
    err = capsys.readouterr().err
    assert "quay.example/hosts.toml is not valid TOML" in err and "fix or remove it" in err
    assert snapshot(existing) == before


def test_environment_variables_work_like_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESHMIRROR_CONTAINERD_REGISTRY_CONFIG_PATH", str(tmp_path))
    monkeypatch.setenv("MESHMIRROR_MIRROR_TARGETS", "http://127.0.0.2:5000,http://127.0.0.3:5000")
    monkeypatch.setenv("MESHMIRROR_MIRRORED_REGISTRIES", "ghcr.io,quay.io")
    assert run("configure") == 0
    parsed = hosts_of(tmp_path / "quay.io" / "hosts.toml")
    assert list(host_entries(parsed)) == ["http://127.0.0.2:5000", "http://127.0.0.3:5000"]


def test_cleanup_without_backup_removes_only_our_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert configure(tmp_path, "--mirrored-registries", "ghcr.io,quay.io",
                     "--mirror-targets", "http://127.0.0.2:5000") == 0
    # The backup is gone (say, removed by hand) and the operator added a file of their own.
    (tmp_path / "_backup").rmdir()
    (tmp_path / "quay.io" / "ca.crt").write_text("mine")
    (tmp_path / "docker.io").mkdir()
    (tmp_path / "docker.io" / "hosts.toml").write_text('server = "https://registry-1.docker.io"\n')
    capsys.readouterr()
    assert run("cleanup", "--containerd-registry-config-path", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "no backup" in out and "nothing to restore" in out
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "docker.io", "docker.io/hosts.toml", "quay.io", "quay.io/ca.crt"]


def test_cleanup_twice_is_harmless(existing: Path) -> None:
    before = snapshot(existing)
    assert configure(existing, "--mirror-targets", "http://127.0.0.2:5000") == 0
    assert run("cleanup", "--containerd-registry-config-path", str(existing)) == 0
    assert run("cleanup", "--containerd-registry-config-path", str(existing)) == 0
    assert snapshot(existing) == before


def test_interrupted_backup_is_completed(existing: Path) -> None:
    """configure killed half-way through moving entries into the backup loses nothing."""
    before = snapshot(existing)
    partial = existing / hostsconfig.PARTIAL_BACKUP_DIR
    partial.mkdir()
    (existing / "docker.io").rename(partial / "docker.io")
    assert configure(existing, "--mirrored-registries", "docker.io", "--mirror-targets",
                     "http://127.0.0.2:5000", "--prepend-existing", "true") == 0
    assert not partial.exists()
    assert snapshot(existing / "_backup") == before
    # The half-made backup was still read for --prepend-existing.
    assert "https://mirror-a.internal" in host_entries(
        hosts_of(existing / "docker.io" / "hosts.toml"))
    assert run("cleanup", "--containerd-registry-config-path", str(existing)) == 0
    assert snapshot(existing) == before


def test_interrupted_cleanup_is_completed(existing: Path) -> None:
    before = snapshot(existing)
    assert configure(existing, "--mirror-targets", "http://127.0.0.2:5000") == 0
    # Simulate cleanup dying after clearing our files and moving one entry back.
    for entry in existing.iterdir():
        if entry.name != "_backup":
            hostsconfig._remove(entry)
    restoring = existing / hostsconfig.RESTORING_DIR
    (existing / "_backup").rename(restoring)
    (restoring / "README").rename(existing / "README")
    assert configure(existing, "--mirror-targets", "http://127.0.0.2:5000") == 1
    assert run("cleanup", "--containerd-registry-config-path", str(existing)) == 0
    assert snapshot(existing) == before


def test_config_path_that_is_a_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "f").write_text("x")
    assert configure(tmp_path / "f", "--mirror-targets", "http://127.0.0.2:5000") == 1
    assert "is not a directory" in capsys.readouterr().err


_toml_text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=20)
_toml_value = st.recursive(
    st.one_of(_toml_text, st.booleans(), st.integers(-(2**63), 2**63 - 1)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(_toml_text, inner, max_size=3)),
    max_leaves=8,
)


@given(
    existing_hosts=st.dictionaries(_toml_text, st.dictionaries(_toml_text, _toml_value,
                                                               max_size=4), max_size=4),
    targets=st.lists(st.sampled_from(["http://127.0.0.2:5000", "https://m.local:1",
                                      "http://[::1]:5000"]), min_size=1, max_size=3,
                     unique=True),
)
def test_rendered_toml_round_trips_any_existing_entries(
    existing_hosts: dict[str, dict[str, object]], targets: list[str]
) -> None:
    """Whatever strings and nesting users' entries hold, the output parses back to them."""
    registry = MirroredRegistry("r.example", "https://r.example")
    text = render_hosts(registry, targets, True,
                        {"server": "https://r.example", "host": existing_hosts}).decode()
    parsed = tomllib.loads(text)
    expected: dict[str, dict[str, object]] = {
        t: {"capabilities": ["pull", "resolve"], "dial_timeout": "200ms"} for t in targets}
    for url, entry in existing_hosts.items():
        expected.setdefault(url, entry)
    assert parsed["host"] == expected
    assert list(parsed["host"]) == list(expected)


@pytest.mark.parametrize(("given", "written"), [
    ("http://fd00::5:30022", "http://[fd00::5]:30022"),
    ("https://2001:db8::10:30023/", "https://[2001:db8::10]:30023"),
    ("http://::1:5000", "http://[::1]:5000"),
    ("http://fd00::5", "http://[fd00::5]"),  # no valid address before the last colon
    ("http://[fd00::5]:30022", "http://[fd00::5]:30022"),
    ("http://192.0.2.10:30022", "http://192.0.2.10:30022"),
])
def test_bare_ipv6_target_hosts_are_bracketed(given: str, written: str) -> None:
    assert hostsconfig.parse_mirror_target(given) == written


@pytest.mark.parametrize("port", ["\u00b2", "\u0663\u0660", "", "5000x", "99999"])
def test_a_bad_port_after_a_bare_ipv6_host_is_a_usage_error(port: str) -> None:
    """Only ASCII digits read as a port: '²' is a digit to `str.isdigit` but no port."""
    given = f"http://fd00::5:{port}"
    with pytest.raises(UsageError, match="is not a host"):
        hostsconfig.parse_mirror_target(given)
    if port == "\u00b2":
        assert hostsconfig.bracket_ipv6_host(given) == given  # not read as host:port


def test_ipv6_node_ip_reaches_hosts_toml_bracketed(tmp_path: Path) -> None:
    """What the chart's init container does on an IPv6 node: $(NODE_IP) expanded bare."""
    assert configure(tmp_path, "--mirror-targets", "http://fd00::5:30022,http://fd00::5:30023") == 0
    hosts = host_entries(hosts_of(tmp_path / "_default" / "hosts.toml"))
    assert list(hosts) == ["http://[fd00::5]:30022", "http://[fd00::5]:30023"]


def test_run_start_up_step_puts_a_lost_entry_back(existing: Path) -> None:
    """`run --write-hosts-config` at a container restart: configure's step, idempotent."""
    from meshmirror.cli import node_config, parse_args
    from meshmirror.node import write_hosts_config

    flags = ["--containerd-registry-config-path", str(existing),
             "--mirrored-registries", "docker.io", "--mirror-targets", "http://127.0.0.2:30022",
             "--prepend-existing", "true"]
    before = snapshot(existing)
    assert configure(existing, *flags) == 0
    configured = snapshot(existing)
    config = node_config(parse_args(["run", "--store", "oci:/tmp", "--mesh-addr", "off",
                                     "--write-hosts-config", "true", *flags]))
    assert write_hosts_config(config) == 0
    assert snapshot(existing) == configured  # nothing changed on a healthy node
    (existing / "docker.io" / "hosts.toml").unlink()  # lost while the container was down
    assert write_hosts_config(config) == 0
    assert snapshot(existing) == configured
    assert run("cleanup", "--containerd-registry-config-path", str(existing)) == 0
    assert snapshot(existing) == before
