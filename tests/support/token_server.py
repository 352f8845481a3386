"""A distribution token server that real Distribution accepts, for registries with auth.

Distribution's ``auth: token`` answers ``401 Bearer realm=...,service=...,scope=...``
as Docker Hub does; the client then asks the realm for a JWT whose ``access``
claim lists what it may do. This server grants anonymous ``pull`` on the
repositories in ``public`` and, for the rest, an empty grant (Docker Hub's
answer for a private repository: a valid token the registry then refuses).
A client with the pusher's credentials gets every action it asks for, so
skopeo can push images in and ``ctr pull --user`` can pull private ones: as
Basic credentials on the GET (skopeo, Docker) or as an OAuth2 password grant
POSTed to the realm (containerd, whenever it holds a secret).

Tokens are ES256 JWTs carrying a self-signed certificate in their ``x5c``
header; that certificate is the registry's ``rootcertbundle``. Faults for
tests: ``refuse_anonymous`` (401 to anonymous requests), ``garbage`` (a 200
whose body is no token response). Every request is recorded.
"""

from __future__ import annotations

import base64
import datetime
import json
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from meshmirror.upstream.guard import AddressGuard
from tests.support.scripted_http import Reply, Request, ScriptedHTTPServer

SERVICE = "meshmirror-test-registry"
ISSUER = "meshmirror-test-token-issuer"
# A token server listens on another loopback address than its registry, which the
# upstream client's guard refuses unless allowed: what a node gets from
# --upstream-allow-hosts 127.0.0.0/8.
LOOPBACK_ALLOWED = AddressGuard.parse(["127.0.0.0/8"])


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class Grant:
    type: str
    name: str
    actions: tuple[str, ...]


def parse_scope(scope: str) -> Grant | None:
    """``repository:library/demo:pull,push`` -> Grant; other shapes -> None."""
    parts = scope.split(":")
    if len(parts) < 3:
        return None
    return Grant(parts[0], ":".join(parts[1:-1]), tuple(a for a in parts[-1].split(",") if a))


class SigningKey:
    """A P-256 key and the self-signed certificate Distribution is told to trust."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshmirror test token")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def jwt(self, claims: dict[str, Any]) -> str:
        """An ES256 JWS: the signature is r||s, 32 bytes each, not DER."""
        header = {"typ": "JWT", "alg": "ES256",
                  "x5c": [base64.b64encode(
                      self.cert.public_bytes(serialization.Encoding.DER)).decode()]}
        signing_input = (f"{_b64url(json.dumps(header).encode())}."
                         f"{_b64url(json.dumps(claims).encode())}")
        der = self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


class TokenServer:
    """``with TokenServer(public={"pub/app"}, tmp_dir) as ts:``; realm at ``ts.realm``."""

    def __init__(self, directory: Path, public: Iterable[str] = (), *,
                 pusher: tuple[str, str] = ("pusher", "push-secret"),
                 expires_in: int | None = 300, host: str | None = None) -> None:
        self.public = set(public)
        self.pusher = pusher
        self.expires_in = expires_in
        self.refuse_anonymous = False
        self.garbage = False
        self.key = SigningKey()
        self.rootcertbundle = directory / "token-root.pem"
        self.rootcertbundle.write_bytes(self.key.cert_pem())
        self._http = ScriptedHTTPServer(self._respond, host=host)

    @property
    def realm(self) -> str:
        return f"{self._http.url}/token"

    @property
    def requests(self) -> list[Request]:
        return self._http.requests

    def anonymous_requests(self) -> list[Request]:
        return [r for r in self.requests if "authorization" not in r.headers]

    def _is_pusher(self, request: Request) -> bool:
        auth = request.headers.get("authorization", "")
        if not auth.lower().startswith("basic "):
            return False
        try:
            user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
        except ValueError:
            return False
        return (user, password) == self.pusher

    def _granted(self, scopes: Iterable[str], pusher: bool) -> list[dict[str, Any]]:
        access = []
        for scope in scopes:
            grant = parse_scope(scope)
            if grant is None or grant.type != "repository":
                continue
            if pusher:
                actions = list(grant.actions)
            else:
                actions = ["pull"] if grant.name in self.public and "pull" in grant.actions else []
            access.append({"type": "repository", "name": grant.name, "actions": actions})
        return access

    def _respond(self, request: Request) -> Reply:
        if request.path != "/token":
            return Reply(404)
        if request.method == "POST":
            return self._oauth(request)
        pusher = self._is_pusher(request)
        if "authorization" in request.headers and not pusher:
            return Reply(401, body=b'{"details":"bad credentials"}')
        if not pusher and self.refuse_anonymous:
            return Reply(401, body=b'{"details":"anonymous access refused"}')
        return self._token(request.query.get("scope", []), request.param("service"), pusher)

    def _oauth(self, request: Request) -> Reply:
        """containerd's OAuth2 POST: a password grant with the pusher's credentials, or 401."""
        form = parse_qs(request.body.decode("latin-1"))

        def field(name: str) -> str:
            return (form.get(name) or [""])[0]

        if field("grant_type") != "password" or (
                field("username"), field("password")) != self.pusher:
            return Reply(401, body=b'{"details":"bad credentials"}')
        scopes = [s for value in form.get("scope", []) for s in value.split(" ") if s]
        return self._token(scopes, field("service") or None, pusher=True)

    def _token(self, scopes: Iterable[str], service: str | None, pusher: bool) -> Reply:
        if self.garbage:
            return Reply(200, (("Content-Type", "application/json"),), b"<html>not json")
        now = int(time.time())
        claims = {"iss": ISSUER, "sub": self.pusher[0] if pusher else "",
                  "aud": service or SERVICE, "exp": now + 600,
                  "nbf": now - 10, "iat": now, "jti": secrets.token_hex(8),
                  "access": self._granted(scopes, pusher)}
        token = self.key.jwt(claims)
        doc: dict[str, Any] = {"token": token, "access_token": token,
                               "issued_at": datetime.datetime.now(datetime.UTC).isoformat()}
        if self.expires_in is not None:
            doc["expires_in"] = self.expires_in
        return Reply(200, (("Content-Type", "application/json"),), json.dumps(doc).encode())

    def start(self) -> TokenServer:
        self._http.start()
        return self

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> TokenServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
