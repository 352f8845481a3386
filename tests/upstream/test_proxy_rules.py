"""HTTP(S)_PROXY and NO_PROXY read as containerd reads them (Go's httpproxy rules).

The cases are the behaviour golang.org/x/net/http/httpproxy documents: which
variable applies to which scheme, upper case before lower case, loopback never
proxied, and NO_PROXY's hosts, domain suffixes, ``*``, CIDRs and ports.
"""

from __future__ import annotations

import pytest

from meshmirror.upstream.proxy import ProxyConfigError, ProxySettings

PROXY = "http://proxy.example:3128"
HTTPS_PROXY = "http://secure-proxy.example:3129"


def settings(no_proxy: str = "", **extra: str) -> ProxySettings:
    return ProxySettings.from_environment(
        {"HTTP_PROXY": PROXY, "HTTPS_PROXY": HTTPS_PROXY, "NO_PROXY": no_proxy, **extra})


def test_each_scheme_uses_its_own_variable() -> None:
    s = settings()
    assert s.proxy_for("http://registry.example/v2/") == PROXY
    assert s.proxy_for("https://registry.example/v2/") == HTTPS_PROXY
    only_http = ProxySettings.from_environment({"HTTP_PROXY": PROXY})
    assert only_http.proxy_for("https://registry.example/v2/") is None  # no fallback
    assert ProxySettings.from_environment({}).proxy_for("http://registry.example/") is None


def test_upper_case_wins_and_lower_case_is_read() -> None:
    both = ProxySettings.from_environment({"HTTP_PROXY": PROXY, "http_proxy": "http://b:1"})
    assert both.proxy_for("http://r.example/") == PROXY
    lower = ProxySettings.from_environment({"https_proxy": HTTPS_PROXY,
                                            "no_proxy": "r.example"})
    assert lower.proxy_for("https://other.example/") == HTTPS_PROXY
    assert lower.proxy_for("https://r.example/") is None
    empty_upper = ProxySettings.from_environment({"HTTP_PROXY": "", "http_proxy": PROXY})
    assert empty_upper.proxy_for("http://r.example/") == PROXY


def test_a_proxy_without_a_scheme_is_http() -> None:
    s = ProxySettings.from_environment({"HTTPS_PROXY": "10.0.0.1:3128"})
    assert s.proxy_for("https://r.example/") == "http://10.0.0.1:3128"


@pytest.mark.parametrize("value", ["socks5://10.0.0.1:1080", "http://:3128", "http://h:99999"])
def test_an_unusable_proxy_is_a_clear_error(value: str) -> None:
    with pytest.raises(ProxyConfigError, match="HTTPS_PROXY"):
        ProxySettings.from_environment({"HTTPS_PROXY": value})


def test_cgi_environment_ignores_http_proxy() -> None:
    s = settings(REQUEST_METHOD="GET")
    assert s.proxy_for("http://r.example/") is None
    assert s.proxy_for("https://r.example/") == HTTPS_PROXY


@pytest.mark.parametrize("url", [
    "http://localhost:5000/v2/", "http://127.0.0.1/", "http://127.9.8.7:5000/",
    "http://[::1]:5000/", "https://localhost/",
])
def test_loopback_is_never_proxied(url: str) -> None:
    assert settings().proxy_for(url) is None


def test_localhost_subdomain_is_proxied() -> None:
    assert settings().proxy_for("http://foo.localhost/") == PROXY


@pytest.mark.parametrize(("no_proxy", "url", "proxied"), [
    # A domain matches itself and its subdomains...
    ("foo.com", "http://foo.com/", False),
    ("foo.com", "http://bar.foo.com/", False),
    ("foo.com", "http://barfoo.com/", True),
    # ...with a leading dot or "*." only its subdomains.
    (".y.com", "http://x.y.com/", False),
    (".y.com", "http://y.com/", True),
    ("*.y.com", "http://x.y.com/", False),
    ("*.y.com", "http://y.com/", True),
    # "*" alone: nothing is proxied.
    ("*", "http://anything.example/", False),
    (" example.com , other.com ", "http://other.com/", False),
    ("EXAMPLE.com", "http://example.COM/", False),
    # IP addresses and CIDRs.
    ("10.1.2.3", "http://10.1.2.3/", False),
    ("10.1.2.3", "http://10.1.2.4/", True),
    ("10.0.0.0/8", "http://10.200.3.4:5000/", False),
    ("10.0.0.0/8", "http://11.0.0.1/", True),
    ("2001:db8::/32", "http://[2001:db8::5]/", False),
    ("2001:db8::1", "http://[2001:db8::1]:80/", False),
    # A CIDR never matches a name, even one that resolves into it.
    ("10.0.0.0/8", "http://internal.example/", True),
    # Ports: the entry's port must be the URL's (its scheme's default when absent).
    ("foo.com:80", "http://foo.com/", False),
    ("foo.com:80", "https://foo.com/", True),
    ("foo.com:443", "https://foo.com/", False),
    ("foo.com:5000", "http://foo.com:5000/", False),
    ("foo.com:5000", "http://foo.com:5001/", True),
    ("10.1.2.3:5000", "http://10.1.2.3:5000/", False),
    ("10.1.2.3:5000", "http://10.1.2.3:6000/", True),
    ("[2001:db8::1]:443", "https://[2001:db8::1]/", False),
    # Unparseable entries are ignored, the rest still apply.
    ("10.0.0.0/99,:80,foo.com", "http://foo.com/", False),
    ("10.0.0.0/99", "http://10.0.0.1/", True),
])
def test_no_proxy(no_proxy: str, url: str, proxied: bool) -> None:
    proxy = settings(no_proxy).proxy_for(url)
    assert (proxy is not None) is proxied, (no_proxy, url, proxy)


def test_proxy_hosts_are_named() -> None:
    assert settings().hosts == {"proxy.example", "secure-proxy.example"}
