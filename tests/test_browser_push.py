"""The chat page's Web Push side in Chromium: the "Notify me" button and the service worker (/sw.js).

Chromium here cannot reach a real push service (no network, no Google push endpoint), so a push message
is delivered to the service worker through the DevTools protocol (``ServiceWorker.deliverPushMessage``):
the worker gets exactly the ``push`` event it would get from the push service, with the payload the
server sends (the /ws ``message`` push JSON). What the worker showed is read back with
``registration.getNotifications()`` in a page of the origin.

Visibility: a headless page is always ``visible``, to itself and to the worker's ``clients.matchAll``.
Tried with this Chromium (156): a second tab, ``Browser.setWindowBounds`` minimized, ``Page.
setWebLifecycleState`` frozen, another tab brought to front with focus emulation off: every window still
reports ``visible`` (only ``focused`` changes). So "a page of the room is visible" is tested with a page
at the room's URL, and "no page of the room is visible" with the page at another room's URL.

Notification clicks cannot be made in headless Chromium (no DevTools command clicks a notification, and
``clients.openWindow``/``focus`` need the click's user activation): ``notificationclick`` is not tested.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .browser_helpers import (
    SCREENSHOTS,
    Watch,
    chromium,
    chromium_profile,
    expect,
    open_page,
    send,
    wait_body,
    wait_state,
)
from .conftest import ServerFactory

if TYPE_CHECKING:
    from playwright.async_api import Browser, BrowserContext, CDPSession, Page, Route

pytestmark = pytest.mark.browser

T_PUSH = 10.0  # s: a push delivered, a notification shown, a registration seen
HOSTILE = '<b>x</b><img src=x onerror="window.__xss=1">'


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with chromium() as b:
        yield b


def vapid_public_key() -> str:
    """A valid applicationServerKey: base64url of a fresh P-256 public point (65 bytes, uncompressed)."""
    point = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    )
    return base64.urlsafe_b64encode(point).rstrip(b"=").decode()


def message_push(channel: str, offset: int, data: Any) -> str:
    """The payload the server's Web Push sender encrypts: the /ws ``message`` push, as JSON."""
    return json.dumps(
        {
            "type": "message",
            "channel": channel,
            "offset": offset,
            "epoch": "e1",
            "id": f"id-{offset}",
            "time": 1_700_000_000_000,
            "data": data,
        }
    )


# Installed in every page of a context: the service worker's report of each push it handled.
COLLECT_REPORTS = """
window.__pushReports = [];
navigator.serviceWorker.addEventListener('message', (e) => {
    if (e.data && e.data.type === 'tidings:push') window.__pushReports.push(e.data);
});
navigator.serviceWorker.startMessages();
"""


class PushDriver:
    """The page's service worker registration seen through DevTools, and push delivery to it.

    ``deliver`` waits for the worker's report of that push (its ``tidings:push`` message to the
    windows): so "not shown" is a fact the worker states, not an absence after a sleep."""

    def __init__(self, cdp: CDPSession, page: Page, origin: str) -> None:
        self.cdp = cdp
        self.page = page
        self.origin = origin
        self.registrations: dict[str, dict[str, Any]] = {}
        self.changed = asyncio.Event()
        cdp.on("ServiceWorker.workerRegistrationUpdated", self._on_update)

    def _on_update(self, params: dict[str, Any]) -> None:
        for reg in params["registrations"]:
            self.registrations[reg["registrationId"]] = reg
        self.changed.set()

    @classmethod
    async def attach(cls, ctx: BrowserContext, page: Page, origin: str) -> PushDriver:
        driver = cls(await ctx.new_cdp_session(page), page, origin)
        await driver.cdp.send("ServiceWorker.enable")
        return driver

    async def registration_id(self, scope: str) -> str:
        async with asyncio.timeout(T_PUSH):
            while True:
                for rid, reg in self.registrations.items():
                    if reg["scopeURL"] == scope and not reg["isDeleted"]:
                        return rid
                self.changed.clear()
                await self.changed.wait()

    async def deliver(self, data: str) -> dict[str, Any]:
        """Deliver one push; the worker's report of it: {channel, offset, shown}."""
        rid = await self.registration_id(self.origin + "/")
        seen = await self.page.evaluate("window.__pushReports.length")
        await self.cdp.send(
            "ServiceWorker.deliverPushMessage", {"origin": self.origin, "registrationId": rid, "data": data}
        )
        await self.page.wait_for_function(
            "(n) => window.__pushReports.length > n", arg=seen, timeout=T_PUSH * 1000
        )
        reports: list[dict[str, Any]] = await self.page.evaluate("window.__pushReports")
        assert len(reports) == seen + 1, reports[seen:]  # one push, one report
        return reports[seen]


async def notifications(page: Page) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = await page.evaluate(
        """() => navigator.serviceWorker.ready.then(r => r.getNotifications()).then(list => list.map(n => ({
               title: n.title, body: n.body, tag: n.tag, data: n.data})))"""
    )
    return result


async def close_notifications(page: Page) -> None:
    """Close every notification and wait until they are gone (close() is asynchronous: a close still in
    flight would otherwise close the next notification of the same tag)."""
    await page.evaluate(
        "navigator.serviceWorker.ready.then(r => r.getNotifications()).then(l => l.map(n => n.close()))"
    )
    async with asyncio.timeout(T_PUSH):
        while await notifications(page):
            await page.wait_for_timeout(20)


async def notification(page: Page, tag: str) -> dict[str, Any]:
    """The one notification with this tag (the worker has reported it shown)."""
    found = [n for n in await notifications(page) if n["tag"] == tag]
    assert len(found) == 1, (tag, await notifications(page))
    return found[0]


async def click_notify(page: Page) -> str:
    """Click "Notify me" and wait until the page has settled: the notice it then shows."""
    button = page.locator("#notify")
    await expect(button).to_be_visible()
    await button.click()
    await expect(page.locator("#notice")).to_be_visible(timeout=T_PUSH * 1000)
    await expect(button).to_be_enabled(timeout=T_PUSH * 1000)
    return await page.locator("#notice").inner_text()


async def serve_vapid_key_if_missing(page: Page, session: aiohttp.ClientSession, http: str) -> bool:
    """Where this server answers no ``GET /push/vapid-public-key`` (Web Push not built or not configured),
    answer it in the browser with a valid key, as the endpoint does (docs/http-api.md), so that the page
    gets as far as ``pushManager.subscribe``. True when the server's own endpoint answers."""
    async with session.get(http + "/push/vapid-public-key") as r:
        if r.status == 200:
            return True
    key = vapid_public_key()

    async def fulfil(route: Route) -> None:
        await route.fulfill(status=200, content_type="application/json", body=json.dumps({"publicKey": key}))

    await page.route("**/push/vapid-public-key", fulfil)
    return False


# ------------------------------------------------------------------------------------------- the worker


async def test_service_worker_is_served_with_its_headers(
    start_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    srv = await start_server()
    async with session.get(srv.http + "/sw.js") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].split(";")[0] == "text/javascript"
        assert r.headers["Cache-Control"] == "no-cache"  # revalidated at every update check
        assert "Service-Worker-Allowed" not in r.headers  # served at / : its scope is / without it
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert 'self.addEventListener("push"' in await r.text()
    async with session.get(srv.http + "/chat/room") as r:
        csp = r.headers["Content-Security-Policy"]
    directives = {d.split()[0]: d.split()[1:] for d in csp.split(";") if d.strip()}
    assert directives["worker-src"] == ["'self'"]
    assert directives["script-src"] == ["'self'"]


async def test_push_shows_escaped_notification_and_visible_room_suppresses(
    browser: Browser, start_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    """The page registers /sw.js; pushes delivered through DevTools are shown (sender, text as plain
    text, tag per room, the room's URL) unless a page of that room is visible."""
    srv = await start_server()
    watch = Watch()
    ctx = await browser.new_context()
    await ctx.add_init_script(COLLECT_REPORTS)
    page = watch.attach(await ctx.new_page(), "A")
    await page.goto(srv.http + "/chat/room-a")
    await wait_state(page, "connected")
    await ctx.grant_permissions(["notifications"], origin=srv.http)
    driver = await PushDriver.attach(ctx, page, srv.http)
    await serve_vapid_key_if_missing(page, session, srv.http)

    # The page's own button registers the worker (then stops at the push service: the next test).
    await click_notify(page)
    scope = await page.evaluate("navigator.serviceWorker.ready.then(r => r.scope)")
    assert scope == srv.http + "/"
    await driver.registration_id(srv.http + "/")

    # A visible page of room-a: a push for room-a is not shown; one for room-b is.
    seen = await driver.deliver(message_push("chat:room-a", 1, {"nick": "alice", "body": "seen on the page"}))
    assert seen == {"type": "tidings:push", "channel": "chat:room-a", "offset": 1, "shown": False}
    assert await notifications(page) == []
    report = await driver.deliver(message_push("chat:room-b", 7, {"nick": HOSTILE, "body": HOSTILE}))
    assert report["shown"] is True
    [shown] = await notifications(page)
    assert shown["title"] == HOSTILE[:32]  # a nickname: at most 32 characters, as the page shows it
    assert shown["body"] == HOSTILE  # plain text: shown literally, never parsed
    assert shown["tag"] == "tidings:chat:room-b"
    assert shown["data"] == {"url": srv.http + "/chat/room-b", "channel": "chat:room-b"}

    # The page moves to room-b: now room-a's pushes are shown and room-b's are not.
    await page.goto(srv.http + "/chat/room-b")
    await wait_state(page, "connected")
    report = await driver.deliver(message_push("chat:room-b", 8, {"nick": "bob", "body": "suppressed"}))
    assert report["shown"] is False
    report = await driver.deliver(
        message_push("chat:room-a", 2, {"nick": "alice", "body": "hi\u202e\u0007 there"})
    )
    assert report["shown"] is True
    shown = await notification(page, "tidings:chat:room-a")
    assert (shown["title"], shown["body"]) == ("alice", "hi there")  # bidi override and BEL removed
    assert shown["data"]["url"] == srv.http + "/chat/room-a"
    assert (await notification(page, "tidings:chat:room-b"))["body"] == HOSTILE  # not replaced

    # The lobby's page is "/"; the truncated form (payload over 4 KiB) gets a generic line.
    truncated = {"type": "message", "channel": "chat:lobby", "offset": 3, "epoch": "e1", "id": "x"}
    assert (await driver.deliver(json.dumps({**truncated, "truncated": True})))["shown"] is True
    shown = await notification(page, "tidings:chat:lobby")
    assert (shown["title"], shown["body"]) == ("#lobby", "New message in #lobby")
    assert shown["data"]["url"] == srv.http + "/"

    # A channel of an app: data.title/data.body, or the channel; a long text is cut.
    await driver.deliver(message_push("alerts:ops", 1, {"title": "disk", "body": "y" * 1000}))
    shown = await notification(page, "tidings:alerts:ops")
    assert shown["title"] == "disk" and shown["body"] == "y" * 299 + "…"
    assert shown["data"]["url"] == srv.http + "/"

    # Not a message push at all: a generic notification, and the worker keeps working.
    for junk in ["not json", "[1, 2]", '{"type": "message"}', ""]:
        await close_notifications(page)
        report = await driver.deliver(junk)
        assert report == {"type": "tidings:push", "channel": None, "offset": None, "shown": True}, junk
        shown = await notification(page, "tidings")
        assert (shown["title"], shown["body"]) == ("tidings", "New notification"), junk
    assert (await driver.deliver(message_push("chat:room-a", 3, {"nick": "al", "body": "alive"})))["shown"]
    assert (await notification(page, "tidings:chat:room-a"))["body"] == "alive"

    # Nothing of the hostile text ran anywhere, and the page broke no CSP rule.
    assert await page.evaluate("window.__xss === undefined")
    assert watch.problems() == [], watch.problems()
    await ctx.close()


# ------------------------------------------------------------------------------------------- the button


async def test_notify_button_says_why_it_cannot(
    browser: Browser, start_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    """Every way "Notify me" can fail is said in words in the page, and the page keeps working."""
    srv = await start_server()
    watch = Watch()
    ctx, page = await open_page(browser, srv.http + "/chat/room-c", watch, "C")
    requests: list[tuple[str, str]] = []
    page.on("request", lambda r: requests.append((r.method, r.url)) if "/push/" in r.url else None)
    button = page.locator("#notify")
    await expect(button).to_have_text("Notify me")

    # Permission not granted (headless Chromium answers "denied" without a grant).
    text = await click_notify(page)
    assert text.startswith("Notifications not enabled: notifications"), text
    assert "blocked" in text or "not allowed" in text, text
    assert requests == []

    await ctx.grant_permissions(["notifications"], origin=srv.http)

    # A server without Web Push: 404 from GET /push/vapid-public-key.
    async def not_found(route: Route) -> None:
        await route.fulfill(status=404, content_type="text/plain", body="404: Not Found")

    await page.route("**/push/vapid-public-key", not_found)
    text = await click_notify(page)
    assert text == "Notifications not enabled: notifications are not set up on this server", text
    await expect(button).to_have_text("Notify me")
    await page.unroute("**/push/vapid-public-key")

    # With a key, in this incognito-like context: Chromium has no Push API in private windows
    # (subscribe() fails at once with "Registration failed - permission denied"), and the page says so.
    own = await serve_vapid_key_if_missing(page, session, srv.http)
    text = await click_notify(page)
    expected = "this browser window cannot receive push messages (a private window has none)"
    assert text == "Notifications not enabled: " + expected, text
    assert ("GET", srv.http + "/push/vapid-public-key") in requests, (own, requests)
    assert ("POST", srv.http + "/push/subscriptions") not in requests
    await expect(button).to_have_text("Notify me")

    # The page works on: a message goes out and comes back; no CSP violation, no page error.
    await send(page, "still chatting")
    await wait_body(page, "still chatting")
    assert watch.problems() == [], watch.problems()
    await ctx.close()


# A browser whose push service answers: PushManager.subscribe/getSubscription replaced by a stand-in
# subscription (the one thing this Chromium cannot do), so the page's own calls can be checked.
FAKE_PUSH_MANAGER = """
(() => {
    let current = null;
    window.__unsubscribed = 0;
    const make = (id, key) => ({
        endpoint: 'https://push.example/send/' + id,
        options: {userVisibleOnly: true, applicationServerKey: new Uint8Array(key).buffer},
        toJSON() {
            return {endpoint: this.endpoint, expirationTime: null, keys: {p256dh: 'P' + id, auth: 'A' + id}};
        },
        unsubscribe() {
            localStorage.removeItem('fake.sub'); current = null; window.__unsubscribed++;
            return Promise.resolve(true);
        },
    });
    PushManager.prototype.subscribe = function (options) {
        const key = Array.from(new Uint8Array(options.applicationServerKey));
        const saved = [String(Math.random()).slice(2), key];
        localStorage.setItem('fake.sub', JSON.stringify(saved));
        current = make(...saved);
        return Promise.resolve(current);
    };
    PushManager.prototype.getSubscription = function () {
        const saved = JSON.parse(localStorage.getItem('fake.sub') || 'null');
        if (!current && saved) current = make(...saved);
        return Promise.resolve(current);
    };
})();
"""


async def test_notify_and_stop_send_the_documented_requests(
    browser: Browser, start_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    """With a push service that answers (a stand-in PushManager): "Notify me" POSTs the subscription and
    the room's channel (plus the rooms already asked for), "Stop notifications" DELETEs by endpoint and
    re-registers the remaining rooms; the state survives a reload; a refusal is said in words."""
    srv = await start_server()
    watch = Watch()
    ctx = await browser.new_context()
    await ctx.add_init_script(FAKE_PUSH_MANAGER)
    await ctx.grant_permissions(["notifications"], origin=srv.http)
    calls: list[tuple[str, Any]] = []
    refuse: list[bool] = []

    async def push_api(route: Route) -> None:
        req = route.request
        body = json.loads(req.post_data or "null")
        assert req.headers.get("content-type") == "application/json"
        calls.append((req.method, body))
        if refuse:
            err = {"error": {"code": "forbidden", "message": "not allowed to subscribe to chat:room-h"}}
            await route.fulfill(status=403, content_type="application/json", body=json.dumps(err))
        elif req.method == "POST":
            await route.fulfill(status=201, content_type="application/json", body="{}")
        else:
            await route.fulfill(status=204)

    page = watch.attach(await ctx.new_page(), "F")
    await serve_vapid_key_if_missing(page, session, srv.http)
    # Stood in for in every case: the stand-in endpoint (push.example) is no address a server accepts.
    await page.route("**/push/subscriptions", push_api)
    button = page.locator("#notify")

    await page.goto(srv.http + "/chat/room-f")
    await wait_state(page, "connected")
    assert await click_notify(page) == "You will be notified of new messages in #room-f."
    await expect(button).to_have_text("Stop notifications")
    await expect(button).to_have_attribute("aria-pressed", "true")
    [(method, body)] = calls
    assert method == "POST" and body["channels"] == ["chat:room-f"]
    sub = body["subscription"]
    assert set(sub) == {"endpoint", "expirationTime", "keys"} and set(sub["keys"]) == {"p256dh", "auth"}
    endpoint = sub["endpoint"]

    await page.reload()  # the state comes back from the browser's subscription and localStorage
    await wait_state(page, "connected")
    await expect(button).to_have_text("Stop notifications")

    await page.goto(srv.http + "/chat/room-g")  # another room: not subscribed there yet
    await wait_state(page, "connected")
    await expect(button).to_have_text("Notify me")
    calls.clear()
    await click_notify(page)
    assert calls == [("POST", {"subscription": sub, "channels": ["chat:room-f", "chat:room-g"]})]

    calls.clear()  # stop room-g: unregister, then register what remains
    assert await click_notify(page) == "Notifications for #room-g stopped."
    assert calls == [
        ("DELETE", {"endpoint": endpoint}),
        ("POST", {"subscription": sub, "channels": ["chat:room-f"]}),
    ]
    await expect(button).to_have_text("Notify me")
    assert await page.evaluate("window.__unsubscribed") == 0  # room-f still wants pushes

    await page.goto(srv.http + "/chat/room-f")
    await wait_state(page, "connected")
    calls.clear()  # stop the last room: unregister and drop the browser's subscription
    await click_notify(page)
    assert calls == [("DELETE", {"endpoint": endpoint})]
    assert await page.evaluate("window.__unsubscribed") == 1
    await expect(button).to_have_text("Notify me")

    await page.goto(srv.http + "/chat/room-h")
    await wait_state(page, "connected")
    refuse.append(True)
    text = await click_notify(page)
    assert text == "Notifications not enabled: the server refused (not allowed to subscribe to chat:room-h)"
    await expect(button).to_have_text("Notify me")
    assert watch.problems() == [], watch.problems()
    await ctx.close()


async def test_notify_button_without_push_service(
    start_server: ServerFactory, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A real profile (not incognito): Chromium here cannot reach its push service (no network), its
    subscribe() never answers, and after the page's 15 s the page says "push service unavailable".
    Where a push service does answer, the page goes on to POST /push/subscriptions: checked instead."""
    srv = await start_server()
    watch = Watch()
    async with chromium_profile(tmp_path / "profile") as ctx:
        await ctx.grant_permissions(["notifications"], origin=srv.http)
        page = watch.attach(await ctx.new_page(), "profile")
        requests: list[tuple[str, str]] = []
        page.on("request", lambda r: requests.append((r.method, r.url)) if "/push/" in r.url else None)
        await page.goto(srv.http + "/chat/room-e")
        await wait_state(page, "connected")
        await serve_vapid_key_if_missing(page, session, srv.http)
        button = page.locator("#notify")
        await button.click()
        await expect(button).to_be_disabled()  # busy while the browser tries its push service
        await expect(page.locator("#notice")).to_be_visible(timeout=25_000)
        text = await page.locator("#notice").inner_text()
        if "push service unavailable" in text:
            assert text.startswith("Notifications not enabled: push service unavailable"), text
            assert ("POST", srv.http + "/push/subscriptions") not in requests
            await expect(button).to_have_text("Notify me")
            await expect(button).to_be_enabled()
        else:  # pragma: no cover - a Chromium that reaches a push service
            assert ("POST", srv.http + "/push/subscriptions") in requests, (text, requests)
        await send(page, "still here")
        await wait_body(page, "still here")
    assert watch.problems() == [], watch.problems()


async def test_notify_button_hidden_without_push_support(
    browser: Browser, start_server: ServerFactory
) -> None:
    """A browser without PushManager gets no button (and no error)."""
    srv = await start_server()
    watch = Watch()
    ctx = await browser.new_context()
    await ctx.add_init_script("delete window.PushManager")
    page = watch.attach(await ctx.new_page(), "no-push")
    await page.goto(srv.http + "/chat/room-d")
    await wait_state(page, "connected")
    await expect(page.locator("#notify")).to_be_hidden()
    assert watch.problems() == [], watch.problems()
    await ctx.close()


async def test_notify_button_screenshots(browser: Browser, start_server: ServerFactory) -> None:
    """artifacts/screenshots/chat-notify-{desktop,phone}.png: the top bar with the button; nothing
    overflows sideways on a phone."""
    srv = await start_server()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    watch = Watch()
    for name, kw in [
        ("desktop", {"viewport": {"width": 1280, "height": 800}}),
        (
            "phone",
            {
                "viewport": {"width": 390, "height": 844},
                "device_scale_factor": 2,
                "is_mobile": True,
                "has_touch": True,
            },
        ),
    ]:
        ctx, page = await open_page(browser, srv.http + "/chat/notify-room", watch, name, **kw)
        await send(page, f"Hello from the {name}")
        await wait_body(page, f"Hello from the {name}")
        await expect(page.locator("#notify")).to_be_visible()
        box = await page.locator("#notify").bounding_box()
        width = kw["viewport"]["width"]  # type: ignore[index]
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width, (name, box)
        overflow = await page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0, (name, overflow)
        path = SCREENSHOTS / f"chat-notify-{name}.png"
        await page.screenshot(path=str(path))
        assert path.stat().st_size > 10_000
        await ctx.close()
    assert watch.problems() == [], watch.problems()
