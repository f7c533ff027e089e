"""Tokens, namespace rules, personal channels and API key roles (issue 5), against real servers.

The permission matrix computes what it expects from a table written here from docs/configuration.md and
docs/protocol.md ("Namespaces", ``subscribe``), never from ``tidings.auth.check_permission``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import importlib.util
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from tidings.config import ApiKey, Namespace, Settings
from tidings.protocol import CloseCode, ErrorCode

from .conftest import API_KEY, Probe, ProbeFactory, Server, ServerFactory, api_headers

SECRET = "hs256-test-secret-0123456789abcdefghijklmnop"
ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------- helpers


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(sub: str | None = "alice", ttl: float = 300, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"exp": int(time.time() + ttl), **extra}
    if sub is not None:
        out["sub"] = sub
    return out


def hs(payload: dict[str, Any], secret: str = SECRET, headers: dict[str, Any] | None = None) -> str:
    return jwt.encode(payload, secret, algorithm="HS256", headers=headers)


def hand_made(header: dict[str, Any], payload: dict[str, Any], key: bytes | None) -> str:
    """A JWT built without PyJWT: ``key`` None leaves the signature empty (``alg: none``)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    sig = b"" if key is None else hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(sig)}"


def assert_error(reply: dict[str, Any], code: ErrorCode) -> None:
    assert reply.get("ok") is False, reply
    assert reply["error"]["code"] == code.value, reply
    assert reply["error"]["message"], reply


async def connect_refused(
    srv: Server, probe: ProbeFactory, token: str, code: ErrorCode, close: CloseCode
) -> None:
    """``connect`` with ``token`` is refused with ``code`` and the connection closed with ``close``."""
    p = await probe(srv)
    assert_error(await p.request("connect", token=token), code)
    assert await p.wait_closed() == close


async def connect_ok(srv: Server, probe: ProbeFactory, token: str, user: str = "alice") -> Probe:
    p = await probe(srv)
    result = await p.ok("connect", token=token)
    assert result["user"] == user
    return p


@dataclass
class Keys:
    dir: Path
    rsa: rsa.RSAPrivateKey
    ec: ec.EllipticCurvePrivateKey
    rsa_pem: Path
    ec_pem: Path
    jwks: Path


def _public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    d = tmp_path_factory.mktemp("keys")
    rk = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ek = ec.generate_private_key(ec.SECP256R1())
    (d / "rsa.pem").write_bytes(_public_pem(rk))
    (d / "ec.pem").write_bytes(_public_pem(ek))
    rjwk = RSAAlgorithm.to_jwk(rk.public_key(), as_dict=True)
    ejwk = ECAlgorithm.to_jwk(ek.public_key(), as_dict=True)
    jwks = {
        "keys": [
            {**ejwk, "kid": "ec-1", "alg": "ES256", "use": "sig"},
            {**rjwk, "kid": "rsa-1", "alg": "RS256", "use": "sig"},
        ]
    }
    (d / "jwks.json").write_text(json.dumps(jwks))
    return Keys(d, rk, ek, d / "rsa.pem", d / "ec.pem", d / "jwks.json")


# ---------------------------------------------------------------------------------------------- tokens


@pytest.fixture
async def hs_server(start_server: ServerFactory) -> Server:
    # Failure slow-down off: these tests send many bad tokens from one address on purpose.
    return await start_server(token_secret=SECRET, api_failures_per_minute=0)


async def test_hs256_connect_and_query_param(hs_server: Server, probe: ProbeFactory) -> None:
    token = hs(claims("alice", info={"name": "Alice"}))
    p = await connect_ok(hs_server, probe, token)
    r = await p.ok("publish", channel="chat:room", data="hi")
    assert r["offset"] == 1
    # The same token in the URL: the connection is authenticated before any frame.
    q = await probe(f"{hs_server.ws_url}?token={token}")
    result = await q.ok("connect")
    assert result["user"] == "alice" and result["expires"] > time.time()
    await q.ok("subscribe", channel="chat:room")
    await p.ok("publish", channel="chat:room", data="again")
    (msg,) = await q.messages(1)
    assert msg["info"]["user"] == "alice" and msg["info"]["info"] == {"name": "Alice"}


async def test_expired_token_is_refused_with_4002(hs_server: Server, probe: ProbeFactory) -> None:
    expired = hs(claims("alice", ttl=-60))
    p = await probe(hs_server)
    assert_error(await p.request("connect", token=expired), ErrorCode.TOKEN_EXPIRED)
    assert await p.wait_closed() == CloseCode.TOKEN_EXPIRED
    disconnect = await p.push()
    assert disconnect == {"type": "disconnect", "code": 4002, "reason": "token expired", "reconnect": True}
    q = await probe(f"{hs_server.ws_url}?token={expired}")
    assert await q.wait_closed() == CloseCode.TOKEN_EXPIRED


@pytest.mark.parametrize(
    "case",
    ["bad-signature", "alg-none", "alg-none-signed", "missing-sub", "missing-exp", "sub-not-string",
     "empty-sub", "not-a-jwt", "too-long", "channels-not-list", "info-not-object",
     "subscription-token"],
)  # fmt: skip
async def test_invalid_connection_tokens(
    hs_server: Server, probe: ProbeFactory, keys: Keys, case: str
) -> None:
    token = {
        "bad-signature": lambda: hs(claims("alice"), secret="another-secret-0123456789abcdefghijkl"),
        "alg-none": lambda: hand_made({"alg": "none", "typ": "JWT"}, claims("alice"), None),
        "alg-none-signed": lambda: hand_made({"alg": "none"}, claims("alice"), SECRET.encode()),
        "missing-sub": lambda: hs(claims(None)),
        "missing-exp": lambda: hs({"sub": "alice"}),
        "sub-not-string": lambda: hs({"sub": 42, "exp": int(time.time()) + 60}),
        "empty-sub": lambda: hs(claims("")),
        "not-a-jwt": lambda: "not-a-jwt",
        "too-long": lambda: hs(claims("alice", pad="x" * 9000)),
        "channels-not-list": lambda: hs(claims("alice", channels="chat:*")),
        "info-not-object": lambda: hs(claims("alice", info="Alice")),
        # A subscription token (it has `sub` and `exp` too) must not pass as a connection token.
        "subscription-token": lambda: hs(claims("alice", channel="chat:room")),
    }[case]()
    await connect_refused(hs_server, probe, token, ErrorCode.UNAUTHORIZED, CloseCode.UNAUTHORIZED)
    q = await probe(f"{hs_server.ws_url}?token={token}" if len(token) < 8000 else hs_server.ws_url)
    if len(token) < 8000:
        assert await q.wait_closed() == CloseCode.UNAUTHORIZED


async def test_rs256_token_refused_when_only_a_secret_is_configured(
    hs_server: Server, probe: ProbeFactory, keys: Keys
) -> None:
    rs = jwt.encode(claims("alice"), keys.rsa, algorithm="RS256")
    await connect_refused(hs_server, probe, rs, ErrorCode.UNAUTHORIZED, CloseCode.UNAUTHORIZED)
    es = jwt.encode(claims("alice"), keys.ec, algorithm="ES256")
    await connect_refused(hs_server, probe, es, ErrorCode.UNAUTHORIZED, CloseCode.UNAUTHORIZED)


async def test_no_key_configured_refuses_every_token(
    start_server: ServerFactory, probe: ProbeFactory
) -> None:
    srv = await start_server(api_failures_per_minute=0)
    await connect_refused(srv, probe, hs(claims("alice")), ErrorCode.UNAUTHORIZED, CloseCode.UNAUTHORIZED)


@pytest.mark.parametrize("kind", ["rsa", "ec"])
async def test_public_key_pem(
    start_server: ServerFactory, probe: ProbeFactory, keys: Keys, kind: str
) -> None:
    pem = keys.rsa_pem if kind == "rsa" else keys.ec_pem
    srv = await start_server(token_public_key=str(pem), api_failures_per_minute=0)
    good, other = (keys.rsa, keys.ec) if kind == "rsa" else (keys.ec, keys.rsa)
    alg, other_alg = ("RS256", "ES256") if kind == "rsa" else ("ES256", "RS256")
    await connect_ok(srv, probe, jwt.encode(claims("alice"), good, algorithm=alg))
    # A token of the other key type, a token signed by another key of the same type.
    await connect_refused(
        srv, probe, jwt.encode(claims("alice"), other, algorithm=other_alg), ErrorCode.UNAUTHORIZED, 4001
    )
    stranger = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if kind == "rsa"
        else ec.generate_private_key(ec.SECP256R1())
    )
    forged = jwt.encode(claims("alice"), stranger, algorithm=alg)
    await connect_refused(srv, probe, forged, ErrorCode.UNAUTHORIZED, CloseCode.UNAUTHORIZED)
    # Algorithm confusion: HS256 "signed" with the public key PEM as the HMAC secret.
    confused = hand_made({"alg": "HS256", "typ": "JWT"}, claims("alice"), pem.read_bytes())
    await connect_refused(srv, probe, confused, ErrorCode.UNAUTHORIZED, CloseCode.UNAUTHORIZED)
    # And `none`.
    none = hand_made({"alg": "none"}, claims("alice"), None)
    await connect_refused(srv, probe, none, ErrorCode.UNAUTHORIZED, CloseCode.UNAUTHORIZED)
    expired = jwt.encode(claims("alice", ttl=-60), good, algorithm=alg)
    await connect_refused(srv, probe, expired, ErrorCode.TOKEN_EXPIRED, CloseCode.TOKEN_EXPIRED)


async def test_jwks_with_kid(start_server: ServerFactory, probe: ProbeFactory, keys: Keys) -> None:
    srv = await start_server(token_jwks=str(keys.jwks), api_failures_per_minute=0)
    rs = jwt.encode(claims("alice"), keys.rsa, algorithm="RS256", headers={"kid": "rsa-1"})
    es = jwt.encode(claims("alice"), keys.ec, algorithm="ES256", headers={"kid": "ec-1"})
    await connect_ok(srv, probe, rs)
    await connect_ok(srv, probe, es)
    refused = [
        # unknown kid
        jwt.encode(claims("alice"), keys.rsa, algorithm="RS256", headers={"kid": "nope"}),
        # right kid, wrong key type for it
        jwt.encode(claims("alice"), keys.rsa, algorithm="RS256", headers={"kid": "ec-1"}),
        # right kid, signed by a stranger
        jwt.encode(
            claims("alice"),
            rsa.generate_private_key(public_exponent=65537, key_size=2048),
            algorithm="RS256",
            headers={"kid": "rsa-1"},
        ),
        # HMAC with the JWKS public key material as the secret
        hand_made({"alg": "HS256", "kid": "rsa-1"}, claims("alice"), keys.rsa_pem.read_bytes()),
        hand_made({"alg": "none", "kid": "rsa-1"}, claims("alice"), None),
    ]
    for token in refused:
        await connect_refused(srv, probe, token, ErrorCode.UNAUTHORIZED, CloseCode.UNAUTHORIZED)


async def test_connection_closed_when_token_expires(hs_server: Server, probe: ProbeFactory) -> None:
    witness = await connect_ok(hs_server, probe, hs(claims("bob", ttl=300)), user="bob")
    await witness.ok("subscribe", channel="chat:exp")
    p = await probe(hs_server)
    exp = int(time.time()) + 2
    result = await p.ok("connect", token=hs({"sub": "alice", "exp": exp}))
    assert result["expires"] == exp
    await p.ok("subscribe", channel="chat:exp")
    assert await p.wait_closed(timeout=10) == CloseCode.TOKEN_EXPIRED
    assert time.time() >= exp - 0.5
    disconnect = [m async for m in _drain(p) if m["type"] == "disconnect"]
    assert disconnect[-1]["code"] == 4002 and disconnect[-1]["reconnect"] is True
    # The other user, connected all along, is unaffected.
    await witness.ok("publish", channel="chat:exp", data="still here")
    assert (await witness.messages(1))[0]["data"] == "still here"


async def _drain(p: Probe) -> Any:
    while not p.pushes.empty():
        yield p.pushes.get_nowait()


async def test_connect_cannot_switch_user_but_can_renew(hs_server: Server, probe: ProbeFactory) -> None:
    p = await connect_ok(hs_server, probe, hs(claims("alice", ttl=60)))
    r = await p.ok("connect", token=hs(claims("alice", ttl=600)))
    assert r["expires"] > time.time() + 300
    assert_error(await p.request("connect", token=hs(claims("mallory"))), ErrorCode.PERMISSION_DENIED)
    assert (await p.ok("connect"))["user"] == "alice"


async def test_anonymous_not_allowed(start_server: ServerFactory, probe: ProbeFactory) -> None:
    srv = await start_server(
        token_secret=SECRET, allow_anonymous=False, auth_timeout=0.5, api_failures_per_minute=0
    )
    witness = await probe(f"{srv.ws_url}?token={hs(claims('bob'))}")
    await witness.ok("subscribe", channel="chat:a")
    p = await probe(srv)
    # Before connect: every op but connect/ping is refused with `unauthorized`.
    assert (await p.request("ping"))["ok"] is True
    for op, fields in [
        ("subscribe", {"channel": "chat:a"}),
        ("publish", {"channel": "chat:a", "data": 1}),
        ("history", {"channel": "chat:a"}),
        ("presence", {"channel": "chat:a"}),
        ("unsubscribe", {"channel": "chat:a"}),
    ]:
        assert_error(await p.request(op, **fields), ErrorCode.UNAUTHORIZED)
    assert_error(await p.request("connect"), ErrorCode.UNAUTHORIZED)
    # No token in time: closed with 4004.
    assert await p.wait_closed(timeout=5) == CloseCode.AUTH_TIMEOUT
    # A connection that authenticates in time is not closed by the auth timer.
    q = await probe(srv)
    await q.ok("connect", token=hs(claims("carol")))
    await asyncio.sleep(1.0)  # twice auth_timeout: the timer would have fired by now
    await q.ok("subscribe", channel="chat:a")
    await witness.ok("publish", channel="chat:a", data="ok")
    assert (await q.messages(1))[0]["data"] == "ok"
    assert (await witness.messages(1))[0]["data"] == "ok"


async def test_subscription_tokens(start_server: ServerFactory, probe: ProbeFactory) -> None:
    srv = await start_server(
        token_secret=SECRET,
        api_failures_per_minute=0,
        namespaces={"priv": Namespace("priv", subscribe="token", publish=True)},
    )
    p = await connect_ok(srv, probe, hs(claims("alice")))

    def sub_token(channel: str, sub: str | None = "alice", ttl: float = 60, secret: str = SECRET) -> str:
        return hs(claims(sub, ttl=ttl, channel=channel), secret=secret)

    assert_error(await p.request("subscribe", channel="priv:1"), ErrorCode.PERMISSION_DENIED)
    assert_error(await p.request("history", channel="priv:1"), ErrorCode.PERMISSION_DENIED)
    cases = [
        (sub_token("priv:2"), ErrorCode.PERMISSION_DENIED),  # another channel
        (sub_token("priv:1", sub="bob"), ErrorCode.PERMISSION_DENIED),  # another user
        (sub_token("priv:1", sub=None), ErrorCode.PERMISSION_DENIED),  # an anonymous grant
        (sub_token("priv:1", ttl=-60), ErrorCode.TOKEN_EXPIRED),
        (sub_token("priv:1", secret="not-the-secret-0123456789abcdefghij"), ErrorCode.UNAUTHORIZED),
        (hand_made({"alg": "none"}, claims("alice", channel="priv:1"), None), ErrorCode.UNAUTHORIZED),
        (hs({"sub": "alice", "channel": "priv:1"}), ErrorCode.UNAUTHORIZED),  # no exp
    ]
    for token, code in cases:
        assert_error(await p.request("subscribe", channel="priv:1", token=token), code)
    # The connection survived every refusal; the right token works and grants history and presence.
    r = await p.ok("subscribe", channel="priv:1", token=sub_token("priv:1"))
    assert r["channel"] == "priv:1"
    await p.ok("history", channel="priv:1")
    assert (await p.ok("presence", channel="priv:1"))["count"] == 1
    await p.ok("publish", channel="priv:1", data="mine")
    assert (await p.messages(1))[0]["data"] == "mine"
    # ...but only that channel.
    assert_error(await p.request("history", channel="priv:2"), ErrorCode.PERMISSION_DENIED)


# ---------------------------------------------------------------------------------------------- the matrix

OWNER = "A"  # the user whose personal channel the personal namespaces test
CLAIM_ALL = ["m*:room", "p*:A"]  # a `channels` claim covering every matrix channel


@dataclass(frozen=True)
class Rule:
    name: str
    anonymous: bool
    subscribe: str
    publish: bool
    personal: bool = False

    @property
    def namespace(self) -> Namespace:
        return Namespace(
            self.name,
            anonymous=self.anonymous,
            subscribe=self.subscribe,
            publish=self.publish,
            personal=self.personal,
        )

    @property
    def channel(self) -> str:
        return f"{self.name}:{OWNER}" if self.personal else f"{self.name}:room"


SUB_LETTER = {"anyone": "a", "authenticated": "u", "token": "t"}
RULES = [
    Rule(f"{'p' if personal else 'm'}{int(anon)}{SUB_LETTER[sub]}{int(pub)}", anon, sub, pub, personal)
    for personal in (False, True)
    for anon in (True, False)
    for sub in ("anyone", "authenticated", "token")
    for pub in (True, False)
]


@dataclass(frozen=True)
class Who:
    name: str
    user: str | None  # None: an anonymous connection
    claim: str | None = None  # the connection token's `channels`: None absent, "all" covers, "none" misses
    grant: bool = False  # subscribes with a subscription token for the channel

    @property
    def channels(self) -> list[str] | None:
        return {None: None, "all": CLAIM_ALL, "none": ["elsewhere:*"]}[self.claim]


WHO = [
    Who("anonymous", None),
    Who("user A (owner)", "A"),
    Who("user B", "B"),
    Who("user A, channels claim covering", "A", claim="all"),
    Who("user C, channels claim covering", "C", claim="all"),
    Who("user D, channels claim elsewhere", "D", claim="none"),
    Who("user G, subscription token", "G", grant=True),
    Who("anonymous, subscription token", None, grant=True),
]

ACTIONS = ("subscribe", "publish", "history", "presence")


def expected(rule: Rule, who: Who, action: str) -> bool:
    """From the docs. A subscription token grants subscribe/history/presence on its channel in any
    namespace; publishing still needs the namespace's ``publish``. Otherwise every rule must pass."""
    if who.grant:
        return rule.publish if action == "publish" else True
    may_read = (
        (rule.anonymous or who.user is not None)  # `anonymous = false`: a user is needed at all
        and (not rule.personal or who.user == OWNER)  # personal: only the owner
        and who.claim != "none"  # a `channels` claim limits the connection to its patterns
        and (rule.subscribe != "authenticated" or who.user is not None)
        and (rule.subscribe != "token" or who.claim == "all")  # token: a grant or a covering claim
    )
    return may_read and (rule.publish if action == "publish" else True)


def test_expected_table_sanity() -> None:
    """A few cells of the table spelled out, so that the table itself is reviewed."""
    m = {r.name: r for r in RULES}
    anon, a, b, ac, cc, dn, g, ag = WHO
    assert expected(m["m1a1"], anon, "publish") and not expected(m["m1a0"], anon, "publish")
    assert not expected(m["m0a1"], anon, "subscribe") and expected(m["m0a1"], b, "subscribe")
    assert not expected(m["m1u1"], anon, "history") and expected(m["m1u1"], b, "history")
    assert not expected(m["m1t1"], a, "subscribe") and expected(m["m1t1"], cc, "subscribe")
    assert not expected(m["m1a1"], dn, "presence")
    assert expected(m["p0a0"], a, "subscribe") and not expected(m["p0a0"], b, "subscribe")
    assert not expected(m["p0a1"], cc, "subscribe") and not expected(m["p1a1"], anon, "subscribe")
    assert not expected(m["p1t1"], a, "history") and expected(m["p1t1"], ac, "history")
    assert expected(m["m0t0"], ag, "history") and not expected(m["m0t0"], g, "publish")
    assert expected(m["p0t1"], g, "publish")


def matrix_settings(tmp_path: Path) -> dict[str, Any]:
    return {
        "token_secret": SECRET,
        "api_failures_per_minute": 0,
        "client_rate": 0.0,
        "user_rate": 0.0,
        "namespaces": {r.name: r.namespace for r in RULES},
    }


async def test_permission_matrix_websocket(
    start_server: ServerFactory, probe: ProbeFactory, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    srv = await start_server(**matrix_settings(tmp_path))
    wrong: list[str] = []
    allowed_publishes = {r.channel: 0 for r in RULES}
    cells = 0
    for who in WHO:
        if who.user is None:
            p = await probe(srv)
        else:
            p = await probe(srv)
            extra = {} if who.channels is None else {"channels": who.channels}
            await p.ok("connect", token=hs(claims(who.user, **extra)))
        for rule in RULES:
            for action in ACTIONS:
                fields: dict[str, Any] = {"channel": rule.channel}
                if action == "subscribe" and who.grant:
                    grant = {"channel": rule.channel, "exp": int(time.time()) + 300}
                    if who.user is not None:
                        grant["sub"] = who.user
                    fields["token"] = hs(grant)
                if action == "publish":
                    fields["data"] = {"from": who.name}
                reply = await p.request(action, **fields)
                cells += 1
                want = expected(rule, who, action)
                if want:
                    got_ok = reply.get("ok") is True
                    if action == "history":
                        got_ok = got_ok and isinstance(reply["result"]["publications"], list)
                    if action == "presence":
                        got_ok = got_ok and isinstance(reply["result"]["clients"], dict | list)
                    if action == "publish" and got_ok:
                        allowed_publishes[rule.channel] += 1
                    if not got_ok:
                        wrong.append(f"{who.name} {action} {rule}: expected ok, got {reply}")
                elif reply.get("ok") is not False or reply["error"]["code"] != "permission_denied":
                    wrong.append(f"{who.name} {action} {rule}: expected permission_denied, got {reply}")
        await p.close()
    assert cells == len(WHO) * len(RULES) * len(ACTIONS) == 768
    assert not wrong, "\n".join(wrong)
    # Every allowed publish (and no other) is in history.
    for rule in RULES:
        async with session.get(f"{srv.http}/api/channels/{rule.channel}/history", headers=api_headers()) as r:
            body = await r.json()
        assert len(body["publications"]) == allowed_publishes[rule.channel], rule
        want = sum(expected(rule, w, "publish") for w in WHO)
        assert allowed_publishes[rule.channel] == want, rule


ROLE_KEYS = {
    "publish": "publish-key-0123456789",
    "read": "read-key-0123456789abc",
    "admin": "admin-key-0123456789ab",
}


DENIAL_CODES = {401: "unauthorized", 403: "permission_denied"}


def expected_http(role: str | None, action: str) -> int:
    """From docs/http-api.md: publish keys publish/broadcast, read keys read (history, presence,
    channels, stats), admin everything; no or a wrong key is 401. The namespace rules are for clients,
    the HTTP API is the trusted backend."""
    if role is None:
        return 401
    needs = "publish" if action in ("publish", "broadcast") else "read"
    return 200 if role in ("admin", needs) else 403


async def test_permission_matrix_http_api_keys(
    start_server: ServerFactory, session: aiohttp.ClientSession, tmp_path: Path, probe: ProbeFactory
) -> None:
    kw = matrix_settings(tmp_path)
    kw["api_keys"] = [ApiKey(f"{role}-key", key, role) for role, key in ROLE_KEYS.items()]
    srv = await start_server(**kw)
    watcher = await probe(srv)
    await watcher.ok("connect", token=hs(claims(OWNER, channels=CLAIM_ALL)))
    keys: list[tuple[str, str | None, dict[str, str]]] = [
        (role, role, {"Authorization": f"Bearer {key}"}) for role, key in ROLE_KEYS.items()
    ]
    keys += [
        ("none", None, {}),
        ("wrong", None, {"Authorization": "Bearer not-a-key-0123456789"}),
        ("basic", None, {"Authorization": f"Basic {ROLE_KEYS['admin']}"}),
        ("prefix", None, {"Authorization": f"Bearer {ROLE_KEYS['admin'][:-1]}"}),
    ]
    wrong: list[str] = []
    published = 0
    for rule in RULES:
        ch = rule.channel
        for label, role, headers in keys:
            for action in ("publish", "broadcast", "history", "presence", "channels", "stats", "metrics"):
                if action == "publish":
                    req = session.post(
                        f"{srv.http}/api/publish", json={"channel": ch, "data": label}, headers=headers
                    )
                elif action == "broadcast":
                    req = session.post(
                        f"{srv.http}/api/broadcast", json={"channels": [ch], "data": label}, headers=headers
                    )
                elif action in ("channels", "stats"):
                    req = session.get(f"{srv.http}/api/{action}", headers=headers)
                elif action == "metrics":  # GET /metrics: a read (or admin) key, like the read routes
                    req = session.get(f"{srv.http}/metrics", headers=headers)
                else:
                    req = session.get(f"{srv.http}/api/channels/{ch}/{action}", headers=headers)
                async with req as r:
                    body = await r.json() if r.content_type == "application/json" else {}
                want = expected_http(role, action)
                if r.status != want:
                    wrong.append(f"{label} {action} {ch}: expected {want}, got {r.status} {body}")
                elif want in (401, 403) and body["error"]["code"] != DENIAL_CODES[want]:
                    wrong.append(f"{label} {action} {ch}: {body}")
                elif want == 200 and action in ("publish", "broadcast"):
                    published += 1
    assert not wrong, "\n".join(wrong)
    assert published == len(RULES) * 2 * 2  # publish and admin keys, publish and broadcast


# ---------------------------------------------------------------------------------------------- personal


async def test_personal_channels_do_not_leak(
    start_server: ServerFactory, probe: ProbeFactory, session: aiohttp.ClientSession
) -> None:
    shipped = Settings().namespaces["user"]
    assert shipped.personal and not shipped.anonymous and not shipped.publish
    srv = await start_server(
        token_secret=SECRET, api_failures_per_minute=0, client_rate=0.0, user_rate=0.0,
        namespaces={"user": shipped},
    )  # fmt: skip
    a = await connect_ok(srv, probe, hs(claims("A")), user="A")
    b = await connect_ok(srv, probe, hs(claims("B")), user="B")
    anon = await probe(srv)
    for ch in ("user:A", "user:A/inbox"):
        await a.ok("subscribe", channel=ch)
    for ch in ("user:B", "user:B/inbox"):
        await b.ok("subscribe", channel=ch)
    # Neither can reach the other's channels by any op, nor can an anonymous client.
    for p, other in ((a, "B"), (b, "A")):
        for ch in (f"user:{other}", f"user:{other}/inbox", f"user:{other}x", f"user:{other}/"):
            for op in ("subscribe", "history", "presence"):
                assert_error(await p.request(op, channel=ch), ErrorCode.PERMISSION_DENIED)
            assert_error(await p.request("publish", channel=ch, data=1), ErrorCode.PERMISSION_DENIED)
    # "user:AB" is not A's: the owner match is exact (or a "/" subtree).
    assert_error(await a.request("subscribe", channel="user:AB"), ErrorCode.PERMISSION_DENIED)
    for op in ("subscribe", "history"):
        assert_error(await anon.request(op, channel="user:A"), ErrorCode.PERMISSION_DENIED)
    # Clients may not publish to their own personal channel either (the backend does).
    assert_error(await a.request("publish", channel="user:A", data=1), ErrorCode.PERMISSION_DENIED)

    # The backend publishes "from A to B" and to both users, interleaved, over the HTTP API.
    n = 50
    for i in range(n):
        for ch in ("user:B", "user:A", "user:B/inbox", "user:A/inbox"):
            async with session.post(
                f"{srv.http}/api/publish",
                json={"channel": ch, "data": {"i": i, "to": ch}, "info": {"from": "A"}},
                headers=api_headers(),
            ) as r:
                assert r.status == 200, await r.text()
    got_a = await a.messages(2 * n)
    got_b = await b.messages(2 * n)
    assert {m["channel"] for m in got_a} == {"user:A", "user:A/inbox"}
    assert {m["channel"] for m in got_b} == {"user:B", "user:B/inbox"}
    # After a sentinel sent to A, nothing of B's is waiting in A's queue.
    async with session.post(
        f"{srv.http}/api/publish", json={"channel": "user:A", "data": "end"}, headers=api_headers()
    ) as r:
        assert r.status == 200
    (last,) = await a.messages(1)
    assert last["data"] == "end"
    leaked = [m for m in [*got_a, *[await a.pushes.get() for _ in range(a.pushes.qsize())]] if "B" in str(m)]
    assert leaked == []
    assert anon.pushes.qsize() == 0


# ---------------------------------------------------------------------------------------------- example


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("issue_token", ROOT / "examples" / "issue_token.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


async def test_issue_token_example_against_a_real_server(
    start_server: ServerFactory, probe: ProbeFactory, session: aiohttp.ClientSession
) -> None:
    ex = load_example()
    srv = await start_server(
        token_secret=SECRET,
        allow_anonymous=False,
        namespaces={"secret": Namespace("secret", anonymous=False, subscribe="token", publish=True)},
    )
    token = ex.connection_token("42", SECRET, ttl=60, info={"name": "Ada"})
    p = await probe(f"{srv.ws_url}?token={token}")
    assert_error(await p.request("subscribe", channel="secret:room-7"), ErrorCode.PERMISSION_DENIED)
    sub = ex.subscription_token("42", "secret:room-7", SECRET, ttl=60)
    await p.ok("subscribe", channel="secret:room-7", token=sub)
    async with session.post(
        f"{srv.http}/api/publish", json={"channel": "secret:room-7", "data": "psst"}, headers=api_headers()
    ) as r:
        assert r.status == 200
    assert (await p.messages(1))[0]["data"] == "psst"
    await p.ok("publish", channel="secret:room-7", data="mine")
    (mine,) = await p.messages(1)
    assert mine["info"]["user"] == "42" and mine["info"]["info"] == {"name": "Ada"}
    # A connection token with a `channels` claim grants the token-only namespace too.
    q = await probe(srv)
    await q.ok("connect", token=ex.connection_token("43", SECRET, ttl=60, channels=["secret:*"]))
    await q.ok("history", channel="secret:room-7")
    # The script prints a working token.
    script = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "examples" / "issue_token.py"), "--secret", SECRET, "--user", "7",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, _ = await asyncio.wait_for(script.communicate(), 30)
    assert script.returncode == 0
    out = stdout.decode().strip()
    r2 = await probe(srv)
    assert (await r2.ok("connect", token=out))["user"] == "7"


# ---------------------------------------------------------------------------------------------- logs


async def test_secrets_never_logged(
    start_server: ServerFactory,
    probe: ProbeFactory,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    srv = await start_server(
        token_secret=SECRET,
        api_failures_per_minute=6,  # the 5 bad tokens below, then the first bad API key
        namespaces={"priv": Namespace("priv", subscribe="token")},
    )
    good = hs(claims("alice", ttl=60))
    forged = hs(claims("alice"), secret="forged-secret-0123456789abcdefghijkl")
    expired = hs(claims("alice", ttl=-60))
    sub_ok = hs(claims("alice", channel="priv:x"))
    sub_bad = hs(claims("alice", channel="priv:x"), secret="forged-secret-0123456789abcdefghijkl")
    bad_key = "bad-api-key-SENSITIVE-0123456789"
    secrets_ = [SECRET, API_KEY, good, forged, expired, sub_ok, sub_bad, bad_key]

    p = await probe(f"{srv.ws_url}?token={good}")
    await p.ok("subscribe", channel="priv:x", token=sub_ok)
    await p.request("subscribe", channel="priv:y", token=sub_bad)
    await p.request("connect", token=good)
    for token in (forged, expired, SECRET):
        q = await probe(srv)
        await q.request("connect", token=token)
        await q.wait_closed()
    q = await probe(f"{srv.ws_url}?token={forged}")
    await q.wait_closed()
    for key in (API_KEY, bad_key, SECRET, bad_key, bad_key, bad_key):
        async with session.post(
            f"{srv.http}/api/publish", json={"channel": "priv:x", "data": 1}, headers=api_headers(key)
        ) as r:
            await r.read()
    async with session.get(f"{srv.http}/api/channels", headers=api_headers()) as r:
        assert r.status == 429  # the address is now slowed down: even the good key waits
    await p.close()
    await srv.stop()
    assert caplog.records, "nothing was logged: the test would prove nothing"
    assert any("4001" in r.getMessage() for r in caplog.records)
    text = caplog.text + "\n".join(f"{r.getMessage()} {r.args!r} {r.exc_text or ''}" for r in caplog.records)
    for s in secrets_:
        assert s not in text
        for part in s.split("."):  # no JWT segment (header, claims, signature) either
            if len(part) > 20:
                assert part not in text


def test_secrets_never_logged_by_the_cli_server(
    subprocess_server: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TIDINGS_TOKEN_SECRET", SECRET)
    monkeypatch.setenv("TIDINGS_API_KEYS", API_KEY)
    monkeypatch.setenv("TIDINGS_BROKER", "memory://")
    proc = subprocess_server("--log-level", "debug")
    good = hs(claims("alice"))
    forged = hs(claims("alice"), secret="forged-secret-0123456789abcdefghijkl")
    bad_key = "bad-api-key-SENSITIVE-0123456789"

    async def exercise() -> None:
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(f"{proc.ws_url}?token={good}") as ws:
                await ws.send_str(orjson.dumps({"id": 1, "op": "connect", "token": good}).decode())
                reply = await ws.receive_json(timeout=10)
                assert reply["result"]["user"] == "alice"
            for url in (f"{proc.ws_url}?token={forged}", proc.ws_url):
                async with s.ws_connect(url) as ws:
                    await ws.send_str(orjson.dumps({"id": 1, "op": "connect", "token": forged}).decode())
                    async with asyncio.timeout(10):
                        async for _ in ws:
                            pass
                    assert ws.close_code == CloseCode.UNAUTHORIZED
            for key in (API_KEY, bad_key):
                async with s.post(
                    f"{proc.http}/api/publish",
                    json={"channel": "chat:x", "data": 1},
                    headers=api_headers(key),
                ) as r:
                    assert r.status == (200 if key == API_KEY else 401)

    asyncio.run(exercise())
    proc.stop()
    assert proc.log is not None
    log_text = proc.log.read_text()
    assert "listening on" in log_text and "4001" in log_text
    for s in (SECRET, API_KEY, good, forged, bad_key, *good.split("."), *forged.split(".")):
        assert s not in log_text, s


async def test_secrets_not_logged_from_malformed_requests(
    start_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    srv = await start_server(token_secret=SECRET)
    token = hs(claims("alice"))
    for raw in (
        f"GET /ws?token={token}\x01 HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
        f"GET /api/channels HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\x01\r\n\r\n".encode(),
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(raw)
        async with asyncio.timeout(5):
            assert (await reader.readline()).startswith(b"HTTP/1.0 400")
        writer.close()
    await srv.stop()
    text = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records) + caplog.text
    assert token not in text and API_KEY not in text


def test_security_doc_lists_every_default_limit() -> None:
    """docs/security.md's table of default limits says what config.py says."""
    import re

    text = (ROOT / "docs" / "security.md").read_text()
    defaults = Settings()
    limits = [
        "max_message_size", "max_http_body", "max_buffer", "max_connections", "max_connections_per_ip",
        "max_subscriptions", "client_rate", "user_rate", "api_failures_per_minute", "header_timeout",
        "auth_timeout", "ping_interval",
    ]  # fmt: skip
    for name in limits:
        m = re.search(rf"^\| `{name}` \| ([0-9]+)", text, re.MULTILINE)
        assert m is not None, f"{name} missing from docs/security.md"
        assert float(m.group(1)) == getattr(defaults, name), name
    for name, shown in (("allow_anonymous", "true"), ("compression", "false")):
        assert re.search(rf"^\| `{name}` \| {shown} \|", text, re.MULTILINE), name
        assert str(getattr(defaults, name)).lower() == shown
    assert (
        "examples/issue_token.py" in text and "trusted_proxies" in text and "proxy_set_header Upgrade" in text
    )
