"""``GET /metrics``: Prometheus text parsed with ``prometheus_client.parser``; the gauges and counters move as
a test connects, subscribes, publishes (HTTP and /ws), gets refused and disconnects; a scrape without a
key, with a wrong key or with a ``publish`` key is refused; ``metrics_port`` answers without a key; with
``--workers 2`` one scrape has both workers' samples."""

from __future__ import annotations

import asyncio
import json
from importlib import resources
from pathlib import Path
from types import SimpleNamespace

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from pytest import MonkeyPatch

from tidings import metrics
from tidings.config import ApiKey
from tidings.metrics import Buckets, Counters

from .conftest import API_KEY, ProbeFactory, ServerFactory, api_headers
from .redis_servers import free_port
from .serve_process import Node
from .test_docs import ResponseChecker

READ_KEY = "metrics-reader-key-0123456789"
PUB_KEY = "metrics-publisher-key-0123456789"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(session: aiohttp.ClientSession, base: str, key: str | None = READ_KEY) -> Samples:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with session.get(f"{base}/metrics", headers=headers) as r:
        assert r.status == 200, await r.text()
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return parse(await r.text())


def keys() -> list[ApiKey]:
    return [
        ApiKey("test", API_KEY, "admin"),
        ApiKey("reader", READ_KEY, "read"),
        ApiKey("pub", PUB_KEY, "publish"),
    ]


async def test_metrics_move_as_clients_connect_publish_and_disconnect(
    start_server: ServerFactory, probe: ProbeFactory, session: aiohttp.ClientSession
) -> None:
    srv = await start_server(api_keys=keys())
    base = srv.http
    m0 = await scrape(session, base)
    assert value(m0, "tidings_connections", transport="ws") == 0
    assert value(m0, "tidings_subscriptions") == 0 and value(m0, "tidings_channels") == 0
    assert ("process_cpu_seconds_total", ()) in m0 and ("process_resident_memory_bytes", ()) in m0

    a, b = await probe(srv), await probe(srv)
    await a.ok("subscribe", channel="chat:m")
    await b.ok("subscribe", channel="chat:m")
    await b.ok("subscribe", channel="pub:m")
    m1 = await scrape(session, base)
    assert value(m1, "tidings_connections", transport="ws") == 2
    assert value(m1, "tidings_subscriptions") == 3 and value(m1, "tidings_channels") == 2

    async with session.post(
        f"{base}/api/publish", json={"channel": "chat:m", "data": 1}, headers=api_headers(PUB_KEY)
    ) as r:
        assert r.status == 200
    await a.ok("publish", channel="chat:m", data=2)
    await a.messages(2)
    await b.messages(2)
    err = await a.request("publish", channel="ro:x", data=1)  # a read-only namespace
    refused = err["error"]["code"]
    async with session.post(f"{base}/api/publish", json={"channel": "chat:m"}, headers=api_headers()) as r:
        assert r.status == 400  # invalid_field

    m2 = await scrape(session, base)
    assert value(m2, "tidings_publications_total", namespace="chat", source="http") == 1
    assert value(m2, "tidings_publications_total", namespace="chat", source="ws") == 1
    assert value(m2, "tidings_deliveries_total") - value(m1, "tidings_deliveries_total") == 4  # 2 pubs x 2
    assert value(m2, "tidings_publish_duration_seconds_count") == 2
    assert 0 < value(m2, "tidings_publish_duration_seconds_sum") < 5
    assert value(m2, "tidings_publish_duration_seconds_bucket", le="+Inf") == 2
    assert value(m2, "tidings_broker_operation_duration_seconds_count", operation="publish") == 2
    assert value(m2, "tidings_broker_operation_duration_seconds_count", operation="history") >= 3
    assert value(m2, "tidings_errors_total", code=refused) == 1
    assert value(m2, "tidings_errors_total", code="invalid_field") == 1
    assert value(m2, "tidings_history_publications") == 2  # the memory broker's chat:m history
    assert value(m2, "tidings_bytes_sent_total") > value(m1, "tidings_bytes_sent_total")
    assert value(m2, "tidings_bytes_received_total") > value(m1, "tidings_bytes_received_total")

    await a.close()
    await b.close()
    async with asyncio.timeout(10):
        while True:
            m3 = await scrape(session, base)
            if value(m3, "tidings_connections", transport="ws") == 0:
                break
            await asyncio.sleep(0.02)
    assert value(m3, "tidings_subscriptions") == 0 and value(m3, "tidings_channels") == 0
    assert value(m3, "tidings_disconnects_total", code="1000") == 2
    sent = value(m3, "tidings_bytes_sent_total")
    assert sent >= value(m2, "tidings_bytes_sent_total")  # ended connections' bytes are kept
    m4 = await scrape(session, base)
    assert sent <= value(m4, "tidings_bytes_sent_total") < sent + 100_000  # never counted twice


async def test_sse_connection_slow_consumer_and_rate_limit_counted(
    start_server: ServerFactory, probe: ProbeFactory, session: aiohttp.ClientSession
) -> None:
    srv = await start_server(api_keys=keys(), client_rate=1.0)
    async with session.get(f"{srv.http}/sse?channel=chat:s") as r:
        assert r.status == 200
        async with asyncio.timeout(5):
            while b"subscribed" not in await r.content.readline():
                pass
        m = await scrape(session, srv.http)
        assert value(m, "tidings_connections", transport="sse") == 1
    p = await probe(srv)
    replies = [await p.request("ping") for _ in range(6)]  # a budget of 2 at 1/s
    assert any(rep.get("error", {}).get("code") == "rate_limited" for rep in replies)
    m = await scrape(session, srv.http)
    assert value(m, "tidings_rate_limited_total") >= 1
    assert value(m, "tidings_errors_total", code="rate_limited") >= 1


async def test_slow_consumer_close_counted(
    start_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    srv = await start_server(api_keys=keys(), max_buffer=16_384)
    # A subscriber that never reads: its buffer fills and it is cut off (4008).
    _reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    writer.write(
        b"GET /sse?channel=chat:slow HTTP/1.1\r\nHost: x\r\n\r\n"
    )  # an SSE stream whose socket we never read
    await writer.drain()
    async with asyncio.timeout(5):
        while srv.node.hub.channels().get("chat:slow") != 1:
            await asyncio.sleep(0.02)
    sock = writer.get_extra_info("socket")
    import socket as _s

    sock.setsockopt(_s.SOL_SOCKET, _s.SO_RCVBUF, 4096)
    big = {"channel": "chat:slow", "data": "x" * 60_000}
    try:
        async with asyncio.timeout(20):
            while srv.node.counters.slow_consumer_closes == 0:
                async with session.post(f"{srv.http}/api/publish", json=big, headers=api_headers()) as r:
                    assert r.status == 200
        m = await scrape(session, srv.http)
        assert value(m, "tidings_slow_consumer_closes_total") == 1
    finally:
        writer.close()


async def test_unauthorized_scrape_refused_as_openapi_documents(
    start_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    srv = await start_server(api_keys=keys(), api_failures_per_minute=3)
    chk = ResponseChecker(json.loads(resources.files("tidings").joinpath("openapi.json").read_text()))
    cases = [
        (PUB_KEY, 403, "permission_denied"),  # a role that may not read
        (None, 401, "unauthorized"),
        ("wrong-key-0123456789", 401, "unauthorized"),
        ("Basic eDp5", 401, "unauthorized"),  # not a bearer key
        (READ_KEY, 429, "rate_limited"),  # after 3 failures even a good key waits
    ]
    for key, status, code in cases:
        headers = {} if key is None else {"Authorization": key if " " in key else f"Bearer {key}"}
        async with session.get(f"{srv.http}/metrics", headers=headers) as r:
            body = await r.json()
            assert (r.status, body["error"]["code"]) == (status, code)
            chk.check("get", "/metrics", r.status, r.content_type, body)
    ok = await start_server(api_keys=keys())
    async with session.get(f"{ok.http}/metrics", headers=api_headers(API_KEY)) as r:  # admin may too
        assert r.status == 200
        chk.check("get", "/metrics", 200, "text/plain; version=0.0.4; charset=utf-8", await r.text())
    assert {s for _, _, s in chk.seen} == {"200", "401", "403", "429"}


async def test_metrics_off_has_no_route(start_server: ServerFactory, session: aiohttp.ClientSession) -> None:
    srv = await start_server(api_keys=keys(), metrics=False)
    async with session.get(f"{srv.http}/metrics", headers=api_headers(READ_KEY)) as r:
        assert r.status == 404


def test_buckets_are_cumulative() -> None:
    b = Buckets((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 2.0):
        b.observe(v)
    assert b.cumulative() == [("0.1", 2.0), ("1.0", 3.0), ("+Inf", 4.0)] and b.count == 4


async def test_metrics_port_without_key_and_main_port_with_key(tmp_path: Path) -> None:
    mport = free_port()
    node = Node(tmp_path, "memory://", "m", metrics_port=str(mport))
    try:
        async with aiohttp.ClientSession() as s:
            await node.ready(s)
            m = await scrape(s, f"http://127.0.0.1:{mport}", key=None)
            assert ("tidings_channels", ()) in m
            async with s.get(f"{node.http}/metrics") as r:
                assert r.status == 401
    finally:
        assert node.stop() == 0


async def test_workers_every_worker_in_one_scrape(tmp_path: Path, redis_url: str) -> None:
    from .serve_process import Deployment

    dep = Deployment(tmp_path, redis_url, 2)
    try:
        await asyncio.to_thread(dep.start)
        key = dep.api_key()
        for _ in range(4):  # whichever worker the connection lands on, it answers for both
            async with aiohttp.ClientSession() as fresh:
                m = await scrape(fresh, dep.http, key)
            assert value(m, "tidings_worker_up", worker="1") == 1
            assert value(m, "tidings_worker_up", worker="2") == 1
            for w in ("1", "2"):
                assert ("tidings_channels", (("worker", w),)) in m
                assert ("process_cpu_seconds_total", (("worker", w),)) in m
    finally:
        dep.stop()


async def test_history_publications_with_sqlite(
    start_server: ServerFactory, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    srv = await start_server(api_keys=keys(), broker=f"sqlite:///{tmp_path / 'h.db'}")
    m = await scrape(session, srv.http)
    assert value(m, "tidings_history_publications") == 0
    pubs = [{"channel": "small:h", "data": i} for i in range(8)] + [{"channel": "chat:h", "data": 1}]
    async with session.post(f"{srv.http}/api/batch", json={"publications": pubs}, headers=api_headers()) as r:
        assert r.status == 200
    m = await scrape(session, srv.http)
    assert value(m, "tidings_history_publications") == 6  # small keeps 5, chat 1
    assert value(m, "tidings_publications_total", namespace="small", source="http") == 8


def test_reported_bytes_never_go_down() -> None:
    """A connection read as open (100 bytes) that ends before the next scrape (its final 120 bytes move
    to the ended total) is briefly counted twice; the counter holds rather than going down."""
    c = Counters()
    c.live_bytes_sent, c.live_bytes_received = 100, 10
    assert c.reported_bytes() == (100, 10)
    c.connection_ended("1000", 12, 120)  # ended after the read: both figures are in for now
    assert c.reported_bytes() == (220, 22)
    c.live_bytes_sent = c.live_bytes_received = 0  # the next read no longer sees it
    assert c.reported_bytes() == (220, 22)  # held, not 120: Prometheus would take a drop for a restart
    c.bytes_sent += 200
    assert c.reported_bytes() == (320, 22)


class _Conn:
    def __init__(self, writer: asyncio.StreamWriter, bytes_in: int) -> None:
        self.writer, self.transport, self.bytes_in = writer, writer.transport, bytes_in


class _InOrder(list[_Conn]):
    """The node's connections, iterated in the order they were added (a set's order is its hashes')."""

    def discard(self, conn: _Conn) -> None:
        self.remove(conn)


async def test_live_bytes_read_from_the_kernel_in_slices(monkeypatch: MonkeyPatch) -> None:
    """What open connections were sent comes from TCP_INFO (the bytes the peer acknowledged), read in
    slices with the event loop running in between, skipping a connection that ended meanwhile."""
    monkeypatch.setattr(metrics, "LIVE_BYTES_SLICE", 1)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    conns = _InOrder()
    for n in (1000, 2000, 3000):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"x" * n)
        await writer.drain()
        conns.append(_Conn(writer, n // 100))
    node = SimpleNamespace(connections=conns, counters=Counters())
    async with asyncio.timeout(5):  # until the peer acknowledged all of it (+1 each: the SYN)
        while sum(metrics.tcp_bytes_sent(c.transport) for c in conns) < 6003:
            await asyncio.sleep(0.01)
    last = conns[2]
    ran: list[int] = []

    async def other() -> None:  # another client's work: it gets the loop between two slices
        ran.append(len(node.connections))
        node.connections.discard(last)  # ...and a connection that ends meanwhile is not read

    task = asyncio.ensure_future(other())
    await metrics.read_live_bytes(node)  # type: ignore[arg-type]
    await task
    assert ran == [3]
    assert node.counters.live_bytes_sent == (1000 + 1) + (2000 + 1)
    assert node.counters.live_bytes_received == 10 + 20
    for c in [*conns, last]:
        c.writer.close()
        await c.writer.wait_closed()
    server.close()
    await server.wait_closed()
