"""The peer-request marker: how a node tells a peer's request from containerd's.

A peer asks us only for what our summary claims we hold. Answering a marked
request from the local store alone keeps a false positive from turning into a
chain of mirrors asking each other; `refuse_private` keeps what this node knows
to be private from leaving it at all.

The marker is also a privilege: a marked request may take one of the node's
``--rollout-fanout`` reader slots, and a tree request (`TREE_HEADER`) makes the
node join a blob's tree. The registry port is open to every pod, so a marker is
believed only if it is authenticated (`PeerAuth`): its source address must be an
alive member's advertised address and, with a gossip key, it must carry an HMAC
made with a key derived from the keyring. A marker that does not verify is
ignored: the request is served as any client's would be, and counted.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import threading
import time
from collections.abc import Callable, Sequence
from typing import Final
from urllib.parse import parse_qs

from aiohttp import ClientHandlerType, ClientMiddlewareType, ClientRequest, ClientResponse
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from prometheus_client import CollectorRegistry, Counter
from starlette.types import ASGIApp, Receive, Scope, Send

from meshmirror.flags import decimal
from meshmirror.registry.errors import RegistryError
from meshmirror.registry.paths import parse_v2_path

PEER_HEADER = "X-Meshmirror-Peer"
_PEER_HEADER_BYTES = PEER_HEADER.lower().encode()
TREE_HEADER = "X-Meshmirror-Tree"
"""Marks a rollout's tree request and names the requesting node (`mirror.rollout`)."""
_TREE_HEADER_BYTES = TREE_HEADER.lower().encode()
AUTH_HEADER = "X-Meshmirror-Auth"
"""``v1 <unix seconds> <hex HMAC-SHA256> <node name>`` on every marked request when the
mesh has a gossip key."""
_AUTH_HEADER_BYTES = AUTH_HEADER.lower().encode()
_AUTH_VERSION: Final = "v1"
# The gossip key encrypts packets; the request key is derived from it for this one
# use, so an HMAC seen on the wire says nothing about the gossip key.
_KDF_INFO: Final = b"meshmirror peer request hmac v1"
# A signed request is good for this long either side of the receiver's clock: it
# bounds replay of a captured request, and tolerates nodes' clocks (NTP) drifting.
MAX_CLOCK_SKEW: Final = 30.0
_MAX_NAME: Final = 256

REFUSALS: Final = ("not_member", "unsigned", "malformed", "stale", "bad_signature",
                   "wrong_name")
"""Why a marker was not believed: the ``reason`` label's values."""


def _host(address: str) -> str | None:
    """``address`` as a canonical IP (an IPv4-mapped IPv6 as IPv4); None if not an IP."""
    try:
        ip = ipaddress.ip_address(address.strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


class MemberAddresses:
    """The addresses alive members advertise (gossip and registry), by member name.

    Peering keeps it up to date from membership events; `PeerAuth` asks it whether
    a marked request's source is a member. Names (not IPs) in an advertisement are
    not resolved: such a member's requests are not believed.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # A tuple per member and a count per address: at 5,000 members a frozenset
        # each (216 bytes for one or two addresses) and a union of all rebuilt on
        # every membership event cost 1 MiB and O(members) per event.
        self._by_name: dict[str, tuple[str, ...]] = {}
        self._members_at: dict[str, int] = {}  # address: how many members advertise it

    def set(self, name: str, addresses: Sequence[str]) -> None:
        hosts = tuple(dict.fromkeys(h for a in addresses if (h := _host(a)) is not None))
        with self._lock:
            self._drop(name)
            self._by_name[name] = hosts
            for host in hosts:
                self._members_at[host] = self._members_at.get(host, 0) + 1

    def remove(self, name: str) -> None:
        with self._lock:
            self._drop(name)

    def _drop(self, name: str) -> None:
        for host in self._by_name.pop(name, ()):
            left = self._members_at[host] - 1
            if left:
                self._members_at[host] = left
            else:
                del self._members_at[host]

    def of(self, name: str) -> tuple[str, ...]:
        return self._by_name.get(name, ())

    def __contains__(self, host: object) -> bool:
        return isinstance(host, str) and (_host(host) or host) in self._members_at


class PeerAuth:
    """Signs this node's marked requests and checks other nodes'.

    ``keys`` returns the gossip keyring's keys, primary first (empty: no gossip
    key). The primary signs; any key verifies, so a key rotation (install, use,
    remove) never makes honest requests fail.

    What each mode guarantees is in docs/security.md: without a key, only that the
    request came from an address a member advertises; with one, also that a key
    holder made it for this method and path within `MAX_CLOCK_SKEW`, as the member
    it names, from that member's address.
    """

    def __init__(self, name: str, members: MemberAddresses,
                 keys: Callable[[], Sequence[bytes]] = tuple, *,
                 registry: CollectorRegistry | None = None,
                 clock: Callable[[], float] = time.time,
                 max_skew: float = MAX_CLOCK_SKEW) -> None:
        self.name = name
        self.members = members
        self._keys = keys
        self._clock = clock
        self._max_skew = max_skew
        self._derived: dict[bytes, bytes] = {}
        self.refused = Counter(
            "meshmirror_peer_markers_refused",
            "Requests marked as a peer's (or a rollout's tree request) whose marker did "
            "not verify, served as any client's instead, by reason: not_member (source "
            "is no alive member's advertised address), unsigned, malformed, stale "
            "(timestamp beyond the clock skew), bad_signature, wrong_name (the signed "
            "name is not the member at that address, or not the tree request's)",
            ["reason"], registry=registry)
        for reason in REFUSALS:
            self.refused.labels(reason)

    def _request_key(self, gossip_key: bytes) -> bytes:
        derived = self._derived.get(gossip_key)
        if derived is None:
            derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                           info=_KDF_INFO).derive(gossip_key)
            if len(self._derived) > 16:  # rotated keys come and go
                self._derived.clear()
            self._derived[gossip_key] = derived
        return derived

    @staticmethod
    def _message(method: str, path: str, stamp: str, name: str) -> bytes:
        return "\n".join((method.upper(), path, stamp, name)).encode()

    def sign(self, method: str, path: str) -> str | None:
        """The `AUTH_HEADER` value for a request of ``method`` on ``path`` (no query);
        None without a gossip key."""
        keys = self._keys()
        if not keys:
            return None
        stamp = str(int(self._clock()))
        mac = hmac.new(self._request_key(keys[0]),
                       self._message(method, path, stamp, self.name), hashlib.sha256)
        return f"{_AUTH_VERSION} {stamp} {mac.hexdigest()} {self.name}"

    def check(self, scope: Scope) -> str | None:
        """None if ``scope``'s marker is believed, else why not (one of `REFUSALS`)."""
        client = scope.get("client")
        source = _host(client[0]) if client else None
        if source is None or source not in self.members:
            return "not_member"
        keys = self._keys()
        if not keys:
            return None
        headers = scope.get("headers", ())
        value = next((v for k, v in headers if k == _AUTH_HEADER_BYTES), None)
        if value is None:
            return "unsigned"
        parts = value.decode("latin-1").split(" ", 3)
        # ASCII digits only, and few: `str.isdigit` also takes digits `int` refuses
        # ("\xb2") and lengths past `int`'s limit, which would end the request in a 500.
        if len(parts) != 4 or parts[0] != _AUTH_VERSION or decimal(parts[1]) is None \
                or len(parts[3]) > _MAX_NAME:
            return "malformed"
        _, stamp, mac, name = parts
        if abs(self._clock() - int(stamp)) > self._max_skew:
            return "stale"
        message = self._message(scope.get("method", ""), scope.get("path", ""), stamp, name)
        if not any(hmac.compare_digest(
                hmac.new(self._request_key(key), message, hashlib.sha256).hexdigest(), mac)
                for key in keys):
            return "bad_signature"
        tree = next((v for k, v in headers if k == _TREE_HEADER_BYTES), None)
        if source not in self.members.of(name) or (
                tree is not None and tree.decode("latin-1") != name):
            return "wrong_name"
        return None

    def admit(self, scope: Scope) -> bool:
        """`check`, counting a refusal."""
        reason = self.check(scope)
        if reason is not None:
            self.refused.labels(reason).inc()
        return reason is None


def signing_middleware(auth: PeerAuth) -> ClientMiddlewareType:
    """An aiohttp client middleware that signs every request carrying `PEER_HEADER`, so
    the session that talks to peers signs whatever asks it (mirror, rollout)."""

    async def sign(request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        if PEER_HEADER in request.headers:
            value = auth.sign(request.method, request.url.path)
            if value is not None:
                request.headers[AUTH_HEADER] = value
        return await handler(request)

    return sign


def peer_dispatch(for_clients: ASGIApp, for_peers: ASGIApp,
                  admit: Callable[[Scope], bool] | None = None) -> ASGIApp:
    """Route requests carrying `PEER_HEADER` to an app without a fallback.

    A peer asks us only for what our summary claims we hold; answering from the
    local store alone keeps a false positive from turning into a chain of mirrors.
    With ``admit`` (`PeerAuth.admit`), a marked request it refuses goes to
    ``for_clients``: a pod that sends the marker gets what its plain request would.
    """

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and any(
            name == _PEER_HEADER_BYTES for name, _ in scope.get("headers", ())
        ) and (admit is None or admit(scope)):
            await for_peers(scope, receive, send)
        else:
            await for_clients(scope, receive, send)

    return app


def refuse_private(app: ASGIApp, known_private: Callable[[str, str], bool],
                   default_registry: str) -> ASGIApp:
    """Answer 404 to requests for a repository ``known_private(registry, repository)``.

    Put in front of the app that serves peers. The requesting node should
    never ask for a private repository's content (its own mirror checks
    first); a node that runs ``--private-images=share``, or a member acting on
    its own, still gets nothing this node knows to be private.
    """

    async def gate(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope.get("path", "")
            if path.startswith("/v2/") and _private(path, scope, known_private,
                                                    default_registry):
                error = RegistryError("NAME_UNKNOWN", "not served to peers")
                response = error.response(head=scope.get("method") == "HEAD")
                await response(scope, receive, send)
                return
        await app(scope, receive, send)

    return gate


def _private(path: str, scope: Scope, known_private: Callable[[str, str], bool],
             default_registry: str) -> bool:
    try:
        parsed = parse_v2_path(path)
    except RegistryError:
        return False  # the app answers malformed paths itself
    if not parsed.repository:
        return False
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    registry = (query.get("ns") or [default_registry])[0]
    return known_private(registry, parsed.repository)
