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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest

from tidings.client import Client, GapEvent

from .browser_helpers import PlaywrightError, Watch, chromium
from .conftest import API_KEY
from .serve_process import Node
from .tcp_balancer import TcpBalancer

if TYPE_CHECKING:
    from playwright.async_api import Browser

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHANNELS = ["pub:kill-0", "pub:kill-1", "pub:kill-2"]
RATE = 50  # publications per second, round-robin over CHANNELS


@dataclass
class Ledger:
    """What was acknowledged, delivered and flagged, per channel; ``report`` counts lost."""

    acked: dict[str, list[tuple[int, str, int]]] = field(default_factory=dict)  # (offset, epoch, n)
    away: int = 0  # acknowledged while the client(s) were not connected

    def ack(self, channel: str, offset: int, epoch: str, n: int) -> None:
        self.acked.setdefault(channel, []).append((offset, epoch, n))

    def report(
        self,
        delivered: dict[str, list[tuple[int, str, int]]],
        flagged: list[tuple[str, str, int, int | None]],
    ) -> dict[str, int]:
        """``flagged``: (channel, epoch, after offset, up to offset or None = the rest of that epoch)."""
        counts = {"acknowledged": 0, "delivered": 0, "flagged": 0, "lost": 0, "duplicates": 0}
        for channel, acked in self.acked.items():
            got = delivered.get(channel, [])
            keys = [(o, e) for o, e, _ in got]
            counts["duplicates"] += len(keys) - len(set(keys))
            offsets = [o for o, _, _ in got]
            assert offsets == sorted(offsets), f"{channel}: out of order: {offsets}"
            have = {(o, e): n for o, e, n in got}
            for offset, epoch, n in acked:
                counts["acknowledged"] += 1
                if (offset, epoch) in have:
                    assert have[(offset, epoch)] == n, f"{channel} {offset}: another publication"
                    counts["delivered"] += 1
                elif any(
                    ch == channel and e == epoch and offset > lo and (hi is None or offset <= hi)
                    for ch, e, lo, hi in flagged
                ):
                    counts["flagged"] += 1
                else:
                    counts["lost"] += 1
        return counts


async def publisher(
    session: aiohttp.ClientSession,
    url: str,
    ledger: Ledger,
    stop: asyncio.Event,
    away: Callable[[], bool],
) -> int:
    """Publish over HTTP at RATE/s until ``stop``; every 200 reply goes into the ledger. Returns how many
    requests were not acknowledged (there must be none: A stays up)."""
    n, failed = 0, 0
    start = time.monotonic()
    while not stop.is_set():
        channel = CHANNELS[n % len(CHANNELS)]
        async with session.post(
            f"{url}/api/publish", json={"channel": channel, "data": {"n": n}}, headers=AUTH
        ) as r:
            body = await r.json()
        if r.status == 200:
            ledger.ack(channel, int(body["offset"]), str(body["epoch"]), n)
            ledger.away += away()
        else:
            failed += 1
        n += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, start + n / RATE - time.monotonic()))
    return failed


@pytest.fixture
async def two_nodes(tmp_path: Path, redis_url: str) -> AsyncIterator[tuple[Node, Node]]:
    a, b = Node(tmp_path, redis_url, "a"), Node(tmp_path, redis_url, "b")
    try:
        await a.ready()
        await b.ready()
        yield a, b
    finally:
        for n in (a, b):
            n.stop()


async def until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not cond():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout} s: {what}") from None


@pytest.mark.timeout(90)
async def test_kill9_of_a_node_python_clients_recover_through_the_balancer(
    two_nodes: tuple[Node, Node],
) -> None:
    a, b = two_nodes
    async with TcpBalancer([("127.0.0.1", b.port), ("127.0.0.1", a.port)]) as lb:
        clients = [Client(lb.ws_url, min_backoff=0.1, max_backoff=0.5) for _ in range(2)]
        delivered: list[dict[str, list[tuple[int, str, int]]]] = [{} for _ in clients]
        flagged: list[list[tuple[str, str, int, int | None]]] = [[] for _ in clients]
        tasks: list[asyncio.Task[None]] = []

        def on_gap(i: int) -> Callable[[GapEvent], None]:
            def note(g: GapEvent) -> None:
                prev = g.previous
                if prev is not None:
                    hi = None if g.epoch_changed else g.position.offset
                    flagged[i].append((g.channel, prev.epoch, prev.offset, hi))

            return note

        async def collect(i: int, sub: Any) -> None:
            async for p in sub:
                delivered[i].setdefault(p.channel, []).append((p.offset, p.epoch, p.data["n"]))

        ledger = Ledger()
        stop = asyncio.Event()
        try:
            for i, c in enumerate(clients):
                c.on("gap", on_gap(i))
                await c.connect(timeout=10)
                for ch in CHANNELS:
                    tasks.append(asyncio.create_task(collect(i, await c.subscribe(ch))))
            assert lb.forwarded == {("127.0.0.1", b.port): len(clients)}  # every client is on B
            async with aiohttp.ClientSession() as s:
                pub = asyncio.create_task(
                    publisher(s, a.http, ledger, stop, lambda: not all(c.connected for c in clients))
                )
                total = lambda: sum(len(v) for d in delivered for v in d.values())  # noqa: E731
                await until(lambda: total() >= 60, 20, "live deliveries before the kill")
                t_kill = time.monotonic()
                await asyncio.to_thread(b.kill9)
                await until(lambda: all(c.connects == 2 for c in clients), 20, "reconnect through the LB")
                t_back = time.monotonic() - t_kill
                n_at_back = sum(len(v) for v in ledger.acked.values())
                await until(
                    lambda: sum(len(v) for v in ledger.acked.values()) >= n_at_back + 30, 20, "more publishes"
                )
                stop.set()
                failed = await pub
            assert failed == 0
            acked = sum(len(v) for v in ledger.acked.values())
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
                        publisher(s, a.http, ledger, stop, lambda: not state["connected"])
                    )
                    await until(lambda: state["count"] >= 60, 20, "live deliveries before the kill")
                    t_kill = time.monotonic()
                    await asyncio.to_thread(b.kill9)
                    await until(lambda: not state["connected"], 10, "the page saw the drop")
                    await until(lambda: state["connected"], 20, "the page reconnected through the LB")
                    t_back = time.monotonic() - t_kill
                    n_at_back = sum(len(v) for v in ledger.acked.values())
                    await until(
                        lambda: sum(len(v) for v in ledger.acked.values()) >= n_at_back + 30,
                        20,
                        "more publishes",
                    )
                    stop.set()
                    failed = await pub
                assert failed == 0
                acked = sum(len(v) for v in ledger.acked.values())
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
