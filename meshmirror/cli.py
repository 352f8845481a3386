"""The ``meshmirror`` command line: the one place where flags exist.

Every flag can also be set from the environment as ``MESHMIRROR_<FLAG>``
(``--registry-addr`` is ``MESHMIRROR_REGISTRY_ADDR``), because a DaemonSet sets
environment variables more naturally than arguments. A flag given on the command
line wins over the environment.

Each flag's default is read from the config dataclass field it sets
(`_flag`), so a default is written once, beside the field. Flags are parsed
and checked here into those frozen dataclasses; the module that owns each
command's work takes the dataclass and never sees a flag. A bad value is one
line naming the flag and a good value, with exit code 2.
"""

from __future__ import annotations

import argparse
import enum
import ipaddress
import os
import re
import socket
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from meshmirror import __version__
from meshmirror.addresses import (
    AddressError,
    bracket_bare_ipv6,
    format_host_port,
    is_wildcard,
    parse_host_port,
)
from meshmirror.containerd.config import ContainerdConfig, DoctorConfig
from meshmirror.containerd.hostsconfig import (
    EVERY_REGISTRY,
    HostsConfig,
    parse_registries,
    parse_targets,
)
from meshmirror.demo import DemoConfig
from meshmirror.flags import (
    UsageError,
    field_default,
    format_duration,
    format_size,
    parse_bool,
    parse_duration,
    parse_size,
    split_list,
)
from meshmirror.logging import LEVELS, parse_level
from meshmirror.mirror.options import (
    MirrorConfig,
    OutagePeerTags,
    PrivateImages,
    TagResolution,
    UnknownVisibility,
)
from meshmirror.registry.serveroptions import ServerConfig
from meshmirror.runconfig import MEMBERLIST_PORT, ZONE, NodeConfig, PeeringConfig
from meshmirror.upstream.options import UpstreamConfig
from meshmirror.upstream.proxy import ProxyConfigError, ProxySettings

T = TypeVar("T")
E = TypeVar("E", bound=enum.Enum)

LOG_LEVEL = "info"
"""``--log-level``'s default, for every command."""


def _typed(flag: str, parse: Callable[[str], T]) -> Callable[[str], T]:
    """``parse`` with its ValueError turned into a one-line UsageError naming ``flag``.

    argparse would print its usage block and a generic message instead; a
    UsageError passes through ``parse_args`` untouched.
    """

    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as err:
            raise UsageError(f"{flag} {text!r}: {err}") from err

    convert.__name__ = getattr(parse, "__name__", flag)
    return convert


def _flag(parser: argparse.ArgumentParser, flag: str, owner: type, field: str, *,
          parse: Callable[[str], Any] | None = None, show: Callable[[Any], str] = str,
          metavar: str | None = None, help: str = "") -> None:
    """Declare ``flag`` with the default of ``owner.field``, shown in its help."""
    default = field_default(owner, field)
    if default is not None:
        help = f"{help} (default: {show(default)})" if help else f"default: {show(default)}"
    action = parser.add_argument(flag, default=default, metavar=metavar, help=help or None)
    if parse is not None:
        action.type = _typed(flag, parse)


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError("expected a whole number such as 3") from None


def _parse_ip_list(text: str) -> tuple[str, ...]:
    addresses = tuple(part.strip().strip("[]") for part in text.split(",") if part.strip())
    for address in addresses:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise ValueError(f"{address!r} is not an IP address (want e.g. "
                             "10.0.0.5,fd00::5)") from None
    return addresses


def _parse_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError("expected a number such as 0.01") from None


def _enum_parser(cls: type[E]) -> Callable[[str], E]:
    """A parser accepting the values of ``cls`` in any case."""

    def parse(text: str) -> E:
        try:
            return cls(text.strip().lower())
        except ValueError:
            raise ValueError("want " + "|".join(str(m.value) for m in cls)) from None

    return parse


def _show_enum(value: enum.Enum) -> str:
    return str(value.value)


def _parse_log_level(text: str) -> str:
    parse_level(text)
    return text.strip().lower()


def _parse_store(text: str) -> str:
    if text != "containerd":
        if not text.startswith("oci:") or not text[4:]:
            raise ValueError("want 'containerd' or 'oci:DIR'")
        directory = Path(text[4:])
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"{directory} is not a directory")
    return text


def _parse_listen_addr(text: str) -> tuple[str, int]:
    return parse_host_port(text)


def _parse_mesh_addr(text: str) -> tuple[str, int] | None:
    if text.strip().lower() in {"off", "none", ""}:
        return None
    return parse_host_port(text, default_port=MEMBERLIST_PORT)


_METRICS_PORT: int = field_default(NodeConfig, "metrics_addr")[1]


def _parse_status_addr(text: str) -> str:
    """Where to dial a node's metrics port: written like ``--metrics-addr``, so the
    ``:9090`` or ``[::]:9090`` a node listens on means this machine, and a bare IPv6
    address (a pod IP) takes the default port."""
    host, port = parse_host_port(bracket_bare_ipv6(text), default_port=_METRICS_PORT)
    if is_wildcard(host):
        host = "::1" if host in {"::", "[::]"} else "127.0.0.1"
    return format_host_port(host, port)


def _show_mesh_addr(addr: tuple[str, int] | None) -> str:
    return "off" if addr is None else format_host_port(*addr)


def _show_addr(addr: tuple[str, int]) -> str:
    return format_host_port(*addr)


def _add_log_level(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("--log-level", default=default, metavar="{" + ",".join(LEVELS) + "}",
                        type=_typed("--log-level", _parse_log_level),
                        help=f"any case (default: {LOG_LEVEL})")


def _add_resolve_tags(parser: argparse.ArgumentParser) -> None:
    """One ``--resolve-tags`` for every command, so one MESHMIRROR_RESOLVE_TAGS serves
    ``run`` and ``configure``; hosts.toml's "resolve" capability is on for any mode
    but off (see `hosts_config`)."""
    _flag(parser, "--resolve-tags", MirrorConfig, "resolve_tags", parse=TagResolution.parse,
          show=_show_enum, metavar="upstream-first|peers|off",
          help="who resolves a tag: the upstream, with peers only in an outage; peers "
               "(a reused tag may resolve stale); or nobody (true/false mean peers/off)")


def _add_mirrored_registries(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mirrored-registries", action="append", default=None, metavar="URL",
                        help="registries to mirror, host[:port] or http(s)://host[:port] "
                             "(repeatable or comma-separated); none means every registry")


def _add_containerd_flags(parser: argparse.ArgumentParser) -> None:
    _flag(parser, "--containerd-sock", ContainerdConfig, "sock", metavar="PATH",
          help="containerd's gRPC socket")
    _flag(parser, "--containerd-namespace", ContainerdConfig, "namespace", metavar="NAME",
          help="containerd namespace whose images are shared")
    _flag(parser, "--containerd-content-path", ContainerdConfig, "content_path", metavar="DIR",
          help="content store directory, read directly when readable")
    _flag(parser, "--containerd-config", ContainerdConfig, "config", metavar="FILE",
          help="containerd's config file, checked for config_path and discard_unpacked_layers")


def _add_hosts_location_flags(parser: argparse.ArgumentParser) -> None:
    _flag(parser, "--containerd-registry-config-path", HostsConfig, "config_path", parse=Path,
          metavar="DIR", help="directory holding <registry>/hosts.toml")
    parser.add_argument("--mirror-targets", action="append", default=None, metavar="URL",
                        help="mirror URLs written into hosts.toml, in order; a bare IPv6 "
                             "host is bracketed (http://fd00::5:30022)")


def _add_prepend_existing(parser: argparse.ArgumentParser) -> None:
    _flag(parser, "--prepend-existing", HostsConfig, "prepend_existing", parse=parse_bool,
          show=lambda value: str(value).lower(), metavar="BOOL",
          help="keep existing host entries after ours")


def _add_hosts_flags(parser: argparse.ArgumentParser) -> None:
    _add_hosts_location_flags(parser)
    _add_mirrored_registries(parser)
    _add_resolve_tags(parser)


def _add_registry_addr(parser: argparse.ArgumentParser, help: str) -> None:
    _flag(parser, "--registry-addr", NodeConfig, "registry_addr", parse=_parse_listen_addr,
          show=_show_addr, metavar="HOST:PORT", help=help)


def _add_run_flags(run: argparse.ArgumentParser) -> None:
    _flag(run, "--store", NodeConfig, "store", parse=_parse_store, metavar="containerd|oci:DIR",
          help="where this node's image content lives")
    _add_registry_addr(run, "the registry's listen address")
    _flag(run, "--mesh-addr", PeeringConfig, "mesh_addr", parse=_parse_mesh_addr,
          show=_show_mesh_addr, metavar="HOST:PORT|off",
          help="gossip bind address (UDP and TCP); 'off' serves the local store only")
    _flag(run, "--metrics-addr", NodeConfig, "metrics_addr", parse=_parse_listen_addr,
          show=_show_addr, metavar="HOST:PORT", help="metrics and status page listen address")
    _flag(run, "--advertise-addr", PeeringConfig, "advertise_addr", metavar="HOST[:PORT]",
          help="address peers use to reach this node (default: the bind address)")
    _flag(run, "--node-name", PeeringConfig, "node_name", metavar="NAME",
          help="this node's name in the mesh")
    _flag(run, "--zone", PeeringConfig, "zone", metavar="ZONE",
          help="this node's topology zone (topology.kubernetes.io/zone); peers in the "
               "same zone are asked first, others only when none of them has a blob")
    _flag(run, "--zone-from-node-label", PeeringConfig, "zone_label", metavar="LABEL",
          help="without --zone, read the zone from this label of the node's own Kubernetes "
               "Node object (named by --node-name), e.g. topology.kubernetes.io/zone; needs "
               "the pod's service account token and get on nodes")
    run.add_argument("--join", action="append", default=None, metavar="HOST:PORT",
                     help="a mesh member to join (repeatable or comma-separated)")
    _flag(run, "--join-dns", PeeringConfig, "join_dns", metavar="NAME",
          help="join every address NAME resolves to (a headless Service)")
    _flag(run, "--gossip-key-file", PeeringConfig, "gossip_key_file", metavar="FILE",
          help="file holding a base64 16/24/32-byte key, as `serf agent -encrypt`")
    _add_mirrored_registries(run)
    run.add_argument("--registry-filters", action="append", default=None, metavar="REGEX",
                     help="keys registry/repo:tag matching any of these answer 404 at once")
    _add_upstream_flags(run)
    _flag(run, "--mirror-resolve-timeout", MirrorConfig, "connect_timeout",
          parse=parse_duration, show=format_duration, metavar="DURATION",
          help="bound on connecting to a peer, e.g. 100ms or 0.1; a hedged request to the "
               "next peer starts at half of it")
    _flag(run, "--mirror-first-byte-timeout", MirrorConfig, "first_byte_timeout",
          parse=parse_duration, show=format_duration, metavar="DURATION",
          help="bound on a connected peer's response headers")
    _flag(run, "--mirror-resolve-retries", MirrorConfig, "peers_tried", parse=_parse_int,
          metavar="N", help="how many peers to try before answering 404")
    _flag(run, "--mirror-spool-dir", MirrorConfig, "spool_dir", parse=Path, metavar="DIR",
          help="where blobs from peers are held until verified (default: the system's "
               "temporary directory)")
    _flag(run, "--mirror-spool-limit", MirrorConfig, "spool_limit", parse=parse_size,
          show=format_size, metavar="SIZE",
          help="bytes of blobs held at once (e.g. 4Gi); a blob beyond it is streamed and "
               "checked only at its end; 0 streams every large blob")
    _flag(run, "--upstream-cache-dir", MirrorConfig, "upstream_cache_dir", parse=Path,
          metavar="DIR",
          help="where fetched blobs are held while they download and kept once verified, "
               "one fetch per blob however many requests want it (default: "
               "--mirror-spool-dir, else the system's temporary directory)")
    _flag(run, "--upstream-cache-limit", MirrorConfig, "upstream_cache_limit",
          parse=parse_size, show=format_size, metavar="SIZE",
          help="bytes of cache files at once, downloading or kept (e.g. 4Gi); verified "
               "blobs nobody reads are evicted least recently used first; a blob that "
               "does not fit is streamed (default: --mirror-spool-limit)")
    _flag(run, "--mirror-stall-timeout", MirrorConfig, "stall_timeout",
          parse=parse_duration, show=format_duration, metavar="DURATION",
          help="a peer body with no byte for this long is left for the next peer; also the "
               "window --mirror-min-rate is measured over")
    _flag(run, "--mirror-min-rate", MirrorConfig, "min_rate", parse=parse_size,
          show=format_size, metavar="SIZE",
          help="bytes per second a peer body must average, e.g. 1Mi; a slower one is left")
    _flag(run, "--mirror-deadline", MirrorConfig, "deadline",
          parse=parse_duration, show=format_duration, metavar="DURATION",
          help="a request to peers answers within this plus its size at --mirror-min-rate, "
               "or with a 404")
    _flag(run, "--mirror-peer-connections", MirrorConfig, "peer_connections",
          parse=_parse_int, metavar="N",
          help="requests at once to one peer; more wait in a queue that no timeout counts")
    _flag(run, "--mirror-memory-limit", MirrorConfig, "memory_limit", parse=parse_size,
          show=format_size, metavar="SIZE",
          help="bytes of peer chunks held in memory at once across all requests")
    _flag(run, "--rollout-fanout", MirrorConfig, "rollout_fanout", parse=_parse_int,
          metavar="F",
          help="a cold public blob no peer holds is fetched from the upstream once, by its "
               "owner, and read through a tree where a node serves at most F peers' "
               "readers at once; 0 turns the designated fetch off (a cold blob is a 404)")
    _flag(run, "--summary-fp-rate", PeeringConfig, "summary_fp_rate", parse=_parse_float,
          metavar="RATE", help="target false-positive rate of the Bloom summary")
    _add_client_flags(run)
    _add_containerd_flags(run)
    _flag(run, "--write-hosts-config", NodeConfig, "write_hosts_config", parse=parse_bool,
          show=lambda value: str(value).lower(), metavar="BOOL",
          help="write hosts.toml at every start, as `configure` does with the same flags, "
               "so a restarted container puts back a lost entry")
    _add_hosts_location_flags(run)
    _add_prepend_existing(run)


def _add_client_flags(run: argparse.ArgumentParser) -> None:
    """Bounds on what one client of the registry port can hold (docs/security.md)."""
    _flag(run, "--client-send-timeout", ServerConfig, "send_timeout",
          parse=parse_duration, show=format_duration, metavar="DURATION",
          help="a response the client takes no byte of for this long is dropped, freeing "
               "its spool, memory and peer connection")
    _flag(run, "--client-max-connections", ServerConfig, "max_connections",
          parse=_parse_int, metavar="N",
          help="open registry connections at most (and at most half the open-file limit); "
               "more wait in the listen backlog")
    _flag(run, "--client-own-addrs", ServerConfig, "own_addrs", parse=_parse_ip_list,
          show=lambda value: ",".join(value) or "none", metavar="IP[,IP...]",
          help="the node's own addresses, whose connections (containerd's) get the "
               "registry port's reserved accept queue, with no accept rate; the listen "
               "and advertised hosts and loopback always do")


def _add_upstream_flags(run: argparse.ArgumentParser) -> None:
    """Who says what a tag means and who may see what: the upstream's word, asked anonymously."""
    _add_resolve_tags(run)
    _flag(run, "--outage-peer-tags", MirrorConfig, "outage_peer_tags",
          parse=_enum_parser(OutagePeerTags), show=_show_enum,
          metavar="encrypted|always|never",
          help="whether tags resolved by peers are accepted while the upstream is "
               "unreachable: only in a mesh with a gossip key, always, or never")
    _flag(run, "--outage-vouches", MirrorConfig, "outage_vouches",
          parse=_enum_parser(OutagePeerTags), show=_show_enum,
          metavar="encrypted|always|never",
          help="whether members' vouches that a repository is public are accepted, for "
               "one this node has no verdict on, while the upstream is unreachable: only "
               "in a mesh with a gossip key, always, or never")
    _flag(run, "--private-images", MirrorConfig, "private_images",
          parse=_enum_parser(PrivateImages), show=_show_enum, metavar="upstream-only|share",
          help="upstream-only: a repository the upstream serves only with credentials "
               "is never served from peers; share: peers serve whatever they hold")
    _flag(run, "--private-images-unknown", MirrorConfig, "private_images_unknown",
          parse=_enum_parser(UnknownVisibility), show=_show_enum, metavar="deny|share",
          help="a repository never checked while the upstream is unreachable: go upstream "
               "(deny) or serve it from peers (share)")
    _flag(run, "--state-dir", MirrorConfig, "state_dir", parse=Path, metavar="DIR",
          help="where the mirror keeps what must outlive a restart (the repositories "
               "known public, for an upstream outage); unset: memory only")
    _flag(run, "--upstream-connect-timeout", UpstreamConfig, "connect_timeout",
          parse=parse_duration, show=format_duration, metavar="DURATION",
          help="bound on connecting to an upstream registry or its token realm")
    _flag(run, "--upstream-timeout", UpstreamConfig, "timeout",
          parse=parse_duration, show=format_duration, metavar="DURATION",
          help="bound on an upstream's whole answer (challenge, token, HEAD): the most an "
               "outage adds to one tag resolution before the breaker opens")
    _flag(run, "--upstream-failure-threshold", UpstreamConfig, "failure_threshold",
          parse=_parse_int, metavar="N",
          help="consecutive failures after which an upstream is not asked until the "
               "cool-down ends")
    _flag(run, "--upstream-cooldown", UpstreamConfig, "cooldown",
          parse=parse_duration, show=format_duration, metavar="DURATION",
          help="how long an upstream that keeps failing is not asked (then one probe)")
    _flag(run, "--upstream-tag-ttl", UpstreamConfig, "tag_ttl",
          parse=parse_duration, show=format_duration, metavar="DURATION",
          help="how long a tag's upstream answer (digest, absent, private) is reused; 0: "
               "ask every time")
    _flag(run, "--upstream-client-rate", UpstreamConfig, "client_rate", parse=_parse_float,
          metavar="N", help="new upstream questions per second per client address")
    _flag(run, "--upstream-client-burst", UpstreamConfig, "client_burst", parse=_parse_int,
          metavar="N", help="new upstream questions a client address may ask at once")
    _flag(run, "--upstream-max-registries", UpstreamConfig, "max_registries",
          parse=_parse_int, metavar="N",
          help="upstream registries whose state (breaker) is kept; the least recently "
               "asked is forgotten first")
    run.add_argument("--upstream-allow-hosts", action="append", default=None, metavar="HOST",
                     help="private or loopback hosts, addresses or CIDRs a token realm or "
                          "redirect may lead to besides the registry's own host (repeatable "
                          "or comma-separated); link-local and metadata addresses never")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshmirror",
        description="A cluster-local OCI registry mirror: nodes share image content over a "
                    "gossip mesh.")
    parser.add_argument("--version", action="version", version=f"meshmirror {__version__}")
    _add_log_level(parser, LOG_LEVEL)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_run_flags(sub.add_parser("run", help="run the node: registry, mirror and mesh"))

    imp = sub.add_parser("import", help="add an OCI archive (tar) to an OCI-layout store")
    imp.add_argument("archive", metavar="ARCHIVE.tar")
    imp.add_argument("--store", required=True, metavar="oci:DIR")

    configure = sub.add_parser("configure", help="write containerd hosts.toml mirror entries")
    _add_hosts_flags(configure)
    _add_prepend_existing(configure)

    cleanup = sub.add_parser("cleanup", help="restore the hosts.toml backup")
    _add_hosts_flags(cleanup)

    doctor = sub.add_parser("doctor", help="check this node's setup and say how to fix it")
    _add_hosts_flags(doctor)
    _add_containerd_flags(doctor)
    _add_registry_addr(doctor, "where this node's `meshmirror run` listens")
    _flag(doctor, "--containerd-mirror-add", DoctorConfig, "containerd_mirror_add",
          parse=parse_bool, show=lambda value: str(value).lower(), metavar="BOOL",
          help="whether meshmirror writes hosts.toml on this node; false (the node's owner "
               "does) reports the hosts.toml checks as information")

    demo = sub.add_parser("demo", help="a local three-node mesh on loopback")
    _flag(demo, "--nodes", DemoConfig, "nodes", parse=_parse_int, metavar="N")
    _flag(demo, "--workdir", DemoConfig, "workdir", parse=Path, metavar="DIR",
          help="kept afterwards (default: a temporary directory, removed)")
    _flag(demo, "--image-size-mib", DemoConfig, "image_size_mib", parse=_parse_int,
          metavar="MIB", help="total size of the demo image's layers")
    demo.add_argument("--no-wait", action="store_true",
                      help="exit after the pull instead of keeping the mesh up")
    migrate = sub.add_parser("migrate-values",
                             help="turn a Spegel chart values file into meshmirror's")
    migrate.add_argument("values", metavar="SPEGEL_VALUES.yaml|-",
                         help="prints meshmirror values; stderr says what became of each key")
    members = sub.add_parser("members", help="list the mesh members one node sees")
    # --metrics-addr first, so MESHMIRROR_METRICS_ADDR (a pod's own) is the default:
    # `kubectl exec` into a pod lists its members whatever its metrics port.
    members.add_argument("--metrics-addr", "--addr", dest="addr", default="127.0.0.1:9090",
                         metavar="HOST:PORT", type=_typed("--addr", _parse_status_addr),
                         help="the node's metrics address (it serves /status)")
    members.add_argument("--format", choices=["table", "json"], default="table")

    # Accept --log-level after the subcommand too (`meshmirror run --log-level debug`).
    for choice in sub.choices.values():
        _add_log_level(choice, argparse.SUPPRESS)
    return parser


def _apply_environment(parser: argparse.ArgumentParser) -> None:
    """Turn MESHMIRROR_<FLAG> variables into defaults of every parser, parsed as the flag is."""
    parsers: list[argparse.ArgumentParser] = [parser]
    for group in parser._actions:
        if isinstance(group, argparse._SubParsersAction):
            parsers.extend(group.choices.values())
    for p in parsers:
        for action in p._actions:
            flags = [s for s in action.option_strings if s.startswith("--")]
            if not flags or action.dest in {"help", "version"}:
                continue
            env_name = "MESHMIRROR_" + flags[0][2:].upper().replace("-", "_")
            raw = os.environ.get(env_name)
            if raw is None:
                continue
            try:
                if isinstance(action, argparse._AppendAction):
                    value: object = [raw]
                elif isinstance(action, argparse._StoreTrueAction):
                    value = _typed(flags[0], parse_bool)(raw)
                elif callable(action.type):
                    value = action.type(raw)
                else:
                    value = raw
            except UsageError as err:
                raise UsageError(f"{env_name}: {err}") from err
            p.set_defaults(**{action.dest: value})


def _advertised_host(*candidates: str) -> str:
    """The first concrete host among the flags, else this machine's primary address.

    A wildcard binds everywhere but cannot be dialled, so peers need something
    else; in Kubernetes the chart passes the pod IP explicitly.
    """
    for host in candidates:
        if not is_wildcard(host):
            return host
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError as err:
        raise UsageError(f"cannot tell which address peers should use ({err}); "
                         "pass --advertise-addr") from err


def mesh_addresses(bind: tuple[str, int], advertise_addr: str | None,
                   registry_addr: tuple[str, int]) -> tuple[tuple[str, int] | None, str]:
    """The gossip address to advertise (None: the bind address), and the registry URL
    peers should use."""
    advertise: tuple[str, int] | None = None
    if advertise_addr:
        try:
            # The chart passes the pod IP as it is: bare on an IPv6 cluster.
            advertise = parse_host_port(bracket_bare_ipv6(advertise_addr), default_host="",
                                        default_port=bind[1])
        except AddressError as err:
            raise UsageError(f"--advertise-addr: {err}") from err
    public = _advertised_host(advertise[0] if advertise is not None else "", bind[0],
                              registry_addr[0])
    if advertise is None and is_wildcard(bind[0]):
        advertise = (public, bind[1])
    url_host = f"[{public}]" if ":" in public else public
    return advertise, f"http://{url_host}:{registry_addr[1]}"


def _mirror_options(args: argparse.Namespace) -> MirrorConfig:
    from meshmirror.mirror.cache import check_cache_directory

    filters: list[re.Pattern[str]] = []
    for text in split_list(args.registry_filters):
        try:
            filters.append(re.compile(text))
        except re.error as err:
            raise UsageError(f"--registry-filters {text!r}: not a regex: {err}") from err
    if (args.mirror_resolve_timeout <= 0 or args.mirror_first_byte_timeout <= 0
            or args.mirror_resolve_retries < 1):
        raise UsageError("--mirror-resolve-timeout and --mirror-first-byte-timeout must be "
                         "> 0 and --mirror-resolve-retries >= 1")
    if (args.mirror_stall_timeout <= 0 or args.mirror_deadline <= 0
            or args.mirror_min_rate < 1 or args.mirror_peer_connections < 1
            or args.mirror_memory_limit < 1 or args.rollout_fanout < 0):
        raise UsageError("--mirror-stall-timeout and --mirror-deadline must be > 0; "
                         "--mirror-min-rate, --mirror-peer-connections and "
                         "--mirror-memory-limit >= 1; --rollout-fanout >= 0")
    spool_dir: Path | None = args.mirror_spool_dir
    cache_dir: Path | None = args.upstream_cache_dir
    if args.mirror_spool_limit > 0 and args.upstream_cache_limit != 0:
        try:
            check_cache_directory(cache_dir or spool_dir or Path(tempfile.gettempdir()))
        except OSError as err:
            flag = ("--upstream-cache-dir" if cache_dir else "--mirror-spool-dir" if spool_dir
                    else "the temporary directory")
            raise UsageError(f"{flag}: {err}; point --upstream-cache-dir at a writable "
                             "directory or set --mirror-spool-limit 0") from err
    registries = parse_registries(args.mirrored_registries)
    return MirrorConfig(
        connect_timeout=args.mirror_resolve_timeout,
        first_byte_timeout=args.mirror_first_byte_timeout,
        peers_tried=args.mirror_resolve_retries,
        spool_dir=spool_dir,
        spool_limit=args.mirror_spool_limit,
        upstream_cache_dir=cache_dir,
        upstream_cache_limit=args.upstream_cache_limit,
        stall_timeout=args.mirror_stall_timeout,
        min_rate=args.mirror_min_rate,
        deadline=args.mirror_deadline,
        peer_connections=args.mirror_peer_connections,
        memory_limit=args.mirror_memory_limit,
        rollout_fanout=args.rollout_fanout,
        resolve_tags=args.resolve_tags,
        outage_peer_tags=args.outage_peer_tags,
        outage_vouches=args.outage_vouches,
        private_images=args.private_images,
        private_images_unknown=args.private_images_unknown,
        state_dir=args.state_dir,
        registry_filters=tuple(filters),
        # `_default` among them means every registry, as in hosts.toml.
        mirrored_registries=(frozenset() if EVERY_REGISTRY in registries
                             else frozenset(r.directory for r in registries)),
    )


def _upstream_options(args: argparse.Namespace, http_base: str) -> UpstreamConfig:
    if (args.upstream_connect_timeout <= 0 or args.upstream_timeout <= 0
            or args.upstream_cooldown < 0 or args.upstream_failure_threshold < 1):
        raise UsageError("--upstream-connect-timeout and --upstream-timeout must be > 0, "
                         "--upstream-cooldown >= 0 and --upstream-failure-threshold >= 1")
    if (args.upstream_tag_ttl < 0 or args.upstream_client_rate <= 0
            or args.upstream_client_burst < 1 or args.upstream_max_registries < 1):
        raise UsageError("--upstream-tag-ttl must be >= 0, --upstream-client-rate > 0, "
                         "--upstream-client-burst and --upstream-max-registries >= 1")
    allow_hosts = tuple(split_list(args.upstream_allow_hosts))
    # Here, not at the top: the guard's resolver is aiohttp's, which only `run` needs.
    from meshmirror.upstream.guard import AddressGuard

    try:
        AddressGuard.parse(allow_hosts)
    except ValueError as err:
        raise UsageError(f"--upstream-allow-hosts {err}") from err
    try:
        proxies = ProxySettings.from_environment()
    except ProxyConfigError as err:
        raise UsageError(str(err)) from err
    return UpstreamConfig(connect_timeout=args.upstream_connect_timeout,
                           timeout=args.upstream_timeout,
                           failure_threshold=args.upstream_failure_threshold,
                           cooldown=args.upstream_cooldown,
                           registry_config_path=args.containerd_registry_config_path,
                           tag_ttl=args.upstream_tag_ttl,
                           client_rate=args.upstream_client_rate,
                           client_burst=args.upstream_client_burst,
                           max_registries=args.upstream_max_registries,
                           allow_hosts=allow_hosts,
                           mirror_urls=(http_base,
                                        *parse_targets(args.mirror_targets, required=False)),
                           proxies=proxies)


def peering_config(args: argparse.Namespace) -> PeeringConfig | None:
    """The peering half of ``run``'s flags; None for ``--mesh-addr off``."""
    if args.mesh_addr is None:
        return None
    advertise, http_base = mesh_addresses(args.mesh_addr, args.advertise_addr,
                                          args.registry_addr)
    try:
        join = tuple(parse_host_port(j, default_port=MEMBERLIST_PORT)
                     for j in split_list(args.join))
    except AddressError as err:
        raise UsageError(f"--join: {err}") from err
    if args.gossip_key_file and not Path(args.gossip_key_file).is_file():
        raise UsageError(f"--gossip-key-file {args.gossip_key_file}: no such file")
    if not 0 < args.summary_fp_rate < 1:
        raise UsageError("--summary-fp-rate must be between 0 and 1, e.g. 0.01")
    if args.zone and not ZONE.fullmatch(args.zone):
        raise UsageError(f"--zone {args.zone!r}: a label value is up to 63 letters, digits, "
                         "'-', '_' or '.', starting and ending with a letter or digit, "
                         "e.g. eu-west-1a")
    return PeeringConfig(http_base=http_base, node_name=args.node_name, mesh_addr=args.mesh_addr,
                         advertise_addr=advertise, join=join, join_dns=args.join_dns,
                         gossip_key_file=args.gossip_key_file, zone=args.zone,
                         zone_label=args.zone_from_node_label,
                         summary_fp_rate=args.summary_fp_rate, mirror=_mirror_options(args),
                         upstream=_upstream_options(args, http_base))


def _containerd_config(args: argparse.Namespace) -> ContainerdConfig:
    return ContainerdConfig(sock=args.containerd_sock, namespace=args.containerd_namespace,
                            content_path=args.containerd_content_path,
                            config=args.containerd_config)


def _server_options(args: argparse.Namespace) -> ServerConfig:
    if args.client_send_timeout <= 0 or args.client_max_connections < 1:
        raise UsageError("--client-send-timeout must be > 0 and --client-max-connections >= 1")
    return ServerConfig(send_timeout=args.client_send_timeout,
                         max_connections=args.client_max_connections,
                         own_addrs=args.client_own_addrs)


def node_config(args: argparse.Namespace) -> NodeConfig:
    """``run``'s flags, checked: every bad one is a UsageError before anything starts."""
    return NodeConfig(store=args.store, registry_addr=args.registry_addr,
                      metrics_addr=args.metrics_addr, containerd=_containerd_config(args),
                      server=_server_options(args), peering=peering_config(args),
                      write_hosts_config=args.write_hosts_config,
                      hosts=hosts_config(args, targets_required=args.write_hosts_config))


def hosts_config(args: argparse.Namespace, *, targets_required: bool) -> HostsConfig:
    """``configure``/``cleanup``/``doctor``'s hosts.toml flags."""
    return HostsConfig(
        resolve_tags=args.resolve_tags is not TagResolution.OFF,
        config_path=args.containerd_registry_config_path,
        registries=tuple(parse_registries(args.mirrored_registries)),
        targets=tuple(parse_targets(args.mirror_targets, required=targets_required)),
        prepend_existing=getattr(args, "prepend_existing", False),
    )


def _dispatch(args: argparse.Namespace) -> int:
    """Build the command's config, then import and run the module that does the work.

    Imported only here, so ``meshmirror configure`` does not pay for grpc,
    starlette and the mesh at start-up.
    """
    command: str = args.command
    if command == "run":
        config = node_config(args)
        from meshmirror.logging import configure_logging
        from meshmirror.node import run_command

        configure_logging(args.log_level)
        return run_command(config)
    if command == "configure":
        from meshmirror.containerd.hostsconfig import configure_command

        return configure_command(hosts_config(args, targets_required=True))
    if command == "cleanup":
        from meshmirror.containerd.hostsconfig import cleanup_command

        return cleanup_command(hosts_config(args, targets_required=False))
    if command == "doctor":
        from meshmirror.containerd.doctor import doctor_command

        return doctor_command(DoctorConfig(hosts=hosts_config(args, targets_required=False),
                                           registry_addr=args.registry_addr,
                                           containerd=_containerd_config(args),
                                           containerd_mirror_add=args.containerd_mirror_add))
    if command == "demo":
        from meshmirror.demo import demo_command

        return demo_command(DemoConfig(nodes=args.nodes, workdir=args.workdir,
                                       image_size_mib=args.image_size_mib,
                                       no_wait=args.no_wait))
    if command == "members":
        from meshmirror.members import members_command

        return members_command(args.addr, args.format)
    if command == "migrate-values":
        from meshmirror.migrate import migrate_command

        return migrate_command(args.values)
    if command == "import":
        from meshmirror.store.ocilayout import import_command

        return import_command(Path(args.archive), args.store)
    raise AssertionError(f"no handler for {command!r}")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """``argv`` with MESHMIRROR_* variables applied; UsageError for a bad value."""
    parser = build_parser()
    _apply_environment(parser)
    return parser.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _dispatch(parse_args(sys.argv[1:] if argv is None else argv))
    except UsageError as err:
        print(f"meshmirror: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
