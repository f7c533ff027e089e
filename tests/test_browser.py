"""The chat page in a real browser: Playwright for Python driving Debian's Chromium.

Each test launches its own Chromium (about half a second) and gives every simulated person their own
browser context, so each has their own localStorage (nickname) and their own network switch. Every
wait is bounded; "no duplicate arrived later" is checked with a barrier message published last (pages
show messages in offset order, so once the barrier is shown everything before it has been delivered).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
from aiohttp import web

from tidings.auth import read_api_key

from .browser_helpers import (
    SCREENSHOTS,
    T_RECONNECT,
    T_STATE,
    Watch,
    api_history,
    api_publish,
    assert_once_in_order,
    barrier,
    chromium,
    expect,
    messages,
    open_page,
    presence_count,
    send,
    set_hidden,
    set_nick,
    wait_body,
    wait_count,
    wait_not_state,
    wait_state,
)
from .conftest import Proc, ServerFactory, bound_socket

if TYPE_CHECKING:
    from playwright.async_api import Browser, Page

pytestmark = pytest.mark.browser


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with chromium() as b:
        yield b


# --------------------------------------------------------------------------------------- 1. two pages


async def test_two_pages_chat(
    browser: Browser, start_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    srv = await start_server()
    watch = Watch()
    _, a = await open_page(browser, srv.http + "/", watch, "A")
    _, b = await open_page(browser, srv.http + "/", watch, "B")
    await set_nick(a, "alice")
    await set_nick(b, "bob")

    # A conversation, turn by turn: each waits to see the other's line before answering.
    lines = [(a, "hi bob"), (b, "hey alice 👋"), (a, "how is the phone?"), (b, "fine\nand two lines")]
    for page, text in lines:
        await send(page, text)
        other = b if page is a else a
        await wait_body(other, text)

    # Both type at once: the order is the server's, the same on both pages.
    for i in range(5):
        await send(a, f"a burst {i}")
        await send(b, f"b burst {i}")
    mark = await barrier([a, b], srv.http, session, "two pages")

    n = len(lines) + 10 + 1
    await wait_count(a, n)
    await wait_count(b, n)
    ma, mb = await messages(a), await messages(b)
    assert ma == mb
    assert [m["offset"] for m in ma] == list(range(1, n + 1))
    bodies = [m["body"] for m in ma]
    assert bodies[: len(lines)] == [t for _, t in lines]
    assert bodies[-1] == mark
    burst = bodies[len(lines) : -1]
    assert sorted(burst) == sorted([f"a burst {i}" for i in range(5)] + [f"b burst {i}" for i in range(5)])
    assert [x for x in burst if x.startswith("a")] == [f"a burst {i}" for i in range(5)]
    assert [x for x in burst if x.startswith("b")] == [f"b burst {i}" for i in range(5)]
    assert {m["nick"] for m in ma} == {"alice", "bob", "barrier"}
    # Own messages are marked as such on each side.
    assert await a.locator("#messages .message.own").count() == 2 + 5
    assert await b.locator("#messages .message.own").count() == 2 + 5
    await expect(a.locator("#online-count")).to_have_text("2 online", timeout=T_STATE)

    # Unread count in the title while the page is hidden (visibility emulated: headless tabs are visible).
    await set_hidden(b, True)
    for i in range(3):
        await send(a, f"while hidden {i}")
    await expect(b).to_have_title("(3) #lobby · tidings", timeout=T_STATE)
    await set_hidden(b, False)
    await expect(b).to_have_title("#lobby · tidings", timeout=T_STATE)
    await expect(a).to_have_title("#lobby · tidings")  # own messages never count as unread
    assert watch.problems() == []


# ------------------------------------------------------------------------------------------ 2. offline


async def test_offline_page_catches_up(
    browser: Browser, start_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    srv = await start_server()
    watch = Watch()
    _, a = await open_page(browser, srv.http + "/", watch, "A")
    ctx_b, b = await open_page(browser, srv.http + "/", watch, "B")
    await set_nick(a, "alice")
    await send(a, "before")
    await wait_body(b, "before")
    assert await presence_count(session, srv.http) == 2

    await ctx_b.set_offline(True)
    await wait_not_state(b, "connected")
    # The socket really is gone: the server no longer counts B in the room.
    async with asyncio.timeout(10):
        while await presence_count(session, srv.http) != 1:
            await asyncio.sleep(0.05)
    await expect(b.locator("#status .status-label")).to_have_text("offline")

    sent = [f"while B was offline {i}" for i in range(1, 21)]
    for text in sent:
        await send(a, text)
    await wait_body(a, sent[-1])
    await wait_count(a, 21)
    assert await b.locator("#messages .message").count() == 1  # nothing reached B

    await ctx_b.set_offline(False)
    await wait_state(b, "connected", T_RECONNECT)
    mark = await barrier([a, b], srv.http, session, "offline")
    await wait_count(b, 22)
    mb = await messages(b)
    assert_once_in_order(mb)
    assert [m["offset"] for m in mb] == list(range(1, 23))
    assert [m["body"] for m in mb] == ["before", *sent, mark]
    assert mb == await messages(a)
    assert await presence_count(session, srv.http) == 2

    # Now the socket dies under the page with no `offline` event (as when a proxy or NAT drops it):
    # the server aborts B's TCP connection. B must notice, reconnect on its own and catch up, while A
    # keeps talking (B may come back in the middle: replay and live pushes must not overlap).
    await b.evaluate(
        """() => { window.__states = [];
                   window.tidingsChat.client.on('state', (s) => window.__states.push(s)); }"""
    )
    b_id = await b.evaluate("window.tidingsChat.client.clientId")
    conns = [c for c in srv.node.connections if getattr(c, "client_id", None) == b_id]
    assert len(conns) == 1, b_id
    conns[0].transport.abort()  # type: ignore[attr-defined]
    await b.wait_for_function("() => window.__states.includes('disconnected')", timeout=T_STATE)
    more = [f"while B's socket was cut {i}" for i in range(1, 21)]
    for text in more:
        await send(a, text)
    await wait_state(b, "connected", T_RECONNECT)
    mark2 = await barrier([a, b], srv.http, session, "socket cut")
    await wait_count(b, 43)
    mb = await messages(b)
    assert [m["offset"] for m in mb] == list(range(1, 44))
    assert [m["body"] for m in mb] == ["before", *sent, mark, *more, mark2]
    assert mb == await messages(a)
    assert watch.problems() == []


# ------------------------------------------------------------------------------------------ 3. restart


async def _restart(proc: Proc, pages: list[Page], kill: bool, typed: str) -> None:
    """Stop the server, wait until the pages show it, type a message on the first page, start again."""
    if kill:
        await asyncio.to_thread(proc.kill9)
    else:
        await asyncio.to_thread(proc.stop)
    for p in pages:
        await wait_not_state(p, "connected")
        await expect(p.locator("#status .status-label")).to_have_text("reconnecting…")
    # Typed while the server is down: tidings.js holds the publish (up to 15 s) until it reconnects.
    await send(pages[0], typed)
    await asyncio.to_thread(proc.start)


async def test_server_restart_loses_nothing(
    browser: Browser, subprocess_server: Callable[..., Proc], session: aiohttp.ClientSession
) -> None:
    proc = subprocess_server()
    key = read_api_key(proc.data_dir)
    assert key
    watch = Watch()
    _, a = await open_page(browser, proc.http + "/", watch, "A")
    _, b = await open_page(browser, proc.http + "/", watch, "B")
    await set_nick(a, "alice")
    await set_nick(b, "bob")
    expected: list[str] = []

    async def say(page: Page, text: str) -> None:
        await send(page, text)
        expected.append(text)

    for i in range(3):
        await say(a, f"before restart {i}")
        await say(b, f"reply before restart {i}")
    await wait_body(a, expected[-1])

    for kill in (True, False):
        how = "kill -9" if kill else "graceful stop"
        await _restart(proc, [a, b], kill, typed=f"typed by alice while the server was down ({how})")
        expected.append(f"typed by alice while the server was down ({how})")
        # Published while the pages are still cut off (they reconnect with backoff, so they are away).
        for i in range(5):
            text = f"api after {how} {i}"
            await api_publish(session, proc.http, text, nick="carol", key=key)
            expected.append(text)
        for p in (a, b):
            await wait_state(p, "connected", T_RECONNECT)
            await wait_body(p, expected[-1])
            await wait_body(p, expected[-6])  # the message typed while down went out after the reconnect
        await say(b, f"bob is back after {how}")
        await say(a, f"alice is back after {how}")
        await wait_body(b, expected[-1])
        await wait_body(a, expected[-2])

    await api_publish(session, proc.http, "the end", key=key)
    expected.append("the end")
    for p in (a, b):
        await wait_body(p, "the end")
        await wait_count(p, len(expected))
    ma, mb = await messages(a), await messages(b)
    assert ma == mb
    assert ma == await api_history(session, proc.http, key)  # exactly what the server stored, in order
    assert [m["offset"] for m in ma] == list(range(1, len(expected) + 1))
    # Whether alice's queued message went out before or after carol's depends on who reconnected
    # first; everything else is in the order it was sent.
    assert sorted(m["body"] for m in ma) == sorted(expected)
    queued = [m["body"] for m in ma if m["body"].startswith("typed by alice")]
    assert [m["body"] for m in ma if not m["body"].startswith("typed")] == [
        t for t in expected if not t.startswith("typed")
    ]
    assert queued == [t for t in expected if t.startswith("typed")]

    # What the server renders on a fresh load is the same list.
    await b.reload()
    await wait_state(b, "connected")
    assert await messages(b) == ma
    assert watch.problems() == []


# ---------------------------------------------------------------------------------------------- 4. XSS

XSS = [
    "<script>window.__xss='script'</script>",
    "<img src=x onerror=\"window.__xss='img'\">",
    "<svg onload=\"window.__xss='svg'\"></svg>",
    "<svg><script>window.__xss='svgscript'</script></svg>",
    "\"><script>window.__xss='breakout'</script>",
    "'><img src=x onerror=alert('sq')>",
    "</div></article><img src=x onerror=alert('close')>",
    "</textarea><script>alert('textarea')</script>",
    '</script><script>alert("json")</script>',
    "javascript:alert('js-url')",
    "<a href=\"javascript:alert('href')\">click me</a>",
    "<iframe src=\"javascript:alert('iframe')\"></iframe>",
    "<body onload=alert('body')>",
    "<details open ontoggle=\"window.__xss='details'\">",
    "<input autofocus onfocus=\"window.__xss='focus'\">",
    "<video><source onerror=\"window.__xss='video'\"></video>",
    "<math><mtext><table><mglyph><style><img src=x onerror=\"window.__xss='mxss'\">",
    "<noscript><p title=\"</noscript><img src=x onerror=alert('noscript')>\">",
    "<object data=\"javascript:alert('object')\"></object>",
    "<style>body{display:none}</style>",
    '<meta http-equiv="refresh" content="0;url=javascript:alert(\'meta\')">',
    "<base href=\"javascript:alert('base')//\">",
    "{{7*7}} {{ config }} ${7*7} #{7*7} <%= 7*7 %>",
    "{% raw %}{{ '<script>' }}{% endraw %}",
    "&lt;b&gt;not bold&lt;/b&gt; &amp; &quot; &#x3C;script&#x3E; &nbsp;",
    'https://example.com/"onmouseover="window.__xss=\'attr\'"',
    "http://x.example/<script>window.__xss='url'</script>",
    "https://ok.example/path?q=<b>&r='y'#\"frag\"",
    "data:text/html,<script>alert('data')</script>",
    "\u202eevil RTL <b>bold</b>",
    "<!-- comment --><![CDATA[x]]>",
    "<scr<script>ipt>window.__xss='nested'</scr</script>ipt>",
]
# The elements chat.js itself builds inside #messages; anything else there was injected.
APP_ELEMENTS = {"ARTICLE", "DIV", "SPAN", "TIME", "A"}


async def _assert_inert(page: Page, payloads: list[str]) -> None:
    shown = [m["body"] for m in await messages(page)]
    for p in payloads:
        assert shown.count(p) == 3, (p, shown.count(p))  # from the page, the HTTP API and /chatsocket
    state = await page.evaluate(
        """() => ({
            xss: window.__xss === undefined ? null : String(window.__xss),
            tags: Array.from(new Set(
                Array.from(document.querySelectorAll('#messages *')).map(e => e.tagName))),
            hrefs: Array.from(document.querySelectorAll('#messages a')).map(a => a.getAttribute('href')),
            handlers: Array.from(document.querySelectorAll('#messages *')).flatMap(
                e => Array.from(e.attributes).map(a => a.name).filter(n => n.startsWith('on'))),
            scripts: document.scripts.length,
            title: document.title,
            bodyVisible: getComputedStyle(document.body).display !== 'none',
        })"""
    )
    assert state["xss"] is None
    assert set(state["tags"]) <= APP_ELEMENTS, state["tags"]
    assert all(h.startswith(("http://", "https://")) for h in state["hrefs"]), state["hrefs"]
    assert state["handlers"] == []
    assert state["scripts"] == 3  # tidings.js, chat.js and the JSON config
    assert state["bodyVisible"]
    assert state["title"] == "#lobby · tidings"  # no {{7*7}} = 49 anywhere, no unread count


async def test_xss_payloads_are_text(
    browser: Browser, start_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    srv = await start_server()
    watch = Watch()
    _, a = await open_page(browser, srv.http + "/", watch, "A")
    # B ignores the page's CSP, so only the rendering code stands between a payload and execution.
    _, b = await open_page(browser, srv.http + "/", watch, "B", bypass_csp=True)
    await set_nick(a, "mallory")

    for p in XSS:
        await send(a, p)
    for p in XSS:
        await api_publish(session, srv.http, p, nick=p)  # hostile nicknames too
    async with session.ws_connect(f"ws://127.0.0.1:{srv.port}/chatsocket") as ws:
        for p in XSS:
            await ws.send_json({"body": p})
        # The demo protocol sends every message to every client, the sender too, escaped in "html".
        got: list[str] = []
        async with asyncio.timeout(10):
            while len(got) < len(XSS):
                got.append((await ws.receive_json())["body"])
        assert got == XSS
    await barrier([a, b], srv.http, session, "xss")

    n = 3 * len(XSS) + 1
    for page in (a, b):
        await wait_count(page, n)
        ms = await messages(page)
        assert_once_in_order(ms)
        bodies = [m["body"] for m in ms]
        assert bodies[: len(XSS)] == XSS
        assert bodies[len(XSS) : 2 * len(XSS)] == XSS
        assert bodies[2 * len(XSS) : 3 * len(XSS)] == XSS
        await _assert_inert(page, XSS)
        # Hostile nicknames are text as well (the page shows at most 32 characters of a nickname).
        nicks = await page.locator("#messages .message .nick").all_text_contents()
        for p in XSS:
            assert p[:32].strip() in nicks

    # Server-rendered on reload: the same, still inert (B without CSP again).
    for page in (a, b):
        await page.reload()
        await wait_state(page, "connected")
        await wait_count(page, n)
        await _assert_inert(page, XSS)
    assert [m["body"] for m in await messages(b)][: len(XSS)] == XSS

    # Nothing ran and nothing was even attempted: no dialog, no page error, and no CSP report on A
    # (a report would mean some payload got parsed as HTML and only the CSP stopped it).
    assert watch.dialogs == []
    assert watch.errors == []
    assert watch.csp_violations() == []


# ------------------------------------------------------------------------------------- 5. cross-origin


async def _try_socket(page: Page, url: str) -> dict[str, Any]:
    """Open a WebSocket from the page; report what happened (bounded by page-side timeouts)."""
    result: dict[str, Any] = await page.evaluate(
        """(url) => new Promise((resolve) => {
            const ev = [];
            let ws;
            try { ws = new WebSocket(url); } catch (e) { resolve({events: ['throw:' + e.name]}); return; }
            const done = () => resolve({events: ev});
            const timer = setTimeout(() => { ev.push('timeout'); done(); }, 5000);
            ws.onopen = () => { ev.push('open'); clearTimeout(timer); ws.close(); done(); };
            // After an error the close event can lag (seen for localhost -> 127.0.0.1): give it 1 s.
            ws.onerror = () => { ev.push('error'); setTimeout(done, 1000); };
            ws.onclose = (e) => { ev.push('close:' + e.code); clearTimeout(timer); done(); };
        })""",
        url,
    )
    return result


async def _foreign_site() -> tuple[web.AppRunner, int]:
    async def index(request: web.Request) -> web.Response:
        return web.Response(
            text="<!doctype html><title>elsewhere</title><p>another site</p>", content_type="text/html"
        )

    app = web.Application()
    app.router.add_get("/", index)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = bound_socket()
    await web.SockSite(runner, sock).start()
    return runner, sock.getsockname()[1]


async def test_cross_origin_page_cannot_open_socket(browser: Browser, start_server: ServerFactory) -> None:
    srv = await start_server()
    runner, other_port = await _foreign_site()
    other = f"http://127.0.0.1:{other_port}"
    allowing = await start_server(allowed_origins=[other])
    try:
        watch = Watch()
        ctx = await browser.new_context()
        page = watch.attach(await ctx.new_page(), "foreign")
        await page.goto(other + "/")
        paths = ["/ws", "/chatsocket", "/websocket"]
        for path in paths:
            r = await _try_socket(page, f"ws://127.0.0.1:{srv.port}{path}")
            assert r["events"][:2] == ["error", "close:1006"], (path, r)
            # ... while a server that lists this origin lets it in.
            r = await _try_socket(page, f"ws://127.0.0.1:{allowing.port}{path}")
            assert r["events"] == ["open"], (path, r)

        # The same script on the tidings origin itself succeeds.
        await page.goto(srv.http + "/")
        await wait_state(page, "connected")
        for path in paths:
            r = await _try_socket(page, f"ws://127.0.0.1:{srv.port}{path}")
            assert r["events"] == ["open"], (path, r)
        # localhost:<port> is another origin than 127.0.0.1:<port>.
        await page.goto(f"http://localhost:{srv.port}/")
        r = await _try_socket(page, f"ws://127.0.0.1:{srv.port}/ws")
        assert r["events"][0] == "error" and "open" not in r["events"], r
        r = await _try_socket(page, f"ws://localhost:{srv.port}/ws")
        assert r["events"] == ["open"], r
        assert watch.dialogs == [] and watch.errors == []
        await ctx.close()
    finally:
        await runner.cleanup()


# -------------------------------------------------------------------------------- 6. form POST, no JS


async def test_form_post_without_javascript(
    browser: Browser, start_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    srv = await start_server()
    watch = Watch()
    _, live = await open_page(browser, srv.http + "/", watch, "live")
    ctx, page = await open_page(browser, srv.http + "/", watch, "nojs", java_script_enabled=False)
    await expect(page.locator("#composer")).to_have_attribute("action", "/chat/lobby/messages")
    await expect(page.locator("#composer")).to_have_attribute("method", "post")
    cookies = {c["name"]: c for c in await ctx.cookies()}
    assert cookies["_xsrf"]["httpOnly"] and cookies["_xsrf"]["sameSite"] == "Strict"
    token = await page.locator("input[name=_xsrf]").get_attribute("value")
    assert token == cookies["_xsrf"]["value"]

    await page.fill("#nick", "nojs")
    await page.fill("#text", "posted without <b>JS</b> & https://example.com/x")
    async with page.expect_navigation():
        await page.click("#send")
    assert page.url == srv.http + "/"
    ms = await messages(page)
    assert [(m["body"], m["nick"]) for m in ms] == [
        ("posted without <b>JS</b> & https://example.com/x", "nojs")
    ]
    await wait_body(live, ms[0]["body"])  # the live page got it over /ws

    # Another room posts to itself and redirects back to it.
    await page.goto(srv.http + "/chat/random")
    await page.fill("#nick", "nojs")
    await page.fill("#text", "in random")
    async with page.expect_navigation():
        await page.click("#send")
    assert page.url == srv.http + "/chat/random"
    assert [m["body"] for m in await messages(page)] == ["in random"]

    # Forged posts: no token, a wrong token, or no cookie at all.
    url = srv.http + "/chat/lobby/messages"
    form = {"body": "forged", "nick": "eve"}
    r = await ctx.request.post(url, form=form, max_redirects=0)
    assert r.status == 403
    r = await ctx.request.post(url, form={**form, "_xsrf": "x" * 32}, max_redirects=0)
    assert r.status == 403
    r = await ctx.request.post(url, form={**form, "_xsrf": ""}, max_redirects=0)
    assert r.status == 403
    async with session.post(url, data={**form, "_xsrf": token}, allow_redirects=False) as resp:
        assert resp.status == 403  # the token without its cookie
    # The real token with its cookie does work from the same context (a sanity check of the above).
    r = await ctx.request.post(url, form={"body": "real", "nick": "nojs", "_xsrf": token}, max_redirects=0)
    assert r.status == 303
    await barrier([live], srv.http, session, "form")
    assert "forged" not in [m["body"] for m in await messages(live)]
    assert watch.problems() == []


# ----------------------------------------------------------------------------------------------- 7. CSP


async def test_content_security_policy(browser: Browser, start_server: ServerFactory) -> None:
    srv = await start_server()
    watch = Watch()
    ctx = await browser.new_context()
    page = watch.attach(await ctx.new_page(), "csp")
    resp = await page.goto(srv.http + "/chat/csp-room")
    assert resp is not None and resp.status == 200
    csp = resp.headers.get("content-security-policy", "")
    directives = {d.split()[0]: d.split()[1:] for d in csp.split(";") if d.strip()}
    assert directives["script-src"] == ["'self'"]
    assert directives["style-src"] == ["'self'"]
    assert directives["object-src"] == ["'none'"]
    assert "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp
    assert resp.headers.get("x-content-type-options") == "nosniff"
    await wait_state(page, "connected")
    await send(page, "hello under CSP https://example.com")
    await wait_body(page, "hello under CSP https://example.com")
    await page.reload()
    await wait_state(page, "connected")
    assert watch.problems() == [], watch.problems()

    # The policy is really enforced, and the watcher really sees violations.
    await page.evaluate(
        """() => { window.__inline = 0;
                   const s = document.createElement('script'); s.textContent = 'window.__inline = 1';
                   document.body.appendChild(s); }"""
    )
    async with asyncio.timeout(5):
        while not watch.csp_violations():
            await page.wait_for_timeout(50)
    assert await page.evaluate("window.__inline") == 0
    await ctx.close()


# ---------------------------------------------------------------------------------------- 8. screenshots


async def test_screenshots(
    browser: Browser, start_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    """Saved to artifacts/screenshots/ on every run: look at them when the page changes."""
    srv = await start_server()
    seed = [
        ("dana", "Morning all! Release notes are up: https://example.com/tidings/releases/0.1"),
        ("dana", "Tried the recovery: killed the server mid-chat and nothing was lost 🎉"),
        ("erik", "Nice."),
        (
            "erik",
            "A longer message, to see how a bubble wraps when a line is really quite long — longer than the "
            "bubble's maximum width on a desktop screen, and certainly longer than a phone is wide. "
            "Anyway: supercalifragilisticexpialidocious_without_any_spaces_at_all_to_break_the_line_on",
        ),
        ("fay", "<b>this is not bold</b> and {{ not a template }}"),
    ]
    for nick, body in seed:
        await api_publish(session, srv.http, body, nick=nick)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    watch = Watch()
    shots: list[Path] = []
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
        ("desktop-dark", {"viewport": {"width": 1280, "height": 800}, "color_scheme": "dark"}),
    ]:
        ctx, page = await open_page(browser, srv.http + "/", watch, name, **kw)
        await set_nick(page, "you")
        text = f"Hello from the {name} 👋"
        await send(page, text)
        await wait_body(page, text)
        await expect(page.locator("#online-count")).to_be_visible(timeout=T_STATE)
        await page.evaluate("document.getElementById('messages').scrollTop = 1e9")
        await page.evaluate("() => document.fonts.ready.then(() => true)")
        path = SCREENSHOTS / f"chat-{name}.png"
        await page.screenshot(path=str(path))
        shots.append(path)
        # Nothing overflows sideways on any width.
        overflow = await page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0, (name, overflow)
        await ctx.close()
    for path in shots:
        assert path.stat().st_size > 10_000, path
    assert watch.problems() == []
