"""Parse a rendered container's command line exactly as ``meshmirror`` would in the pod.

Flags and MESHMIRROR_* variables are looked up by exact name first: argparse
accepts any unique prefix, so a renamed flag's old spelling would still parse.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import pytest

from meshmirror import cli
from tests.helm import chart

# What the downward API would fill in on a node; only ever parsed, never dialled.
NODE = {"NODE_IP": "192.0.2.10", "spec.nodeName": "node-a", "status.podIP": "198.51.100.7",
        "status.hostIP": "192.0.2.10"}


def check_exact_flags(argv: list[str], parser: argparse.ArgumentParser, where: str) -> None:
    known = chart.option_strings(parser)
    unknown = [f for f in chart.flags_used(argv) if f not in known]
    assert not unknown, f"{where} uses flags that `meshmirror {argv[0]}` lacks: {unknown}"


def check_env_names(env: dict[str, str], command: str) -> None:
    parser = cli.build_parser()
    known = chart.option_strings(parser) | chart.option_strings(chart.subparser(parser, command))
    for name in env:
        if not name.startswith("MESHMIRROR_"):
            continue
        flag = "--" + name.removeprefix("MESHMIRROR_").lower().replace("_", "-")
        assert flag in known, f"{name} sets {flag}, which `meshmirror {command}` does not have"


def node_env(cont: dict[str, Any]) -> dict[str, str]:
    env = chart.literal_env(cont)
    for name, field in chart.field_env(cont).items():
        env[name] = NODE[field]
    return env


def parse_container(
    cont: dict[str, Any], monkeypatch: pytest.MonkeyPatch, argv: list[str] | None = None
) -> argparse.Namespace:
    """Parse a container's command line as `meshmirror` would inside the pod."""
    command: list[str] = cont.get("command", [])
    if argv is None:
        assert command == ["meshmirror"], command
        argv = list(cont["args"])
    env = node_env(cont)
    refs = chart.var_refs(argv)
    assert refs <= set(env), f"$(…) references not in the container's env: {refs - set(env)}"
    argv = [chart.expand_var_refs(a, env) for a in argv]
    parser = cli.build_parser()
    check_exact_flags(argv, chart.subparser(parser, argv[0]), cont["name"])
    # The env is the container's, written for its own command (a preStop hook shares it).
    check_env_names(env, cont["args"][0])
    for name in list(os.environ):
        if name.startswith("MESHMIRROR_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    cli._apply_environment(parser, argv)
    return parser.parse_args(argv)
