"""Token renewal in-band (connection tokens with `connect`, subscription grants with `refresh`), the
lifetime fields clients schedule renewal from, and idempotent publish on every way in (`/ws`,
`/api/publish`, `/api/batch`, `/api/broadcast`). Raw protocol clients; the real clients are tested in
test_python_client.py and the tidings.js tests."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from tidings.config import Namespace
from tidings.protocol import CloseCode, ErrorCode

from .conftest import Probe, ProbeFactory, Server, ServerFactory, api_headers
from .test_auth import SECRET, claims, hs

PRIV = {"priv": Namespace("priv", subscribe="token", publish=True)}


def sub_token(channel: str, ttl: float, sub: str = "alice") -> str:
    return hs({"sub": sub, "channel": channel, "exp": time.time() + ttl})


async def api_publish(session: aiohttp.ClientSession, srv: Server, body: dict[str, Any]) -> dict[str, Any]:
    async with session.post(f"{srv.http}/api/publish", headers=api_headers(), json=body) as r:
        out: dict[str, Any] = await r.json()
        assert r.status == 200, out
        return out


async def token_server(start_server: ServerFactory, **kw: Any) -> Server:
    return await start_server(token_secret=SECRET, namespaces=PRIV, **kw)


# ---------------------------------------------------------------------------------------- lifetimes


async def test_connect_and_token_subscribe_replies_carry_expires_and_ttl(
    start_server: ServerFactory, probe: ProbeFactory
) -> None:
    srv = await token_server(start_server)
    p = await probe(srv)
    exp = time.time() + 30
    r = await p.ok("connect", token=hs({"sub": "alice", "exp": exp}))
    assert r["expires"] == int(exp) and 28 < r["ttl"] <= 30
    s = await p.ok("subscribe", channel="priv:a", token=sub_token("priv:a", 20))
    assert 18 < s["ttl"] <= 20 and s["expires"] == int(s["expires"])
    plain = await p.ok("subscribe", channel="pub:a")
    assert "ttl" not in plain and "expires" not in plain  # no token, no lifetime


async def test_connection_token_renewed_in_band_keeps_the_connection(
    start_server: ServerFactory, probe: ProbeFactory, session: aiohttp.ClientSession
) -> None:
    """Tokens of 1.5 s renewed every ~0.7 s for 4 s: the connection and its subscription live on, with
    every publication; then without renewal it is closed with 4002 at the last token's expiry."""
    srv = await token_server(start_server)
    p = await probe(srv)
    r = await p.ok("connect", token=hs({"sub": "alice", "exp": time.time() + 1.5}))
    await p.ok("subscribe", channel="pub:renew")
    loop = asyncio.get_running_loop()
    end = loop.time() + 4
    sent = 0
    while loop.time() < end:
        await asyncio.sleep(r["ttl"] / 2)
        r = await p.ok("connect", token=hs({"sub": "alice", "exp": time.time() + 1.5}))
        await api_publish(session, srv, {"channel": "pub:renew", "data": sent})
        sent += 1
    assert [m["data"] for m in await p.messages(sent)] == list(range(sent))
    assert not p.closed.is_set()
    assert await p.wait_closed(timeout=5) == CloseCode.TOKEN_EXPIRED


# ---------------------------------------------------------------------------------------- refresh


async def test_refresh_extends_a_subscription_grant_without_a_gap(
    start_server: ServerFactory, probe: ProbeFactory, session: aiohttp.ClientSession
) -> None:
    srv = await token_server(start_server)
    p = await probe(srv)
    await p.ok("connect", token=hs(claims("alice")))
    first = await p.ok("subscribe", channel="priv:r", token=sub_token("priv:r", 1))
    renewed = await p.ok("refresh", channel="priv:r", token=sub_token("priv:r", 3))
    assert renewed["channel"] == "priv:r" and renewed["expires"] > first["expires"]
    assert 2 < renewed["ttl"] <= 3
    # Past the first token's expiry the subscription lives on and delivers.
    await asyncio.sleep(1.5)
    await api_publish(session, srv, {"channel": "priv:r", "data": "still here"})
    assert (await p.messages(1))[0]["data"] == "still here"
    # and at the renewed expiry it ends with the documented push
    push = await p.push(timeout=5)
    assert push["type"] == "unsubscribe" and push["code"] == "token_expired" and push["resubscribe"]


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (lambda: {"channel": "priv:x"}, ErrorCode.INVALID_FIELD),
        (lambda: {"channel": "priv:x", "token": 5}, ErrorCode.INVALID_FIELD),
        (lambda: {"channel": "priv:other", "token": sub_token("priv:other", 5)}, ErrorCode.NOT_SUBSCRIBED),
        (lambda: {"channel": "priv:x", "token": sub_token("priv:y", 5)}, ErrorCode.PERMISSION_DENIED),
        (
            lambda: {"channel": "priv:x", "token": sub_token("priv:x", 5, sub="bob")},
            ErrorCode.PERMISSION_DENIED,
        ),
        (
            lambda: {"channel": "priv:x", "token": hs(claims("alice"), secret="x" * 40)},
            ErrorCode.UNAUTHORIZED,
        ),
        (lambda: {"channel": "priv:x", "token": sub_token("priv:x", -60)}, ErrorCode.TOKEN_EXPIRED),
        (lambda: {"channel": "bad channel", "token": "t"}, ErrorCode.INVALID_CHANNEL),
    ],
)
async def test_a_refused_refresh_leaves_the_grant_as_it_was(
    start_server: ServerFactory, probe: ProbeFactory, make: Any, code: ErrorCode
) -> None:
    srv = await token_server(start_server)
    p = await probe(srv)
    await p.ok("connect", token=hs(claims("alice")))
    await p.ok("subscribe", channel="priv:x", token=sub_token("priv:x", 1))
    r = await p.request("refresh", **make())
    assert r["ok"] is False and r["error"]["code"] == code, r
    push = await p.push(timeout=5)  # the original grant still ends at its own expiry
    assert push["type"] == "unsubscribe" and push["channel"] == "priv:x" and push["code"] == "token_expired"
    assert not p.closed.is_set()


async def test_an_expired_grant_is_answered_token_expired_not_permission_denied(
    start_server: ServerFactory, probe: ProbeFactory
) -> None:
    """A token expired by less than the verifier's 5 s leeway passes verification but gives no right:
    the answer says why (token_expired, so clients fetch a fresh token), not permission_denied."""
    srv = await token_server(start_server)
    p = await probe(srv)
    await p.ok("connect", token=hs(claims("alice")))
    for op in ("subscribe", "history", "presence"):
        r = await p.request(op, channel="priv:late", token=sub_token("priv:late", -2))
        if op == "subscribe":
            assert r["error"]["code"] == ErrorCode.TOKEN_EXPIRED, r
        else:  # the grant from the refused subscribe is expired too
            assert r["error"]["code"] == ErrorCode.TOKEN_EXPIRED, (op, r)
    fresh = await p.ok("subscribe", channel="priv:late", token=sub_token("priv:late", 30))
    assert fresh["channel"] == "priv:late"


# ---------------------------------------------------------------------------------------- idempotency


async def subscriber(probe: ProbeFactory, srv: Server, channel: str) -> Probe:
    s = await probe(srv)
    await s.ok("subscribe", channel=channel)
    return s


async def test_ws_publish_retried_with_one_key_is_stored_and_delivered_once(
    start_server: ServerFactory, probe: ProbeFactory, session: aiohttp.ClientSession
) -> None:
    srv = await start_server()
    s = await subscriber(probe, srv, "pub:idem")
    p = await probe(srv)
    answers = [await p.ok("publish", channel="pub:idem", data="hi", idempotency_key="k-1") for _ in range(5)]
    # five more in one frame read (one group for the broker)
    rids = [f"r{i}" for i in range(5)]
    for rid in rids:
        await p.send_raw(
            f'{{"id":"{rid}","op":"publish","channel":"pub:idem","data":"hi","idempotency_key":"k-1"}}'
        )
    answers += [(await p.reply(rid))["result"] for rid in rids]
    assert len({(a["offset"], a["epoch"], a["id"]) for a in answers}) == 1
    await p.ok("publish", channel="pub:idem", data="next")
    assert [m["data"] for m in await s.messages(2)] == ["hi", "next"]
    h = await p.ok("history", channel="pub:idem")
    assert [x["data"] for x in h["publications"]] == ["hi", "next"]


async def test_http_publish_batch_and_broadcast_retried_with_keys_store_once(
    start_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    srv = await start_server()
    url = srv.http
    one = [
        await api_publish(session, srv, {"channel": "pub:h", "data": 1, "idempotency_key": "a"})
        for _ in range(5)
    ]
    assert len({(r["offset"], r["id"]) for r in one}) == 1
    batch = {
        "publications": [
            {"channel": "pub:h", "data": 2, "idempotency_key": "b"},
            {"channel": "pub:h2", "data": 3, "idempotency_key": "b"},
            {"channel": "pub:h", "data": 4},
        ]
    }
    runs = []
    for _ in range(5):
        async with session.post(f"{url}/api/batch", headers=api_headers(), json=batch) as r:
            assert r.status == 200
            runs.append((await r.json())["results"])
    assert len({(x[0]["offset"], x[0]["id"]) for x in runs}) == 1
    assert len({(x[1]["offset"], x[1]["id"]) for x in runs}) == 1
    assert len({x[2]["offset"] for x in runs}) == 5  # the keyless entry is stored each time
    casts = []
    for _ in range(5):
        body = {"channels": ["pub:h", "pub:h3"], "data": 5, "idempotency_key": "c"}
        async with session.post(f"{url}/api/broadcast", headers=api_headers(), json=body) as r:
            assert r.status == 200
            casts.append(tuple((c["channel"], c["offset"]) for c in (await r.json())["results"]))
    assert len(set(casts)) == 1
    async with session.get(f"{url}/api/channels/pub:h/history", headers=api_headers()) as r:
        data = [p["data"] for p in (await r.json())["publications"]]
    assert data == [1, 2, 4, 4, 4, 4, 4, 5]


@pytest.mark.parametrize("key", ["", "x" * 65, 7, True, ["k"], {"k": 1}])
async def test_a_bad_idempotency_key_is_invalid_field_everywhere(
    start_server: ServerFactory, probe: ProbeFactory, session: aiohttp.ClientSession, key: Any
) -> None:
    srv = await start_server()
    p = await probe(srv)
    r = await p.request("publish", channel="pub:k", data=1, idempotency_key=key)
    assert r["error"]["code"] == ErrorCode.INVALID_FIELD, r
    body = {"channel": "pub:k", "data": 1, "idempotency_key": key}
    async with session.post(f"{srv.http}/api/publish", headers=api_headers(), json=body) as resp:
        assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_field"
    batch = {"publications": [body, {"channel": "pub:k", "data": 2}]}
    async with session.post(f"{srv.http}/api/batch", headers=api_headers(), json=batch) as resp:
        results = (await resp.json())["results"]
    assert results[0]["error"]["code"] == "invalid_field" and results[1]["offset"] == 1
    assert (await p.ok("history", channel="pub:k"))["offset"] == 1  # only the good one was stored


async def test_the_idempotency_window_is_the_configured_one(
    start_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    srv = await start_server(idempotency_window=0.5)
    first = await api_publish(session, srv, {"channel": "pub:w", "data": 1, "idempotency_key": "k"})
    again = await api_publish(session, srv, {"channel": "pub:w", "data": 1, "idempotency_key": "k"})
    assert again == first
    await asyncio.sleep(0.6)  # the window is a clock: wait it out
    later = await api_publish(session, srv, {"channel": "pub:w", "data": 1, "idempotency_key": "k"})
    assert later["offset"] == first["offset"] + 1
