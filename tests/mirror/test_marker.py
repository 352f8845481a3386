"""`PeerAuth`: which markers a node believes (sans-IO: scopes built by hand, a fake clock)."""

from __future__ import annotations

from starlette.types import Scope

from meshmirror.mirror.marker import (
    AUTH_HEADER,
    PEER_HEADER,
    TREE_HEADER,
    MemberAddresses,
    PeerAuth,
)

OLD_KEY, NEW_KEY, OTHER_KEY = b"o" * 32, b"n" * 32, b"x" * 16
PATH = "/v2/pub/app/blobs/sha256:" + "ab" * 32


def _members() -> MemberAddresses:
    members = MemberAddresses()
    members.set("node-a", ("10.0.0.1", "10.0.0.1"))
    members.set("node-b", ("fd00::2",))
    return members


def _scope(source: str, auth: str | None, *, tree: str | None = None, path: str = PATH,
           method: str = "GET") -> Scope:
    headers = [(PEER_HEADER.lower().encode(), b"1")]
    if auth is not None:
        headers.append((AUTH_HEADER.lower().encode(), auth.encode()))
    if tree is not None:
        headers.append((TREE_HEADER.lower().encode(), tree.encode()))
    return {"type": "http", "method": method, "path": path, "headers": headers,
            "client": (source, 40000)}


def _signer(name: str, keys: list[bytes], now: float = 1000.0) -> PeerAuth:
    return PeerAuth(name, MemberAddresses(), lambda: keys, clock=lambda: now)


def test_a_members_signed_request_is_believed_and_nothing_else_is() -> None:
    verifier = PeerAuth("me", _members(), lambda: [OLD_KEY], clock=lambda: 1000.0)
    signed = _signer("node-a", [OLD_KEY]).sign("GET", PATH)
    assert signed is not None
    assert verifier.check(_scope("10.0.0.1", signed)) is None
    assert verifier.check(_scope("10.0.0.1", signed, tree="node-a")) is None
    # Where each forgery fails:
    assert verifier.check(_scope("10.0.0.9", signed)) == "not_member"
    assert verifier.check(_scope("10.0.0.1", None)) == "unsigned"
    assert verifier.check(_scope("10.0.0.1", "v1 soon x node-a")) == "malformed"
    assert verifier.check(_scope("10.0.0.1", signed, path=PATH + "x")) == "bad_signature"
    assert verifier.check(_scope("10.0.0.1", signed, method="HEAD")) == "bad_signature"
    forged = _signer("node-a", [OTHER_KEY]).sign("GET", PATH)
    assert verifier.check(_scope("10.0.0.1", forged)) == "bad_signature"
    assert verifier.check(_scope("10.0.0.1", signed, tree="node-b")) == "wrong_name"
    # node-b's signature, sent from node-a's address: the name does not match.
    as_b = _signer("node-b", [OLD_KEY]).sign("GET", PATH)
    assert verifier.check(_scope("10.0.0.1", as_b)) == "wrong_name"
    assert verifier.check(_scope("fd00::2", as_b)) is None


def test_the_clock_bounds_how_long_a_signature_is_good() -> None:
    verifier = PeerAuth("me", _members(), lambda: [OLD_KEY], clock=lambda: 1000.0)
    for offset, verdict in ((-29, None), (29, None), (-31, "stale"), (31, "stale")):
        signed = _signer("node-a", [OLD_KEY], now=1000.0 + offset).sign("GET", PATH)
        assert verifier.check(_scope("10.0.0.1", signed)) == verdict, offset


def test_any_key_of_the_ring_verifies_so_rotation_never_refuses_a_peer() -> None:
    verifier = PeerAuth("me", _members(), lambda: [NEW_KEY, OLD_KEY], clock=lambda: 1000.0)
    for keys in ([OLD_KEY], [NEW_KEY, OLD_KEY]):
        signed = _signer("node-a", keys).sign("GET", PATH)
        assert verifier.check(_scope("10.0.0.1", signed)) is None


def test_the_signature_is_not_made_with_the_gossip_key_itself() -> None:
    import hashlib
    import hmac

    signed = _signer("node-a", [OLD_KEY]).sign("GET", PATH)
    assert signed is not None
    _, stamp, mac, name = signed.split(" ", 3)
    direct = hmac.new(OLD_KEY, "\n".join(("GET", PATH, stamp, name)).encode(),
                      hashlib.sha256).hexdigest()
    assert mac != direct


def test_without_a_key_a_members_address_is_what_is_checked() -> None:
    members = _members()
    verifier = PeerAuth("me", members, clock=lambda: 1000.0)
    assert _signer("me", []).sign("GET", PATH) is None  # nothing to sign with
    assert verifier.check(_scope("10.0.0.1", None)) is None
    assert verifier.check(_scope("::ffff:10.0.0.1", None)) is None
    assert verifier.check(_scope("10.0.0.2", None)) == "not_member"
    members.remove("node-a")  # it left or died
    assert verifier.check(_scope("10.0.0.1", None)) == "not_member"


def test_refusals_are_counted_by_reason() -> None:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    verifier = PeerAuth("me", _members(), lambda: [OLD_KEY], registry=registry,
                        clock=lambda: 1000.0)
    assert not verifier.admit(_scope("10.0.0.1", None))
    assert not verifier.admit(_scope("10.0.0.7", None))
    assert registry.get_sample_value("meshmirror_peer_markers_refused_total",
                                     {"reason": "unsigned"}) == 1
    assert registry.get_sample_value("meshmirror_peer_markers_refused_total",
                                     {"reason": "not_member"}) == 1


def test_peer_requests_leave_from_the_advertised_address_only_when_it_is_ours() -> None:
    from meshmirror.peering import bindable

    assert bindable("127.0.0.1")
    assert not bindable("192.0.2.1")  # TEST-NET-1: advertised through NAT, say
    assert not bindable("registry.example")


def test_an_address_two_members_advertise_stays_a_member_until_both_are_gone() -> None:
    members = MemberAddresses()
    members.set("node-a", ("10.0.0.1", "10.0.0.2"))
    members.set("node-b", ("10.0.0.1",))
    members.set("node-a", ("10.0.0.3",))  # node-a moved: its old addresses go
    assert "10.0.0.1" in members and "10.0.0.2" not in members and "10.0.0.3" in members
    assert members.of("node-a") == ("10.0.0.3",)
    members.remove("node-b")
    assert "10.0.0.1" not in members and "::ffff:10.0.0.3" in members
    members.remove("node-a")
    members.remove("node-a")  # twice: nothing left to drop
    assert "10.0.0.3" not in members and members.of("node-a") == ()
