"""EventSource in headless Chromium against /sse: live messages; after a server restart (a real
``tidings serve`` with the SQLite broker) and after a network cut (tests/tcp_balancer.py), the browser's
own reconnect, with the Last-Event-ID it sends by itself, gets exactly what it missed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest

from tidings.config import Namespace

from .browser_helpers import Watch, chromium
from .conftest import API_KEY, ServerFactory, api_headers
from .serve_process import Node
from .tcp_balancer import TcpBalancer

if TYPE_CHECKING:
    from playwright.async_api import Browser, Page, Request

pytestmark = pytest.mark.browser

# The page's script: an EventSource, and what it saw (messages with their lastEventId, other events).
PAGE = """(url) => {
  window.got = []; window.events = [];
  const es = window.es = new EventSource(url);
  es.onmessage = (e) => window.got.push({id: e.lastEventId, msg: JSON.parse(e.data)});
  for (const kind of ["reset", "subscribed", "disconnect"]) {
    es.addEventListener(kind, (e) => window.events.push({kind, id: e.lastEventId, body: JSON.parse(e.data)}));
  }
  es.onerror = () => window.events.push({kind: "error", state: es.readyState});
}"""


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with chromium() as b:
        yield b


async def sse_page(browser: Browser, origin: str, url: str, watch: Watch) -> tuple[Page, list[Request]]:
    """A page on the server's own origin (``/healthz``, CSP bypassed for evaluate) running the script;
    the EventSource requests it makes are kept, to read the headers the browser sent."""
    page = watch.attach(await (await browser.new_context(bypass_csp=True)).new_page(), "sse")
    requests: list[Request] = []
    page.on("request", lambda req: requests.append(req) if "/sse?" in req.url else None)
    await page.goto(f"{origin}/healthz")
    await page.evaluate(PAGE, url)
    await page.wait_for_function("window.events.some((e) => e.kind === 'subscribed')", timeout=15_000)
    return page, requests


async def publish(session: aiohttp.ClientSession, http: str, channel: str, data: Any) -> int:
    async with session.post(
        f"{http}/api/publish", json={"channel": channel, "data": data}, headers=api_headers(API_KEY)
    ) as r:
        assert r.status == 200, await r.text()
        return int((await r.json())["offset"])


async def wait_got(page: Page, n: int, timeout: float = 20_000) -> list[dict[str, Any]]:
    await page.wait_for_function(f"window.got.length >= {n}", timeout=timeout)
    got: list[dict[str, Any]] = await page.evaluate("window.got")
    return got


async def last_event_ids(requests: list[Request]) -> list[str | None]:
    return [(await r.all_headers()).get("last-event-id") for r in requests]


async def test_event_source_receives_live_messages(
    browser: Browser, start_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    srv = await start_server()
    watch = Watch()
    page, requests = await sse_page(browser, srv.http, "/sse?channel=pub:live&channel=pub:other", watch)
    for i in range(3):
        await publish(session, srv.http, "pub:live", {"i": i, "text": "<b>&"})
    await publish(session, srv.http, "pub:other", "o")
    got = await wait_got(page, 4)
    assert [(g["msg"]["channel"], g["msg"]["offset"]) for g in got] == [
        ("pub:live", 1),
        ("pub:live", 2),
        ("pub:live", 3),
        ("pub:other", 1),
    ]
    assert got[0]["msg"]["data"] == {"i": 0, "text": "<b>&"} and got[0]["msg"]["type"] == "message"
    epochs = next(
        e["body"]["channels"] for e in await page.evaluate("window.events") if e["kind"] == "subscribed"
    )
    assert got[-1]["id"] == f"3:{epochs[0]['epoch']};1:{epochs[1]['epoch']}"
    assert await last_event_ids(requests) == [None]
    assert not watch.problems(), watch.problems()


async def _missed_exactly(
    page: Page,
    requests: list[Request],
    session: aiohttp.ClientSession,
    http: str,
    before: list[dict[str, Any]],
) -> None:
    """After the browser is back: it got 4..6 once each, in order, through a reconnect that sent the id
    of the last message it had as Last-Event-ID."""
    got = await wait_got(page, 6, timeout=30_000)
    await publish(session, http, "news:x", "live again")
    got = await wait_got(page, 7)
    assert [g["msg"]["offset"] for g in got] == [1, 2, 3, 4, 5, 6, 7]
    assert [g["msg"]["data"] for g in got[3:6]] == ["missed 0", "missed 1", "missed 2"]
    sent = await last_event_ids(requests)
    assert sent[0] is None and before[-1]["id"] in sent[1:], sent
    assert sent[-1] == before[-1]["id"]  # the reconnect that got through asked from message 3
    subscribed = [e for e in await page.evaluate("window.events") if e["kind"] == "subscribed"]
    assert subscribed[-1]["body"]["channels"][0]["recovered"] is True
    assert not [e for e in await page.evaluate("window.events") if e["kind"] == "reset"]


@pytest.mark.timeout(120)
async def test_event_source_recovers_after_a_server_restart(
    browser: Browser, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """``tidings serve`` (SQLite) behind the balancer: 3 messages; SIGTERM (the stream is drained with
    a disconnect 1001); while the browser cannot get back in, the restarted server gets 3 more; then the
    browser's own reconnect gets exactly those."""
    node = Node(tmp_path, f"sqlite:///{tmp_path / 'tidings.db'}", "a", sse_retry="0.3")
    try:
        await node.ready(session)
        backend = ("127.0.0.1", node.port)
        async with TcpBalancer([backend]) as bal:
            watch = Watch()
            page, requests = await sse_page(browser, bal.url, "/sse?channel=news:x", watch)
            for i in range(3):
                await publish(session, node.http, "news:x", f"before {i}")
            before = await wait_got(page, 3)
            bal.backends.clear()  # keep the browser out until the missed messages exist
            assert await asyncio.to_thread(node.stop) == 0
            await page.wait_for_function("window.events.some((e) => e.kind === 'disconnect')", timeout=15_000)
            bye = next(e for e in await page.evaluate("window.events") if e["kind"] == "disconnect")
            assert bye["body"]["code"] == 1001 and bye["body"]["reconnect"] is True
            node.spawn()
            await node.ready(session)
            for i in range(3):
                await publish(session, node.http, "news:x", f"missed {i}")
            n_before = len(requests)
            bal.backends.append(backend)
            await _missed_exactly(page, requests, session, node.http, before)
            assert len(requests) > n_before
            assert not watch.problems(), watch.problems()
    finally:
        node.stop()


@pytest.mark.timeout(120)
async def test_event_source_recovers_after_a_network_cut(
    browser: Browser, start_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    srv = await start_server(sse_retry=0.3, namespaces={"news": Namespace("news")})
    backend = ("127.0.0.1", srv.port)
    async with TcpBalancer([backend]) as bal:
        watch = Watch()
        page, requests = await sse_page(browser, bal.url, "/sse?channel=news:x", watch)
        for i in range(3):
            await publish(session, srv.http, "news:x", f"before {i}")
        before = await wait_got(page, 3)
        bal.backends.clear()
        assert bal.cut() >= 2  # the browser's side and the server's side
        await page.wait_for_function("window.events.some((e) => e.kind === 'error')", timeout=15_000)
        async with asyncio.timeout(10):  # the server saw the connection go
            while srv.node.connections:
                await asyncio.sleep(0.02)
        for i in range(3):
            await publish(session, srv.http, "news:x", f"missed {i}")
        bal.backends.append(backend)
        await _missed_exactly(page, requests, session, srv.http, before)
        assert not watch.problems(), watch.problems()
