"""``GET /readyz``: 200 while the broker answers a real request and the node is not draining; 503 with a
reason otherwise. The failures are real: a SQLite file the kernel refuses to grow (RLIMIT_FSIZE on the
serving process), a Redis server stopped, a ``tidings serve`` process draining after SIGTERM."""

from __future__ import annotations

import asyncio
import json
import math
import resource
import signal
import time
from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp

from tidings.backends.memory import MemoryBroker
from tidings.node import READY_CACHE

from .conftest import ProbeFactory, Server, ServerFactory, api_headers
from .redis_servers import RedisServer
from .serve_process import Node
from .test_docs import ResponseChecker

CHECKER = ResponseChecker(json.loads(resources.files("tidings").joinpath("openapi.json").read_text()))


async def readyz(session: aiohttp.ClientSession, base: str) -> tuple[int, dict[str, Any]]:
    """One /readyz answer, checked against its openapi.json schema."""
    async with session.get(f"{base}/readyz") as r:
        body = await r.json()
        CHECKER.check("get", "/readyz", r.status, r.content_type, body)
        return r.status, body


async def until_status(
    session: aiohttp.ClientSession, base: str, status: int, timeout: float = 15.0
) -> dict[str, Any]:
    """Poll /readyz (every 50 ms) until it answers ``status``; its body."""
    async with asyncio.timeout(timeout):
        while True:
            got, body = await readyz(session, base)
            if got == status:
                return body
            await asyncio.sleep(0.05)


async def test_readyz_is_ready_and_healthz_stays_liveness(
    server: Server, session: aiohttp.ClientSession
) -> None:
    assert await readyz(session, server.http) == (200, {"status": "ready"})
    async with session.get(f"{server.http}/healthz") as r:
        assert r.status == 200 and (await r.json())["status"] == "ok"


class CountingBroker(MemoryBroker):
    """The memory broker, counting the readiness checks that reach it."""

    def __init__(self) -> None:
        super().__init__()
        self.pings = 0

    async def ping(self) -> None:
        self.pings += 1
        await super().ping()


async def test_readyz_answers_are_cached_so_probes_cannot_hammer_the_broker(
    start_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    broker = CountingBroker()
    srv = await start_server(broker_impl=broker)
    t0 = time.monotonic()
    statuses = await asyncio.gather(*(readyz(session, srv.http) for _ in range(50)))
    for _ in range(50):
        statuses.append(await readyz(session, srv.http))
    elapsed = time.monotonic() - t0
    assert all(s == (200, {"status": "ready"}) for s in statuses)
    # One check per READY_CACHE seconds at most (+1 for the window the burst started in), not one per probe.
    assert 1 <= broker.pings <= math.ceil(elapsed / READY_CACHE) + 1, (broker.pings, elapsed)


async def test_readyz_fails_when_sqlite_cannot_write(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    """RLIMIT_FSIZE 0 on the serving process: every write to the database (and its WAL) fails with EFBIG,
    as on a full or read-only disk (chmod does not stop root; this does). /readyz goes 503 and a publish
    fails too, so the check tells what publishing meets; with the limit lifted it is ready again."""
    node = Node(tmp_path, f"sqlite:///{tmp_path / 'tidings.db'}", "sqlite")
    try:
        await node.ready(session)
        assert node.pid is not None
        assert (await readyz(session, node.http))[0] == 200
        soft, hard = resource.prlimit(node.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(node.pid, resource.RLIMIT_FSIZE, (0, hard))
        try:
            body = await until_status(session, node.http, 503)
            assert body["status"] == "unavailable"
            assert body["reason"].startswith("broker: storage write failed"), body
            pub = {"channel": "chat:x", "data": 1}
            async with session.post(f"{node.http}/api/publish", json=pub, headers=api_headers()) as r:
                assert r.status == 503, await r.text()
            async with session.get(f"{node.http}/healthz") as r:
                assert r.status == 200  # alive: liveness does not restart a node whose disk is full
        finally:
            resource.prlimit(node.pid, resource.RLIMIT_FSIZE, (soft, hard))
        assert await until_status(session, node.http, 200) == {"status": "ready"}
    finally:
        node.stop()


async def test_readyz_fails_while_redis_is_stopped(
    start_server: ServerFactory, redis_server: RedisServer, session: aiohttp.ClientSession
) -> None:
    srv = await start_server(broker=redis_server.url, redis_timeout=1.0)
    assert await readyz(session, srv.http) == (200, {"status": "ready"})
    await asyncio.to_thread(redis_server.stop)
    body = await until_status(session, srv.http, 503)
    assert body["status"] == "unavailable"
    assert body["reason"].startswith(f"broker: cannot reach Redis at 127.0.0.1:{redis_server.port}"), body
    await asyncio.to_thread(redis_server.start)
    assert await until_status(session, srv.http, 200) == {"status": "ready"}


async def test_readyz_is_503_while_draining_after_sigterm(
    tmp_path: Path, session: aiohttp.ClientSession, probe: ProbeFactory
) -> None:
    """SIGTERM to a real ``tidings serve`` with drain_delay: /readyz says ``draining`` at once while the
    node still serves its held connection (a publication reaches it) and /healthz; then it closes the
    connection (1001 going away) and exits 0."""
    node = Node(tmp_path, "memory://", "drain", drain_delay="3")
    try:
        await node.ready(session)
        held = await probe(node.ws_url)
        await held.ok("subscribe", channel="chat:drain")
        assert node.proc is not None
        node.proc.send_signal(signal.SIGTERM)
        body = await until_status(session, node.http, 503, timeout=2.5)
        assert body == {"status": "unavailable", "reason": "draining"}
        async with session.get(f"{node.http}/healthz") as r:
            assert r.status == 200
        pub = {"channel": "chat:drain", "data": "still here"}
        async with session.post(f"{node.http}/api/publish", json=pub, headers=api_headers()) as r:
            assert r.status == 200, await r.text()
        (msg,) = await held.messages(1)
        assert msg["data"] == "still here"
        assert await held.wait_closed(10) == 1001
        await asyncio.to_thread(node.proc.wait, 10)
        assert node.proc.returncode == 0, node.text()
        assert "draining: /readyz answers 503" in node.text()
    finally:
        node.stop()
