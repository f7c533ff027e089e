"""The admin page (/admin) in a real browser: Playwright for Python driving Debian's Chromium.

It asks for a key, says when the key is wrong, then shows live what GET /api/stats says (the counters
and the sparkline move while the test publishes), the presence of a channel picked in the table, and
publishes from its form to a real /ws subscriber; all under the chat page's CSP, with the key in
sessionStorage and the Authorization header only. Screenshots (desktop, phone) go to
artifacts/screenshots/admin-*.png.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest

from tidings.config import ApiKey
from tidings.transports.pages import CSP

from .browser_helpers import SCREENSHOTS, T_STATE, Watch, chromium, expect
from .conftest import API_KEY, ProbeFactory, Server, ServerFactory, api_headers, make_settings
from .rawws import client_frame, raw_upgrade

if TYPE_CHECKING:
    from playwright.async_api import Browser, Page, Request

pytestmark = pytest.mark.browser

READ_KEY = "admin-page-reader-0123456789"
DESKTOP = {"viewport": {"width": 1280, "height": 800}}
PHONE = {
    "viewport": {"width": 390, "height": 844},
    "device_scale_factor": 2,
    "is_mobile": True,
    "has_touch": True,
}


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with chromium() as b:
        yield b


async def admin_server(start_server: ServerFactory, tmp_path: Path, **kw: Any) -> Server:
    settings = make_settings(tmp_path, client_rate=0.0, user_rate=0.0, **kw)
    settings.api_keys = [*settings.api_keys, ApiKey("reader", READ_KEY, "read")]
    return await start_server(settings=settings)


async def sign_in(page: Page, key: str) -> None:
    await page.fill("#key", key)
    await page.click("#key-submit")


async def shown_int(page: Page, selector: str) -> int:
    return int(await page.locator(selector).text_content() or "0")


@contextlib.asynccontextmanager
async def publishing(
    session: aiohttp.ClientSession, srv: Server, channel: str, per_second: float = 20
) -> AsyncIterator[list[int]]:
    """Publish to ``channel`` over the HTTP API in the background (``per_second``) while the block runs;
    the list yielded counts what was published."""
    count = [0]

    async def run() -> None:
        while True:
            async with session.post(
                srv.http + "/api/publish",
                json={"channel": channel, "data": {"n": count[0]}},
                headers=api_headers(),
            ) as r:
                assert r.status == 200
            count[0] += 1
            await asyncio.sleep(1 / per_second)

    task = asyncio.get_running_loop().create_task(run())
    try:
        yield count
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_admin_page_key_live_counters_presence_and_publish(
    browser: Browser, start_server: ServerFactory, session: aiohttp.ClientSession, probe: ProbeFactory,
    tmp_path: Path,
) -> None:  # fmt: skip
    srv = await admin_server(start_server, tmp_path)
    watch = Watch()
    ctx = await browser.new_context(**DESKTOP)
    page = watch.attach(await ctx.new_page(), "admin")
    # The chat page first: the browser now holds a cookie for this origin (the XSRF one), which the
    # admin page's requests must not carry (credentials: "omit").
    await page.goto(srv.http + "/")
    assert [c["name"] for c in await ctx.cookies()] == ["_xsrf"]
    requests: list[Request] = []
    page.on("request", lambda r: requests.append(r))
    resp = await page.goto(srv.http + "/admin")
    assert resp is not None and resp.status == 200
    assert resp.headers["content-security-policy"] == CSP

    # 1. No key: it asks for one, and asks the server nothing.
    await expect(page.locator("#key-form")).to_be_visible()
    await expect(page.locator("#dashboard")).to_be_hidden()
    await expect(page.locator("#key")).to_be_focused()
    await expect(page.locator("#status .status-label")).to_have_text("not signed in")
    assert not [r for r in requests if "/api/" in r.url]

    # 2. A wrong key: it says so, stays on the form, keeps nothing.
    await sign_in(page, "wrong-key-0123456789")
    await expect(page.locator("#key-error")).to_contain_text("refused", timeout=T_STATE)
    await expect(page.locator("#key-error")).to_contain_text("401")
    await expect(page.locator("#dashboard")).to_be_hidden()
    await expect(page.locator("#key")).to_have_attribute("aria-invalid", "true")
    assert await page.evaluate("sessionStorage.getItem('tidings.admin.key')") is None

    # 3. The right key: the dashboard, live; the key in sessionStorage only.
    sub = await probe(srv)
    client = (await sub.ok("connect"))["client"]
    await sub.ok("subscribe", channel="chat:lobby")
    await sign_in(page, API_KEY)
    await expect(page.locator("#dashboard")).to_be_visible(timeout=T_STATE)
    await expect(page.locator("#key-form")).to_be_hidden()
    await expect(page.locator('#status[data-state="live"]')).to_have_count(1)
    await expect(page.locator('[data-transport="ws"]')).to_have_text("1", timeout=T_STATE)
    assert await page.evaluate("sessionStorage.getItem('tidings.admin.key')") == API_KEY
    in_local = (
        "(k) => Object.keys(localStorage).some((n) => n.includes('admin') || localStorage[n].includes(k))"
    )
    assert await page.evaluate(in_local, API_KEY) is False
    assert "admin" not in str(await ctx.cookies())
    assert await page.locator("#pid").text_content() == str(os.getpid())  # the server runs in this process

    # A second /ws client and an SSE stream: the counters follow.
    other = await probe(srv)
    await other.ok("subscribe", channel="pub:other")
    sse = await session.get(srv.http + "/sse", params={"channel": "chat:lobby"})
    await expect(page.locator('[data-transport="ws"]')).to_have_text("2", timeout=T_STATE)
    await expect(page.locator('[data-transport="sse"]')).to_have_text("1", timeout=T_STATE)
    await expect(page.locator("#conn-total")).to_have_text("3")
    await expect(page.locator("#subscriptions")).to_have_text("3")

    # 4. The counters and the chart move while the test publishes.
    points_before = await page.locator("#spark-in").get_attribute("points")
    async with publishing(session, srv, "chat:lobby") as sent:
        await page.wait_for_function(
            "() => parseFloat(document.getElementById('rate-in').textContent) > 0"
            " && parseFloat(document.getElementById('rate-out').textContent) > 0",
            timeout=T_STATE,
        )
        await page.wait_for_function(
            "(n) => Number(document.getElementById('chart').dataset.samples) >= n", arg=3, timeout=T_STATE
        )
    points_after = await page.locator("#spark-in").get_attribute("points")
    assert points_after and points_after != points_before
    ys = [float(p.split(",")[1]) for p in points_after.split()]
    assert min(ys) < 70, ys  # a line above the baseline: the rate was drawn, not flat
    assert float(await page.locator("#chart-max").text_content() or "0") > 0
    n = sent[0]
    await page.wait_for_function(
        "(n) => Number(document.getElementById('published').textContent) >= n", arg=n, timeout=T_STATE
    )
    # each publication reached 2 subscribers of chat:lobby (the /ws client and the SSE stream)
    await page.wait_for_function(
        "(n) => Number(document.getElementById('delivered').textContent) >= 2 * n", arg=n, timeout=T_STATE
    )
    await sub.messages(n)

    # 5. Channels: subscriber counts and history sizes; sortable; filterable.
    rows = page.locator("#channels tbody tr")
    await expect(rows).to_have_count(2, timeout=T_STATE)
    lobby = page.locator('#channels tbody tr[data-channel="chat:lobby"] td')
    await expect(lobby.nth(1)).to_have_text("2")
    # (a publish cancelled in flight may still have landed: the server's own count is the reference)
    async with session.get(srv.http + "/api/channels/chat:lobby/history?limit=1", headers=api_headers()) as r:
        top = (await r.json())["offset"]
    assert top in (n, n + 1)
    await expect(lobby.nth(2)).to_have_text(str(min(top, 200)), timeout=T_STATE)
    first = page.locator("#channels tbody tr:first-child")
    await expect(first).to_have_attribute("data-channel", "chat:lobby")  # most subscribers first
    await page.click('th button[data-sort="channel"]')
    await expect(first).to_have_attribute("data-channel", "chat:lobby")  # ascending by name
    await expect(page.locator("#channels th").first).to_have_attribute("aria-sort", "ascending")
    await page.click('th button[data-sort="channel"]')
    await expect(first).to_have_attribute("data-channel", "pub:other")  # descending
    await expect(page.locator("#channels th").first).to_have_attribute("aria-sort", "descending")
    await page.fill("#filter", "other")
    await expect(rows).to_have_count(1, timeout=T_STATE)
    await expect(first).to_have_attribute("data-channel", "pub:other")
    assert any("q=other" in r.url for r in requests)  # filtered by the server, before its limit
    await page.fill("#filter", "")
    await expect(rows).to_have_count(2, timeout=T_STATE)

    # 6. Presence of the channel picked.
    await page.click('button[data-pick="chat:lobby"]')
    await expect(page.locator("#pres-channel")).to_have_text("chat:lobby")
    await expect(page.locator(f'#pres-list li[data-client="{client}"]')).to_have_count(1, timeout=T_STATE)
    await expect(page.locator("#pres-count")).to_have_text("2 clients")  # the /ws client and the SSE stream
    await expect(page.locator('#channels tbody tr[data-channel="chat:lobby"]')).to_have_class("selected")

    # 7. The form publishes, and a real /ws subscriber gets it.
    await expect(page.locator("#pub-channel")).to_have_value("chat:lobby")  # picked: prefilled
    await page.fill("#pub-data", '{"body": "from the admin form", "n": 7}')
    await page.click("#pub-submit")
    await expect(page.locator("#pub-result")).to_contain_text(
        "Published to chat:lobby at offset", timeout=T_STATE
    )
    async with asyncio.timeout(10):
        while True:
            got = await sub.messages(1)
            if got[0]["data"] == {"body": "from the admin form", "n": 7}:
                break
    offset = got[0]["offset"]
    await expect(page.locator("#pub-result")).to_contain_text(f"offset {offset}.")
    # Not JSON: said, nothing sent; a refused channel: the server's reason.
    await page.fill("#pub-data", "not json")
    await page.click("#pub-submit")
    await expect(page.locator("#pub-result")).to_contain_text("Data must be JSON")
    await page.fill("#pub-data", '"x"')
    await page.fill("#pub-channel", "bad name")
    await page.click("#pub-submit")
    await expect(page.locator("#pub-result")).to_contain_text("invalid_channel", timeout=T_STATE)
    # ... which shows up in the page's recent errors.
    await expect(page.locator("#errors li").first).to_contain_text("http · invalid_channel", timeout=T_STATE)

    # 8. Reload: still signed in (sessionStorage); "Forget key": asked again, nothing kept.
    await page.reload()
    await expect(page.locator("#dashboard")).to_be_visible(timeout=T_STATE)
    await page.click("#signout")
    await expect(page.locator("#key-form")).to_be_visible()
    assert await page.evaluate("sessionStorage.getItem('tidings.admin.key')") is None

    # The key went out only as the Authorization header, never in a URL.
    api = [r for r in requests if "/api/" in r.url]
    assert api and len(api) >= 5
    for r in api:
        assert API_KEY not in r.url
        headers = await r.all_headers()
        auth = headers.get("authorization", "")
        assert auth in (f"Bearer {API_KEY}", "Bearer wrong-key-0123456789"), (r.url, auth)
        assert "cookie" not in headers, (r.url, headers["cookie"])
    assert watch.problems() == [], watch.problems()
    sse.close()
    await ctx.close()


async def test_read_key_watches_but_may_not_publish(
    browser: Browser, start_server: ServerFactory, tmp_path: Path
) -> None:
    srv = await admin_server(start_server, tmp_path)
    watch = Watch()
    ctx = await browser.new_context(**PHONE)
    page = watch.attach(await ctx.new_page(), "reader")
    await page.goto(srv.http + "/admin")
    await sign_in(page, READ_KEY)
    await expect(page.locator("#dashboard")).to_be_visible(timeout=T_STATE)
    await page.fill("#pub-channel", "chat:lobby")
    await page.click("#pub-submit")
    await expect(page.locator("#pub-result")).to_have_text(
        "This key may not publish (it needs the admin or publish role).", timeout=T_STATE
    )
    # A key that stops working while the page polls (here: every bad key for a minute, 429 after 10):
    # the key is dropped and the page asks again.
    srv.node.settings.api_keys = [k for k in srv.node.settings.api_keys if k.key != READ_KEY]
    await expect(page.locator("#key-error")).to_contain_text("refused", timeout=T_STATE)
    assert await page.evaluate("sessionStorage.getItem('tidings.admin.key')") is None
    assert watch.problems() == [], watch.problems()
    await ctx.close()


async def _seed_for_screenshots(srv: Server, session: aiohttp.ClientSession, probe: ProbeFactory) -> Any:
    """Channels, an error and a slow-consumer close, so that every panel has something to show."""
    subs = [await probe(srv) for _ in range(3)]
    for i, p in enumerate(subs):
        await p.ok("subscribe", channel="chat:lobby")
        await p.ok("subscribe", channel=f"user-feed:{i}")
    await subs[0].ok("subscribe", channel="pub:orders/eu-west")
    await subs[1].request("publish", channel="ro:announcements", data="nope")  # permission_denied
    reader, writer = await raw_upgrade(srv.port, rcvbuf=4096)
    writer.write(client_frame(b'{"id":1,"op":"subscribe","channel":"pub:firehose"}'))
    await writer.drain()
    async with asyncio.timeout(10):
        while not srv.node.hub.subscribers("pub:firehose"):
            await asyncio.sleep(0.02)
        while srv.node.hub.subscribers("pub:firehose"):
            await subs[2].ok("publish", channel="pub:firehose", data="x" * 8000)
    writer.close()
    for i in range(30):
        body = {"body": f"message {i}", "nick": "seed"}
        async with session.post(
            srv.http + "/api/publish", json={"channel": "chat:lobby", "data": body}, headers=api_headers()
        ) as r:
            assert r.status == 200
    return subs, reader


async def test_admin_screenshots(
    browser: Browser, start_server: ServerFactory, session: aiohttp.ClientSession, probe: ProbeFactory,
    tmp_path: Path,
) -> None:  # fmt: skip
    """Saved to artifacts/screenshots/admin-{desktop,phone,desktop-dark,phone-login}.png on every run:
    look at them when the page changes. Nothing overflows sideways at either width."""
    srv = await admin_server(start_server, tmp_path, max_buffer=64 * 1024)
    await _seed_for_screenshots(srv, session, probe)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    watch = Watch()
    shots: list[Path] = []
    for name, kw in [
        ("desktop", DESKTOP),
        ("phone", PHONE),
        ("desktop-dark", {**DESKTOP, "color_scheme": "dark"}),
    ]:
        ctx = await browser.new_context(**kw)
        page = watch.attach(await ctx.new_page(), name)
        await page.goto(srv.http + "/admin")
        await sign_in(page, API_KEY)
        await expect(page.locator("#dashboard")).to_be_visible(timeout=T_STATE)
        async with publishing(session, srv, "chat:lobby", per_second=15):
            await page.wait_for_function(
                "() => Number(document.getElementById('chart').dataset.samples) >= 8", timeout=T_STATE
            )
        await page.click('button[data-pick="chat:lobby"]')
        await expect(page.locator("#pres-list li")).to_have_count(3, timeout=T_STATE)
        await expect(page.locator("#slow li")).to_have_count(1, timeout=T_STATE)
        await page.fill("#pub-channel", "chat:lobby")
        await page.click("#pub-submit")
        await expect(page.locator("#pub-result")).to_contain_text("Published", timeout=T_STATE)
        await page.evaluate("() => document.fonts.ready.then(() => true)")
        path = SCREENSHOTS / f"admin-{name}.png"
        await page.screenshot(path=str(path), full_page=True)
        shots.append(path)
        overflow = await page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0, (name, overflow)
        await ctx.close()
    # The login form too, on a phone.
    ctx = await browser.new_context(**PHONE)
    page = watch.attach(await ctx.new_page(), "login")
    await page.goto(srv.http + "/admin")
    await sign_in(page, "wrong-key-0123456789")
    await expect(page.locator("#key-error")).to_be_visible(timeout=T_STATE)
    path = SCREENSHOTS / "admin-phone-login.png"
    await page.screenshot(path=str(path))
    shots.append(path)
    await ctx.close()
    for path in shots:
        assert path.stat().st_size > 10_000, path
    assert watch.problems() == [], watch.problems()
