"""GET /api/stats (what the admin page polls): the key check, bounded output, the numbers moving with
real clients of every transport, the rings of recent errors and slow-consumer closes bounded in entries
and bytes, and every documented response against openapi.json."""

from __future__ import annotations

import asyncio
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from tidings.config import ApiKey
from tidings.protocol import CloseCode
from tidings.stats import MAX_CHANNELS, RING_BYTES, RING_ENTRIES, TRANSPORTS
from tidings.transports.pages import CSP

from .conftest import API_KEY, ProbeFactory, Server, ServerFactory, api_headers, make_settings
from .rawws import client_frame, raw_upgrade, read_until_close
from .test_docs import ResponseChecker

READ_KEY = "stats-reader-0123456789"
PUB_KEY = "stats-pusher-0123456789"
STATS = "/api/stats"


def stats_settings(tmp_path: Path, **kw: Any) -> Any:
    s = make_settings(tmp_path, api_failures_per_minute=0, client_rate=0.0, user_rate=0.0, **kw)
    s.api_keys = [*s.api_keys, ApiKey("reader", READ_KEY, "read"), ApiKey("pusher", PUB_KEY, "publish")]
    return s


async def get_stats(
    session: aiohttp.ClientSession, srv: Server, query: str = "", key: str = READ_KEY
) -> dict[str, Any]:
    async with asyncio.timeout(10), session.get(srv.http + STATS + query, headers=api_headers(key)) as r:
        assert r.status == 200, await r.text()
        assert r.headers["Cache-Control"] == "no-store"
        body: dict[str, Any] = await r.json()
        return body


async def wait_stats(
    session: aiohttp.ClientSession, srv: Server, ok: Any, query: str = "", timeout: float = 10.0
) -> dict[str, Any]:
    """Poll /api/stats until ``ok(body)`` holds (the counters move on the loop, after the reply)."""
    async with asyncio.timeout(timeout):
        while True:
            body = await get_stats(session, srv, query)
            if ok(body):
                return body
            await asyncio.sleep(0.02)


async def publish(session: aiohttp.ClientSession, srv: Server, channel: str, data: Any) -> None:
    async with session.post(
        srv.http + "/api/publish", json={"channel": channel, "data": data}, headers=api_headers()
    ) as r:
        assert r.status == 200, await r.text()


async def test_stats_needs_a_read_or_admin_key(
    start_server: ServerFactory, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    srv = await start_server(settings=stats_settings(tmp_path))
    cases: list[tuple[dict[str, str], int, str | None]] = [
        ({}, 401, "unauthorized"),
        ({"Authorization": "Bearer not-a-key-0123456789"}, 401, "unauthorized"),
        ({"Authorization": f"Basic {READ_KEY}"}, 401, "unauthorized"),
        ({"Authorization": f"Bearer {READ_KEY[:-1]}"}, 401, "unauthorized"),
        (api_headers(PUB_KEY), 403, "permission_denied"),
        (api_headers(READ_KEY), 200, None),
        (api_headers(), 200, None),  # admin
    ]
    for headers, status, code in cases:
        async with session.get(srv.http + STATS, headers=headers) as r:
            body = await r.json()
            assert r.status == status, (headers, r.status, body)
            if code is not None:
                assert body == {"error": {"code": code, "message": body["error"]["message"]}}
                assert "process" not in body
            else:
                assert body["process"]["pid"] > 0
    # The key is never taken from the URL.
    async with session.get(srv.http + STATS, params={"key": READ_KEY, "token": READ_KEY}) as r:
        assert r.status == 401


async def test_bad_parameters_are_refused(
    start_server: ServerFactory, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    srv = await start_server(settings=stats_settings(tmp_path))
    for query in ("?limit=0", f"?limit={MAX_CHANNELS + 1}", "?limit=abc", "?limit=-1", "?q=" + "x" * 256):
        async with session.get(srv.http + STATS + query, headers=api_headers(READ_KEY)) as r:
            body = await r.json()
            assert (r.status, body["error"]["code"]) == (400, "invalid_field"), (query, body)
    async with session.post(srv.http + STATS, headers=api_headers(READ_KEY)) as r:
        assert r.status == 405


async def test_channels_listed_are_bounded(
    start_server: ServerFactory, session: aiohttp.ClientSession, probe: ProbeFactory, tmp_path: Path
) -> None:
    """1,200 channels with subscribers: the default lists 50, ?limit= at most 1,000, the busiest first,
    the total counts them all, ?q= filters before the limit; history sizes are the channels' own."""
    srv = await start_server(settings=stats_settings(tmp_path, max_subscriptions=2000))
    a, b = await probe(srv), await probe(srv)
    n = 1200
    for i in range(n):
        await a.ok("subscribe", channel=f"pub:c{i:04d}")
    for i in range(3):  # three channels with two subscribers: they come first
        await b.ok("subscribe", channel=f"pub:c{1000 + i:04d}")
    for i in range(7):
        await publish(session, srv, "pub:c1001", i)
    await b.ok("subscribe", channel="small:x")
    for i in range(9):  # small: history_size 5
        await publish(session, srv, "small:x", i)

    body = await get_stats(session, srv)
    chans = body["channels"]
    assert chans["total"] == n + 1 and chans["limit"] == 50 and len(chans["listed"]) == 50
    top = chans["listed"][:3]
    assert [c["channel"] for c in top] == ["pub:c1000", "pub:c1001", "pub:c1002"]
    assert [c["subscribers"] for c in top] == [2, 2, 2]
    assert [c["history"] for c in top] == [0, 7, 0]
    assert chans["listed"][3] == {"channel": "pub:c0000", "subscribers": 1, "history": 0}  # then by name
    assert body["subscriptions"] == n + 4

    body = await get_stats(session, srv, f"?limit={MAX_CHANNELS}")
    assert len(body["channels"]["listed"]) == MAX_CHANNELS and body["channels"]["total"] == n + 1
    raw = orjson.dumps(body)
    assert len(raw) < MAX_CHANNELS * 120 + 2 * RING_BYTES + 4096, len(raw)

    body = await get_stats(session, srv, "?q=small&limit=5")
    assert body["channels"]["total"] == 1
    assert body["channels"]["listed"] == [{"channel": "small:x", "subscribers": 1, "history": 5}]
    body = await get_stats(session, srv, "?q=c11&limit=5")
    assert body["channels"]["total"] == 100  # c1100..c1199
    assert [c["channel"] for c in body["channels"]["listed"]] == [f"pub:c{1100 + i}" for i in range(5)]


async def test_numbers_move_with_every_transport(
    start_server: ServerFactory, session: aiohttp.ClientSession, probe: ProbeFactory, tmp_path: Path
) -> None:
    srv = await start_server(settings=stats_settings(tmp_path))
    before = await get_stats(session, srv)
    assert before["connections"] == {"total": 0, "by_transport": dict.fromkeys(TRANSPORTS, 0)}
    assert before["messages"] == {"published": 0, "delivered": 0} and before["subscriptions"] == 0

    ws = [await probe(srv) for _ in range(2)]
    for p in ws:
        await p.ok("subscribe", channel="chat:lobby")
    chat = await session.ws_connect(f"ws://127.0.0.1:{srv.port}/chatsocket")
    echo = await session.ws_connect(f"ws://127.0.0.1:{srv.port}/websocket")
    sse = await session.get(srv.http + "/sse", params={"channel": "chat:lobby"})
    stream = await session.get(srv.http + "/stream", params={"channel": "pub:s"})
    want = {"ws": 2, "chatsocket": 1, "echo": 1, "sse": 1, "stream": 1, "poll": 0}
    body = await wait_stats(session, srv, lambda b: b["connections"]["by_transport"] == want)
    assert body["connections"]["total"] == 6
    # ws x2, chatsocket, sse on chat:lobby; stream on pub:s
    body = await wait_stats(session, srv, lambda b: b["subscriptions"] == 5)
    lobby = next(c for c in body["channels"]["listed"] if c["channel"] == "chat:lobby")
    assert lobby["subscribers"] == 4

    # A pending poll counts while it waits.
    top = (await (await session.get(srv.http + "/poll", params={"channel": "pub:p"})).json())["offset"]
    poll = asyncio.ensure_future(
        session.get(srv.http + "/poll", params={"channel": "pub:p", "since": f"{top}:", "timeout": "10"})
    )
    await wait_stats(session, srv, lambda b: b["connections"]["by_transport"]["poll"] == 1)

    for i in range(10):
        await publish(session, srv, "chat:lobby", {"body": f"m{i}"})
    await ws[1].ok("publish", channel="chat:lobby", data={"body": "from ws"})
    body = await wait_stats(session, srv, lambda b: b["messages"]["delivered"] >= 44)
    assert body["messages"] == {"published": 11, "delivered": 44}  # 11 publications x 4 subscribers
    await publish(session, srv, "pub:p", "wake")  # answers the poll
    r = await asyncio.wait_for(poll, 10)
    assert (await r.json())["publications"][0]["data"] == "wake"
    r.close()
    body = await wait_stats(session, srv, lambda b: b["connections"]["by_transport"]["poll"] == 0)
    assert body["messages"] == {"published": 12, "delivered": 45}

    for p in ws:
        await p.close()
    await chat.close()
    await echo.close()
    sse.close()
    stream.close()
    body = await wait_stats(session, srv, lambda b: b["connections"]["total"] == 0)
    assert body["connections"]["by_transport"] == dict.fromkeys(TRANSPORTS, 0)
    assert body["subscriptions"] == 0 and body["channels"] == {"total": 0, "limit": 50, "listed": []}
    assert body["process"]["uptime"] >= before["process"]["uptime"]
    assert body["process"]["rss_bytes"] > 1 << 20 and body["process"]["cpu_seconds"] > 0


async def test_a_repeat_is_not_counted_as_published(
    start_server: ServerFactory, session: aiohttp.ClientSession, probe: ProbeFactory, tmp_path: Path
) -> None:
    """A publish repeated with its idempotency key stores and delivers nothing: not counted either."""
    srv = await start_server(settings=stats_settings(tmp_path))
    sub = await probe(srv)
    await sub.ok("subscribe", channel="pub:once")
    for _ in range(3):
        async with session.post(
            srv.http + "/api/publish",
            json={"channel": "pub:once", "data": 1, "idempotency_key": "k1"},
            headers=api_headers(),
        ) as r:
            assert r.status == 200
    body = await wait_stats(session, srv, lambda b: b["messages"]["delivered"] >= 1)
    assert body["messages"] == {"published": 1, "delivered": 1}


async def test_errors_ring_is_bounded_in_entries_and_bytes(
    start_server: ServerFactory, session: aiohttp.ClientSession, probe: ProbeFactory, tmp_path: Path
) -> None:
    srv = await start_server(settings=stats_settings(tmp_path, default_namespace=None))
    p = await probe(srv)
    # Short errors: the entry bound holds (every one counted in total).
    for i in range(RING_ENTRIES + 30):
        reply = await p.request("publish", channel=f"nowhere:{i}", data=1)
        assert reply["error"]["code"] == "unknown_namespace"
    body = await get_stats(session, srv)
    errors = body["errors"]
    assert errors["total"] == RING_ENTRIES + 30
    assert len(errors["recent"]) == RING_ENTRIES
    newest = errors["recent"][0]
    assert newest["source"] == "ws" and newest["code"] == "unknown_namespace"
    assert f"nowhere:{RING_ENTRIES + 29}" in newest["message"] and newest["client"]
    # Long errors (255-byte channel names): the byte bound holds, and each message is cut.
    long = "nowhere:" + "x" * 247
    for _ in range(RING_ENTRIES):
        await p.request("publish", channel=long, data=1)
    errors = (await get_stats(session, srv))["errors"]
    size = sum(len(orjson.dumps(e)) for e in errors["recent"])
    assert size <= RING_BYTES, size
    assert 20 < len(errors["recent"]) < RING_ENTRIES
    assert all(len(e["message"]) <= 200 for e in errors["recent"])
    # HTTP API errors go in too: method and path, never the query string.
    async with session.get(
        srv.http + "/api/channels/nowhere:q/history?token=SECRET-IN-QUERY", headers=api_headers()
    ) as r:
        assert r.status == 404
    newest = (await get_stats(session, srv))["errors"]["recent"][0]
    assert newest["source"] == "http" and newest["status"] == 404 and newest["code"] == "unknown_namespace"
    assert newest["request"] == "GET /api/channels/nowhere:q/history"
    assert "SECRET" not in json.dumps(await get_stats(session, srv))


async def test_slow_consumer_close_is_listed(
    start_server: ServerFactory, session: aiohttp.ClientSession, probe: ProbeFactory, tmp_path: Path
) -> None:
    srv = await start_server(settings=stats_settings(tmp_path, max_buffer=64 * 1024))
    reader, writer = await raw_upgrade(srv.port, rcvbuf=4096)
    writer.write(client_frame(b'{"id":1,"op":"subscribe","channel":"pub:slow"}'))
    await writer.drain()
    await wait_stats(session, srv, lambda b: b["subscriptions"] == 1)
    publisher = await probe(srv)
    blob = "x" * 8000
    async with asyncio.timeout(20):
        while srv.node.hub.subscribers("pub:slow"):
            await publisher.ok("publish", channel="pub:slow", data=blob)
    code, _ = await asyncio.wait_for(read_until_close(reader), 10)
    assert code == CloseCode.SLOW_CONSUMER
    writer.close()
    body = await get_stats(session, srv)
    slow = body["slow_consumers"]
    assert slow["total"] == 1 and len(slow["recent"]) == 1
    entry = slow["recent"][0]
    assert entry["transport"] == "ws" and entry["ip"] == "127.0.0.1" and entry["user"] == ""
    assert entry["buffered"] > 64 * 1024 // 2
    assert all(e["code"] != CloseCode.SLOW_CONSUMER for e in body["errors"]["recent"])


async def test_stats_responses_match_openapi(
    start_server: ServerFactory, session: aiohttp.ClientSession, probe: ProbeFactory, tmp_path: Path
) -> None:
    """Every response openapi.json documents for GET /api/stats, produced and validated (the other
    routes: tests/test_docs.py::test_real_responses_match_openapi)."""
    spec = json.loads(resources.files("tidings").joinpath("openapi.json").read_text(encoding="utf-8"))
    chk = ResponseChecker(spec)
    settings = stats_settings(tmp_path, max_buffer=64 * 1024)
    settings.api_failures_per_minute = 3
    srv = await start_server(settings=settings)

    async def call(url: str, status: int, key: str | None = READ_KEY, method: str = "get") -> Any:
        headers = api_headers(key) if key else {}
        async with session.request(method.upper(), srv.http + url, headers=headers) as r:
            body = await r.json()
            assert r.status == status, (url, r.status, body)
            chk.check(method, STATS, r.status, r.content_type, body)
            return body

    await call(STATS, 200)  # empty
    p = await probe(srv)
    await p.ok("subscribe", channel="chat:lobby")
    await p.request("publish", channel="nowhere:x", data=1)  # an error entry
    _reader, writer = await raw_upgrade(srv.port, rcvbuf=4096)  # a slow-consumer entry
    writer.write(client_frame(b'{"id":1,"op":"subscribe","channel":"pub:slow"}'))
    await writer.drain()
    await wait_stats(session, srv, lambda b: b["subscriptions"] == 2)
    async with asyncio.timeout(20):
        while srv.node.hub.subscribers("pub:slow"):
            await p.ok("publish", channel="pub:slow", data="x" * 8000)
    writer.close()
    body = await call(STATS + "?limit=1&q=chat", 200)
    assert body["channels"]["listed"][0]["channel"] == "chat:lobby"
    body = await wait_stats(session, srv, lambda b: b["slow_consumers"]["total"] == 1)
    chk.check("get", STATS, 200, "application/json", body)
    assert body["errors"]["recent"] and body["slow_consumers"]["recent"]
    await call(STATS + "?limit=0", 400)
    await call(STATS, 403, PUB_KEY)
    await call(STATS, 405, method="post")
    for _ in range(3):
        await call(STATS, 401, "wrong-key-0123456789")
    await call(STATS, 429)
    documented = set(spec["paths"][STATS]["get"]["responses"])
    assert {s for m, path, s in chk.seen if path == STATS and m == "get"} == documented


async def test_admin_page_is_a_shell_without_data(
    start_server: ServerFactory, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """/admin itself holds no data (everything comes from /api/stats with the key): it is served to
    anyone, even on a server that refuses anonymous clients, under the chat page's CSP, without a
    cookie."""
    srv = await start_server(settings=stats_settings(tmp_path, allow_anonymous=False))
    await publish(session, srv, "chat:lobby", {"body": "private words"})
    async with session.get(srv.http + "/admin") as r:
        text = await r.text()
        assert r.status == 200 and r.content_type == "text/html"
        assert r.headers["Content-Security-Policy"] == CSP
        assert r.headers["Cache-Control"] == "no-store"
        assert "Set-Cookie" not in r.headers
    assert "private words" not in text and API_KEY not in text and READ_KEY not in text
    assert "<script>" not in text and not re.search(r"\sstyle=|\son[a-z]+=", text)  # nothing inline
