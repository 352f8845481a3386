"""Which forward proxy an upstream request goes through: containerd's rules, not urllib's.

containerd (Go) reads ``HTTP_PROXY``, ``HTTPS_PROXY`` and ``NO_PROXY`` (upper case
first, then lower case) with ``golang.org/x/net/http/httpproxy``. The mirror must
reach a registry exactly as containerd on the same node would, or it declares an
outage that containerd does not see (or leaks questions past a proxy the
cluster requires). Python's urllib (and so aiohttp's ``trust_env``) reads
``NO_PROXY`` differently: no CIDRs, no ports, no ``*.`` prefixes. So the rules
live here, as Go documents them:

- an ``https`` URL uses ``HTTPS_PROXY`` only, an ``http`` URL ``HTTP_PROXY`` only
  (and not at all when ``REQUEST_METHOD`` is set: a CGI environment);
- ``localhost`` and loopback addresses are never proxied;
- ``NO_PROXY`` is a comma list of ``*`` (nothing is proxied), IP addresses,
  CIDRs, and domain names, each but ``*`` and CIDRs with an optional ``:port``;
  ``foo.com`` matches ``foo.com`` and its subdomains, ``.foo.com`` and
  ``*.foo.com`` only the subdomains; unparseable entries are ignored;
- a proxy value without a scheme means ``http://``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

_DEFAULT_PORTS = {"http": 80, "https": 443}
# The proxy schemes aiohttp can speak: an http(s) proxy, CONNECT for https targets.
_SUPPORTED_SCHEMES = ("http", "https")


class ProxyConfigError(ValueError):
    """A proxy variable that names no usable proxy (``socks5://``, garbage)."""


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _env(environ: Mapping[str, str], name: str) -> str:
    """Go's getEnvAny: the upper-case name first, then the lower-case one; empty is unset."""
    return environ.get(name) or environ.get(name.lower()) or ""


def _parse_proxy(value: str, variable: str) -> str | None:
    """Go's parseProxy: a URL with a scheme and host, else tried again after ``http://``."""
    value = value.strip()
    if not value:
        return None
    parts = urlsplit(value)
    if not parts.scheme or not parts.netloc:
        parts = urlsplit("http://" + value)
    if parts.scheme not in _SUPPORTED_SCHEMES or not parts.hostname:
        raise ProxyConfigError(f"{variable}={value[:200]!r}: want http://host:port "
                               "(socks proxies are not supported)")
    try:
        parts.port  # noqa: B018 - raises for a port outside 0-65535
    except ValueError as err:
        raise ProxyConfigError(f"{variable}={value[:200]!r}: {err}") from err
    return value if "://" in value else "http://" + value


def _ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _split_host_port(entry: str) -> tuple[str, str]:
    """Go's net.SplitHostPort, tolerant: ``host`` alone gives an empty port."""
    if entry.startswith("["):
        end = entry.find("]")
        if end == -1:
            return entry, ""
        host, rest = entry[1:end], entry[end + 1:]
        return (host, rest[1:]) if rest.startswith(":") else (host, "")
    if entry.count(":") == 1:
        host, port = entry.split(":")
        return host, port
    return entry, ""


@dataclass(frozen=True, slots=True)
class _DomainMatch:
    suffix: str  # always with a leading dot
    port: str
    match_host: bool  # the entry had no leading dot: the name itself matches too

    def matches(self, host: str, port: str) -> bool:
        named = host.endswith(self.suffix) or (self.match_host and host == self.suffix[1:])
        return named and (not self.port or self.port == port)


@dataclass(frozen=True, slots=True)
class _IPMatch:
    ip: IPAddress
    port: str

    def matches(self, ip: IPAddress, port: str) -> bool:
        return ip == self.ip and (not self.port or self.port == port)


@dataclass(frozen=True, slots=True)
class NoProxy:
    """A parsed ``NO_PROXY``."""

    everything: bool = False
    networks: tuple[IPNetwork, ...] = ()
    ips: tuple[_IPMatch, ...] = ()
    domains: tuple[_DomainMatch, ...] = ()

    @classmethod
    def parse(cls, value: str) -> NoProxy:
        networks: list[IPNetwork] = []
        ips: list[_IPMatch] = []
        domains: list[_DomainMatch] = []
        for raw in value.split(","):
            entry = raw.strip().lower()
            if not entry:
                continue
            if entry == "*":
                return cls(everything=True)
            if "/" in entry:
                with contextlib.suppress(ValueError):
                    networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            host, port = _split_host_port(entry)
            if not host:
                continue
            ip = _ip(host)
            if ip is not None:
                ips.append(_IPMatch(ip, port))
                continue
            if host.startswith("*."):
                host = host[1:]
            match_host = not host.startswith(".")
            suffix = host if not match_host else "." + host
            with contextlib.suppress(UnicodeError):
                suffix = suffix.encode("idna").decode("ascii")
            domains.append(_DomainMatch(suffix, port, match_host))
        return cls(False, tuple(networks), tuple(ips), tuple(domains))

    def excludes(self, host: str, port: str) -> bool:
        """Whether a request to ``host:port`` goes direct (loopback always does)."""
        host = host.strip().lower()
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if host == "localhost":
            return True
        ip = _ip(host)
        if ip is not None and ip.is_loopback:
            return True
        if self.everything:
            return True
        if ip is not None and (any(ip in network for network in self.networks)
                               or any(m.matches(ip, port) for m in self.ips)):
            return True
        return any(m.matches(host, port) for m in self.domains)


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """The proxies of one environment; ``proxy_for`` answers per URL."""

    http_proxy: str | None = None
    https_proxy: str | None = None
    no_proxy: NoProxy = NoProxy()

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> ProxySettings:
        """The settings containerd would read from the same environment.

        Raises :class:`ProxyConfigError` for a proxy that cannot be used, so a
        typo is one line at start-up, not an outage that looks like the network.
        """
        env = os.environ if environ is None else environ
        http_proxy = _parse_proxy(_env(env, "HTTP_PROXY"), "HTTP_PROXY")
        if env.get("REQUEST_METHOD"):
            http_proxy = None  # Go refuses HTTP_PROXY in a CGI environment (httpoxy)
        return cls(http_proxy, _parse_proxy(_env(env, "HTTPS_PROXY"), "HTTPS_PROXY"),
                   NoProxy.parse(_env(env, "NO_PROXY")))

    def proxy_for(self, url: str) -> str | None:
        """The proxy URL for a request to ``url``, or None to connect directly."""
        parts = urlsplit(url)
        proxy = self.https_proxy if parts.scheme == "https" else (
            self.http_proxy if parts.scheme == "http" else None)
        if proxy is None or parts.hostname is None:
            return None
        try:
            port = parts.port or _DEFAULT_PORTS[parts.scheme]
        except ValueError:
            return None
        if self.no_proxy.excludes(parts.hostname, str(port)):
            return None
        return proxy

    @property
    def hosts(self) -> frozenset[str]:
        """The proxies' own host names: the operator chose them, so they may be private."""
        return frozenset(h for h in (urlsplit(p).hostname for p in
                                     (self.http_proxy, self.https_proxy) if p) if h)
