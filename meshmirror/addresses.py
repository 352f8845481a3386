"""HOST:PORT parsing and binding shared by every listener and every --join.

A port-only address (``:5000``) means every address of both families: one IPv6
socket with IPV6_V6ONLY off, which takes IPv4 too (as ``::ffff:a.b.c.d``), so an
IPv6-only or dual-stack cluster needs no per-pod address; where IPv6 is off it
falls back to IPv4's 0.0.0.0. ``0.0.0.0:5000`` stays IPv4 only.
"""

from __future__ import annotations

import errno
import ipaddress
import socket

from meshmirror.flags import decimal

ANY_HOST = ""
"""What a listener binds when its flag names no host (``:5000``): both families."""
IPV4_ANY = "0.0.0.0"

_WILDCARDS = frozenset({ANY_HOST, IPV4_ANY, "::", "[::]"})
_DUAL_STACK = frozenset({ANY_HOST, "::", "[::]"})
# What binding "::" fails with where the kernel has no IPv6 or it is switched off.
_NO_IPV6 = frozenset({errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT})


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
        number = decimal(port_text)
        if number is None:
            raise AddressError(f"invalid address {text!r}: port {port_text!r} is not a number")
        port = number
        if port > 65535:
            raise AddressError(f"invalid address {text!r}: port must be 0-65535")
    return (host or default_host, port)


def bracket_bare_ipv6(text: str) -> str:
    """``[fd00::1]`` for a bare IPv6 address (a pod IP from the downward API), else ``text``."""
    try:
        ipaddress.IPv6Address(text.strip())
    except ValueError:
        return text
    return f"[{text.strip()}]"


def format_host_port(host: str, port: int) -> str:
    """The inverse of `parse_host_port`: ``:5000`` for the wildcard, ``[::1]:5000`` for IPv6."""
    if host == ANY_HOST:
        return f":{port}"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_socket(host: str, port: int, kind: int = socket.SOCK_STREAM,
                reuse_port: bool = False) -> socket.socket:
    """A socket of ``kind`` bound (not yet listening) to host:port; OSError if it cannot be.

    Port-only and ``[::]`` bind one dual-stack IPv6 socket; port-only falls back to
    IPv4 where IPv6 is unavailable. TCP gets SO_REUSEADDR, as every listener here wants.
    ``reuse_port``: SO_REUSEPORT, for a group of listeners on one port
    (`meshmirror.registry.steering`).
    """
    bare = host.strip("[]")
    if host in _DUAL_STACK:
        try:
            return _bind(socket.AF_INET6, "::", port, kind, reuse_port, dual_stack=True)
        except OSError as err:
            if host != ANY_HOST or err.errno not in _NO_IPV6:
                raise
        return _bind(socket.AF_INET, IPV4_ANY, port, kind, reuse_port)
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    return _bind(family, bare, port, kind, reuse_port)


def _bind(family: int, host: str, port: int, kind: int, reuse_port: bool = False,
          dual_stack: bool = False) -> socket.socket:
    sock = socket.socket(family, kind)
    try:
        if kind == socket.SOCK_STREAM:
            # Not for UDP: there it would let a second process share the port.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if dual_stack:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def unmapped(host: str) -> str:
    """``1.2.3.4`` for the IPv4-mapped ``::ffff:1.2.3.4`` a dual-stack socket reports."""
    if host.startswith("::ffff:") and "." in host:
        return host[len("::ffff:"):]
    return host


def sendable(family: int, host: str) -> str:
    """``host`` as a socket of ``family`` can send to it: IPv4 mapped for a dual-stack one."""
    if family == socket.AF_INET6:
        try:
            if ipaddress.ip_address(host).version == 4:
                return f"::ffff:{host}"
        except ValueError:
            pass
    return host
