"""Presence and the channel list across nodes (``RedisPresence``), with real ``tidings serve`` processes
sharing one real ``redis-server``: asked on one node, they answer for every node; a node killed with
``kill -9`` drops out within ``presence_ttl``; Redis down answers ``unavailable`` within ``redis_timeout``
and presence comes back by itself after Redis restarted empty.

Presence is a TTL, so waiting for it is a bounded poll of the answer (the condition, not a sleep)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tidings.backends.redis_presence import RedisPresence

from .conftest import API_KEY, Probe, ProbeFactory, ServerFactory
from .redis_servers import RedisCluster, RedisServer
from .serve_process import running_nodes
from .test_redis import Node, open_probe

AUTH = {"Authorization": f"Bearer {API_KEY}"}
TTL = 2.0  # presence_ttl of these nodes: refreshed every TTL / 3

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def nodes(tmp_path: Path, redis_url: str) -> AsyncIterator[list[Node]]:
    async with running_nodes(tmp_path, redis_url, presence_ttl=str(TTL)) as started:
        yield started


async def api(s: aiohttp.ClientSession, base: str, path: str) -> tuple[int, Any]:
    async with s.get(f"{base}{path}", headers=AUTH) as r:
        return r.status, await r.json()


async def until(check: Callable[[], Awaitable[bool]], timeout: float, step: float = 0.05) -> float:
    """Poll ``check`` until it holds; the seconds it took (fails after ``timeout``)."""
    t0 = time.monotonic()
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(step)
    return time.monotonic() - t0


async def client_id(p: Probe) -> str:
    cid: str = (await p.ok("connect"))["client"]
    return cid


async def next_push(p: Probe, kind: str, timeout: float = 5.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            push = await p.push(timeout)
            if push["type"] == kind:
                return push


async def test_presence_join_leave_and_channels_answer_for_every_node(nodes: list[Node]) -> None:
    a, b = nodes
    async with aiohttp.ClientSession() as s:
        on_a = await open_probe(s, a.http)
        on_b = await open_probe(s, b.http)
        id_a, id_b = await client_id(on_a), await client_id(on_b)
        await on_a.ok("subscribe", channel="chat:room")

        async def listed(n: int) -> bool:
            _, body = await api(s, a.http, "/api/channels/chat:room/presence")
            return bool(body["count"] == n)

        await until(lambda: listed(1), 5)  # A's member is in Redis before B's joins: a known order
        await on_b.ok("subscribe", channel="chat:room")
        # B's join reaches A's subscriber through Redis
        join = await next_push(on_a, "join")
        assert (join["channel"], join["client"], join["user"]) == ("chat:room", id_b, "")
        want = [{"client": id_a, "user": ""}, {"client": id_b, "user": ""}]  # in join order

        async def both_listed() -> bool:
            status, body = await api(s, a.http, "/api/channels/chat:room/presence")
            assert status == 200, body
            return bool(body == {"clients": want, "count": 2})

        await until(both_listed, 5)
        # the same on B, and over /ws on A
        status, body = await api(s, b.http, "/api/channels/chat:room/presence")
        assert (status, body) == (200, {"clients": want, "count": 2})
        assert await on_a.ok("presence", channel="chat:room") == {"clients": want, "count": 2}

        # /api/channels on A counts B's subscribers and lists B's channel A has none of
        only_b = await open_probe(s, b.http)
        await only_b.ok("subscribe", channel="chat:only-b")
        await only_b.ok("subscribe", channel="chat:room")
        want_channels = [
            {"channel": "chat:only-b", "subscribers": 1},
            {"channel": "chat:room", "subscribers": 3},
        ]

        async def channels_listed() -> bool:
            status, body = await api(s, a.http, "/api/channels")
            assert status == 200, body
            return bool(body["channels"] == want_channels)

        await until(channels_listed, 5)

        # B's leave reaches A's subscriber, and B's client is gone from A's answer
        await on_b.ok("unsubscribe", channel="chat:room")
        leave = await next_push(on_a, "leave")
        assert (leave["channel"], leave["client"]) == ("chat:room", id_b)

        async def left() -> bool:
            _, body = await api(s, a.http, "/api/channels/chat:room/presence")
            return id_b not in [c["client"] for c in body["clients"]] and body["count"] == 2

        await until(left, 5)
        for p in (on_a, on_b, only_b):
            await p.close()


async def test_a_killed_nodes_members_expire_within_the_ttl_and_the_others_stay(nodes: list[Node]) -> None:
    a, b = nodes
    async with aiohttp.ClientSession() as s:
        on_a = await open_probe(s, a.http)
        id_a = await client_id(on_a)
        await on_a.ok("subscribe", channel="chat:crash")
        on_b = [await open_probe(s, b.http) for _ in range(2)]
        for p in on_b:
            await p.ok("subscribe", channel="chat:crash")
        await on_b[0].ok("subscribe", channel="chat:b-only")

        async def count(n: int) -> bool:
            _, body = await api(s, a.http, "/api/channels/chat:crash/presence")
            return bool(body["count"] == n)

        await until(lambda: count(3), 5)

        b.kill9()
        t_kill = time.monotonic()

        async def only_a_left() -> bool:
            _, body = await api(s, a.http, "/api/channels/chat:crash/presence")
            return bool(body == {"clients": [{"client": id_a, "user": ""}], "count": 1})

        took = await until(only_a_left, TTL + 3)
        # B refreshed at most TTL / 3 before it died, so its members lasted at most TTL after that
        assert took <= TTL + 1.0, f"the dead node's members lasted {took:.2f}s (presence_ttl {TTL}s)"

        async def b_channels_gone() -> bool:
            _, body = await api(s, a.http, "/api/channels")
            return bool(body["channels"] == [{"channel": "chat:crash", "subscribers": 1}])

        await until(b_channels_gone, TTL + 3)
        # A's own member outlives several TTLs (A keeps refreshing it)
        await asyncio.sleep(max(0.0, t_kill + 2 * TTL - time.monotonic()))
        assert await count(1)
        assert await on_a.ok("presence", channel="chat:crash") == {
            "clients": [{"client": id_a, "user": ""}],
            "count": 1,
        }
        print(f"\n  dead node's presence gone {took:.2f}s after kill -9 (presence_ttl {TTL}s)")
        await on_a.close()


async def test_redis_down_presence_answers_503_in_bounded_time_and_comes_back_after_a_refresh(
    start_server: ServerFactory, probe: ProbeFactory, redis_server: RedisServer
) -> None:
    timeout = 1.5
    srv = await start_server(broker=redis_server.url, redis_timeout=timeout, presence_ttl=TTL)
    p = await probe(srv)
    cid = await client_id(p)
    await p.ok("subscribe", channel="chat:down")
    listed = {"clients": [{"client": cid, "user": ""}], "count": 1}
    async with aiohttp.ClientSession() as s:

        async def present() -> bool:
            status, body = await api(s, srv.http, "/api/channels/chat:down/presence")
            return status == 200 and body == listed

        await until(present, 5)
        for stop, what in ((redis_server.pause, "paused (hangs)"), (redis_server.stop, "stopped")):
            stop()
            for path in ("/api/channels/chat:down/presence", "/api/channels"):
                t0 = time.monotonic()
                status, body = await api(s, srv.http, path)
                elapsed = time.monotonic() - t0
                assert status == 503 and body["error"]["code"] == "unavailable", (what, path, body)
                assert elapsed < timeout + 1.0, (what, path, elapsed)
            t0 = time.monotonic()
            r = await p.request("presence", channel="chat:down", timeout=timeout + 3)
            assert r["ok"] is False and r["error"]["code"] == "unavailable", r
            assert time.monotonic() - t0 < timeout + 1.0
            if what.startswith("paused"):
                redis_server.resume()
                await until(present, 5)
        # Redis comes back empty: the node writes its members again on its own
        redis_server.start()
        took = await until(present, TTL / 3 + 5)
        print(f"\n  presence back {took:.2f}s after Redis restarted empty (refresh every {TTL / 3:.2f}s)")
        assert took <= TTL / 3 + 2.0, took


async def test_redis_presence_runs_on_redis_cluster_one_slot_per_command(redis_cluster: RedisCluster) -> None:
    """The store on a real 3-master Redis Cluster through redis-py's cluster client (the client a
    Cluster broker hands it): channels on different masters, node keys in their own slots."""
    from redis.asyncio.cluster import ClusterNode
    from redis.asyncio.cluster import RedisCluster as ClusterClient

    channels = ["chat:c0", "chat:c1", "chat:c2", "chat:c3", "chat:c4", "chat:c5"]
    owners = {
        redis_cluster.master_for_slot(redis_cluster.keyslot(f"tidings:{{{c}}}:pe")).port for c in channels
    }
    assert len(owners) >= 2, "the channels should live on several masters"
    nodes = [ClusterNode(h, p) for h, p in redis_cluster.startup_nodes]
    clients = [ClusterClient(startup_nodes=nodes) for _ in range(2)]
    ttl = 1.0
    alive = RedisPresence(lambda: clients[0], ttl=ttl, timeout=3.0)
    dead = RedisPresence(lambda: clients[1], ttl=ttl, timeout=3.0)
    await alive.start(lambda: {c: 1 for c in channels})
    await dead.start(lambda: {c: 2 for c in channels})
    try:
        for c in channels:
            alive.add(c, f"a-{c}", "ua")
            dead.add(c, f"d1-{c}", "ud")
            dead.add(c, f"d2-{c}", "ud")

        async def everyone() -> bool:
            counts = [(await alive.read(c)).count for c in channels]
            return counts == [3] * len(channels) and await alive.channels() == {c: 3 for c in channels}

        await until(everyone, 10)
        ids = [m["client"] for m in await dead.clients("chat:c0")]
        assert [i for i in ids if i.startswith("d")] == ["d1-chat:c0", "d2-chat:c0"]  # one node's join order
        await dead.close(forget=False)  # stops refreshing, as a crash would

        async def only_alive() -> bool:
            listed = [await alive.clients(c) for c in channels]
            want = [[{"client": f"a-{c}", "user": "ua"}] for c in channels]
            return listed == want and await alive.channels() == {c: 1 for c in channels}

        took = await until(only_alive, ttl + 3)
        assert took <= ttl + 1.0, took
    finally:
        await alive.close()
        for cl in clients:
            await cl.aclose()


async def test_a_leave_while_redis_is_down_is_written_once_it_is_back(
    start_server: ServerFactory,
    probe: ProbeFactory,
    make_redis_server: Callable[..., RedisServer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis with AOF keeps the members it had; a client that left meanwhile must not linger there until
    its TTL (30 s here): the node keeps the removal and writes it once Redis answers."""
    redis_server = make_redis_server(persistence="aof")
    srv = await start_server(broker=redis_server.url, redis_timeout=1.0, presence_ttl=30.0)
    stay, go = await probe(srv), await probe(srv)
    id_stay, id_go = await client_id(stay), await client_id(go)
    for p in (stay, go):
        await p.ok("subscribe", channel="chat:aof")
    async with aiohttp.ClientSession() as s:

        async def listed(ids: list[str]) -> bool:
            status, body = await api(s, srv.http, "/api/channels/chat:aof/presence")
            return status == 200 and [c["client"] for c in body["clients"]] == ids

        await until(lambda: listed([id_stay, id_go]), 5)
        redis_server.stop()  # SIGTERM: the AOF holds both members
        await go.ok("unsubscribe", channel="chat:aof")
        caplog.set_level(logging.INFO, "tidings.redis")

        async def write_failed() -> bool:  # the node tried to write the leave while Redis was down
            return any("presence write failed" in r.getMessage() for r in caplog.records)

        await until(write_failed, 5)
        redis_server.start()
        took = await until(lambda: listed([id_stay]), 10)
        print(f"\n  leave written {took:.2f}s after Redis came back (presence_ttl 30s)")
        assert took < 5.0, took
