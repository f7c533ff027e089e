"""Live reload: a real ``tidings serve`` process with ``--config FILE``, real WebSocket, SSE and HTTP
clients; the file is edited and the server gets SIGHUP (or ``tidings reload``). Existing connections take
the new rules and rates without being dropped; a broken file changes nothing; options that need a restart
are reported and kept."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from .conftest import API_KEY
from .redis_servers import free_port
from .serve_process import PY, Deployment, ServeProcess, wait_for

pytestmark = pytest.mark.timeout(90)

BASE = f"""
api_keys = ["{API_KEY}"]
client_rate = 1000
max_message_size = 5000

[namespaces.news]
subscribe = "anyone"

[namespaces.feed]
subscribe = "anyone"
publish = true
"""


class Server(ServeProcess):
    """``tidings serve --config FILE`` on a free port, the memory broker, ``--max-message-size 1000`` on
    the command line (above the file's 5000: a reload must keep it)."""

    def __init__(self, tmp: Path, text: str = BASE) -> None:
        self.port = free_port()
        self.config = tmp / "tidings.toml"
        self.config.write_text(text)
        self.data_dir = tmp / "data"
        argv = ["--port", str(self.port), "--broker", "memory://", "--data-dir", str(self.data_dir)]
        argv += ["--config", str(self.config), "--max-message-size", "1000"]
        super().__init__(argv, tmp / "serve.log")
        for name in [k for k in self.env if k.startswith("TIDINGS_")]:
            del self.env[name]  # the file and the command line only
        self.spawn()

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def count(self, text: str) -> int:
        return self.text().count(text)

    def reload(self, text: str, expect: str = "configuration reloaded") -> None:
        """Write ``text`` as the file, SIGHUP, wait for the log line ``expect``."""
        before = self.count(expect)
        self.config.write_text(text)
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: self.check_alive() or self.count(expect) > before, 15, f"no {expect!r} in the log")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path)
    try:
        wait_for(lambda: srv.check_alive() or "listening on" in srv.text(), 20, "the server did not start")
        yield srv
    finally:
        srv.stop()


@contextlib.asynccontextmanager
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        yield s


class Ws:
    """A /ws client: commands with ids, pushes kept apart."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.pushes: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.next_id = 0
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            obj = orjson.loads(msg.data)
            if "type" in obj:
                self.pushes.put_nowait(obj)
            else:
                self.replies.pop(obj["id"]).set_result(obj)

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        self.next_id += 1
        fut = self.replies[self.next_id] = asyncio.get_running_loop().create_future()
        await self.ws.send_str(orjson.dumps({"id": self.next_id, "op": op, **fields}).decode())
        return await asyncio.wait_for(fut, 10)

    async def burst(self, n: int) -> list[dict[str, Any]]:
        """``n`` pings sent at once; their replies."""
        futs = []
        for _ in range(n):
            self.next_id += 1
            futs.append(self.replies.setdefault(self.next_id, asyncio.get_running_loop().create_future()))
            await self.ws.send_str(orjson.dumps({"id": self.next_id, "op": "ping"}).decode())
        return [await asyncio.wait_for(f, 10) for f in futs]

    async def push(self, kind: str) -> dict[str, Any]:
        async with asyncio.timeout(10):
            while True:
                obj = await self.pushes.get()
                if obj["type"] == kind:
                    return obj


async def ws_client(s: aiohttp.ClientSession, srv: Server) -> Ws:
    return Ws(await s.ws_connect(f"ws://127.0.0.1:{srv.port}/ws"))


async def publish(s: aiohttp.ClientSession, srv: Server, channel: str, data: Any, key: str = API_KEY) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    async with s.post(
        f"{srv.http}/api/publish", json={"channel": channel, "data": data}, headers=headers
    ) as r:
        assert r.status == 200, await r.text()


async def sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """(event name, data) of each SSE event; keep-alives and retry hints skipped."""
    kind, data = "message", b""
    async for raw in resp.content:
        line = raw.rstrip(b"\n")
        if not line:
            if data:
                yield kind, orjson.loads(data)
            kind, data = "message", b""
        elif line.startswith(b"event: "):
            kind = line[7:].decode()
        elif line.startswith(b"data: "):
            data = line[6:]


async def next_event(events: AsyncIterator[tuple[str, dict[str, Any]]], kind: str) -> dict[str, Any]:
    async with asyncio.timeout(10):
        async for name, data in events:
            if name == kind:
                return data
    raise AssertionError(f"the stream ended before an {kind!r} event")


async def test_reload_applies_rules_and_rates_to_existing_connections(server: Server) -> None:
    async with session() as s:
        ws = await ws_client(s, server)
        for ch in ("news:1", "feed:1"):
            assert (await ws.call("subscribe", channel=ch))["ok"]
        sse = await s.get(f"{server.http}/sse", params=[("channel", "news:1"), ("channel", "feed:1")])
        assert sse.status == 200
        events = sse_events(sse)
        await next_event(events, "subscribed")
        chat = await s.ws_connect(f"ws://127.0.0.1:{server.port}/chatsocket")
        async with s.get(f"{server.http}/poll", params={"channel": "news:1"}) as r:
            top = await r.json()
        poll = asyncio.ensure_future(
            s.get(
                f"{server.http}/poll",
                params={"channel": "news:1", "since": f"{top['offset']}:{top['epoch']}", "timeout": "30"},
            )
        )
        # The old rate allows a burst of 50; the old rules let anyone read news.
        assert all(r["ok"] for r in await ws.burst(50))
        await asyncio.sleep(0.3)  # the poll is pending (nothing to answer it yet)
        assert not poll.done()

        server.reload(
            BASE.replace("client_rate = 1000", "client_rate = 1")
            .replace(
                '[namespaces.news]\nsubscribe = "anyone"', '[namespaces.news]\nsubscribe = "authenticated"'
            )
            .replace("max_message_size = 5000", "max_message_size = 6000")
            + "\n[namespaces.chat]\nanonymous = false\n"
        )
        assert "applied client_rate, max_message_size, namespaces" not in server.text()  # CLI wins
        assert "applied client_rate, namespaces" in server.text()

        # /ws: the news subscription ends with a documented push; the connection and feed:1 go on.
        pushed = await ws.push("unsubscribe")
        assert pushed == {
            "type": "unsubscribe",
            "channel": "news:1",
            "code": "permission_denied",
            "reason": pushed["reason"],
            "resubscribe": False,
        }
        await publish(s, server, "feed:1", "still here")
        assert (await ws.push("message"))["data"] == "still here"
        # The new rate (1/s, bursts of 2) holds for this existing connection's next commands.
        replies = await ws.burst(10)
        codes = [r["error"]["code"] for r in replies if not r["ok"]]
        assert 1 <= len([r for r in replies if r["ok"]]) <= 3 and codes and set(codes) == {"rate_limited"}
        assert not ws.ws.closed
        await asyncio.sleep(1.1)
        refused = await ws.call("subscribe", channel="news:2")
        assert refused["error"]["code"] == "permission_denied"

        # /sse: news ends with event: unsubscribe, feed goes on in the same stream.
        assert (await next_event(events, "unsubscribe"))["channel"] == "news:1"
        await publish(s, server, "feed:1", "sse too")
        assert (await next_event(events, "message"))["data"] == "still here"
        assert (await next_event(events, "message"))["data"] == "sse too"
        sse.close()

        # /chatsocket: chat no longer admits anonymous clients: closed as at the upgrade (4003).
        async with asyncio.timeout(10):
            async for _ in chat:
                pass
        assert chat.close_code == 4003

        # The pending poll is answered with the error a new poll gets.
        resp = await asyncio.wait_for(poll, 10)
        assert resp.status == 403 and (await resp.json())["error"]["code"] == "permission_denied"
        resp.close()

        # The command line's --max-message-size 1000 stays on top of the file's new 6000.
        await ws.ws.send_str(
            orjson.dumps({"id": 99, "op": "publish", "channel": "feed:1", "data": "x" * 1500}).decode()
        )
        await asyncio.wait_for(ws.reader, 10)
        assert ws.ws.close_code == 1009


async def test_broken_file_is_refused_whole_and_the_old_config_keeps_working(server: Server) -> None:
    async with session() as s:
        ws = await ws_client(s, server)
        assert (await ws.call("subscribe", channel="news:1"))["ok"]
        # A TOML syntax error: refused, with the file and line.
        broken = BASE.replace("[namespaces.feed]", "[namespaces.feed")
        server.reload(broken, expect="reload refused")
        line = broken.splitlines().index("[namespaces.feed") + 1
        assert f"{server.config}:{line}: " in server.text()
        # Valid changes next to invalid ones: none of them is applied.
        bad = (
            BASE.replace("client_rate = 1000", "client_rate = 1")
            .replace('subscribe = "anyone"', 'subscribe = "authenticated"')
            .replace("max_message_size = 5000", "max_mesage_size = 5000")
        )
        server.reload(bad, expect="reload refused")
        log = server.text()
        assert "unknown option 'max_mesage_size' (did you mean 'max_message_size'?)" in log
        assert "configuration reloaded" not in log
        # What only a start checks otherwise: a token key file that cannot be loaded.
        server.reload(
            'token_public_key = "/nonexistent/key.pem"\n'
            + BASE.replace("client_rate = 1000", "client_rate = 1"),
            expect="token_public_key: cannot load '/nonexistent/key.pem'",
        )
        assert "configuration reloaded" not in server.text()
        # The old rules and rates hold: the subscription goes on, new ones are allowed, no rate limit.
        await publish(s, server, "news:1", "old rules")
        assert (await ws.push("message"))["data"] == "old rules"
        assert ws.pushes.empty()
        assert (await ws.call("subscribe", channel="news:2"))["ok"]
        assert all(r["ok"] for r in await ws.burst(50))
        await ws.ws.close()


async def test_options_that_need_a_restart_are_reported_and_kept(server: Server) -> None:
    async with session() as s:
        ws = await ws_client(s, server)
        assert (await ws.call("subscribe", channel="news:1"))["ok"]
        new_key = "another-key-0123456789"
        changed = 'host = "127.0.0.2"\npresence_ttl = 7.0\nsse_retry = 9.0\n' + BASE.replace(API_KEY, new_key)
        server.reload(changed)
        log = server.text()
        assert "reload: host, presence_ttl changed but cannot change while running" in log
        assert "applied api_keys, sse_retry" in log
        # API keys are live: the old one is refused from now on, the new one works.
        body = {"channel": "news:1", "data": "x"}
        for key, status in ((API_KEY, 401), (new_key, 200)):
            headers = {"Authorization": f"Bearer {key}"}
            async with s.post(f"{server.http}/api/publish", json=body, headers=headers) as r:
                assert r.status == status, await r.text()
        assert (await ws.push("message"))["data"] == "x"
        # Still on the same address and port, the connection untouched.
        async with s.get(f"{server.http}/healthz") as r:
            assert r.status == 200
        await publish(s, server, "news:1", "same place", new_key)
        assert (await ws.push("message"))["data"] == "same place"
        # The live option took effect: a new SSE stream gets the new retry hint.
        async with s.get(f"{server.http}/sse", params={"channel": "feed:1"}) as r:
            assert await r.content.readline() == b"retry: 9000\n"
        await ws.ws.close()


def run_tidings(*args: str) -> subprocess.CompletedProcess[str]:
    src = str(Path(__file__).parent.parent / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([PY, "-m", "tidings", *args], capture_output=True, text=True, timeout=30, env=env)


async def test_tidings_reload_signals_the_server_in_the_data_dir(server: Server) -> None:
    pid_file = server.data_dir / "tidings.pid"
    assert pid_file.read_text().strip() == str(server.pid)
    async with session() as s:
        ws = await ws_client(s, server)
        assert (await ws.call("subscribe", channel="news:1"))["ok"]
        server.config.write_text(BASE.replace('subscribe = "anyone"', 'subscribe = "token"', 1))
        r = await asyncio.to_thread(run_tidings, "reload", "--data-dir", str(server.data_dir))
        assert r.returncode == 0 and f"pid {server.pid}" in r.stderr, r.stderr
        pushed = await ws.push("unsubscribe")
        assert (pushed["channel"], pushed["code"]) == ("news:1", "permission_denied")
        assert "configuration reloaded" in server.text()
        await ws.ws.close()
    assert server.stop() == 0
    assert not pid_file.exists()  # removed at exit
    r = run_tidings("reload", "--data-dir", str(server.data_dir))
    assert r.returncode == 1 and "no pid file" in r.stderr


def test_sighup_with_workers_reloads_every_worker(tmp_path: Path, redis_url: str) -> None:
    cfg = tmp_path / "tidings.toml"
    cfg.write_text(BASE)
    d = Deployment(tmp_path, redis_url, count=2)
    d.env["TIDINGS_CONFIG"] = str(cfg)
    d.start()
    try:
        assert (tmp_path / "data" / "tidings.pid").read_text().strip() == str(d.pid)
        cfg.write_text(BASE.replace("client_rate = 1000", "client_rate = 5"))
        r = run_tidings("reload", "--data-dir", str(tmp_path / "data"))
        assert r.returncode == 0, r.stderr
        wait_for(lambda: d.text().count("applied client_rate") == 2, 20, "not every worker reloaded")
        assert "[worker 1]: configuration reloaded" in d.text()
        assert "[worker 2]: configuration reloaded" in d.text()
        assert d.running and all(os.path.exists(f"/proc/{pid}") for pid in d.pids)  # none restarted
        assert "exited" not in d.text() and "was killed" not in d.text()
    finally:
        assert d.stop() == 0
    assert not (tmp_path / "data" / "tidings.pid").exists()


def test_config_check_and_example_commands(tmp_path: Path) -> None:
    r = run_tidings("config", "example")
    assert r.returncode == 0 and "[namespaces.chat]" in r.stdout
    example = tmp_path / "example.toml"
    example.write_text(r.stdout)
    r = run_tidings("config", "check", str(example))
    assert (r.returncode, r.stdout) == (0, f"{example}: ok\n")
    bad = tmp_path / "bad.toml"
    bad.write_text('prot = 8888\n[namespaces.news]\nsubscribe = "everyone"\n')
    r = run_tidings("config", "check", str(bad))
    assert r.returncode == 1
    assert r.stdout.splitlines() == [
        f"{bad}:1: unknown option 'prot' (did you mean 'port'?)",
        f"{bad}:3: namespaces.news.subscribe must be one of anyone, authenticated, token",
    ]


if sys.platform == "win32":  # pragma: no cover
    pytestmark = pytest.mark.skip("SIGHUP")
