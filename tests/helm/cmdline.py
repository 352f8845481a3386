"""Parse a rendered container's command line as ``meshmirror`` would in the pod.

Flags and MESHMIRROR_* variables are looked up by exact name first: argparse
accepts any unique prefix, so a renamed flag's old spelling would still parse.
The variables are then turned into the flags they stand for (the documented
contract: MESHMIRROR_<FLAG> is --<flag>) and the whole line goes through
``meshmirror.cli.build_parser()``, so each value must also pass the flag's type.
"""

from __future__ import annotations

import argparse
from typing import Any

from meshmirror import cli
from meshmirror.flags import UsageError
from tests.helm import chart

# What the downward API would fill in on a node; only ever parsed, never dialled.
NODE = {"spec.nodeName": "node-a", "status.podIP": "198.51.100.7",
        "status.hostIP": "192.0.2.10"}


def check_exact_flags(argv: list[str], parser: argparse.ArgumentParser, where: str) -> None:
    known = chart.option_strings(parser)
    unknown = [f for f in chart.flags_used(argv) if f not in known]
    assert not unknown, f"{where} uses flags that `meshmirror {argv[0]}` lacks: {unknown}"


def env_flag(name: str) -> str:
    return "--" + name.removeprefix("MESHMIRROR_").lower().replace("_", "-")


def check_env_names(env: dict[str, str], command: str) -> None:
    parser = cli.build_parser()
    known = chart.option_strings(parser) | chart.option_strings(chart.subparser(parser, command))
    for name in env:
        if name.startswith("MESHMIRROR_"):
            flag = env_flag(name)
            assert flag in known, f"{name} sets {flag}, which `meshmirror {command}` lacks"


def node_env(cont: dict[str, Any], node: dict[str, str] | None = None) -> dict[str, str]:
    """The container's env as a node would fill it; ``node`` overrides downward-API fields.

    As the kubelet does, a value's $(VAR) is replaced by a variable defined above it.
    """
    fields = {**NODE, **(node or {})}
    env: dict[str, str] = {}
    for item in cont.get("env", []):
        if "value" in item:
            env[item["name"]] = chart.expand_var_refs(item["value"], env, keep_unknown=True)
        elif "fieldRef" in item.get("valueFrom", {}):
            env[item["name"]] = fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def with_env_as_flags(argv: list[str], env: dict[str, str]) -> list[str]:
    """argv with each MESHMIRROR_* variable as its flag: top-level ones before the
    subcommand, the subcommand's after it, where the subcommand owns that flag."""
    parser = cli.build_parser()
    top = chart.option_strings(parser)
    own = chart.option_strings(chart.subparser(parser, argv[0]))
    given = set(chart.flags_used(argv))
    before: list[str] = []
    after: list[str] = []
    for name, value in env.items():
        if not name.startswith("MESHMIRROR_"):
            continue
        flag = env_flag(name)
        assert flag not in given, f"{flag} is set both as a flag and as {name}"
        if flag in own:
            after.append(f"{flag}={value}")
        elif flag in top:
            before.append(f"{flag}={value}")
    return [*before, argv[0], *after, *argv[1:]]


def parse_container(
    cont: dict[str, Any], argv: list[str] | None = None, node: dict[str, str] | None = None
) -> argparse.Namespace:
    """Parse a container's command line (or ``argv``, e.g. its preStop hook) with its env."""
    command: list[str] = cont.get("command", [])
    if argv is None:
        assert command == ["meshmirror"], command
        argv = list(cont["args"])
    env = node_env(cont, node)
    refs = chart.var_refs(argv)
    assert refs <= set(env), f"$(…) references not in the container's env: {refs - set(env)}"
    argv = [chart.expand_var_refs(a, env) for a in argv]
    parser = cli.build_parser()
    check_exact_flags(argv, chart.subparser(parser, argv[0]), cont["name"])
    # The env is the container's, written for its own command (a preStop hook shares it).
    check_env_names(env, cont["args"][0])
    try:
        return parser.parse_args(with_env_as_flags(argv, env))
    except (SystemExit, UsageError) as err:
        raise AssertionError(f"`meshmirror` refuses {cont['name']}'s command line") from err
