"""The ``meshmirror`` command line.

Every flag can also be set from the environment as ``MESHMIRROR_<FLAG>``
(``--registry-addr`` is ``MESHMIRROR_REGISTRY_ADDR``), because a DaemonSet sets
environment variables more naturally than arguments. A flag given on the command
line wins over the environment. Each subcommand's work lives in the module that
owns the concern; this file only declares flags and dispatches.
"""

from __future__ import annotations

import argparse
import importlib
import os
import socket
import sys
from collections.abc import Callable, Sequence

from meshmirror import __version__
from meshmirror.flags import UsageError, parse_bool, parse_size

# subcommand -> "module:function"; imported lazily so `meshmirror configure`
# does not pay for grpc, starlette and the mesh at start-up.
_HANDLERS = {
    "run": "meshmirror.node:run_command",
    "import": "meshmirror.store.ocilayout:import_command",
    "configure": "meshmirror.containerd.hostsconfig:configure_command",
    "cleanup": "meshmirror.containerd.hostsconfig:cleanup_command",
    "doctor": "meshmirror.containerd.doctor:doctor_command",
    "demo": "meshmirror.demo:demo_command",
    "members": "meshmirror.members:members_command",
}


def _add_containerd_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--containerd-sock", default="/run/containerd/containerd.sock",
                        help="containerd's gRPC socket")
    parser.add_argument("--containerd-namespace", default="k8s.io",
                        help="containerd namespace whose images are shared")
    parser.add_argument("--containerd-content-path",
                        default="/var/lib/containerd/io.containerd.content.v1.content",
                        help="content store directory, read directly when readable")
    parser.add_argument("--containerd-config", default="/etc/containerd/config.toml",
                        help="containerd's config file, checked for config_path and "
                             "discard_unpacked_layers")


def _add_hosts_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--containerd-registry-config-path", default="/etc/containerd/certs.d",
                        help="directory holding <registry>/hosts.toml")
    parser.add_argument("--mirrored-registries", action="append", default=None,
                        metavar="URL", help="registries to mirror (repeatable or comma-separated); "
                                            "none means every registry (_default)")
    parser.add_argument("--mirror-targets", action="append", default=None, metavar="URL",
                        help="mirror URLs written into hosts.toml, in order")
    parser.add_argument("--resolve-tags", type=parse_bool, default=True, metavar="BOOL",
                        help="let the mirror resolve tags (capability 'resolve')")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshmirror",
        description="A cluster-local OCI registry mirror: nodes share image content over a "
                    "gossip mesh.")
    parser.add_argument("--version", action="version", version=f"meshmirror {__version__}")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the node: registry, mirror and mesh")
    run.add_argument("--store", default="containerd", metavar="containerd|oci:DIR",
                     help="where this node's image content lives")
    run.add_argument("--registry-addr", default=":5000", metavar="HOST:PORT")
    run.add_argument("--mesh-addr", default=":7946", metavar="HOST:PORT|off",
                     help="gossip bind address (UDP and TCP); 'off' serves the local store only")
    run.add_argument("--metrics-addr", default=":9090", metavar="HOST:PORT")
    run.add_argument("--advertise-addr", default=None, metavar="HOST[:PORT]",
                     help="address peers use to reach this node (default: the bind address)")
    run.add_argument("--node-name", default=socket.gethostname())
    run.add_argument("--join", action="append", default=None, metavar="HOST:PORT",
                     help="a mesh member to join (repeatable or comma-separated)")
    run.add_argument("--join-dns", default=None, metavar="NAME",
                     help="join every address NAME resolves to (a headless Service)")
    run.add_argument("--gossip-key-file", default=None, metavar="FILE",
                     help="file holding a base64 16/24/32-byte key, as `serf agent -encrypt`")
    run.add_argument("--mirrored-registries", action="append", default=None, metavar="URL",
                     help="only mirror these registries (repeatable or comma-separated)")
    run.add_argument("--registry-filters", action="append", default=None, metavar="REGEX",
                     help="keys registry/repo:tag matching any of these answer 404 at once")
    run.add_argument("--resolve-tags", type=parse_bool, default=True, metavar="BOOL")
    run.add_argument("--mirror-resolve-timeout", type=float, default=0.1, metavar="SECONDS",
                     help="bound on connecting to a peer; a hedged request to the next peer "
                          "starts at half of it")
    run.add_argument("--mirror-first-byte-timeout", type=float, default=0.5, metavar="SECONDS",
                     help="bound on a connected peer's response headers")
    run.add_argument("--mirror-resolve-retries", type=int, default=3, metavar="N",
                     help="how many peers to try before answering 404")
    run.add_argument("--mirror-spool-dir", default=None, metavar="DIR",
                     help="where blobs from peers are held until verified (default: the "
                          "system's temporary directory)")
    run.add_argument("--mirror-spool-limit", type=parse_size, default=4 << 30, metavar="SIZE",
                     help="bytes of blobs held at once (e.g. 4Gi); a blob beyond it is streamed "
                          "and checked only at its end; 0 streams every large blob")
    run.add_argument("--summary-fp-rate", type=float, default=0.01, metavar="RATE",
                     help="target false-positive rate of the Bloom summary")
    _add_containerd_flags(run)

    imp = sub.add_parser("import", help="add an OCI archive (tar) to an OCI-layout store")
    imp.add_argument("archive", metavar="ARCHIVE.tar")
    imp.add_argument("--store", required=True, metavar="oci:DIR")

    configure = sub.add_parser("configure", help="write containerd hosts.toml mirror entries")
    _add_hosts_flags(configure)
    configure.add_argument("--prepend-existing", type=parse_bool, default=False, metavar="BOOL",
                           help="keep existing host entries after ours")

    cleanup = sub.add_parser("cleanup", help="restore the hosts.toml backup")
    _add_hosts_flags(cleanup)

    doctor = sub.add_parser("doctor", help="check this node's setup and say how to fix it")
    _add_hosts_flags(doctor)
    _add_containerd_flags(doctor)
    doctor.add_argument("--registry-addr", default=":5000", metavar="HOST:PORT")

    demo = sub.add_parser("demo", help="a local three-node mesh on loopback")
    demo.add_argument("--nodes", type=int, default=3)
    demo.add_argument("--workdir", default=None, metavar="DIR")
    demo.add_argument("--image-size-mib", type=int, default=64,
                      help="total size of the demo image's layers")
    demo.add_argument("--no-wait", action="store_true",
                      help="exit after the pull instead of keeping the mesh up")
    members = sub.add_parser("members", help="list the mesh members one node sees")
    members.add_argument("--addr", default="127.0.0.1:9090", metavar="HOST:PORT",
                         help="the node's metrics address (it serves /status)")
    members.add_argument("--format", choices=["table", "json"], default="table")

    # Accept --log-level after the subcommand too (`meshmirror run --log-level debug`).
    for choice in sub.choices.values():
        choice.add_argument("--log-level", default=argparse.SUPPRESS,
                            choices=["debug", "info", "warning", "error"])
    return parser


def _apply_environment(parser: argparse.ArgumentParser) -> None:
    """Turn MESHMIRROR_<FLAG> variables into defaults of the chosen subcommand."""
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
            if isinstance(action, argparse._AppendAction):
                p.set_defaults(**{action.dest: [raw]})
            elif action.type is not None and callable(action.type):
                try:
                    p.set_defaults(**{action.dest: action.type(raw)})
                except (ValueError, argparse.ArgumentTypeError) as err:
                    raise UsageError(f"{env_name}: {err}") from err
            else:
                p.set_defaults(**{action.dest: raw})


def _resolve(target: str) -> Callable[[argparse.Namespace], int]:
    module_name, _, function = target.partition(":")
    handler: Callable[[argparse.Namespace], int] = getattr(
        importlib.import_module(module_name), function
    )
    return handler


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        _apply_environment(parser)
        args = parser.parse_args(args_list)
        return _resolve(_HANDLERS[args.command])(args)
    except UsageError as err:
        print(f"meshmirror: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
