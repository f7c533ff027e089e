"""Every way in goes through the same policy gate: the permission matrix, rate limits and the token rule
on /chatsocket, /websocket, the chat page and its form POST, /sse, /stream and /poll, next to /ws
(tests/test_auth.py; the API-key matrix there covers /api/stats, and /admin is a shell without data)."""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import replace
from typing import Any

import aiohttp
import orjson
import pytest

from tidings.protocol import CloseCode

from .conftest import Server, ServerFactory, api_headers
from .test_auth import RULES, SECRET, WHO, Who, claims, expected, hs, matrix_settings

CHAT_RULES = [r for r in RULES if not r.personal]  # the page and /chatsocket serve chat:<room> only
# (who, the connection token's `channels` claim)
CHAT_WHO = [
    (Who("anonymous", None), None),
    (Who("user B", "B"), None),
    (Who("user C, channels claim covering", "C", claim="all"), ["chat:*"]),
]


async def stored(session: aiohttp.ClientSession, srv: Server, channel: str) -> list[Any]:
    async with session.get(f"{srv.http}/api/channels/{channel}/history", headers=api_headers()) as r:
        assert r.status == 200, await r.text()
        return [p["data"] for p in (await r.json())["publications"]]


async def page_form(session: aiohttp.ClientSession, srv: Server, room: str) -> tuple[int, dict[str, str]]:
    """GET the room's page; the XSRF field of its form when it rendered."""
    async with session.get(f"{srv.http}/chat/{room}") as r:
        text = await r.text()
        if r.status != 200:
            return r.status, {}
    m = re.search(r'name="_xsrf" value="([^"]+)"', text)
    assert m, text[:500]
    return 200, {"_xsrf": m.group(1)}


async def chatsocket(
    session: aiohttp.ClientSession, srv: Server, token: str | None
) -> aiohttp.ClientWebSocketResponse:
    url = f"ws://127.0.0.1:{srv.port}/chatsocket" + (f"?token={token}" if token else "")
    return await session.ws_connect(url)


async def recv_demo(ws: aiohttp.ClientWebSocketResponse, timeout: float = 5.0) -> dict[str, Any] | int:
    """The next demo message, or the close code if the server closed instead."""
    msg = await ws.receive(timeout)
    if msg.type == aiohttp.WSMsgType.TEXT:
        obj: dict[str, Any] = orjson.loads(msg.data)
        return obj
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), msg
    return ws.close_code or 0


async def live_in(srv: Server, channel: str, n: int) -> None:
    async with asyncio.timeout(5):
        while len(await srv.node.presence.clients(channel)) < n:
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("rule", CHAT_RULES, ids=lambda r: r.name)
async def test_permission_matrix_page_form_and_chatsocket(start_server: ServerFactory, rule: Any) -> None:
    """For each namespace rule on `chat`: the page GET is a history read, the form POST a publish, a
    /chatsocket client a subscriber and publisher of chat:lobby, each allowed exactly when /ws allows it."""
    ns = replace(rule.namespace, name="chat", history_size=200)
    srv = await start_server(token_secret=SECRET, client_rate=0.0, user_rate=0.0, namespaces={"chat": ns})
    wrong: list[str] = []
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        anon = CHAT_WHO[0][0]
        # The page: GET = history read, form POST = publish (anonymous: the page has no token).
        status, form = await page_form(session, srv, "room")
        if (status == 200) != expected(rule, anon, "history"):
            wrong.append(f"page GET: {status}, expected allowed={expected(rule, anon, 'history')}")
        async with session.post(
            f"{srv.http}/chat/room/messages",
            data={**form, "body": "from the form", "nick": "n"},
            allow_redirects=False,
        ) as r:
            posted = r.status
        if (posted == 303) != expected(rule, anon, "publish"):
            wrong.append(f"form POST: {posted}, expected allowed={expected(rule, anon, 'publish')}")
        if posted != 303 and posted not in (401, 403):
            wrong.append(f"form POST refused with {posted}, not 401/403")
        # /chatsocket: subscriber of chat:lobby, publisher through the gate.
        for who, chans in CHAT_WHO:
            token = None
            if who.user is not None:
                extra = {} if chans is None else {"channels": chans}
                token = hs(claims(who.user, **extra))
            ws = await chatsocket(session, srv, token)
            may_read = expected(rule, who, "subscribe")
            if not may_read:
                got = await recv_demo(ws)
                if got not in (CloseCode.FORBIDDEN, CloseCode.UNAUTHORIZED):
                    wrong.append(f"/chatsocket {who.name}: expected 4003/4001, got {got}")
                continue
            await live_in(srv, "chat:lobby", 1)
            before = await stored(session, srv, "chat:lobby")
            await ws.send_str(orjson.dumps({"body": f"from {who.name}"}).decode())
            # A marker from the backend: once it arrives, the client's own message was handled first.
            async with session.post(
                f"{srv.http}/api/publish",
                headers=api_headers(),
                json={"channel": "chat:lobby", "data": {"body": "marker"}},
            ) as r:
                assert r.status == 200
            bodies = []
            while not bodies or bodies[-1] != "marker":
                got = await recv_demo(ws)
                assert isinstance(got, dict), got
                bodies.append(got["body"])
            published = f"from {who.name}" in bodies
            if published != expected(rule, who, "publish"):
                wrong.append(f"/chatsocket {who.name} publish: {bodies}")
            after = await stored(session, srv, "chat:lobby")
            if (len(after) - len(before) == 2) != expected(rule, who, "publish"):
                wrong.append(f"/chatsocket {who.name}: stored {after[len(before) :]}")
            await ws.close()
            async with asyncio.timeout(5):
                while await srv.node.presence.clients("chat:lobby"):
                    await asyncio.sleep(0.01)
    assert not wrong, f"{rule}:\n" + "\n".join(wrong)


async def test_locked_server_refuses_anonymous_on_every_entry_point(start_server: ServerFactory) -> None:
    """`allow_anonymous = false`: the page, the form, /chatsocket and /websocket refuse an anonymous
    client, and nothing is read or stored (the holes found: private history rendered, the form stored)."""
    srv = await start_server(token_secret=SECRET, allow_anonymous=False, auth_timeout=0.5)
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{srv.http}/api/publish", headers=api_headers(), json={"channel": "chat:lobby", "data": "secret"}
        ) as r:
            assert r.status == 200
        async with session.get(f"{srv.http}/") as r:
            text = await r.text()
            assert r.status == 401 and "secret" not in text
        async with session.post(
            f"{srv.http}/chat/lobby/messages", data={"_xsrf": "x" * 32, "body": "hi"}, allow_redirects=False
        ) as r:
            assert r.status in (401, 403)
        for path in ("/chatsocket", "/websocket"):
            ws = await session.ws_connect(f"ws://127.0.0.1:{srv.port}{path}")
            await ws.send_str('{"body": "sneaky"}')
            assert await recv_demo(ws) == CloseCode.UNAUTHORIZED, path
        # The admin page is a shell without data; what it shows needs an API key (401 without one).
        async with session.get(f"{srv.http}/admin") as r:
            assert r.status == 200 and "secret" not in await r.text()
        async with session.get(f"{srv.http}/api/stats") as r:
            assert r.status == 401 and "secret" not in await r.text()
        # With a token, /chatsocket works.
        ws = await chatsocket(session, srv, hs(claims("alice")))
        await live_in(srv, "chat:lobby", 1)
        await ws.send_str('{"body": "with a token"}')
        got = await recv_demo(ws)
        assert isinstance(got, dict) and got["body"] == "with a token"
        await ws.close()
        assert await stored(session, srv, "chat:lobby") == ["secret", {"body": "with a token"}]


@pytest.mark.parametrize("path", ["/chatsocket", "/websocket"])
async def test_demo_sockets_have_the_command_budget(start_server: ServerFactory, path: str) -> None:
    """5,000 messages in a burst: /chatsocket stores and /websocket echoes only the budget's worth, and a
    client that keeps pushing past it is closed with 4030 (before: all 5,000 were stored)."""
    srv = await start_server(client_rate=10.0, user_rate=0.0)
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(f"ws://127.0.0.1:{srv.port}{path}")
        if path == "/chatsocket":
            await live_in(srv, "chat:lobby", 1)
        for i in range(5000):
            if ws.closed:
                break
            await ws.send_str(orjson.dumps({"body": f"m{i}"}).decode())
        replies = 0
        code: int | None = None
        async with asyncio.timeout(10):
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    replies += 1
        code = ws.close_code
        assert code == CloseCode.RATE_LIMITED
        assert replies <= 30, replies  # burst 20 plus what refills while sending
        if path == "/chatsocket":
            assert len(await stored(session, srv, "chat:lobby")) <= 30


async def test_page_requests_have_the_address_budget(start_server: ServerFactory) -> None:
    srv = await start_server(client_rate=2.0)
    async with aiohttp.ClientSession() as session:
        statuses = []
        for _ in range(20):
            async with session.get(f"{srv.http}/chat/room") as r:
                statuses.append(r.status)
        assert statuses[:4] == [200] * 4 and 429 in statuses, statuses


@pytest.mark.parametrize("endpoint", ["/sse", "/stream", "/poll"])
async def test_permission_matrix_http_streams(
    start_server: ServerFactory, tmp_path: Any, endpoint: str
) -> None:
    """/sse, /stream and /poll subscribe through the same gate as a /ws subscribe: for every namespace
    rule and every kind of client (token in Authorization, or ?token= for the others; a subscription
    token in ?sub_token=), allowed exactly when /ws allows ``subscribe``, else 403 permission_denied."""
    srv = await start_server(**matrix_settings(tmp_path))
    wrong: list[str] = []
    cells = 0
    async with aiohttp.ClientSession() as session:
        for n, who in enumerate(WHO):
            for rule in RULES:
                params: list[tuple[str, str]] = [("channel", rule.channel)]
                headers: dict[str, str] = {}
                if who.user is not None:
                    extra = {} if who.channels is None else {"channels": who.channels}
                    token = hs(claims(who.user, **extra))
                    if n % 2:  # both ways in, over the table
                        headers["Authorization"] = f"Bearer {token}"
                    else:
                        params.append(("token", token))
                if who.grant:
                    grant = {"channel": rule.channel, "exp": int(time.time()) + 300}
                    if who.user is not None:
                        grant["sub"] = who.user
                    params.append(("sub_token", hs(grant)))
                cells += 1
                want = expected(rule, who, "subscribe")
                async with (
                    asyncio.timeout(10),
                    session.get(srv.http + endpoint, params=params, headers=headers) as r,
                ):
                    if r.status == 200:
                        # A stream says "subscribed" once every channel is; a poll without since answers.
                        first = (
                            await r.json()
                            if endpoint == "/poll"
                            else await _first_control(r, sse=endpoint == "/sse")
                        )
                        ok = "offset" in first if endpoint == "/poll" else first["type"] == "subscribed"
                        if not (want and ok):
                            wrong.append(f"{who.name} {endpoint} {rule}: expected refusal, got {first}")
                    else:
                        body = await r.json()
                        if want or (r.status, body["error"]["code"]) != (403, "permission_denied"):
                            wrong.append(f"{who.name} {endpoint} {rule}: want={want}, got {r.status} {body}")
    assert cells == len(WHO) * len(RULES) == 192
    assert not wrong, "\n".join(wrong)
    async with asyncio.timeout(10):
        while srv.node.connections:
            await asyncio.sleep(0.01)


async def _first_control(r: aiohttp.ClientResponse, *, sse: bool) -> dict[str, Any]:
    """The first JSON object of a stream: an SSE ``data:`` line, or an NDJSON line."""
    while True:
        line = (await r.content.readline()).strip()
        if not line:
            continue
        if sse:
            if not line.startswith(b"data: "):
                continue
            line = line[6:]
        obj: dict[str, Any] = orjson.loads(line)
        return obj
