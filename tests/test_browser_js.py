"""tidings.js (the package's classic build, as served at /static/tidings.js) in Chromium, against real
in-process servers: 3-second connection and subscription tokens over 20 s of publishing, and a server
that answers ``unavailable`` once on a re-subscribe. The same scenarios run in Node in
clients/js/test (tests/test_js_package.py).

The page is a document of the server's own origin (/healthz) into which /static/tidings.js is loaded;
tokens come from Python through ``page.expose_function``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import pytest
from aiohttp import web

from tidings.app import create_app
from tidings.backends import BrokerError, HistoryOptions, HistoryResult, MemoryBroker
from tidings.config import Namespace
from tidings.transports.server import make_runner

from .browser_helpers import PlaywrightError, Watch, chromium
from .conftest import API_KEY, Server, ServerFactory, bound_socket, make_settings
from .test_auth import SECRET, hs
from .test_python_client import LossyBroker

if TYPE_CHECKING:
    from playwright.async_api import Browser, Page

pytestmark = pytest.mark.browser

PRIV = {"priv": Namespace("priv", subscribe="token", publish=True)}


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with chromium() as b:
        yield b


async def js_page(browser: Browser, srv: Server, watch: Watch) -> Page:
    """A page on the server's origin with /static/tidings.js loaded, and token minting."""
    # /healthz answers with a strict CSP (no eval): the test drives the page with evaluate and
    # wait_for_function, which need it off. The chat page tests keep the CSP on.
    page = watch.attach(await (await browser.new_context(bypass_csp=True)).new_page(), "js")

    await page.expose_function(
        "mintConnectionToken", lambda ttl: hs({"sub": "alice", "exp": time.time() + ttl})
    )
    await page.expose_function(
        "mintSubscriptionToken", lambda channel, ttl: hs({"channel": channel, "exp": time.time() + ttl})
    )
    # A document that really came from the (loopback) server: Chromium's local-network checks block a
    # routed page's WebSocket to 127.0.0.1.
    await page.goto(f"{srv.http}/healthz")
    await page.add_script_tag(url="/static/tidings.js")
    assert await page.evaluate("typeof Tidings === 'function' && Tidings.VERSION") is not False
    return page


# The whole 20 s scenario runs in the page; Python checks what it returns.
TOKENS_SCENARIO = """async ({ttl, seconds, rate, apiKey}) => {
  const N = seconds * rate;
  const suffix = Math.random().toString(16).slice(2, 10);
  const connChannel = "pub:conn-" + suffix, subChannel = "priv:sub-" + suffix;
  const fixedChannel = "priv:fixed-" + suffix;
  const counts = {connTokens: 0, subTokens: 0};
  const events = {A: [], B: [], C: []};
  const track = (name, c) => {
    ["disconnect", "connected", "unsubscribed", "gap", "error"].forEach(
      (ev) => c.on(ev, (e) => events[name].push([ev, e && (e.code !== undefined ? e.code : e.client)])));
    c.on("subscribed", (e) => events[name].push(["subscribed", e.channel]));
  };
  const a = new Tidings({getToken: () => { counts.connTokens++; return window.mintConnectionToken(ttl); }});
  const b = new Tidings(), c = new Tidings();
  track("A", a); track("B", b); track("C", c);
  const got = window.progress = {A: [], B: []};
  got.events = events; got.counts = counts;
  a.connect(); b.connect(); c.connect();
  const hooks = {A: () => {}, B: () => {}};  // called after each delivery
  const collect = (name) => (p) => { got[name].push([p.offset, p.data.i]); hooks[name](); };
  await a.subscribe(connChannel, collect("A"));
  const subRes = await b.subscribe(subChannel, collect("B"), {
    getToken: (channel) => { counts.subTokens++; return window.mintSubscriptionToken(channel, ttl); }});
  const fixedRes = await c.subscribe(fixedChannel, () => {},
    {token: await window.mintSubscriptionToken(fixedChannel, ttl)});
  const ended = new Promise((resolve) => c.on("unsubscribed", resolve));
  const paced = async (fn) => {
    const start = Date.now(), out = [];
    for (let i = 0; i < N; i++) {
      out.push(fn(i));
      await new Promise((r) => setTimeout(r, Math.max(0, start + (i + 1) * 1000 / rate - Date.now())));
    }
    return Promise.all(out);
  };
  const httpPublish = (i) => fetch("/api/publish", {method: "POST",
    headers: {"authorization": "Bearer " + apiKey, "content-type": "application/json"},
    body: JSON.stringify({channel: subChannel, data: {i}})}).then((r) => r.json());
  const [onConn, onSub] = await Promise.all([
    paced((i) => a.publish(connChannel, {i})), paced(httpPublish)]);
  const until = (name) => new Promise((resolve) => {
    hooks[name] = () => { if (got[name].length >= N) resolve(); };
    hooks[name]();
  });
  await Promise.all([until("A"), until("B")]);
  const end = await ended;
  const result = {N, got, counts, events, end, subTtl: subRes.ttl, fixedTtl: fixedRes.ttl,
    published: [onConn.map((r) => r.offset), onSub.map((r) => r.offset)], cSubs: c.subscriptions()};
  a.close(); b.close(); c.close();
  return result;
}"""


@pytest.mark.timeout(120)
async def test_tidings_js_tokens_renewed_in_band(browser: Browser, start_server: ServerFactory) -> None:
    """3-second connection tokens with getToken, 20 s at 10/s: zero disconnects, every publication once.
    3-second subscription tokens with a per-subscription getToken: every publication once. A fixed
    3-second subscription token: the `unsubscribed` event (token_expired) when the grant ends."""
    srv = await start_server(token_secret=SECRET, namespaces=PRIV)
    watch = Watch()
    page = await js_page(browser, srv, watch)
    args = {"ttl": 3, "seconds": 20, "rate": 10, "apiKey": API_KEY}
    await page.evaluate(
        f"(args) => {{ window.result = null; ({TOKENS_SCENARIO})(args).then("
        "(r) => { window.result = r; }, (e) => { window.result = {error: String(e && e.stack || e)}; }); }",
        args,
    )
    try:
        await page.wait_for_function("window.result !== null", timeout=70_000)
    except PlaywrightError:
        progress = await page.evaluate(
            "() => ({A: progress.A.length, B: progress.B.length, events: progress.events,"
            " counts: progress.counts})"
        )
        raise AssertionError(f"the scenario did not finish: {progress}") from None
    r = await page.evaluate("window.result")
    assert "error" not in r, r["error"]
    n = r["N"]
    expected = [[i + 1, i] for i in range(n)]
    assert r["published"] == [list(range(1, n + 1))] * 2
    assert r["got"]["A"] == expected  # every publication once, in order
    assert r["got"]["B"] == expected
    # No disconnect, no error; B's grant renewed with `refresh` (one subscription, never redone).
    assert [e for e, _ in r["events"]["A"]] == ["connected", "subscribed"], r["events"]
    assert [e for e, _ in r["events"]["B"]] == ["connected", "subscribed"], r["events"]
    assert [e for e, _ in r["events"]["C"]] == ["connected", "subscribed", "unsubscribed"], r["events"]
    assert r["end"]["code"] == "token_expired" and r["end"]["resubscribe"] is True
    assert r["cSubs"] == []
    # Renewed in-band, many times over: at least one token per 3 s on the one connection.
    assert r["counts"]["connTokens"] >= 20 / 3 and r["counts"]["subTokens"] >= 20 / 3, r["counts"]
    print(f"chromium: {n} + {n} delivered once, 0 disconnects, tokens {r['counts']}")
    assert watch.problems() == []


class FlakyHistory(MemoryBroker):
    """The real memory broker, whose next ``fail`` history reads with ``since`` raise BrokerError."""

    fail = 0
    injected = 0

    async def history(
        self, channel: str, opts: HistoryOptions, *, since: int | None = None, limit: int | None = None
    ) -> HistoryResult:
        if since is not None and self.fail > 0:
            self.fail -= 1
            self.injected += 1
            raise BrokerError("injected: history unavailable once")
        return await super().history(channel, opts, since=since, limit=limit)


async def test_unavailable_on_resubscribe_keeps_the_subscription(
    browser: Browser, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """The page goes offline, misses 3 publications, comes back; its re-subscribe (with `since`) is
    answered `unavailable` once (a real BrokerError from the broker): tidings.js reports it, retries
    with backoff, and recovers all 3 — no `unsubscribed`, no gap, each publication once."""
    settings = make_settings(tmp_path)
    broker = FlakyHistory()
    runner = make_runner(
        create_app(settings, broker), settings.header_timeout, access_log=None, shutdown_timeout=2
    )
    await runner.setup()
    sock = bound_socket()
    await web.SockSite(runner, sock).start()
    srv = Server(runner, sock.getsockname()[1], settings)
    try:
        watch = Watch()
        page = await js_page(browser, srv, watch)
        await page.evaluate("""() => {
          window.log = {pubs: [], errors: [], ended: [], gaps: [], subscribed: []};
          const c = window.client = new Tidings({minReconnectDelay: 100, maxReconnectDelay: 1000});
          c.on("error", (e) => log.errors.push([e.code, e.channel]));
          c.on("unsubscribed", (e) => log.ended.push(e));
          c.on("gap", (e) => log.gaps.push(e));
          c.on("subscribed", (e) => log.subscribed.push(e.recovered));
          c.connect();
          return c.subscribe("pub:flaky", (p) => log.pubs.push([p.offset, p.data]));
        }""")

        async def publish(data: int) -> None:
            async with session.post(
                f"{srv.http}/api/publish",
                json={"channel": "pub:flaky", "data": data},
                headers={"Authorization": f"Bearer {API_KEY}"},
            ) as resp:
                assert resp.status == 200, await resp.text()

        await publish(1)
        await page.wait_for_function("log.pubs.length === 1", timeout=10_000)
        broker.fail = 1
        await page.context.set_offline(True)
        await page.wait_for_function("client.state !== 'connected'", timeout=10_000)
        for i in (2, 3, 4):
            await publish(i)
        await page.context.set_offline(False)
        await page.wait_for_function("log.pubs.length === 4", timeout=20_000)
        await publish(5)
        await page.wait_for_function("log.pubs.length === 5", timeout=10_000)
        log = await page.evaluate("() => ({...log, subs: client.subscriptions()})")
        assert broker.injected == 1
        assert log["pubs"] == [[i, i] for i in range(1, 6)]
        assert log["errors"] == [["unavailable", "pub:flaky"]]
        assert log["ended"] == [] and log["gaps"] == []
        assert log["subscribed"] == [None, True]  # the first subscribe, then the recovered re-subscribe
        assert log["subs"] == ["pub:flaky"]
        assert watch.problems() == []
    finally:
        await runner.cleanup()


async def test_insufficient_state_resubscribes_from_the_last_position(
    browser: Browser, start_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    """The node misses 3 publications, then ends the page's subscription with the `insufficient_state`
    push: tidings.js subscribes again at once with `since` (no reconnect): recovered true, every
    publication once, in order, and no `unsubscribed`."""
    broker = LossyBroker()
    srv = await start_server(broker_impl=broker)
    watch = Watch()
    page = await js_page(browser, srv, watch)
    await page.evaluate("""() => {
      window.log = {pubs: [], ended: [], gaps: [], subscribed: [], disconnects: 0};
      const c = window.client = new Tidings({minReconnectDelay: 100, maxReconnectDelay: 1000});
      c.on("unsubscribed", (e) => log.ended.push(e));
      c.on("gap", (e) => log.gaps.push(e));
      c.on("subscribed", (e) => log.subscribed.push(e.recovered));
      c.on("disconnect", () => log.disconnects++);
      c.connect();
      return c.subscribe("pub:lossy", (p) => log.pubs.push([p.offset, p.data]));
    }""")

    async def publish(data: int) -> None:
        async with session.post(
            f"{srv.http}/api/publish",
            json={"channel": "pub:lossy", "data": data},
            headers={"Authorization": f"Bearer {API_KEY}"},
        ) as resp:
            assert resp.status == 200, await resp.text()

    await publish(1)
    await page.wait_for_function("log.pubs.length === 1", timeout=10_000)
    broker.dropping.add("pub:lossy")
    for i in (2, 3, 4):  # stored, never delivered live by this node
        await publish(i)
    broker.dropping.clear()
    srv.node.subscriptions.lost("pub:lossy")
    await publish(5)
    await page.wait_for_function("log.pubs.length === 5", timeout=10_000)
    await publish(6)
    await page.wait_for_function("log.pubs.length === 6", timeout=10_000)
    log = await page.evaluate("() => ({...log, subs: client.subscriptions()})")
    assert log["pubs"] == [[i, i] for i in range(1, 7)]
    assert log["subscribed"] == [None, True]  # the first subscribe, then the recovered re-subscribe
    assert log["ended"] == [] and log["gaps"] == [] and log["disconnects"] == 0
    assert log["subs"] == ["pub:lossy"]
    assert watch.problems() == []
