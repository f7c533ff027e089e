"""``kill -9`` of a node while its clients are subscribed: two ``tidings serve`` processes A and B share
one real Redis behind a loopback TCP balancer (tests/tcp_balancer.py, B first: every client lands on B);
a publisher publishes over HTTP to A at a steady rate and records every acknowledged publication; B is
killed with SIGKILL mid-stream; the clients (the Python client, and tidings.js in Chromium) reconnect
through the balancer, land on A, and recover from their positions with ``since``.

Each test counts, per channel: acknowledged, delivered, flagged (a ``gap`` event covering it:
``recovered: false`` or a new epoch) and lost = acknowledged and neither delivered nor flagged, which must
be 0, with no duplicate and offsets in order. It also checks that the clients really missed live
publications while they were away (acknowledged while they were disconnected), so recovery was
exercised and not just a fast reconnect."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest

from tidings.client import Client

from .browser_helpers import PlaywrightError, Watch, chromium
from .ledger import Delivered, Flagged, Ledger, collect, gap_recorder, publisher, until
from .serve_process import Node, running_nodes
from .tcp_balancer import TcpBalancer

if TYPE_CHECKING:
    from playwright.async_api import Browser

CHANNELS = ["pub:kill-0", "pub:kill-1", "pub:kill-2"]
RATE = 50  # publications per second, round-robin over CHANNELS


@pytest.fixture
async def two_nodes(tmp_path: Path, redis_url: str) -> AsyncIterator[tuple[Node, Node]]:
    async with running_nodes(tmp_path, redis_url) as (a, b):
        yield a, b


@pytest.mark.timeout(90)
async def test_kill9_of_a_node_python_clients_recover_through_the_balancer(
    two_nodes: tuple[Node, Node],
) -> None:
    a, b = two_nodes
    async with TcpBalancer([("127.0.0.1", b.port), ("127.0.0.1", a.port)]) as lb:
        clients = [Client(lb.ws_url, min_backoff=0.1, max_backoff=0.5) for _ in range(2)]
        delivered: list[Delivered] = [{} for _ in clients]
        flagged: list[Flagged] = [[] for _ in clients]
        tasks: list[asyncio.Task[None]] = []

        ledger = Ledger()
        stop = asyncio.Event()
        try:
            for i, c in enumerate(clients):
                c.on("gap", gap_recorder(flagged[i]))
                await c.connect(timeout=10)
                for ch in CHANNELS:
                    tasks.append(asyncio.create_task(collect(await c.subscribe(ch), delivered[i])))
            assert lb.forwarded == {("127.0.0.1", b.port): len(clients)}  # every client is on B
            async with aiohttp.ClientSession() as s:
                pub = asyncio.create_task(
                    publisher(
                        s, a.http, ledger, stop, CHANNELS, RATE, lambda: not all(c.connected for c in clients)
                    )
                )
                total = lambda: sum(len(v) for d in delivered for v in d.values())  # noqa: E731
                await until(lambda: total() >= 60, 20, "live deliveries before the kill")
                t_kill = time.monotonic()
                await asyncio.to_thread(b.kill9)
                await until(lambda: all(c.connects == 2 for c in clients), 20, "reconnect through the LB")
                t_back = time.monotonic() - t_kill
                n_at_back = ledger.total
                await until(lambda: ledger.total >= n_at_back + 30, 20, "more publishes")
                stop.set()
                failed = await pub
            assert failed == 0
            acked = ledger.total
            await until(lambda: total() >= acked * len(clients), 20, "every acknowledged one delivered")
        finally:
            stop.set()
            for c in clients:
                await c.close()
            for t in tasks:
                t.cancel()
        assert lb.dropped == [("127.0.0.1", b.port)]
        assert lb.forwarded[("127.0.0.1", a.port)] == len(clients)
        assert ledger.away > 0, "no publication was acknowledged while the clients were away"
        for i, c in enumerate(clients):
            counts = ledger.report(delivered[i], flagged[i])
            print(f"client {i}: {counts}, away {ledger.away}, reconnected after {t_back:.2f} s")
            assert counts["lost"] == 0 and counts["duplicates"] == 0, counts
            assert counts["delivered"] == acked and counts["flagged"] == 0, counts
            assert all(sub.gaps == 0 and sub.recovered is True for sub in c.subscriptions.values())


# ----------------------------------------------------------------------------------------- tidings.js

JS_SETUP = """async (channels) => {
  window.log = {pubs: {}, gaps: [], subscribed: [], disconnects: 0, connects: 0};
  const c = window.client = new Tidings({minReconnectDelay: 100, maxReconnectDelay: 500});
  c.on("gap", (g) => log.gaps.push([g.channel, g.previous && g.previous.epoch,
      g.previous && g.previous.offset, g.epochChanged ? null : g.position.offset]));
  c.on("subscribed", (e) => log.subscribed.push([e.channel, e.recovered === undefined ? null : e.recovered]));
  c.on("disconnect", () => log.disconnects++);
  c.on("connected", () => log.connects++);
  c.connect();
  await Promise.all(channels.map((ch) => {
    log.pubs[ch] = [];
    return c.subscribe(ch, (p) => log.pubs[ch].push([p.offset, p.epoch, p.data.n]));
  }));
}"""


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with chromium() as b:
        yield b


@pytest.mark.browser
@pytest.mark.timeout(120)
async def test_kill9_of_a_node_tidings_js_recovers_through_the_balancer(
    two_nodes: tuple[Node, Node], browser: Browser
) -> None:
    a, b = two_nodes
    async with TcpBalancer([("127.0.0.1", b.port), ("127.0.0.1", a.port)]) as lb:
        watch = Watch()
        ctx = await browser.new_context(bypass_csp=True)
        try:
            page = watch.attach(await ctx.new_page(), "js")
            # The document comes from the balancer's origin (served by B), so tidings.js's default URL,
            # ws://<page host>/ws, goes through the balancer too.
            await page.goto(f"{lb.url}/healthz")
            await page.add_script_tag(url="/static/tidings.js")
            await page.evaluate(JS_SETUP, CHANNELS)
            on_b = ("127.0.0.1", b.port)
            assert set(lb.forwarded) == {on_b}, lb.forwarded  # page, script and WebSocket all on B

            state: dict[str, Any] = {"connected": True, "count": 0}

            async def poll() -> None:
                while True:
                    with contextlib.suppress(PlaywrightError):
                        st = await page.evaluate(
                            "() => [client.state, Object.values(log.pubs).reduce((s, v) => s + v.length, 0)]"
                        )
                        state["connected"] = st[0] == "connected"
                        state["count"] = st[1]
                    await asyncio.sleep(0.02)

            poller = asyncio.create_task(poll())
            ledger = Ledger()
            stop = asyncio.Event()
            try:
                async with aiohttp.ClientSession() as s:
                    pub = asyncio.create_task(
                        publisher(s, a.http, ledger, stop, CHANNELS, RATE, lambda: not state["connected"])
                    )
                    await until(lambda: state["count"] >= 60, 20, "live deliveries before the kill")
                    t_kill = time.monotonic()
                    await asyncio.to_thread(b.kill9)
                    await until(lambda: not state["connected"], 10, "the page saw the drop")
                    await until(lambda: state["connected"], 20, "the page reconnected through the LB")
                    t_back = time.monotonic() - t_kill
                    n_at_back = ledger.total
                    await until(
                        lambda: ledger.total >= n_at_back + 30,
                        20,
                        "more publishes",
                    )
                    stop.set()
                    failed = await pub
                assert failed == 0
                acked = ledger.total
                await until(lambda: state["count"] >= acked, 20, "every acknowledged one shown")
            finally:
                stop.set()
                poller.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poller
            log = await page.evaluate("() => log")
            await page.evaluate("() => client.close()")
        finally:
            await ctx.close()
        assert lb.dropped == [on_b]
        assert ledger.away > 0, "no publication was acknowledged while the page was away"
        delivered = {ch: [(o, e, n) for o, e, n in v] for ch, v in log["pubs"].items()}
        flagged = [(ch, e, lo, hi) for ch, e, lo, hi in log["gaps"]]
        counts = ledger.report(delivered, flagged)
        print(f"tidings.js: {counts}, away {ledger.away}, reconnected after {t_back:.2f} s")
        assert counts["lost"] == 0 and counts["duplicates"] == 0, counts
        assert counts["delivered"] == acked and counts["flagged"] == 0, counts
        assert log["disconnects"] == 1 and log["connects"] == 2, log
        # each channel: subscribed once, then re-subscribed with `since` and recovered
        want = [(ch, None) for ch in CHANNELS] + [(ch, True) for ch in CHANNELS]
        assert Counter(tuple(e) for e in log["subscribed"]) == Counter(want), log["subscribed"]
        assert watch.problems() == []
