"""Web Push, server side, end to end against a push service stand-in on loopback (tests/push_service.py):
VAPID and aes128gcm as a vendor's service checks them, every publish path, truncation, 404/410, 429 with
Retry-After, "offline" mode, SSRF refusals at registration and at send time, a stuck push service, bad
input, the VAPID key file, and the permission matrix of POST/DELETE /push/subscriptions."""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tidings.config import ApiKey, Namespace
from tidings.push import MAX_PAYLOAD, Guard

from .conftest import ProbeFactory, Server, ServerFactory, api_headers
from .push_service import Browser, PushServiceStandIn, b64, unb64
from .test_auth import RULES, SECRET, WHO, Rule, Who, claims, expected, hs
from .test_docs import ResponseChecker, _call
from .test_entry_points import chatsocket, live_in, page_form

PUSH_NS = {
    "chat": Namespace("chat", publish=True, join_leave=True, push="always"),
    "alerts": Namespace(
        "alerts", publish=True, push="always", push_ttl=120, push_urgency="high", push_topic="ops"
    ),
    "quiet": Namespace("quiet", publish=True, push="offline", anonymous=True),
    "nopush": Namespace("nopush", publish=True),
    "user": Namespace("user", anonymous=False, personal=True, publish=False, push="always"),
}


@pytest.fixture
async def svc() -> AsyncIterator[PushServiceStandIn]:
    s = PushServiceStandIn()
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


async def push_server(start_server: ServerFactory, **kw: Any) -> Server:
    kw.setdefault("namespaces", PUSH_NS)
    kw.setdefault("push_allowed_hosts", ["127.0.0.1"])
    kw.setdefault("token_secret", SECRET)
    kw.setdefault("api_failures_per_minute", 0)
    return await start_server(**kw)


async def register(
    session: aiohttp.ClientSession,
    srv: Server,
    sub: dict[str, Any],
    channels: list[str],
    token: str | None = None,
    expect: int = 201,
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with session.post(
        f"{srv.http}/push/subscriptions", json={"subscription": sub, "channels": channels}, headers=headers
    ) as r:
        body: dict[str, Any] = await r.json()
        assert r.status == expect, body
        return body


async def publish(session: aiohttp.ClientSession, srv: Server, channel: str, data: Any) -> dict[str, Any]:
    async with session.post(
        f"{srv.http}/api/publish", json={"channel": channel, "data": data}, headers=api_headers()
    ) as r:
        body: dict[str, Any] = await r.json()
        assert r.status == 200, body
        return body


async def counted(srv: Server, timeout: float = 10.0, **want: int) -> None:
    """Wait until the push counters reach ``want`` (they move once the push service's answer is in)."""
    stats = srv.node.push.stats
    async with asyncio.timeout(timeout):
        while any(getattr(stats, k) < v for k, v in want.items()):
            await asyncio.sleep(0.01)
    assert {k: getattr(stats, k) for k in want} == want


# ---------------------------------------------------------------------------------------------- delivery


async def test_vapid_public_key_is_the_65_byte_point_of_the_key_file_mode_0600(
    start_server: ServerFactory, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    srv = await push_server(start_server)
    async with session.get(f"{srv.http}/push/vapid-public-key") as r:
        assert r.status == 200
        key = (await r.json())["publicKey"]
    point = unb64(key)
    assert len(point) == 65 and point[0] == 4 and "=" not in key
    path = srv.settings.data_dir / "vapid_private.pem"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    await srv.stop()
    again = await push_server(start_server)  # the same key after a restart
    async with session.get(f"{again.http}/push/vapid-public-key") as r:
        assert (await r.json())["publicKey"] == key
    # A configured key file is used as it is.
    other = tmp_path / "mine.pem"
    other.write_text(path.read_text())
    path.unlink()
    third = await push_server(start_server, push_vapid_private_key=str(other))
    async with session.get(f"{third.http}/push/vapid-public-key") as r:
        assert (await r.json())["publicKey"] == key
    assert not path.exists()


async def test_push_is_off_without_a_push_namespace(
    start_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    srv = await start_server()
    async with session.get(f"{srv.http}/push/vapid-public-key") as r:
        assert r.status == 404 and (await r.json())["error"]["code"] == "not_available"
    assert not (srv.settings.data_dir / "vapid_private.pem").exists()


async def test_end_to_end_vapid_encryption_headers_and_the_ws_message_payload(
    start_server: ServerFactory, svc: PushServiceStandIn, session: aiohttp.ClientSession, probe: ProbeFactory
) -> None:
    srv = await push_server(start_server)
    dev = svc.device("d1")
    assert await register(session, srv, dev.subscription(), ["alerts:ops"]) == {
        "endpoint": dev.endpoint,
        "channels": ["alerts:ops"],
    }
    p = await probe(srv)
    await p.ok("subscribe", channel="alerts:ops")
    res = await publish(session, srv, "alerts:ops", {"text": "disk full", "n": 1})
    ws_msg = await p.push()
    await svc.until(lambda: len(svc.received) == 1)
    got = svc.received[0]
    assert not svc.rejected
    assert got.payload == ws_msg  # the same JSON object as the /ws message push
    assert got.payload["offset"] == res["offset"] and got.payload["data"] == {"text": "disk full", "n": 1}
    assert got.headers["TTL"] == "120" and got.headers["Urgency"] == "high" and got.headers["Topic"] == "ops"
    assert got.headers["Content-Type"] == "application/octet-stream"
    assert got.claims["aud"] == svc.origin and got.claims["sub"] == "mailto:tidings@127.0.0.1"
    assert got.claims["exp"] <= time.time() + 24 * 3600
    await counted(srv, sent=1)
    stats = srv.node.push.stats
    assert (stats.sent, stats.failed, stats.gone) == (1, 0, 0)
    async with session.get(f"{srv.http}/api/push/stats", headers=api_headers()) as r:
        body = await r.json()
        assert body["sent"] == 1 and body["queued"] == 0
    async with session.get(f"{srv.http}/api/push/stats") as r:
        assert r.status == 401


async def test_every_publish_path_pushes_once(
    start_server: ServerFactory, svc: PushServiceStandIn, probe: ProbeFactory
) -> None:
    srv = await push_server(start_server)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        lobby, room = svc.device("lobby"), svc.device("room")
        await register(session, srv, lobby.subscription(), ["chat:lobby"])
        await register(session, srv, room.subscription(), ["chat:room"])
        await publish(session, srv, "chat:lobby", "api")
        async with session.post(
            f"{srv.http}/api/batch",
            json={"publications": [{"channel": "chat:lobby", "data": "batch"}]},
            headers=api_headers(),
        ) as r:
            assert r.status == 200
        async with session.post(
            f"{srv.http}/api/broadcast",
            json={"channels": ["chat:lobby", "chat:room"], "data": "broadcast"},
            headers=api_headers(),
        ) as r:
            assert r.status == 200
        p = await probe(srv)
        await p.ok("publish", channel="chat:lobby", data="ws")
        ws = await chatsocket(session, srv, None)
        await live_in(srv, "chat:lobby", 1)
        await ws.send_str(orjson.dumps({"body": "chatsocket"}).decode())
        status, form = await page_form(session, srv, "room")
        assert status == 200
        async with session.post(
            f"{srv.http}/chat/room/messages",
            data={**form, "body": "form", "nick": "n"},
            allow_redirects=False,
        ) as r:
            assert r.status == 303
        await svc.until(lambda: len(svc.of("lobby")) == 5 and len(svc.of("room")) == 2)
        await ws.close()

    def texts(device: str) -> list[str]:
        out = []
        for r in svc.of(device):
            data = r.payload["data"]
            out.append(data["body"] if isinstance(data, dict) else data)
        return sorted(out)

    assert texts("lobby") == ["api", "batch", "broadcast", "chatsocket", "ws"]
    assert texts("room") == ["broadcast", "form"]
    offsets = [r.payload["offset"] for r in svc.of("lobby")]
    assert sorted(offsets) == [1, 2, 3, 4, 5]  # once each
    await counted(srv, sent=7)
    assert not svc.rejected


async def test_a_publication_above_the_push_limit_is_sent_truncated(
    start_server: ServerFactory, svc: PushServiceStandIn, session: aiohttp.ClientSession
) -> None:
    srv = await push_server(start_server)
    dev = svc.device("big")
    await register(session, srv, dev.subscription(), ["alerts:x"])
    small = await publish(session, srv, "alerts:x", "x" * (MAX_PAYLOAD - 200))
    big = await publish(session, srv, "alerts:x", "y" * 5000)
    await svc.until(lambda: len(svc.received) == 2)
    by_offset = {r.payload["offset"]: r.payload for r in svc.received}
    assert by_offset[small["offset"]]["data"] == "x" * (MAX_PAYLOAD - 200)
    assert by_offset[big["offset"]] == {
        "type": "message",
        "channel": "alerts:x",
        "offset": big["offset"],
        "epoch": big["epoch"],
        "id": big["id"],
        "truncated": True,
    }
    assert not svc.rejected  # every body within the 4096 bytes a push service takes


async def test_410_deletes_the_subscription(
    start_server: ServerFactory, svc: PushServiceStandIn, session: aiohttp.ClientSession
) -> None:
    srv = await push_server(start_server)
    gone, kept = svc.device("gone"), svc.device("kept")
    await register(session, srv, gone.subscription(), ["alerts:g"])
    await register(session, srv, kept.subscription(), ["alerts:g"])
    svc.answers["gone"] = [(410, {})]
    await publish(session, srv, "alerts:g", 1)
    await svc.until(lambda: len(svc.of("kept")) == 1)
    await counted(srv, gone=1)
    assert await srv.node.push.store.get(gone.endpoint) is None
    await publish(session, srv, "alerts:g", 2)
    await svc.until(lambda: len(svc.of("kept")) == 2)
    assert len(svc.attempts["gone"]) == 1  # never tried again
    await counted(srv, sent=2)


async def test_429_with_retry_after_is_retried_after_it(
    start_server: ServerFactory, svc: PushServiceStandIn, session: aiohttp.ClientSession
) -> None:
    srv = await push_server(start_server)
    dev = svc.device("busy")
    await register(session, srv, dev.subscription(), ["alerts:r"])
    # (3 s: longer than the backoff's first wait, 1 s, so a Retry-After that is not honoured shows)
    svc.answers["busy"] = [(429, {"Retry-After": "3"}), (503, {"Retry-After": "1"})]
    await publish(session, srv, "alerts:r", "later")
    await svc.until(lambda: len(svc.of("busy")) == 1)
    t = svc.attempts["busy"]
    assert len(t) == 3
    assert t[1] - t[0] >= 2.95 and t[2] - t[1] >= 0.95  # Retry-After honoured
    await counted(srv, sent=1, retried=2, failed=0)


async def test_retries_are_bounded(
    start_server: ServerFactory, svc: PushServiceStandIn, session: aiohttp.ClientSession
) -> None:
    srv = await push_server(start_server, push_max_attempts=2, push_retry_max_delay=5.0)
    a, b = svc.device("a"), svc.device("b")
    await register(session, srv, a.subscription(), ["alerts:b"])
    await register(session, srv, b.subscription(), ["alerts:c"])
    svc.answers["a"] = [(500, {"Retry-After": "0"})] * 5
    svc.answers["b"] = [(429, {"Retry-After": "3600"})]  # longer than push_retry_max_delay: give up
    await publish(session, srv, "alerts:b", 1)
    await publish(session, srv, "alerts:c", 1)
    await counted(srv, failed=2)
    assert len(svc.attempts["a"]) == 2 and len(svc.attempts["b"]) == 1


async def test_offline_mode_skips_a_connected_user_and_pushes_once_they_left(
    start_server: ServerFactory, svc: PushServiceStandIn, session: aiohttp.ClientSession, probe: ProbeFactory
) -> None:
    srv = await push_server(start_server)
    token = hs(claims("ann"))
    ann, anon = svc.device("ann"), svc.device("anon")
    await register(session, srv, ann.subscription(), ["quiet:room"], token=token)
    await register(session, srv, anon.subscription(), ["quiet:room"])
    p = await probe(f"{srv.ws_url}?token={token}")
    await p.ok("ping")
    assert srv.node.push.local_users == {"ann": 1}
    await publish(session, srv, "quiet:room", "while ann is here")
    await svc.until(lambda: len(svc.of("anon")) == 1)
    await p.close()
    async with asyncio.timeout(5):
        while srv.node.push.local_users:
            await asyncio.sleep(0.01)
    await publish(session, srv, "quiet:room", "after ann left")
    await svc.until(lambda: len(svc.of("ann")) == 1 and len(svc.of("anon")) == 2)
    assert [r.payload["data"] for r in svc.of("ann")] == ["after ann left"]
    await counted(srv, sent=3)


@pytest.mark.parametrize("transport", ["sse", "stream", "poll"])
async def test_offline_mode_counts_a_user_online_on_the_http_transports(
    start_server: ServerFactory, svc: PushServiceStandIn, session: aiohttp.ClientSession, transport: str
) -> None:
    """A user held on /sse, /stream or a pending /poll is online like on /ws: their devices get no
    "offline" push until the stream ends, or a few seconds after the poll was answered (the publication
    that answered it is not pushed to them as well)."""
    srv = await push_server(start_server)
    token = hs(claims("bob"))
    bob, anon = svc.device("bob"), svc.device("anon")
    await register(session, srv, bob.subscription(), ["quiet:h"], token=token)
    await register(session, srv, anon.subscription(), ["quiet:h"])
    async with session.get(
        f"{srv.http}/poll?channel=quiet:h", headers={"Authorization": f"Bearer {token}"}
    ) as r:
        epoch = (await r.json())["epoch"]
    query = f"channel=quiet:h&since=0:{epoch}&timeout=30" if transport == "poll" else "channel=quiet:other"
    # (a held poll's response starts only with its answer: the request runs as a task)
    held = asyncio.ensure_future(
        session.get(f"{srv.http}/{transport}?{query}", headers={"Authorization": f"Bearer {token}"})
    )
    try:
        async with asyncio.timeout(5):
            while srv.node.push.local_users != {"bob": 1}:
                await asyncio.sleep(0.01)
        await publish(session, srv, "quiet:h", "while bob is here")
        await svc.until(lambda: len(svc.of("anon")) == 1)
        async with asyncio.timeout(5):
            resp = await held
        if transport == "poll":
            assert (await resp.json())["publications"][0]["data"] == "while bob is here"
        resp.close()
    finally:
        held.cancel()
    async with asyncio.timeout(10):  # (a poll's user stays online 5 s after its answer: POLL_ONLINE_LINGER)
        while srv.node.push.local_users:
            await asyncio.sleep(0.01)
    await publish(session, srv, "quiet:h", "after bob left")
    await svc.until(lambda: len(svc.of("bob")) == 1 and len(svc.of("anon")) == 2)
    assert [r.payload["data"] for r in svc.of("bob")] == ["after bob left"]


async def test_a_stuck_push_service_does_not_slow_publishes(
    start_server: ServerFactory, svc: PushServiceStandIn, session: aiohttp.ClientSession
) -> None:
    srv = await push_server(start_server, push_senders=4)
    for i in range(8):
        dev = svc.device(f"stuck{i}")
        svc.hold[f"stuck{i}"] = asyncio.Event()
        await register(session, srv, dev.subscription(), ["alerts:slow"])

    async def latencies(channel: str, n: int) -> list[float]:
        out = []
        for i in range(n):
            t0 = time.perf_counter()
            await publish(session, srv, channel, i)
            out.append(time.perf_counter() - t0)
        return sorted(out)

    base = await latencies("nopush:x", 100)
    stuck = await latencies("alerts:slow", 100)  # every sender is held by the push service meanwhile
    assert svc.held == 4 and not any(ev.is_set() for ev in svc.hold.values())  # really stuck
    assert srv.node.push.queued > 0
    print(
        f"\npublish latency (ms) without push p50 {base[50] * 1e3:.2f} max {base[-1] * 1e3:.2f}; "
        f"with a stuck push service p50 {stuck[50] * 1e3:.2f} max {stuck[-1] * 1e3:.2f}"
    )
    for ev in svc.hold.values():
        ev.set()


async def test_a_full_queue_drops_and_counts(
    start_server: ServerFactory, svc: PushServiceStandIn, session: aiohttp.ClientSession
) -> None:
    srv = await push_server(start_server, push_senders=1, push_queue_size=3)
    dev = svc.device("q")
    svc.hold["q"] = asyncio.Event()
    await register(session, srv, dev.subscription(), ["alerts:q"])
    for i in range(10):
        await publish(session, srv, "alerts:q", i)
    await svc.until(lambda: svc.held == 1)
    assert srv.node.push.queued <= 3 and srv.node.push.stats.dropped >= 6
    svc.hold["q"].set()


# ---------------------------------------------------------------------------------------------- SSRF


@pytest.mark.parametrize(
    "endpoint",
    [
        "https://10.0.0.1/push/x",
        "https://192.168.1.5/push/x",
        "https://172.16.0.1/push/x",
        "https://127.0.0.1/push/x",
        "https://[::1]/push/x",
        "https://169.254.169.254/latest",
        "https://100.64.0.1/push/x",
        "https://0.0.0.0/push/x",
        "https://224.0.0.1/push/x",
        "https://[fe80::1]/push/x",
        "https://[::ffff:10.0.0.1]/push/x",
        "https://localhost/push/x",
        "https://2130706433/push/x",
        "http://127.0.0.1:9/push/x",
        "http://push.example/x",
        "https://user:pw@push.example/x",
        "ftp://push.example/x",
        "https://push.example/" + "a" * 2100,
    ],
)
async def test_registration_refuses_non_public_and_non_https_endpoints(
    start_server: ServerFactory, session: aiohttp.ClientSession, endpoint: str
) -> None:
    srv = await push_server(start_server, push_allowed_hosts=[])
    sub = Browser(endpoint).subscription()
    body = await register(session, srv, sub, ["alerts:x"], expect=400)
    assert body["error"]["code"] == "invalid_field" and "endpoint" in body["error"]["message"]


async def test_send_time_recheck_refuses_an_endpoint_whose_dns_changed(
    start_server: ServerFactory, svc: PushServiceStandIn, session: aiohttp.ClientSession
) -> None:
    """The host resolved to a public address at registration and to loopback when sending (DNS
    rebinding): nothing is sent, the refusal is counted. No request leaves loopback: the public answer
    only exists at registration, where nothing is sent."""
    srv = await push_server(start_server, push_allowed_hosts=[])
    answers = {"now": "93.184.215.14"}

    async def lookup(host: str, port: int) -> list[str]:
        assert host == "push.rebind.test"
        return [answers["now"]]

    srv.node.push.guard.lookup = lookup
    dev = svc.device("rebind", origin=f"https://push.rebind.test:{svc.port}")
    await register(session, srv, dev.subscription(), ["alerts:dns"])
    answers["now"] = "127.0.0.1"
    await publish(session, srv, "alerts:dns", "x")
    async with asyncio.timeout(5):
        while srv.node.push.stats.refused == 0:
            await asyncio.sleep(0.01)
    assert srv.node.push.stats.failed == 1 and srv.node.push.stats.sent == 0
    assert not svc.attempts


async def test_allowed_hosts_exempt_names_and_cidrs_and_allow_http_to_them() -> None:
    g = Guard(["push.internal", "10.1.0.0/16"])
    g.check_url("http://push.internal:8080/x")
    g.check_url("http://10.1.2.3/x")
    await g.addresses("10.1.2.3", 80)
    with pytest.raises(ValueError):
        g.check_url("http://10.2.0.1/x")
    with pytest.raises(ValueError):
        await g.addresses("10.2.0.1", 443)


# ---------------------------------------------------------------------------------------------- bad input


def _sub(**over: Any) -> dict[str, Any]:
    s = Browser("http://127.0.0.1:9/push/bad").subscription()
    s.update(over)
    return s


BAD = [
    ({"subscription": "x", "channels": ["alerts:x"]}, 400, "invalid_field"),
    ({"channels": ["alerts:x"]}, 400, "invalid_field"),
    ({"subscription": _sub(keys=None), "channels": ["alerts:x"]}, 400, "invalid_field"),
    (
        {"subscription": _sub(keys={"p256dh": "!!", "auth": b64(b"a" * 16)}), "channels": ["alerts:x"]},
        400,
        "invalid_field",
    ),
    (
        {
            "subscription": _sub(keys={"p256dh": b64(b"\x04" + b"\x01" * 64), "auth": b64(b"a" * 16)}),
            "channels": ["alerts:x"],
        },
        400,
        "invalid_field",
    ),
    (
        {
            "subscription": _sub(keys={"p256dh": b64(b"\x04" * 33), "auth": b64(b"a" * 16)}),
            "channels": ["alerts:x"],
        },
        400,
        "invalid_field",
    ),
    (
        {
            "subscription": {**_sub(), "keys": {**_sub()["keys"], "auth": b64(b"a" * 15)}},
            "channels": ["alerts:x"],
        },
        400,
        "invalid_field",
    ),
    ({"subscription": _sub(endpoint=5), "channels": ["alerts:x"]}, 400, "invalid_field"),
    ({"subscription": _sub(expirationTime="soon"), "channels": ["alerts:x"]}, 400, "invalid_field"),
    ({"subscription": _sub(), "channels": []}, 400, "invalid_field"),
    ({"subscription": _sub(), "channels": "alerts:x"}, 400, "invalid_field"),
    ({"subscription": _sub(), "channels": [f"alerts:{i}" for i in range(33)]}, 400, "invalid_field"),
    ({"subscription": _sub(), "channels": ["bad channel"]}, 400, "invalid_channel"),
    ({"subscription": _sub(), "channels": [7]}, 400, "invalid_channel"),
    ({"subscription": _sub(), "channels": ["nopush:x"]}, 404, "not_available"),
    ({"subscription": _sub(), "channels": ["user:someone"]}, 403, "permission_denied"),
]


@pytest.mark.parametrize(("body", "status", "code"), BAD)
async def test_bad_registrations_get_a_clear_error(
    start_server: ServerFactory, session: aiohttp.ClientSession, body: Any, status: int, code: str
) -> None:
    srv = await push_server(start_server)
    async with session.post(f"{srv.http}/push/subscriptions", json=body) as r:
        got = await r.json()
        assert r.status == status and got["error"]["code"] == code, got


async def test_bad_bodies_tokens_and_deletes(
    start_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    srv = await push_server(start_server)
    url = f"{srv.http}/push/subscriptions"
    async with session.post(url, data=b"{" * 20000) as r:
        assert r.status == 413 and (await r.json())["error"]["code"] == "message_too_large"
    async with session.post(url, data=b"not json") as r:
        assert r.status == 400 and (await r.json())["error"]["code"] == "bad_request"
    async with session.post(url, data=b"[]") as r:
        assert r.status == 400
    async with session.post(url, json={}, headers={"Authorization": "Bearer nope"}) as r:
        assert r.status == 401 and (await r.json())["error"]["code"] == "unauthorized"
    async with session.post(url, json={}, headers={"Authorization": "Basic x"}) as r:
        assert r.status == 401
    async with session.delete(url, json={"endpoint": "http://127.0.0.1:9/push/none"}) as r:
        assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
    async with session.delete(url, json={"endpoint": 3}) as r:
        assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_field"
    # A user's device: only that user replaces or deletes it.
    dev = Browser("http://127.0.0.1:9/push/owned").subscription()
    await register(session, srv, dev, ["alerts:x"], token=hs(claims("ann")))
    other = await register(session, srv, dev, ["alerts:x"], token=hs(claims("bob")), expect=403)
    assert other["error"]["code"] == "permission_denied"
    await register(session, srv, dev, ["alerts:x"], expect=403)
    for headers, status in (({}, 403), ({"Authorization": f"Bearer {hs(claims('bob'))}"}, 403)):
        async with session.delete(url, json={"endpoint": dev["endpoint"]}, headers=headers) as r:
            assert r.status == status
    async with session.delete(
        url, json={"subscription": dev}, headers={"Authorization": f"Bearer {hs(claims('ann'))}"}
    ) as r:
        assert r.status == 200 and (await r.json()) == {"endpoint": dev["endpoint"], "removed": True}
    assert await srv.node.push.store.get(dev["endpoint"]) is None


async def test_at_most_n_devices_per_user_per_anonymous_address_and_per_server(
    start_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    srv = await push_server(start_server, push_max_subscriptions_per_user=2, push_max_subscriptions=5)
    ann = hs(claims("ann"))
    subs = [Browser(f"http://127.0.0.1:9/push/{i}").subscription() for i in range(8)]
    await register(session, srv, subs[0], ["alerts:x"], token=ann)
    await register(session, srv, subs[1], ["alerts:x"], token=ann)
    await register(session, srv, subs[1], ["alerts:y"], token=ann)  # re-registering replaces, counts once
    body = await register(session, srv, subs[2], ["alerts:x"], token=ann, expect=429)
    assert body["error"]["code"] == "too_many_subscriptions"
    await register(session, srv, subs[2], ["alerts:x"])  # anonymous: counted per address
    await register(session, srv, subs[3], ["alerts:x"])
    await register(session, srv, subs[4], ["alerts:x"], expect=429)
    await register(session, srv, subs[4], ["alerts:x"], token=hs(claims("bob")))  # the 5th on the server
    body = await register(session, srv, subs[5], ["alerts:x"], token=hs(claims("cid")), expect=429)
    assert "server" in body["error"]["message"]
    assert [d.endpoint for d in await srv.node.push.store.devices("alerts:y")] == [subs[1]["endpoint"]]
    assert len(await srv.node.push.store.devices("alerts:x")) == 4


async def test_sqlite_registrations_survive_a_restart(
    start_server: ServerFactory, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path}/push.db"
    srv = await push_server(start_server, broker=url)
    dev = Browser("http://127.0.0.1:9/push/durable").subscription()
    await register(session, srv, dev, ["alerts:x", "alerts:y"])
    await srv.stop()
    again = await push_server(start_server, broker=url)
    found = await again.node.push.store.devices("alerts:y")
    assert [d.endpoint for d in found] == [dev["endpoint"]]


# ---------------------------------------------------------------------------------------------- the matrix


def expected_push(rule: Rule, who: Who) -> bool:
    """Registration follows the /ws subscribe rules, except that a subscription token grants nothing
    (a registration outlives any token): such a client counts as the same client without it."""
    if who.grant:
        who = Who(who.name, who.user, who.claim)
    return expected(rule, who, "subscribe")


async def test_permission_matrix_push_subscriptions(
    start_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    srv = await push_server(
        start_server,
        namespaces={r.name: replace(r.namespace, push="always") for r in RULES},
        client_rate=0.0,
        user_rate=0.0,
        push_max_subscriptions_per_user=1000,
    )
    url = f"{srv.http}/push/subscriptions"
    wrong: list[str] = []
    cells = 0
    for wi, who in enumerate(WHO):
        headers = {}
        if who.user is not None:
            extra = {} if who.channels is None else {"channels": who.channels}
            headers["Authorization"] = f"Bearer {hs(claims(who.user, **extra))}"
        for rule in RULES:
            sub = Browser(f"http://127.0.0.1:9/push/{wi}-{rule.name}").subscription()
            async with session.post(
                url, json={"subscription": sub, "channels": [rule.channel]}, headers=headers
            ) as r:
                body = await r.json()
                status = r.status
            cells += 1
            want = expected_push(rule, who)
            if want != (status == 201):
                wrong.append(f"{who.name} POST {rule}: expected allowed={want}, got {status} {body}")
            elif not want and (status, body["error"]["code"]) not in (
                (403, "permission_denied"),
                (401, "unauthorized"),
            ):
                wrong.append(f"{who.name} POST {rule}: refused with {status} {body}")
            if status == 201:
                async with session.delete(url, json={"endpoint": sub["endpoint"]}, headers=headers) as r:
                    if r.status != 200:
                        wrong.append(f"{who.name} DELETE {rule}: {r.status} {await r.text()}")
                # Nobody else deletes a user's device.
                if who.user is not None:
                    await register(session, srv, sub, [rule.channel], token=headers["Authorization"][7:])
                    async with session.delete(url, json={"endpoint": sub["endpoint"]}) as r:
                        if r.status != 403:
                            wrong.append(f"anonymous DELETE of {who.name}'s device: {r.status}")
    assert cells == len(WHO) * len(RULES) == 192
    assert not wrong, "\n".join(wrong)


# ---------------------------------------------------------------------------------------------- two nodes


async def test_two_redis_nodes_push_once_and_offline_sees_a_user_on_the_other_node(
    start_server: ServerFactory,
    svc: PushServiceStandIn,
    session: aiohttp.ClientSession,
    probe: ProbeFactory,
    redis_url: str,
) -> None:
    """Two nodes on one Redis: a publication is pushed once (by the node that accepted it), and a user
    connected to the other node counts as online for "offline" pushes, until they leave."""
    a = await push_server(start_server, broker=redis_url, presence_ttl=3.0)
    b = await push_server(start_server, broker=redis_url, presence_ttl=3.0)
    token = hs(claims("ann"))
    ann, every = svc.device("ann"), svc.device("every")
    await register(session, a, ann.subscription(), ["quiet:r"], token=token)
    await register(session, b, every.subscription(), ["alerts:r"])  # registered on b, sent by a
    await publish(session, a, "alerts:r", "once")
    await svc.until(lambda: len(svc.of("every")) == 1)
    p = await probe(f"{b.ws_url}?token={token}")
    await p.ok("ping")

    async def online_for_a() -> bool:
        return await a.node.push.store.online_elsewhere(["ann"]) == {"ann"}

    async with asyncio.timeout(5):
        while not await online_for_a():
            await asyncio.sleep(0.01)
    await publish(session, a, "quiet:r", "ann is on b")
    await publish(session, a, "alerts:r", "marker")  # queued after it, on the same senders
    await svc.until(lambda: len(svc.of("every")) == 2)
    await p.close()
    async with asyncio.timeout(5):
        while await online_for_a():
            await asyncio.sleep(0.01)
    await publish(session, a, "quiet:r", "ann left")
    await svc.until(lambda: len(svc.of("ann")) == 1)
    assert [r.payload["data"] for r in svc.of("ann")] == ["ann left"]
    await counted(a, sent=3)
    assert b.node.push.stats.sent == 0 and len(svc.of("every")) == 2  # pushed once, never by b


# ---------------------------------------------------------------------------------------------- OpenAPI


def _spec() -> dict[str, Any]:
    spec: dict[str, Any] = orjson.loads(resources.files("tidings").joinpath("openapi.json").read_bytes())
    return spec


async def test_push_responses_match_openapi(
    start_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    chk = ResponseChecker(_spec())
    srv = await push_server(start_server, push_max_subscriptions_per_user=1)
    key, subs, stats = "/push/vapid-public-key", "/push/subscriptions", "/api/push/stats"
    ann = {"Authorization": f"Bearer {hs(claims('ann'))}"}

    async def call(method: str, path: str, expect: int, **kw: Any) -> Any:
        kw.setdefault("headers", {})
        return await _call(session, srv, chk, method, path, path, expect=expect, **kw)

    dev = Browser("http://127.0.0.1:9/push/doc").subscription()
    await call("get", key, 200)
    await call("post", subs, 201, json_body={"subscription": dev, "channels": ["alerts:x"]}, headers=ann)
    await call("get", stats, 200, headers=api_headers())
    await call("post", subs, 400, raw=b"{")
    await call(
        "post",
        subs,
        400,
        json_body={"subscription": Browser("https://10.0.0.1/x").subscription(), "channels": ["alerts:x"]},
    )
    await call("post", subs, 401, json_body={}, headers={"Authorization": "Bearer bad"})
    await call("post", subs, 403, json_body={"subscription": dev, "channels": ["alerts:x"]})  # ann's device
    await call("post", subs, 404, json_body={"subscription": dev, "channels": ["nopush:x"]})
    await call("post", subs, 413, raw=b" " * 20000)
    other = Browser("http://127.0.0.1:9/push/doc2").subscription()
    async with session.post(
        f"{srv.http}{subs}", json={"subscription": other, "channels": ["alerts:x"]}, headers=ann
    ) as r:
        assert r.status == 429  # a cap, not a rate: no Retry-After
        chk.check("post", subs, r.status, r.content_type, await r.json())
    await call("delete", subs, 400, json_body={})
    await call(
        "delete", subs, 401, json_body={"endpoint": dev["endpoint"]}, headers={"Authorization": "Bearer bad"}
    )
    await call("delete", subs, 403, json_body={"endpoint": dev["endpoint"]})
    await call("delete", subs, 404, json_body={"endpoint": other["endpoint"]})
    await call("delete", subs, 413, raw=b" " * 20000)
    await call("delete", subs, 200, json_body={"endpoint": dev["endpoint"]}, headers=ann)
    keyed = await push_server(start_server, api_failures_per_minute=2)
    keyed.settings.api_keys.append(ApiKey("pub", "publish-key-0123456789", "publish"))
    for headers, status in (
        (api_headers("publish-key-0123456789"), 403),
        ({}, 401),
        (api_headers("wrong-key-0123456789"), 401),
        (api_headers(), 429),  # too many failed keys from this address
    ):
        await _call(session, keyed, chk, "get", stats, stats, headers=headers, expect=status)
    off = await start_server()
    async with session.get(f"{off.http}{key}") as r:
        chk.check("get", key, r.status, r.content_type, await r.json())
        assert r.status == 404
    slow = await push_server(start_server, client_rate=0.5)  # a burst of 1 request per address
    await _call(
        session,
        slow,
        chk,
        "delete",
        subs,
        subs,
        json_body={"endpoint": "https://a.example/x"},
        headers={},
        expect=404,
    )
    body = await _call(
        session, slow, chk, "delete", subs, subs, json_body={"endpoint": "x"}, headers={}, expect=429
    )
    assert body["error"]["code"] == "rate_limited"
    documented = {
        (m, p, status)
        for p, item in _spec()["paths"].items()
        if "push" in p
        for m in item
        for status in item[m]["responses"]
    }
    untested = {d for d in documented - chk.seen if d[2] != "503" and not (d[0] == "post" and d[2] == "429")}
    assert not untested, sorted(untested)


# ---------------------------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[namespaces.a]\npush = true\n", "push must be false"),
        ('[namespaces.a]\npush = "sometimes"\n', "push must be false"),
        ('[namespaces.a]\npush = "always"\npush_urgency = "urgent"\n', "push_urgency"),
        ('[namespaces.a]\npush = "always"\npush_topic = "has space"\n', "push_topic"),
        ("[namespaces.a]\npush_ttl = -1\n", "push_ttl"),
        ('push_subject = "admin@example.com"\n', "push_subject"),
        ('push_allowed_hosts = ["10.0.0.0/33"]\n', "push_allowed_hosts"),
        ("push_senders = 0\n", "push_senders"),
    ],
)
def test_bad_push_settings_name_the_option(tmp_path: Path, toml: str, message: str) -> None:
    from tidings.config import ConfigError, load_settings

    cfg = tmp_path / "t.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        load_settings({}, env={}, config_file=cfg)


def test_push_settings_from_file_and_env(tmp_path: Path) -> None:
    from tidings.config import load_settings

    cfg = tmp_path / "t.toml"
    cfg.write_text(
        'push_subject = "mailto:ops@example.com"\n[namespaces.alerts]\npush = "offline"\n'
        'push_ttl = 60\npush_urgency = "high"\npush_topic = "a-b_c"\n'
    )
    s = load_settings({}, env={"TIDINGS_PUSH_ALLOWED_HOSTS": "push.local, 10.9.0.0/16"}, config_file=cfg)
    ns = s.namespaces["alerts"]
    assert (ns.push, ns.push_ttl, ns.push_urgency, ns.push_topic) == ("offline", 60, "high", "a-b_c")
    assert (
        s.push_allowed_hosts == ["push.local", "10.9.0.0/16"] and s.push_subject == "mailto:ops@example.com"
    )
    assert s.namespaces["chat"].push is False  # off unless asked for


async def test_failed_tokens_block_the_address_on_every_token_route(
    start_server: ServerFactory, svc: PushServiceStandIn, session: aiohttp.ClientSession
) -> None:
    """Bad connection tokens on the push routes count against the address like on /ws, and once it is
    blocked every route that takes a token answers 429 with Retry-After, before looking at the token."""
    srv = await push_server(start_server, api_failures_per_minute=2)
    dev = svc.device("blocked")
    for _ in range(2):
        body = await register(session, srv, dev.subscription(), ["alerts:x"], token="not-a-jwt", expect=401)
        assert body["error"]["code"] == "unauthorized"
    good = hs(claims("ann"))
    epoch_q = "since=0:e&timeout=0"
    for method, path, kw in (
        (
            "POST",
            "/push/subscriptions",
            {"json": {"subscription": dev.subscription(), "channels": ["alerts:x"]}},
        ),
        ("DELETE", "/push/subscriptions", {"json": {"endpoint": dev.subscription()["endpoint"]}}),
        ("GET", f"/sse?channel=alerts:x&token={good}", {}),
        ("GET", f"/stream?channel=alerts:x&token={good}", {}),
        ("GET", f"/poll?channel=alerts:x&{epoch_q}&token={good}", {}),
    ):
        headers = {"Authorization": f"Bearer {good}"} if path.startswith("/push") else {}
        async with session.request(method, srv.http + path, headers=headers, **kw) as r:
            assert r.status == 429, (method, path, await r.text())
            assert (await r.json())["error"]["code"] == "rate_limited"
            assert int(r.headers["Retry-After"]) >= 1
    with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
        await session.ws_connect(f"{srv.ws_url}?token={good}")
    assert exc.value.status == 429
