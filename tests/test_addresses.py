"""Port-only addresses listen on IPv6 and IPv4 alike; ``0.0.0.0`` stays IPv4 only."""

from __future__ import annotations

import errno
import socket
from typing import Any

import pytest

from meshmirror import addresses
from meshmirror.addresses import bind_socket, parse_host_port, sendable, unmapped
from tests.support.ports import free_dual_stack_port


def connects(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as c:
        c.settimeout(2)
        try:
            c.connect((host, port))
        except OSError:
            return False
    return True


def test_port_only_parses_to_the_dual_stack_wildcard() -> None:
    assert parse_host_port(":5000") == ("", 5000)
    assert addresses.format_host_port("", 5000) == ":5000"
    assert parse_host_port("0.0.0.0:5000") == ("0.0.0.0", 5000)


@pytest.mark.parametrize("text", ["host:\u00b2", "host:\u0663\u0660", "[::1]:+80", "host: 80",
                                  "host:8_0", "host:65536", "host:"])
def test_a_port_is_ascii_digits_within_range(text: str) -> None:
    """`int` reads '٣٠', '+80' and '8_0'; a registry name from a client must not pass so."""
    with pytest.raises(addresses.AddressError, match="invalid address"):
        parse_host_port(text)


def test_port_only_accepts_ipv6_and_ipv4() -> None:
    port = free_dual_stack_port()
    with bind_socket("", port) as sock:
        sock.listen(8)
        assert sock.family == socket.AF_INET6
        assert connects("::1", port) and connects("127.0.0.1", port)


def test_bracketed_any_is_dual_stack_too() -> None:
    with bind_socket("[::]", 0) as sock:
        sock.listen(8)
        port = sock.getsockname()[1]
        assert connects("127.0.0.1", port) and connects("::1", port)


def test_ipv4_any_is_ipv4_only() -> None:
    with bind_socket("0.0.0.0", 0) as sock:
        sock.listen(8)
        port = sock.getsockname()[1]
        assert sock.family == socket.AF_INET
        assert connects("127.0.0.1", port) and not connects("::1", port)


def test_udp_port_only_receives_both_families() -> None:
    port = free_dual_stack_port()
    with bind_socket("", port, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        for host in ("127.0.0.1", "::1"):
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            with socket.socket(family, socket.SOCK_DGRAM) as c:
                c.sendto(host.encode(), (host, port))
                data, source = sock.recvfrom(64)
            assert data == host.encode() and unmapped(source[0]) == host
        # A second UDP socket on the same port is refused: no SO_REUSEADDR for UDP.
        with pytest.raises(OSError), bind_socket("", port, socket.SOCK_DGRAM):
            pass


def test_port_only_falls_back_to_ipv4_without_ipv6(monkeypatch: pytest.MonkeyPatch) -> None:
    real = socket.socket

    def no_ipv6(family: int = socket.AF_INET, *args: Any, **kwargs: Any) -> socket.socket:
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        return real(family, *args, **kwargs)

    monkeypatch.setattr(socket, "socket", no_ipv6)
    with bind_socket("", 0) as sock:
        assert sock.family == socket.AF_INET and sock.getsockname()[0] == "0.0.0.0"
    with pytest.raises(OSError):  # asked for IPv6 by name: no silent fallback
        bind_socket("[::]", 0)


def test_mapped_addresses() -> None:
    assert unmapped("::ffff:127.0.0.3") == "127.0.0.3"
    assert unmapped("::1") == "::1" and unmapped("127.0.0.1") == "127.0.0.1"
    assert sendable(socket.AF_INET6, "127.0.0.3") == "::ffff:127.0.0.3"
    assert sendable(socket.AF_INET6, "::1") == "::1"
    assert sendable(socket.AF_INET, "127.0.0.3") == "127.0.0.3"


def test_a_bare_ipv6_pod_ip_is_an_advertise_address() -> None:
    """The chart sets MESHMIRROR_ADVERTISE_ADDR to status.podIP, bare on IPv6 clusters."""
    from meshmirror.cli import mesh_addresses

    advertise, http_base = mesh_addresses(("", 7946), "fd00::1", ("", 5000))
    assert advertise == ("fd00::1", 7946) and http_base == "http://[fd00::1]:5000"
    assert mesh_addresses(("", 7946), "[fd00::1]:7000", ("", 5000))[0] == ("fd00::1", 7000)
    assert mesh_addresses(("", 7946), "10.0.0.3", ("", 5000))[0] == ("10.0.0.3", 7946)
