"""The original Tornado chat demo's protocols, driven exactly as its chat.js does."""

from __future__ import annotations

import asyncio
import html
import re
import uuid
from typing import Any

import aiohttp
import orjson
import pytest

from tidings.transports.seed import linkify

from .conftest import ProbeFactory, Server, ServerFactory, api_headers


async def live_in_lobby(server: Server, n: int) -> list[dict[str, str]]:
    """Wait until ``n`` clients are live in chat:lobby (any transport: they are in its presence)."""
    async with asyncio.timeout(5):
        while len(clients := await server.node.presence.clients("chat:lobby")) < n:
            await asyncio.sleep(0.01)
    return clients


HOSTILE = [
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
    "</div><div class=x>",
    "a & b < c > d \" e ' f",
    "javascript:alert(1)",
    'http://example.com/"onmouseover="alert(1)',
    "https://ok.example/path?q=<b>&x='y'",
    "<svg/onload=alert(1)>",
    "&lt;already escaped&gt;",
]


async def recv_json(ws: aiohttp.ClientWebSocketResponse, timeout: float = 5.0) -> dict[str, Any]:
    msg = await asyncio.wait_for(ws.receive(), timeout)
    assert msg.type == aiohttp.WSMsgType.TEXT, msg
    obj: dict[str, Any] = orjson.loads(msg.data)
    return obj


async def test_echo(server: Server, session: aiohttp.ClientSession) -> None:
    async with session.ws_connect(f"ws://127.0.0.1:{server.port}/websocket") as ws:
        for text in ["hello", "", "ünïcødé ✓", "<b>x</b>"]:
            await ws.send_str(text)
            msg = await asyncio.wait_for(ws.receive(), 5)
            assert msg.data == f"You said: {text}"
        await ws.send_bytes(b"\x00\x01")
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1003


def _check_demo_message(m: dict[str, Any], body: str) -> None:
    assert set(m) == {"id", "body", "html"}
    assert str(uuid.UUID(m["id"])) == m["id"]
    assert m["body"] == body
    assert m["html"].startswith(f'<div class="message" id="m{m["id"]}">') and m["html"].endswith("</div>")
    inner = m["html"][len(f'<div class="message" id="m{m["id"]}">') : -len("</div>")]
    # Apart from the <a> tags of linkify, no markup survives: un-linkify and unescape gives the body back.
    text = re.sub(
        r'<a href="[^"]*" rel="nofollow noopener noreferrer" target="_blank">([^<]*)</a>', r"\1", inner
    )
    assert "<" not in text and ">" not in text
    assert html.unescape(text) == body


async def test_chatsocket_demo_protocol(server: Server, session: aiohttp.ClientSession) -> None:
    url = f"ws://127.0.0.1:{server.port}/chatsocket"
    async with session.ws_connect(url) as a, session.ws_connect(url) as b:
        # Wait until both are live subscribers of chat:lobby (they show in presence then).
        await live_in_lobby(server, 2)
        for body in ["hello from the demo", *HOSTILE]:
            # The demo's chat.js sends the whole form: body and the _xsrf field.
            await a.send_str(orjson.dumps({"body": body, "_xsrf": "2|abc"}).decode())
            ma, mb = await recv_json(a), await recv_json(b)
            assert ma == mb
            _check_demo_message(ma, body)


async def test_chatsocket_meets_ws_and_http_api(
    server: Server, session: aiohttp.ClientSession, probe: ProbeFactory
) -> None:
    async with session.ws_connect(f"ws://127.0.0.1:{server.port}/chatsocket") as demo:
        ws_client = await probe(server)
        await ws_client.ok("subscribe", channel="chat:lobby")
        await live_in_lobby(server, 2)
        await demo.send_str('{"body": "from the demo"}')
        assert (await ws_client.messages(1))[0]["data"] == {"body": "from the demo"}
        assert (await recv_json(demo))["body"] == "from the demo"
        await ws_client.ok("publish", channel="chat:lobby", data={"body": "from /ws", "nick": "ann"})
        assert (await recv_json(demo))["body"] == "from /ws"
        async with session.post(
            f"{server.http}/api/publish",
            headers=api_headers(),
            json={"channel": "chat:lobby", "data": "plain text"},
        ) as r:
            assert r.status == 200
        assert (await recv_json(demo))["body"] == "plain text"
        # Garbage is ignored as the demo did; the socket stays usable.
        for junk in ["not json", "[1,2]", '{"body": 5}', "{}"]:
            await demo.send_str(junk)
        await demo.send_str('{"body": "still here"}')
        assert (await recv_json(demo))["body"] == "still here"
        h = await ws_client.ok("history", channel="chat:lobby")
        assert [p["data"] for p in h["publications"]][-1] == {"body": "still here"}


@pytest.mark.parametrize("text", HOSTILE)
def test_linkify_escapes(text: str) -> None:
    out = linkify(text)
    stripped = re.sub(
        r'<a href="[^"]*" rel="nofollow noopener noreferrer" target="_blank">([^<]*)</a>', r"\1", out
    )
    assert "<" not in stripped and ">" not in stripped
    assert html.unescape(stripped) == text


def test_linkify_links() -> None:
    assert linkify("see https://example.com/a?b=1&c=2.") == (
        'see <a href="https://example.com/a?b=1&amp;c=2" rel="nofollow noopener noreferrer" '
        'target="_blank">https://example.com/a?b=1&amp;c=2</a>.'
    )


@pytest.mark.parametrize("path", ["/ws", "/chatsocket", "/websocket"])
async def test_cross_origin_upgrade_refused(
    start_server: ServerFactory, session: aiohttp.ClientSession, path: str
) -> None:
    srv = await start_server(allowed_origins=["https://allowed.example"])
    url = f"ws://127.0.0.1:{srv.port}{path}"
    with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
        await session.ws_connect(url, headers={"Origin": "https://evil.example"})
    assert exc.value.status == 403
    for origin in ("https://allowed.example", f"http://127.0.0.1:{srv.port}"):
        ws = await session.ws_connect(url, headers={"Origin": origin})
        await ws.close()


async def test_chatsocket_clients_are_ordinary_subscribers(
    server: Server, session: aiohttp.ClientSession
) -> None:
    """A /chatsocket client is a subscriber of chat:lobby like any other: it is in the channel's presence
    and in /api/channels, and it leaves both when it goes."""
    url = f"ws://127.0.0.1:{server.port}/chatsocket"
    async with session.ws_connect(url), session.ws_connect(url):
        clients = await live_in_lobby(server, 2)
        async with session.get(f"{server.http}/api/channels/chat:lobby/presence", headers=api_headers()) as r:
            assert (await r.json())["count"] == 2 == len(clients)
        async with session.get(f"{server.http}/api/channels", headers=api_headers()) as r:
            assert {"channel": "chat:lobby", "subscribers": 2} in (await r.json())["channels"]
    async with asyncio.timeout(5):
        while await server.node.presence.clients("chat:lobby") or server.node.hub.channels():
            await asyncio.sleep(0.01)
