"""The Redis broker with real nodes and a real ``redis-server``: several ``tidings serve`` processes
sharing one Redis, Pub/Sub connections killed under load, Redis stopped and restarted empty. Each
counts what an acknowledged publication became for a subscriber: delivered, or flagged (an
``insufficient_state`` push / ``recovered: false``); lost must be 0."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis

from tidings.client import Client
from tidings.protocol import new_publication_id

from .conftest import API_KEY, Probe, ProbeFactory, ServerFactory
from .ledger import Delivered, Flagged, Ledger, collect, gap_recorder, publisher, until
from .redis_servers import RedisServer
from .serve_process import Node, running_nodes

__all__ = ["Node"]  # re-exported: other tests import Node from here

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture
async def nodes(tmp_path: Path, redis_url: str) -> AsyncIterator[list[Node]]:
    async with running_nodes(tmp_path, redis_url) as started:
        yield started


async def http_publish(s: aiohttp.ClientSession, base: str, channel: str, data: Any) -> tuple[int, Any]:
    async with s.post(f"{base}/api/publish", json={"channel": channel, "data": data}, headers=AUTH) as r:
        return r.status, await r.json()


async def open_probe(s: aiohttp.ClientSession, base: str) -> Probe:
    ws = await s.ws_connect(base.replace("http", "ws") + "/ws")
    return Probe(ws)


async def test_a_subscriber_on_one_node_gets_in_order_what_another_node_publishes(nodes: list[Node]) -> None:
    a, b = nodes
    async with aiohttp.ClientSession() as s:
        sub = await open_probe(s, b.http)
        pub = await open_probe(s, a.http)
        first = await sub.ok("subscribe", channel="chat:multi")
        for i in range(20):
            status, _ = await http_publish(s, a.http, "chat:multi", {"n": i})
            assert status == 200
        for i in range(20, 40):
            await pub.ok("publish", channel="chat:multi", data={"n": i})
        got = await sub.messages(40)
        assert [m["data"]["n"] for m in got] == list(range(40))
        assert [m["offset"] for m in got] == list(range(1, 41))
        seen = got[-1]
        # B's subscriber goes away; A goes on; it comes back to B and recovers exactly what it missed
        await sub.close()
        for i in range(40, 50):
            await http_publish(s, a.http, "chat:multi", {"n": i})
        again = await open_probe(s, b.http)
        r = await again.ok(
            "subscribe", channel="chat:multi", since={"offset": seen["offset"], "epoch": seen["epoch"]}
        )
        assert r["recovered"] is True and r["epoch"] == first["epoch"]
        assert [m["data"]["n"] for m in await again.messages(10)] == list(range(40, 50))
        # and a client that saw a position on B recovers on A too
        other = await open_probe(s, a.http)
        r = await other.ok("subscribe", channel="chat:multi", since={"offset": 45, "epoch": seen["epoch"]})
        assert r["recovered"] is True
        assert [m["offset"] for m in await other.messages(5)] == [46, 47, 48, 49, 50]
        for p in (pub, again, other):
            await p.close()


async def test_killed_pubsub_connections_are_repaired_from_the_stream(
    start_server: ServerFactory, probe: ProbeFactory, redis_url: str
) -> None:
    srv = await start_server(broker=redis_url, redis_check_interval=0.5)
    sub = await probe(srv)
    await sub.ok("subscribe", channel="pub:kill")
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    stop = threading.Event()
    kills = [0]

    def killer() -> None:
        r = redis.Redis(port=port, socket_timeout=2)
        while not stop.is_set():
            kills[0] += int(r.execute_command("CLIENT", "KILL", "TYPE", "pubsub"))
            stop.wait(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    n = 300
    try:
        async with aiohttp.ClientSession() as s:
            for i in range(n):
                status, body = await http_publish(s, srv.http, "pub:kill", i)
                assert status == 200, body
        got = await sub.messages(n, timeout=30)
    finally:
        stop.set()
        t.join(5)
    assert kills[0] >= 3, "the Pub/Sub connection was not killed"
    assert [m["data"] for m in got] == list(range(n))  # every one, in order, no duplicate
    assert [m["offset"] for m in got] == list(range(1, n + 1))
    with contextlib.suppress(asyncio.TimeoutError):
        extra = await sub.push(timeout=1.0)
        raise AssertionError(f"unexpected push after the stream: {extra}")


async def test_redis_down_answers_503_in_bounded_time_and_a_lost_stream_is_flagged(
    start_server: ServerFactory, probe: ProbeFactory, redis_server: RedisServer
) -> None:
    srv = await start_server(broker=redis_server.url, redis_timeout=2.0, redis_check_interval=0.3)
    sub = await probe(srv)
    await sub.ok("subscribe", channel="pub:down")
    async with aiohttp.ClientSession() as s:
        for i in range(5):
            assert (await http_publish(s, srv.http, "pub:down", i))[0] == 200
        got = await sub.messages(5)
        seen = got[-1]
        redis_server.stop()
        t0 = time.monotonic()
        status, body = await http_publish(s, srv.http, "pub:down", "while down")
        elapsed = time.monotonic() - t0
        assert status == 503 and body["error"]["code"] == "unavailable", body
        assert elapsed < 5.0, elapsed
        r = await sub.request("publish", channel="pub:down", data="ws while down", timeout=10)
        assert r["ok"] is False and r["error"]["code"] == "unavailable"
        # Redis comes back empty (no persistence): publishing resumes within seconds
        redis_server.start()
        async with asyncio.timeout(15):
            while (await http_publish(s, srv.http, "pub:down", "back"))[0] != 200:
                await asyncio.sleep(0.1)
        # the subscriber is told its stream was lost, never left with a silent gap
        async with asyncio.timeout(10):
            while True:
                push = await sub.push(timeout=10)
                if push["type"] == "unsubscribe":
                    break
        assert push["code"] == "insufficient_state" and push["resubscribe"] is True
        r2 = await sub.ok(
            "subscribe", channel="pub:down", since={"offset": seen["offset"], "epoch": seen["epoch"]}
        )
        assert r2["recovered"] is False and r2["epoch"] != seen["epoch"]


# ------------------------------------------------------------------------ one lost Pub/Sub message


def lose_one_publication(url: str, channel: str, data: Any, prefix: str = "tidings") -> int:
    """What ``_PUBLISH`` does for a publication, by hand on the real Redis, but without its PUBLISH: the
    offset increment and the XADD with the script's field layout (``d`` data, ``i`` info, ``id``, ``t``
    Redis time in ms). The stream has it; no node hears of it live. Returns its offset."""
    r = redis.Redis.from_url(url, socket_timeout=5)
    try:
        meta, stream = f"{prefix}:{{{channel}}}:m", f"{prefix}:{{{channel}}}:s"
        assert r.hget(meta, "e") is not None, "publish once normally first: the channel has its epoch"
        secs, micros = r.time()
        ms = secs * 1000 + micros // 1000
        top = int(r.hincrby(meta, "t", 1))
        r.xadd(
            stream, {"d": orjson.dumps(data), "i": b"", "id": new_publication_id(), "t": ms}, id=f"{top}-1"
        )
        return top
    finally:
        r.close()


@pytest.mark.timeout(30)
async def test_a_lost_pubsub_message_is_repaired_before_the_next_one(
    start_server: ServerFactory, probe: ProbeFactory, redis_url: str
) -> None:
    """Exactly one publication reaches the stream but not Pub/Sub; the next normal publish arrives with an
    offset one too far, and the node reads the missing one from the stream first: in order, no
    duplicate. The position check is set to 60 s, so it is not what repairs it here."""
    srv = await start_server(broker=redis_url, redis_check_interval=60.0)
    sub = await probe(srv)
    await sub.ok("subscribe", channel="pub:lost")
    async with aiohttp.ClientSession() as s:
        assert (await http_publish(s, srv.http, "pub:lost", "one"))[0] == 200
        assert [m["data"] for m in await sub.messages(1)] == ["one"]
        lost = await asyncio.to_thread(lose_one_publication, redis_url, "pub:lost", "lost")
        assert lost == 2
        # nothing tells the node yet (no Pub/Sub message, no position check within the test)
        with contextlib.suppress(TimeoutError):
            early = await sub.push(timeout=0.5)
            raise AssertionError(f"delivered before anything could have told the node: {early}")
        status, body = await http_publish(s, srv.http, "pub:lost", "three")
        assert status == 200 and body["offset"] == 3
        got = await sub.messages(2)
    assert [(m["offset"], m["data"]) for m in got] == [(2, "lost"), (3, "three")]
    with contextlib.suppress(TimeoutError):
        extra = await sub.push(timeout=1.0)
        raise AssertionError(f"a push after the repair (a duplicate?): {extra}")


@pytest.mark.timeout(30)
async def test_a_lost_pubsub_message_with_nothing_after_it_is_found_by_the_position_check(
    start_server: ServerFactory, probe: ProbeFactory, redis_url: str
) -> None:
    """No later publish comes: the periodic position check (``redis_check_interval`` 0.3 s) sees the
    stream's top ahead of what the node delivered and repairs it within a bounded time."""
    interval = 0.3
    srv = await start_server(broker=redis_url, redis_check_interval=interval)
    sub = await probe(srv)
    await sub.ok("subscribe", channel="pub:lost-quiet")
    async with aiohttp.ClientSession() as s:
        assert (await http_publish(s, srv.http, "pub:lost-quiet", "one"))[0] == 200
        assert [m["data"] for m in await sub.messages(1)] == ["one"]
        t0 = time.monotonic()
        await asyncio.to_thread(lose_one_publication, redis_url, "pub:lost-quiet", "lost")
        got = await sub.messages(1, timeout=5 * interval + 2)
        took = time.monotonic() - t0
    print(f"repaired by the position check after {took:.2f} s (interval {interval} s)")
    assert [(m["offset"], m["data"]) for m in got] == [(2, "lost")]
    assert took < 2 * interval + 1.0, took
    with contextlib.suppress(TimeoutError):
        extra = await sub.push(timeout=1.0)
        raise AssertionError(f"a push after the repair (a duplicate?): {extra}")


# --------------------------------------------------------------- Redis restarted with its AOF, under load

AOF_CHANNELS = ["pub:aof-0", "pub:aof-1"]


CRASH_LOSES = 20  # publish transactions cut from the AOF's tail for the "crash" case (~0.25 s of them)


def drop_aof_tail(dir: Path, n: int) -> int:
    """What a machine crash does to an ``everysec`` AOF: the last writes never reached the disk. Cut the
    incremental AOF (Redis 7's multi-part AOF) before its ``n``-th last MULTI: each publish script is
    one MULTI/EXEC there (its effects), so exactly the last ``n`` publications are gone. Returns the
    bytes cut."""
    (incr,) = (dir / "appendonlydir").glob("*.incr.aof")
    data = incr.read_bytes()
    marker = b"*1\r\n$5\r\nMULTI\r\n"
    starts = [i for i in range(len(data)) if data.startswith(marker, i)]
    assert len(starts) > n, f"only {len(starts)} transactions in {incr}"
    cut = starts[-n]
    incr.write_bytes(data[:cut])
    return len(data) - cut


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("fsync", "signame"),
    [
        ("always", "SIGTERM"),
        ("always", "SIGKILL"),
        ("everysec", "SIGTERM"),
        ("everysec", "SIGKILL"),
        ("everysec", "crash"),
    ],
)
async def test_redis_restarted_with_its_aof_under_load(
    tmp_path: Path, make_redis_server: Callable[..., RedisServer], fsync: str, signame: str
) -> None:
    """Publishes flow over HTTP into nodes A and B (real ``tidings serve`` processes) at 40/s each; a
    Python client on each node is subscribed to both channels. Redis (AOF, ``appendfsync`` ``fsync``) is
    stopped with ``signame`` mid-stream and started again on its port with its AOF. Publishing resumes
    within seconds (measured); each subscriber gets every acknowledged publication, or is told (a
    ``gap``: new epoch / ``recovered: false``): lost = 0, no duplicate, in order.

    ``always``: Redis fsyncs before it answers, so nothing acknowledged can be missing after the restart;
    the nodes see ``appendfsync always`` (CONFIG GET) and each channel keeps its epoch: everything is
    delivered, nothing flagged. ``everysec``: a SIGTERM flushes and fsyncs the AOF, and after a SIGKILL of
    the process what Redis wrote is in the kernel's page cache, but a crash of the machine loses up to a
    second, and nobody can tell which happened: each channel goes on in a new epoch at its first publish
    after the restart (its in-memory marker is gone), and its subscribers are told (flagged > 0, lost 0).
    ``crash`` is that machine crash: SIGKILL, then the AOF's last CRASH_LOSES publications cut off before
    the restart, so Redis comes back behind what it acknowledged: lost 0 all the same, and never a
    different publication at an offset a subscriber already holds (the ledger checks that)."""
    srv = make_redis_server(persistence="aof", args=["--appendfsync", fsync])
    assert srv.client().config_get("appendfsync") == {"appendfsync": fsync}
    env = {"TIDINGS_REDIS_TIMEOUT": "2"}
    a, b = (Node(tmp_path, srv.url, n, check_interval=0.3, env=env) for n in ("a", "b"))
    clients = [Client(n.ws_url, min_backoff=0.1, max_backoff=0.5) for n in (a, b)]
    delivered: list[Delivered] = [{} for _ in clients]
    flagged: list[Flagged] = [[] for _ in clients]
    tasks: list[asyncio.Task[Any]] = []
    ledger = Ledger()
    stop = asyncio.Event()
    try:
        await a.ready()
        await b.ready()
        for i, c in enumerate(clients):
            c.on("gap", gap_recorder(flagged[i]))
            await c.connect(timeout=10)
            for ch in AOF_CHANNELS:
                tasks.append(asyncio.create_task(collect(await c.subscribe(ch), delivered[i])))
        async with aiohttp.ClientSession() as s:
            pubs = [asyncio.create_task(publisher(s, n.http, ledger, stop, AOF_CHANNELS, 40)) for n in (a, b)]
            count = lambda: sum(len(v) for v in delivered[0].values())  # noqa: E731
            await until(lambda: count() >= 60, 20, "deliveries before Redis stops")
            before = ledger.total
            t_down = time.monotonic()
            await asyncio.to_thread(srv.stop if signame == "SIGTERM" else srv.kill)
            if signame == "crash":
                cut = drop_aof_tail(srv.dir, CRASH_LOSES)
            await until(
                lambda: sum(1 for t, st, _ in ledger.attempts if t > t_down and st == 503) >= 80,
                20,
                "publishes answered 503 while Redis is down",
            )
            # ~1 s down: the nodes' Pub/Sub reconnect backoff has grown to ~0.4-0.8 s by now
            await srv.astart()
            t_up = time.monotonic()
            pchan = f"tidings:{{{AOF_CHANNELS[0]}}}:p"

            async def pubsub_back() -> float:
                while (await asyncio.to_thread(srv.command, "PUBSUB", "NUMSUB", pchan))[1] < 2:
                    await asyncio.sleep(0.01)
                return time.monotonic()

            watcher = asyncio.create_task(pubsub_back())
            await until(
                lambda: any(t > t_up and st == 200 for t, st, _ in ledger.attempts), 20, "publishing resumed"
            )
            first_fail = min(t for t, st, _ in ledger.attempts if t > t_down and st != 200)
            resumed = min(t for t, st, _ in ledger.attempts if t > first_fail and st == 200)
            n_back = ledger.total
            await until(lambda: ledger.total >= n_back + 40, 20, "publishes after the restart")
            stop.set()
            await asyncio.gather(*pubs)
            t_pubsub = await asyncio.wait_for(watcher, 10)
        # acknowledged before both nodes' Pub/Sub subscription was back: only a read of the stream (a
        # repair, or the recovery verdict) can bring these to the subscribers or flag them
        behind = sum(1 for t, st, _ in ledger.attempts if resumed <= t < t_pubsub and st == 200)
        assert behind > 0, "the nodes' Pub/Sub was back before publishing resumed: no repair exercised"
        down = [(st, took) for t, st, took in ledger.attempts if first_fail <= t < resumed]
        assert down and all(st != 200 for st, _ in down)
        assert all(st == 503 and took < 5.0 for st, took in down), down  # unavailable, in bounded time
        # whatever was acknowledged: every subscriber got it or was told
        pairs = list(zip(delivered, flagged, strict=True))
        try:
            await until(lambda: all(ledger.report(d, f)["lost"] == 0 for d, f in pairs), 20, "lost = 0")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {[ledger.report(d, f) for d, f in pairs]}") from None
    finally:
        stop.set()
        for c in clients:
            await c.close()
        for t in tasks:
            t.cancel()
        for n in (a, b):
            n.stop()
    print(
        f"\nappendfsync {fsync}, {signame}: acknowledged {ledger.total} ({before} before the stop), "
        f"{len(down)} answered 503 while down (slowest {max(took for _, took in down):.2f} s), "
        f"publishing resumed {resumed - t_up:.2f} s after Redis answered PING again "
        f"({resumed - first_fail:.2f} s after the first 503); {behind} acknowledged before the "
        f"nodes' Pub/Sub was back ({t_pubsub - t_up:.2f} s after PING)"
        + (f"; AOF tail cut: {CRASH_LOSES} publications, {cut} bytes" if signame == "crash" else "")
    )
    for i, (d, f) in enumerate(pairs):
        counts = ledger.report(d, f)
        print(f"  subscriber on node {'ab'[i]}: {counts}")
        assert counts["lost"] == 0 and counts["duplicates"] == 0, counts
        assert counts["acknowledged"] == ledger.total
        if fsync == "everysec":  # a new epoch after the restart: told, not silently skipped
            assert counts["flagged"] > 0, counts
        else:  # nothing acknowledged can be missing from Redis: nothing to flag
            assert counts["flagged"] == 0 and counts["delivered"] == ledger.total, counts
