"""Server processes killed and restarted: history survives kill -9; clients lose nothing across restarts."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from tidings.auth import read_api_key
from tidings.client import ApiError, Client, HTTPClient

from .conftest import API_KEY, ProbeFactory, Proc, ServerFactory


async def test_kill9_keeps_every_acknowledged_publication(subprocess_server: Callable[..., Proc]) -> None:
    srv = subprocess_server()
    key = read_api_key(srv.data_dir)
    assert key
    acked: dict[str, list[dict[str, object]]] = {"pub:a": [], "chat:b": []}
    async with HTTPClient(srv.http, key) as api:
        # Concurrent publishes so that several share one group commit.
        for batch in range(6):
            results = await asyncio.gather(
                *(api.publish(ch, {"batch": batch, "i": i}) for i in range(25) for ch in acked)
            )
            for r, (i, ch) in zip(results, [(i, ch) for i in range(25) for ch in acked], strict=True):
                acked[ch].append(
                    {"offset": r["offset"], "epoch": r["epoch"], "data": {"batch": batch, "i": i}}
                )
    srv.kill9()
    srv.start()  # same port, same data dir
    async with HTTPClient(srv.http, key) as api:
        for ch, expected in acked.items():
            pubs, pos, _ = await api.history(ch, limit=1000)
            assert pos.offset == 150 and pos.epoch == expected[0]["epoch"]
            assert [(p.offset, p.data) for p in pubs] == sorted((e["offset"], e["data"]) for e in expected)
        # Offsets continue where they stopped.
        r = await api.publish("pub:a", "after")
        assert r["offset"] == 151 and r["epoch"] == acked["pub:a"][0]["epoch"]


async def test_client_survives_server_restart_without_loss(subprocess_server: Callable[..., Proc]) -> None:
    srv = subprocess_server()
    key = read_api_key(srv.data_dir)
    assert key
    received: list[object] = []
    async with (
        Client(srv.ws_url, min_backoff=0.05, max_backoff=0.5) as client,
        HTTPClient(srv.http, key) as api,
    ):
        sub = await client.subscribe("pub:r")
        for i in range(10):
            await api.publish("pub:r", i)
        for _ in range(10):
            received.append((await sub.get(timeout=5)).data)
        srv.kill9()
        srv.start()
        await api.close()
        # Published while the client is still reconnecting: it must recover these.
        for i in range(10, 40):
            await api.publish("pub:r", i)
        for _ in range(30):
            received.append((await sub.get(timeout=15)).data)
        assert client.connects >= 2 and sub.gaps == 0
        # Then a graceful restart (SIGTERM: close 1001 going away), and more.
        srv.stop()
        srv.start()
        await api.close()  # drop keep-alive connections to the old process
        for i in range(40, 50):
            await api.publish("pub:r", i)
        for _ in range(10):
            received.append((await sub.get(timeout=15)).data)
    assert received == list(range(50))


def test_cli_publish_subscribe_history(subprocess_server: Callable[..., Proc], tmp_path: Path) -> None:
    """The README's demo: `tidings subscribe` in one terminal, `tidings publish` in another."""
    srv = subprocess_server()
    env = {**os.environ, "TIDINGS_URL": srv.http, "PYTHONUNBUFFERED": "1"}
    sub = subprocess.Popen(
        [sys.executable, "-m", "tidings", "subscribe", "chat:lobby"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        assert sub.stderr is not None and sub.stdout is not None
        line = sub.stderr.readline()  # "subscribed to ..." once the subscription is live
        assert b"subscribed to chat:lobby" in line, line
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "tidings",
                "publish",
                "chat:lobby",
                '{"text":"hi"}',
                "--data-dir",
                str(srv.data_dir),
            ],
            capture_output=True,
            env=env,
            timeout=30,
            check=True,
        )
        assert b'"offset":1' in out.stdout
        got = sub.stdout.readline()
        assert b'"data":{"text":"hi"}' in got and b'"channel":"chat:lobby"' in got
        # While the subscriber is connected: presence and channels show it.
        for cmd, want in (("presence", b'"user":""'), ("channels", b'"subscribers":1')):
            extra = ["chat:lobby"] if cmd == "presence" else []
            res = subprocess.run(
                [sys.executable, "-m", "tidings", cmd, *extra, "--data-dir", str(srv.data_dir)],
                capture_output=True,
                env=env,
                timeout=30,
                check=True,
            )
            assert res.stdout.count(b"\n") == 1 and want in res.stdout, res.stdout
    finally:
        sub.terminate()
        sub.wait(10)
    hist = subprocess.run(
        [sys.executable, "-m", "tidings", "history", "chat:lobby", "--data-dir", str(srv.data_dir)],
        capture_output=True,
        env=env,
        timeout=30,
        check=True,
    )
    assert hist.stdout.count(b"\n") == 1 and b'"text":"hi"' in hist.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "tidings", "publish", "chat:lobby", "x", "--api-key", "wrong"],
        capture_output=True,
        env=env,
        timeout=30,
    )
    assert bad.returncode == 1 and b"401 unauthorized" in bad.stderr


async def test_api_key_file_is_private(subprocess_server: Callable[..., Proc]) -> None:
    srv = subprocess_server()
    mode = (srv.data_dir / "api-key").stat().st_mode & 0o777
    assert mode == 0o600
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{srv.http}/api/publish", json={"channel": "a:b", "data": 1}) as r,
    ):
        assert r.status == 401


async def test_storage_failure_is_unavailable_and_loses_no_offset(
    start_server: ServerFactory, tmp_path: Path, probe: ProbeFactory
) -> None:
    """A failing commit answers `unavailable` (503 over HTTP) and rolls back: offsets stay gapless after."""
    db = tmp_path / "fail.db"
    srv = await start_server(broker=f"sqlite:///{db}")
    sub = await probe(srv)
    await sub.ok("subscribe", channel="pub:f")
    async with HTTPClient(srv.http, API_KEY) as api:
        assert (await api.publish("pub:f", 1))["offset"] == 1
        with sqlite3.connect(db) as other:
            other.execute(
                "CREATE TRIGGER fail BEFORE INSERT ON pubs BEGIN SELECT RAISE(ABORT, 'disk on fire'); END"
            )
        with pytest.raises(ApiError) as exc:
            await api.publish("pub:f", 2)
        assert exc.value.status == 503 and exc.value.code == "unavailable"
        r = await sub.request("publish", channel="pub:f", data=3)
        assert r["error"]["code"] == "unavailable"
        with sqlite3.connect(db) as other:
            other.execute("DROP TRIGGER fail")
        assert (await api.publish("pub:f", 4))["offset"] == 2
        pubs, pos, _ = await api.history("pub:f")
    assert [(p.offset, p.data) for p in pubs] == [(1, 1), (2, 4)] and pos.offset == 2
    assert [m["data"] for m in await sub.messages(2)] == [1, 4]  # the failed ones were never delivered
