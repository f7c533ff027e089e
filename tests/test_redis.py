"""The Redis broker with real nodes and a real ``redis-server``: several ``tidings serve`` processes
sharing one Redis, Pub/Sub connections killed under load, Redis stopped and restarted empty. Each
counts what an acknowledged publication became for a subscriber: delivered, or flagged (an
``insufficient_state`` push / ``recovered: false``); lost must be 0."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis

from .conftest import API_KEY, Probe, ProbeFactory, ServerFactory, bound_socket
from .redis_servers import RedisServer

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def free_port() -> int:
    with bound_socket() as s:
        port: int = s.getsockname()[1]
        return port


class Node:
    """One ``tidings serve`` process on a free loopback port. ``settings``: more options, passed as
    ``TIDINGS_<NAME>`` variables (``presence_ttl="2"``)."""

    def __init__(self, tmp: Path, broker: str, name: str, **settings: str) -> None:
        self.port = free_port()
        env = {**os.environ, "TIDINGS_API_KEYS": API_KEY, "TIDINGS_REDIS_CHECK_INTERVAL": "0.5"}
        env.update({f"TIDINGS_{k.upper()}": v for k, v in settings.items()})
        self.log = (tmp / f"{name}.log").open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tidings",
                "serve",
                "--port",
                str(self.port),
                "--broker",
                broker,
                "--data-dir",
                str(tmp / name),
            ],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def ready(self, session: aiohttp.ClientSession, timeout: float = 15.0) -> None:
        async with asyncio.timeout(timeout):
            while True:
                assert self.proc.poll() is None, f"node exited with {self.proc.returncode}"
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"{self.http}/healthz") as r:
                        if r.status == 200:
                            return
                await asyncio.sleep(0.05)

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


@pytest.fixture
async def nodes(tmp_path: Path, redis_url: str) -> AsyncIterator[list[Node]]:
    started = [Node(tmp_path, redis_url, name) for name in ("a", "b")]
    try:
        async with aiohttp.ClientSession() as s:
            for n in started:
                await n.ready(s)
        yield started
    finally:
        for n in started:
            n.stop()


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
