"""The command line's edge: defaults come from the config dataclasses, values parse as
a person writes them, and a bad one is one line naming the flag."""

from __future__ import annotations

import argparse
import re
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshmirror import cli
from meshmirror.addresses import is_wildcard
from meshmirror.containerd.config import ContainerdConfig
from meshmirror.containerd.hostsconfig import HostsConfig, parse_registries
from meshmirror.flags import UsageError, field_default, parse_bool, parse_duration, parse_size
from meshmirror.mirror.options import MirrorConfig, OutagePeerTags
from meshmirror.registry.serveroptions import ServerConfig
from meshmirror.runconfig import NodeConfig, PeeringConfig
from meshmirror.upstream.options import UpstreamConfig

CHART_VALUES = Path(__file__).resolve().parent.parent / "helm" / "meshmirror" / "values.yaml"

# `run`'s scalar flags (by argparse dest) and the dataclass field each one sets.
RUN_FLAGS: dict[str, tuple[type, str]] = {
    "store": (NodeConfig, "store"),
    "registry_addr": (NodeConfig, "registry_addr"),
    "metrics_addr": (NodeConfig, "metrics_addr"),
    "mesh_addr": (PeeringConfig, "mesh_addr"),
    "advertise_addr": (PeeringConfig, "advertise_addr"),
    "node_name": (PeeringConfig, "node_name"),
    "join_dns": (PeeringConfig, "join_dns"),
    "gossip_key_file": (PeeringConfig, "gossip_key_file"),
    "summary_fp_rate": (PeeringConfig, "summary_fp_rate"),
    "zone": (PeeringConfig, "zone"),
    "zone_from_node_label": (PeeringConfig, "zone_label"),
    "resolve_tags": (MirrorConfig, "resolve_tags"),
    "outage_peer_tags": (MirrorConfig, "outage_peer_tags"),
    "outage_vouches": (MirrorConfig, "outage_vouches"),
    "private_images": (MirrorConfig, "private_images"),
    "private_images_unknown": (MirrorConfig, "private_images_unknown"),
    "state_dir": (MirrorConfig, "state_dir"),
    "upstream_connect_timeout": (UpstreamConfig, "connect_timeout"),
    "upstream_timeout": (UpstreamConfig, "timeout"),
    "upstream_failure_threshold": (UpstreamConfig, "failure_threshold"),
    "upstream_cooldown": (UpstreamConfig, "cooldown"),
    "upstream_tag_ttl": (UpstreamConfig, "tag_ttl"),
    "upstream_client_rate": (UpstreamConfig, "client_rate"),
    "upstream_client_burst": (UpstreamConfig, "client_burst"),
    "upstream_max_registries": (UpstreamConfig, "max_registries"),
    "mirror_resolve_timeout": (MirrorConfig, "connect_timeout"),
    "mirror_first_byte_timeout": (MirrorConfig, "first_byte_timeout"),
    "mirror_resolve_retries": (MirrorConfig, "peers_tried"),
    "mirror_spool_dir": (MirrorConfig, "spool_dir"),
    "mirror_spool_limit": (MirrorConfig, "spool_limit"),
    "upstream_cache_dir": (MirrorConfig, "upstream_cache_dir"),
    "upstream_cache_limit": (MirrorConfig, "upstream_cache_limit"),
    "mirror_stall_timeout": (MirrorConfig, "stall_timeout"),
    "mirror_min_rate": (MirrorConfig, "min_rate"),
    "mirror_deadline": (MirrorConfig, "deadline"),
    "mirror_peer_connections": (MirrorConfig, "peer_connections"),
    "mirror_memory_limit": (MirrorConfig, "memory_limit"),
    "rollout_fanout": (MirrorConfig, "rollout_fanout"),
    "containerd_sock": (ContainerdConfig, "sock"),
    "containerd_namespace": (ContainerdConfig, "namespace"),
    "containerd_content_path": (ContainerdConfig, "content_path"),
    "containerd_config": (ContainerdConfig, "config"),
    "write_hosts_config": (NodeConfig, "write_hosts_config"),
    "client_send_timeout": (ServerConfig, "send_timeout"),
    "client_max_connections": (ServerConfig, "max_connections"),
    "client_own_addrs": (ServerConfig, "own_addrs"),
    "containerd_registry_config_path": (HostsConfig, "config_path"),
    "prepend_existing": (HostsConfig, "prepend_existing"),
}
# Repeatable flags: absent on the command line, they leave these fields at their default.
RUN_LIST_FLAGS = {"join", "mirrored_registries", "registry_filters", "mirror_targets",
                  "upstream_allow_hosts"}


def run_parser() -> argparse.ArgumentParser:
    parser = cli.build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            run: argparse.ArgumentParser = action.choices["run"]
            return run
    raise AssertionError("no run subcommand")


def test_every_run_flag_defaults_to_its_dataclass_default() -> None:
    dests = {a.dest for a in run_parser()._actions} - {"help", "log_level"}
    assert dests == set(RUN_FLAGS) | RUN_LIST_FLAGS, "map each new run flag to its field"
    args = cli.build_parser().parse_args(["run"])
    for dest, (owner, name) in RUN_FLAGS.items():
        assert getattr(args, dest) == field_default(owner, name), dest
    assert args.node_name == socket.gethostname()


def test_run_without_flags_builds_the_dataclass_defaults() -> None:
    config = cli.node_config(cli.build_parser().parse_args(["run", "--store", "oci:/tmp"]))
    assert config.containerd == ContainerdConfig()
    assert config.peering is not None
    assert config.peering.mirror == MirrorConfig()
    assert config.peering.join == field_default(PeeringConfig, "join")
    assert config.peering.mesh_addr == field_default(PeeringConfig, "mesh_addr")
    assert config.write_hosts_config is False
    assert config.hosts == NodeConfig().hosts
    assert config.server == ServerConfig()


def test_client_bounds_reach_the_server_options() -> None:
    config = cli.node_config(cli.parse_args(["run", "--store", "oci:/tmp",
                                             "--client-send-timeout", "1.5s",
                                             "--client-max-connections", "64",
                                             "--client-own-addrs", "10.0.0.5, [fd00::5]"]))
    assert config.server == ServerConfig(send_timeout=1.5, max_connections=64,
                                         own_addrs=("10.0.0.5", "fd00::5"))


@pytest.mark.parametrize(("flag", "value"), [("--client-send-timeout", "0"),
                                             ("--client-max-connections", "0")])
def test_client_bounds_must_bound(flag: str, value: str,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "--store", "oci:/tmp", flag, value]) == 2
    assert flag in one_error_line(capsys)


def test_run_hosts_config_reads_as_configure_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """The chart passes the same MESHMIRROR_* variables to `configure` and to `run`."""
    env = {"MESHMIRROR_WRITE_HOSTS_CONFIG": "true",
           "MESHMIRROR_CONTAINERD_REGISTRY_CONFIG_PATH": "/srv/certs.d",
           "MESHMIRROR_MIRRORED_REGISTRIES": "https://docker.io,ghcr.io",
           "MESHMIRROR_MIRROR_TARGETS": "http://fd00::5:30022,http://fd00::5:30023",
           "MESHMIRROR_RESOLVE_TAGS": "false", "MESHMIRROR_PREPEND_EXISTING": "true"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    run = cli.node_config(cli.parse_args(["run", "--store", "oci:/tmp"]))
    configure = cli.hosts_config(cli.parse_args(["configure"]), targets_required=True)
    assert run.write_hosts_config is True
    assert run.hosts == configure
    assert run.hosts.targets == ("http://[fd00::5]:30022", "http://[fd00::5]:30023")


def test_run_writing_hosts_config_needs_a_target(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "--store", "oci:/tmp", "--write-hosts-config", "true"]) == 2
    assert "--mirror-targets is required" in capsys.readouterr().err


def test_help_shows_the_defaults_in_the_form_a_flag_takes() -> None:
    text = " ".join(run_parser().format_help().split())
    assert "(default: 100ms)" in text and "(default: 500ms)" in text
    assert "(default: 4Gi)" in text and "(default: :5000)" in text
    assert "(default: :7946)" in text and "(default: encrypted)" in text


def _values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load(CHART_VALUES.read_text())
    return values


# values.yaml key -> (the CLI's parser for the value as the chart passes it, its default).
CHART_DEFAULTS: dict[str, tuple[Any, Any]] = {
    "meshmirror.logLevel": (str, cli.LOG_LEVEL),
    # On: hosts.toml's "resolve" capability, and `run --resolve-tags` upstream-first.
    "meshmirror.resolveTags": (parse_bool, True),
    "meshmirror.outageVouches": (OutagePeerTags, field_default(MirrorConfig, "outage_vouches")),
    "meshmirror.rolloutFanout": (int, field_default(MirrorConfig, "rollout_fanout")),
    "meshmirror.mirrorResolveTimeout": (parse_duration,
                                        field_default(MirrorConfig, "connect_timeout")),
    "meshmirror.mirrorFirstByteTimeout": (parse_duration,
                               field_default(MirrorConfig, "first_byte_timeout")),
    "meshmirror.mirrorResolveRetries": (int, field_default(MirrorConfig, "peers_tried")),
    "meshmirror.mirrorSpoolLimit": (parse_size, field_default(MirrorConfig, "spool_limit")),
    # Empty: as mirrorSpoolLimit, which the CLI's None means too.
    "meshmirror.upstreamCacheLimit": (lambda text: parse_size(text) if text else None,
                                      field_default(MirrorConfig, "upstream_cache_limit")),
    "meshmirror.summaryFpRate": (float, field_default(PeeringConfig, "summary_fp_rate")),
    "meshmirror.zoneFromNodeLabel": (str, field_default(PeeringConfig, "zone_label")),
    "meshmirror.clientSendTimeout": (parse_duration, field_default(ServerConfig, "send_timeout")),
    "meshmirror.clientMaxConnections": (int, field_default(ServerConfig, "max_connections")),
    "meshmirror.prependExisting": (parse_bool, field_default(HostsConfig, "prepend_existing")),
    "meshmirror.containerdSock": (str, field_default(ContainerdConfig, "sock")),
    "meshmirror.containerdNamespace": (str, field_default(ContainerdConfig, "namespace")),
    "meshmirror.containerdContentPath": (str, field_default(ContainerdConfig, "content_path")),
    "meshmirror.containerdConfigPath": (str, field_default(ContainerdConfig, "config")),
    "meshmirror.containerdRegistryConfigPath": (Path, field_default(HostsConfig, "config_path")),
    "service.registry.port": (int, field_default(NodeConfig, "registry_addr")[1]),
    "service.mesh.port": (int, field_default(PeeringConfig, "mesh_addr")[1]),
    "service.metrics.port": (int, field_default(NodeConfig, "metrics_addr")[1]),
}


@pytest.mark.parametrize("key", sorted(CHART_DEFAULTS))
def test_chart_values_default_to_the_dataclass_defaults(key: str) -> None:
    value: Any = _values()
    for part in key.split("."):
        value = value[part]
    parse, default = CHART_DEFAULTS[key]
    # Scalars reach the CLI as MESHMIRROR_* strings: YAML's true arrives as "true".
    text = str(value).lower() if isinstance(value, bool) else str(value)
    assert parse(text) == default


def test_chart_lists_default_to_every_registry_and_no_filter() -> None:
    values = _values()["meshmirror"]
    assert tuple(parse_registries(values["mirroredRegistries"])) == field_default(
        HostsConfig, "registries")
    assert values["mirroredRegistries"] == [] and not field_default(
        MirrorConfig, "mirrored_registries")
    assert values["registryFilters"] == [] and field_default(
        MirrorConfig, "registry_filters") == ()


@pytest.mark.parametrize(("text", "seconds"), [
    ("20ms", 0.02), ("1.5s", 1.5), ("1m", 60.0), ("500us", 0.0005), ("500µs", 0.0005),
    ("0.1", 0.1), ("2", 2.0), ("1m30s", 90.0), ("2h", 7200.0), (".5s", 0.5), ("100ns", 1e-7),
    (" 250ms ", 0.25), ("0", 0.0),
])
def test_durations_read_as_go_writes_them_or_as_seconds(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "1x", "-1s", "ms", "1.5.5s", "nan", "inf", "1 s",
                                  "-0.1"])
def test_bad_durations_say_what_to_write(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape("such as 100ms, 1.5s or 0.1")):
        parse_duration(text)


def test_every_duration_flag_takes_go_durations() -> None:
    args = cli.parse_args(["run", "--mirror-resolve-timeout", "20ms",
                           "--mirror-first-byte-timeout", "1.5s"])
    assert args.mirror_resolve_timeout == pytest.approx(0.02)
    assert args.mirror_first_byte_timeout == pytest.approx(1.5)


def test_duration_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHMIRROR_MIRROR_RESOLVE_TIMEOUT", "20ms")
    monkeypatch.setenv("MESHMIRROR_MIRROR_FIRST_BYTE_TIMEOUT", "0.75")
    args = cli.parse_args(["run"])
    assert args.mirror_resolve_timeout == pytest.approx(0.02)
    assert args.mirror_first_byte_timeout == pytest.approx(0.75)
    assert cli.parse_args(["run", "--mirror-resolve-timeout", "1s"]).mirror_resolve_timeout == 1


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("flag", ["--mirror-resolve-timeout", "--mirror-first-byte-timeout"])
def test_bad_duration_flag_is_one_line_naming_it(
    flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["run", "--store", "oci:/tmp", flag, "soon"]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"meshmirror: {flag} 'soon': ") and "100ms" in line


def test_bad_environment_value_names_variable_and_flag(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MESHMIRROR_MIRROR_RESOLVE_TIMEOUT", "1x")
    assert cli.main(["run", "--store", "oci:/tmp"]) == 2
    line = one_error_line(capsys)
    assert line.startswith("meshmirror: MESHMIRROR_MIRROR_RESOLVE_TIMEOUT: "
                           "--mirror-resolve-timeout '1x': ") and "100ms" in line


@pytest.mark.parametrize(("argv", "level"), [
    (["--log-level", "INFO", "run"], "info"),
    (["run", "--log-level", "Debug"], "debug"),
    (["--log-level", "Warning", "doctor"], "warning"),
    (["run"], cli.LOG_LEVEL),
])
def test_log_level_ignores_case(argv: list[str], level: str) -> None:
    assert cli.parse_args(argv).log_level == level


def test_bad_log_level_is_one_line_with_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--log-level", "loud", "run"]) == 2
    line = one_error_line(capsys)
    assert line.startswith("meshmirror: --log-level 'loud': ") and "debug" in line


@pytest.mark.parametrize(("flag", "value", "example"), [
    ("--mirror-resolve-retries", "many", "such as 3"),
    ("--summary-fp-rate", "low", "such as 0.01"),
    ("--zone", "eu west", "e.g. eu-west-1a"),
    ("--zone", "a" * 64, "e.g. eu-west-1a"),
    ("--resolve-tags", "maybe", "true or false"),
    ("--registry-addr", "h:port", "not a number"),
    ("--mirrored-registries", "docker.io/library", "e.g. ghcr.io"),
    ("--upstream-client-burst", "lots", "such as 3"),
    ("--upstream-client-rate", "fast", "such as 0.01"),
    ("--client-own-addrs", "10.0.0.5,node-a", "10.0.0.5,fd00::5"),
])
def test_bad_values_are_one_line_naming_the_flag(
    flag: str, value: str, example: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["run", "--store", "oci:/tmp", flag, value]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"meshmirror: {flag} {value!r}") and example in line


def test_upstream_bounds_and_allow_list(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY",
                 "no_proxy", "REQUEST_METHOD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "proxy.internal:3128")
    monkeypatch.setenv("NO_PROXY", "10.0.0.0/8")
    config = cli.node_config(cli.parse_args([
        "run", "--store", "oci:/tmp", "--registry-addr", "10.0.0.7:5000",
        "--upstream-tag-ttl", "1500ms", "--upstream-client-rate", "2.5",
        "--upstream-client-burst", "7", "--upstream-max-registries", "4",
        "--upstream-allow-hosts", "auth.internal,10.1.0.0/16",
        "--upstream-allow-hosts", "192.168.5.5", "--mirror-targets", "http://127.0.0.1:5000"]))
    assert config.peering is not None
    upstream = config.peering.upstream
    assert (upstream.tag_ttl, upstream.client_rate, upstream.client_burst,
            upstream.max_registries) == (1.5, 2.5, 7, 4)
    assert upstream.allow_hosts == ("auth.internal", "10.1.0.0/16", "192.168.5.5")
    assert upstream.mirror_urls == ("http://10.0.0.7:5000", "http://127.0.0.1:5000")
    assert upstream.proxies.proxy_for("https://ghcr.io/v2/") == "http://proxy.internal:3128"
    assert upstream.proxies.proxy_for("https://10.2.3.4/v2/") is None


@pytest.mark.parametrize(("argv", "env", "words"), [
    (["--upstream-allow-hosts", "169.254.169.254"], {}, "--upstream-allow-hosts"),
    (["--upstream-client-rate", "0"], {}, "--upstream-client-rate"),
    (["--upstream-tag-ttl", "-1"], {}, "--upstream-tag-ttl"),
    ([], {"HTTPS_PROXY": "socks5://10.0.0.1:1080"}, "HTTPS_PROXY"),
])
def test_bad_upstream_settings_are_one_line(
    argv: list[str], env: dict[str, str], words: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["run", "--store", "oci:/tmp", *argv]) == 2
    line = one_error_line(capsys)
    assert line.startswith("meshmirror: ") and words in line


def test_mirrored_registries_parse_alike_for_run_and_configure() -> None:
    flags = ["--mirrored-registries", "https://docker.io/,ghcr.io",
             "--mirrored-registries", "http://127.0.0.1:5050"]
    run = cli.node_config(cli.parse_args(["run", "--store", "oci:/tmp", *flags]))
    hosts = cli.hosts_config(cli.parse_args(["configure", *flags]), targets_required=False)
    assert run.peering is not None
    assert run.peering.mirror.mirrored_registries == {r.directory for r in hosts.registries}
    assert run.peering.mirror.mirrored_registries == {"docker.io", "ghcr.io", "127.0.0.1:5050"}
    every = cli.node_config(cli.parse_args(
        ["run", "--store", "oci:/tmp", "--mirrored-registries", "_default"]))
    assert every.peering is not None and every.peering.mirror.mirrored_registries == frozenset()


@pytest.mark.parametrize(("host", "wildcard"), [
    ("", True), ("0.0.0.0", True), ("::", True), ("[::]", True),
    ("127.0.0.1", False), ("::1", False), ("node-a", False),
])
def test_is_wildcard(host: str, wildcard: bool) -> None:
    assert is_wildcard(host) is wildcard


@pytest.mark.parametrize(("given", "dialled"), [
    ("127.0.0.1:9090", "127.0.0.1:9090"),
    (":9191", "127.0.0.1:9191"),
    ("0.0.0.0:9191", "127.0.0.1:9191"),
    ("[::]:9191", "[::1]:9191"),
    ("::1", "[::1]:9090"),
    ("fd00::7", "[fd00::7]:9090"),
    ("[fd00::7]:9191", "[fd00::7]:9191"),
])
def test_members_addr_is_written_like_metrics_addr(given: str, dialled: str) -> None:
    assert cli.parse_args(["members", "--addr", given]).addr == dialled


def test_members_in_a_pod_dials_the_pods_own_metrics_addr(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The chart sets MESHMIRROR_METRICS_ADDR for `run`; `kubectl exec ... -- meshmirror
    # members` in that pod must reach it, whatever service.metrics.port is.
    monkeypatch.setenv("MESHMIRROR_METRICS_ADDR", ":9191")
    assert cli.parse_args(["members"]).addr == "127.0.0.1:9191"
    assert cli.parse_args(["members", "--addr", "127.0.0.9:9090"]).addr == "127.0.0.9:9090"


def test_members_addr_that_cannot_be_dialled_is_one_line() -> None:
    with pytest.raises(UsageError, match="--addr 'host:port:x'"):
        cli.parse_args(["members", "--addr", "host:port:x"])
