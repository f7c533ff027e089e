"""Real servers on free loopback ports, real clients. Every wait has a timeout; nothing sleeps and hopes."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import itertools
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from tidings.app import create_app
from tidings.config import ApiKey, Namespace, Settings
from tidings.node import NODE, Node
from tidings.transports.server import make_runner

from .redis_servers import RedisCluster, RedisSentinel, RedisServer
from .redis_servers import missing as redis_missing

API_KEY = "test-key-0123456789"

# Subprocesses (`python -m tidings ...`) run this checkout's code too, whatever is installed.
SRC = str(Path(__file__).resolve().parent.parent / "src")
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH", "")) if p)


def bound_socket(host: str = "127.0.0.1") -> socket.socket:
    """A listening socket on a free port: the port is known before the server starts, so nothing races."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(1024)
    return sock


@dataclass
class Server:
    runner: web.AppRunner
    port: int
    settings: Settings

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def node(self) -> Node:
        return self.runner.app[NODE]

    async def stop(self) -> None:
        await self.runner.cleanup()


def make_settings(tmp_path: Path, **kw: Any) -> Settings:
    ns = kw.pop("namespaces", None)
    s = Settings(data_dir=tmp_path / "data", api_keys=[ApiKey("test", API_KEY, "admin")], broker="memory://")
    s.namespaces = {
        "chat": Namespace("chat", publish=True, join_leave=True),
        "pub": Namespace("pub", publish=True),
        "ro": Namespace("ro", publish=False),
        "small": Namespace("small", publish=True, history_size=5),
        "ttl": Namespace("ttl", publish=True, history_ttl=0.5),
        **(ns or {}),
    }
    for k, v in kw.items():
        setattr(s, k, v)
    return s


ServerFactory = Callable[..., Awaitable[Server]]


@pytest.fixture
async def start_server(tmp_path: Path) -> AsyncIterator[ServerFactory]:
    """``await start_server(broker="sqlite://...", max_buffer=...)``: a server on its own free port.
    ``broker_impl=`` hands the app a broker object instead of the one ``broker`` names."""
    started: list[Server] = []

    async def start(sock: socket.socket | None = None, **kw: Any) -> Server:
        broker_impl = kw.pop("broker_impl", None)
        settings = kw.pop("settings", None) or make_settings(tmp_path, **kw)
        runner = make_runner(
            create_app(settings, broker_impl), settings.header_timeout, access_log=None, shutdown_timeout=2
        )
        await runner.setup()
        sock = sock or bound_socket()
        site = web.SockSite(runner, sock)
        await site.start()
        srv = Server(runner, sock.getsockname()[1], settings)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        await srv.stop()


@pytest.fixture
async def server(start_server: ServerFactory) -> Server:
    return await start_server()


class Probe:
    """A raw protocol client: send commands, await replies by id, await pushes. For testing the wire."""

    _ids = itertools.count(1)

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.replies: dict[Any, dict[str, Any]] = {}
        self.pushes: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.closed = asyncio.Event()
        self._reply_event = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            async for msg in self.ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                obj = orjson.loads(msg.data)
                if "type" in obj:
                    self.pushes.put_nowait(obj)
                else:
                    self.replies[obj.get("id")] = obj
                    self._reply_event.set()
        finally:
            self.closed.set()
            self._reply_event.set()

    async def send_raw(self, text: str) -> None:
        await self.ws.send_str(text)

    async def request(self, op: str, timeout: float = 5.0, **fields: Any) -> dict[str, Any]:
        rid = next(self._ids)
        await self.ws.send_str(orjson.dumps({"id": rid, "op": op, **fields}).decode())
        return await self.reply(rid, timeout)

    async def reply(self, rid: Any, timeout: float = 5.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while rid not in self.replies:
                if self.closed.is_set():
                    raise ConnectionError(f"closed ({self.ws.close_code}) before reply {rid}")
                self._reply_event.clear()
                await self._reply_event.wait()
        return self.replies.pop(rid)

    async def ok(self, op: str, **fields: Any) -> dict[str, Any]:
        r = await self.request(op, **fields)
        assert r.get("ok") is True, r
        result: dict[str, Any] = r["result"]
        return result

    async def push(self, timeout: float = 5.0) -> dict[str, Any]:
        return await asyncio.wait_for(self.pushes.get(), timeout)

    async def messages(self, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        async with asyncio.timeout(timeout):
            while len(out) < n:
                p = await self.pushes.get()
                if p["type"] == "message":
                    out.append(p)
        return out

    async def wait_closed(self, timeout: float = 10.0) -> int | None:
        await asyncio.wait_for(self.closed.wait(), timeout)
        return self.ws.close_code

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


ProbeFactory = Callable[..., Awaitable[Probe]]


@pytest.fixture
async def probe(session: aiohttp.ClientSession) -> AsyncIterator[ProbeFactory]:
    """``p = await probe(server)``: a connected raw-protocol client, closed after the test."""
    made: list[Probe] = []

    async def connect(srv: Server | str, **kw: Any) -> Probe:
        url = srv if isinstance(srv, str) else srv.ws_url
        ws = await session.ws_connect(url, autoping=True, **kw)
        p = Probe(ws)
        made.append(p)
        return p

    yield connect
    for p in made:
        await p.close()


def api_headers(key: str = API_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# ---------------------------------------------------------------------------------------------- subprocess


@dataclass
class Proc:
    """``tidings serve`` in a subprocess on a pre-bound socket, for restart and kill -9 tests."""

    data_dir: Path
    port: int
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(1024)
        self.port = sock.getsockname()[1]
        self.log = self.data_dir.parent / f"server-{self.port}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tidings",
                    "serve",
                    "--fd",
                    str(sock.fileno()),
                    "--data-dir",
                    str(self.data_dir),
                    *self.args,
                ],
                pass_fds=[sock.fileno()],
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=env,
            )
        sock.close()
        self.wait_ready()

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log and self.log.read_text()}")
            if self.log and b"listening on" in self.log.read_bytes():
                return
            time.sleep(0.05)
        raise TimeoutError("server did not start")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def subprocess_server(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    made: list[Proc] = []

    def make(*args: str) -> Proc:
        p = Proc(tmp_path / "data", 0, list(args))
        p.start()
        made.append(p)
        return p

    yield make
    for p in made:
        p.stop()


# ------------------------------------------------------------------------------------------- real Redis
# Real redis-server processes on free loopback ports (tests/redis_servers.py). Without redis-server the
# tests skip locally and fail under CI (env CI set): the Redis broker must be tested where it ships.

REDIS_FIXTURES = {
    "redis_server",
    "make_redis_server",
    "shared_redis",
    "redis_url",
    "redis_cluster",
    "redis_cluster_replicas",
    "redis_sentinel",
    "make_redis_cluster",
    "make_redis_sentinel",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that uses a Redis fixture is marked ``redis`` (``pytest -m 'not redis'`` skips them)."""
    for item in items:
        if REDIS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.redis)


def require_redis() -> None:
    """Skip (locally) or fail (under CI) when real Redis cannot run here."""
    reason = redis_missing()
    if not reason and importlib.util.find_spec("redis") is None:
        reason = "redis-py is not installed (pip install -e '.[test]')"
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"Redis tests cannot run under CI: {reason}", pytrace=False)
        pytest.skip(reason)


@pytest.fixture
def make_redis_server(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """``make_redis_server(persistence="aof", args=[...])``: a started standalone server (RedisServer's
    keyword arguments), killed after the test."""
    require_redis()
    made: list[RedisServer] = []

    def make(**kw: Any) -> RedisServer:
        srv = RedisServer(tmp_path / f"redis{len(made)}", **kw)
        made.append(srv)
        return srv.start()

    try:
        yield make
    finally:
        for srv in made:
            srv.kill()


@pytest.fixture
def redis_server(make_redis_server: Callable[..., RedisServer]) -> RedisServer:
    """A fresh standalone server for this test only (no persistence): free to stop, kill, restart."""
    return make_redis_server()


@pytest.fixture(scope="session")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One standalone server for the whole session; use ``redis_url`` in tests, which flushes it."""
    require_redis()
    srv = RedisServer(tmp_path_factory.mktemp("shared-redis"), name="shared")
    try:
        yield srv.start()
    finally:
        srv.kill()


@pytest.fixture
def redis_url(shared_redis: RedisServer) -> str:
    """``redis://127.0.0.1:PORT/0`` of the shared server, empty (FLUSHALL) at the start of each test.
    A test that needs to stop or kill Redis takes ``redis_server`` instead (this one is revived if not)."""
    if shared_redis.running:
        shared_redis.resume()  # in case a test left it SIGSTOPped
    else:
        shared_redis.start()
    shared_redis.flushall()
    return shared_redis.url


class _SharedGroup:
    """A Redis group (cluster or sentinel) made on first use and reused by later tests: each use checks
    it is healthy again (restarting what a test killed), or makes a new one, and empties it."""

    def __init__(self, make: Callable[[], RedisCluster | RedisSentinel]) -> None:
        self.make = make
        self.group: RedisCluster | RedisSentinel | None = None

    def get(self) -> RedisCluster | RedisSentinel:
        require_redis()
        if self.group is not None:
            try:
                self.group.ensure_healthy(timeout=20)
            except Exception:  # beyond repair: make a new one
                self.group.close()
                self.group = None
        if self.group is None:
            self.group = self.make().start()
        self.group.flushall()
        return self.group

    def close(self) -> None:
        if self.group is not None:
            self.group.close()


@pytest.fixture(scope="session")
def _redis_groups(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, _SharedGroup]]:
    def base(name: str) -> Path:
        return tmp_path_factory.mktemp(name)

    groups = {
        "cluster": _SharedGroup(lambda: RedisCluster(base("redis-cluster"))),
        "cluster_replicas": _SharedGroup(lambda: RedisCluster(base("redis-cluster-r"), replicas=1)),
        "sentinel": _SharedGroup(lambda: RedisSentinel(base("redis-sentinel"))),
    }
    try:
        yield groups
    finally:
        for g in groups.values():
            g.close()


@pytest.fixture
def redis_cluster(_redis_groups: dict[str, _SharedGroup]) -> RedisCluster:
    """A 3-master Redis Cluster (no replicas), shared by the session, healthy and empty for each test
    (``.url`` is ``redis+cluster://...``; a master killed by a test is restarted, without its data)."""
    group = _redis_groups["cluster"].get()
    assert isinstance(group, RedisCluster)
    return group


@pytest.fixture
def redis_cluster_replicas(_redis_groups: dict[str, _SharedGroup]) -> RedisCluster:
    """3 masters with one replica each (for failover: ``await cluster.akill_master()``), shared like
    ``redis_cluster``; after a failover the roles stay swapped, so ask ``masters()`` / ``master_for_key``."""
    group = _redis_groups["cluster_replicas"].get()
    assert isinstance(group, RedisCluster)
    return group


@pytest.fixture
def redis_sentinel(_redis_groups: dict[str, _SharedGroup]) -> RedisSentinel:
    """Master + replica + 3 sentinels (master name ``tidings``, ``.url`` is ``redis+sentinel://...``),
    shared like ``redis_cluster``; ``.master`` is whichever server the sentinels name now."""
    group = _redis_groups["sentinel"].get()
    assert isinstance(group, RedisSentinel)
    return group


@pytest.fixture
def make_redis_cluster(tmp_path: Path) -> Iterator[Callable[..., RedisCluster]]:
    """``make_redis_cluster(replicas=1, persistence="aof")``: a fresh cluster for this test only."""
    require_redis()
    made: list[RedisCluster] = []

    def make(**kw: Any) -> RedisCluster:
        c = RedisCluster(tmp_path / f"cluster{len(made)}", **kw)
        made.append(c)
        return c.start()

    try:
        yield make
    finally:
        for c in made:
            c.close()


@pytest.fixture
def make_redis_sentinel(tmp_path: Path) -> Iterator[Callable[..., RedisSentinel]]:
    """``make_redis_sentinel(persistence="aof")``: a fresh sentinel group for this test only."""
    require_redis()
    made: list[RedisSentinel] = []

    def make(**kw: Any) -> RedisSentinel:
        s = RedisSentinel(tmp_path / f"sentinel{len(made)}", **kw)
        made.append(s)
        return s.start()

    try:
        yield make
    finally:
        for s in made:
            s.close()
