"""HOST:PORT parsing shared by every listener and every --join."""

from __future__ import annotations

ANY_HOST = "0.0.0.0"
"""What a listener binds when its flag names no host (``:5000``)."""

_WILDCARDS = frozenset({"", ANY_HOST, "::", "[::]"})


class AddressError(ValueError):
    """An address flag that is not HOST:PORT."""


def is_wildcard(host: str) -> bool:
    """Whether ``host`` binds every address: fine to listen on, impossible to dial."""
    return host in _WILDCARDS


def parse_host_port(
    text: str, default_host: str = ANY_HOST, default_port: int | None = None
) -> tuple[str, int]:
    """Split ``HOST:PORT``, ``:PORT``, ``[v6]:PORT`` or (with a default port) ``HOST``."""
    text = text.strip()
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise AddressError(f"invalid address {text!r}: unclosed '['")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise AddressError(f"invalid address {text!r}: want [HOST]:PORT")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") > 1:
        raise AddressError(f"invalid address {text!r}: put an IPv6 host in brackets, [::1]:PORT")
    if not port_text:
        if default_port is None:
            raise AddressError(f"invalid address {text!r}: want HOST:PORT")
        port = default_port
    else:
        try:
            port = int(port_text)
        except ValueError as err:
            raise AddressError(
                f"invalid address {text!r}: port {port_text!r} is not a number"
            ) from err
        if not 0 <= port <= 65535:
            raise AddressError(f"invalid address {text!r}: port must be 0-65535")
    return (host or default_host, port)


def format_host_port(host: str, port: int) -> str:
    """The inverse of `parse_host_port`: ``:5000`` for the wildcard, ``[::1]:5000`` for IPv6."""
    if host == ANY_HOST:
        return f":{port}"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
