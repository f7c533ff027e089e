"""Regression tests for the holes found from outside: poison data, bursts that cut a room, subscriptions
that outlive their rights, reads that write, unknown broker schemes."""

from __future__ import annotations

import asyncio
import io
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tidings.config import Namespace
from tidings.protocol import MAX_DEPTH

from .conftest import ProbeFactory, Server, ServerFactory, api_headers
from .rawws import client_frame, raw_upgrade
from .test_auth import SECRET, claims, hs


async def never_reading_subscriber(port: int, channel: str) -> asyncio.StreamWriter:
    """A /ws client that subscribes to ``channel`` and then never reads."""
    _, writer = await raw_upgrade(port, rcvbuf=4096)
    writer.write(client_frame(orjson.dumps({"id": 1, "op": "subscribe", "channel": channel})))
    await writer.drain()
    return writer


def nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def raw_nested(depth: int) -> str:
    return "[" * depth + "0" + "]" * depth


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 254, 255, 1000])
async def test_over_deep_data_is_refused_at_the_door(
    start_server: ServerFactory,
    probe: ProbeFactory,
    session: aiohttp.ClientSession,
    depth: int,
    tmp_path: Path,
) -> None:
    """Data nested deeper than MAX_DEPTH: bad_request on /ws (the connection lives on, the good publish
    of the same read is acknowledged and delivered), 400 JSON on the HTTP API, nothing stored, and
    history still answers (before: stored, then every encode failed; or 1006 / HTTP 500)."""
    srv = await start_server(broker=f"sqlite:///{tmp_path / 'deep.db'}")
    sub = await probe(srv)
    await sub.ok("subscribe", channel="pub:deep")
    pub = await probe(srv)
    # A poison publish and a good one in one frame read.
    await pub.send_raw(f'{{"id": 1, "op": "publish", "channel": "pub:deep", "data": {raw_nested(depth)}}}')
    await pub.send_raw('{"id": 2, "op": "publish", "channel": "pub:deep", "data": "fine"}')
    bad, good = await pub.reply(1), await pub.reply(2)
    assert bad["ok"] is False and bad["error"]["code"] == "bad_request", bad
    assert good["ok"] is True, good
    assert [m["data"] for m in await sub.messages(1)] == ["fine"]
    for body in (
        f'{{"channel": "pub:deep", "data": {raw_nested(depth)}}}',
        f'{{"channel": "pub:deep", "data": 1, "info": {{"x": {raw_nested(depth)}}}}}',
    ):
        async with session.post(f"{srv.http}/api/publish", headers=api_headers(), data=body) as r:
            assert r.status == 400 and r.content_type == "application/json", await r.text()
            assert (await r.json())["error"]["code"] == "bad_request"
    # A batch with one poison entry: the others are stored and acknowledged.
    batch = (
        '{"publications": [{"channel": "pub:deep", "data": "a"}, '
        f'{{"channel": "pub:deep", "data": {raw_nested(depth)}}}, {{"channel": "pub:deep", "data": "b"}}]}}'
    )
    async with session.post(f"{srv.http}/api/batch", headers=api_headers(), data=batch) as r:
        results = (await r.json())["results"]
        assert r.status == 200 and [("error" in x) for x in results] == [False, True, False], results
    async with session.get(f"{srv.http}/api/channels/pub:deep/history", headers=api_headers()) as r:
        assert r.status == 200
        assert [p["data"] for p in (await r.json())["publications"]] == ["fine", "a", "b"]
    got = await pub.ok("history", channel="pub:deep")
    assert [p["data"] for p in got["publications"]] == ["fine", "a", "b"]


async def test_data_at_the_depth_limit_round_trips(
    server: Server, probe: ProbeFactory, session: aiohttp.ClientSession
) -> None:
    p = await probe(server)
    await p.ok("subscribe", channel="pub:edge")
    await p.ok("publish", channel="pub:edge", data=nested(MAX_DEPTH))
    assert (await p.messages(1))[0]["data"] == nested(MAX_DEPTH)
    got = await p.ok("history", channel="pub:edge")
    assert got["publications"][0]["data"] == nested(MAX_DEPTH)


async def test_a_burst_does_not_cut_a_room(
    start_server: ServerFactory, probe: ProbeFactory, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """17 publications of 62 KB in one group (1.05 MB delivered in one loop iteration, over max_buffer):
    every subscriber that reads gets all of them, none is closed 4008 (before: the whole room was cut,
    and every recovery replayed 16 and was cut again)."""
    srv = await start_server(broker=f"sqlite:///{tmp_path / 'burst.db'}", max_http_body=4 << 20)
    subs = [await probe(srv) for _ in range(5)]
    for s in subs:
        await s.ok("subscribe", channel="pub:burst")
    blob = "x" * (62 * 1024)
    body = {"publications": [{"channel": "pub:burst", "data": blob} for _ in range(17)]}
    raw = io.BytesIO(orjson.dumps(body))
    headers = {**api_headers(), "Content-Type": "application/json"}
    async with session.post(f"{srv.http}/api/batch", headers=headers, data=raw) as r:
        assert r.status == 200 and all("offset" in x for x in (await r.json())["results"])
    for s in subs:
        got = await s.messages(17, timeout=20)
        assert [m["offset"] for m in got] == list(range(1, 18))
        assert not s.closed.is_set()
    # A late subscriber recovers all 17 from offset 0: the replay is paced, not cut.
    late = await probe(srv)
    first = await late.ok("subscribe", channel="pub:burst", since={"offset": 0, "epoch": got[0]["epoch"]})
    assert first["recovered"] is True
    assert [m["offset"] for m in await late.messages(17, timeout=20)] == list(range(1, 18))


async def test_a_stalled_reader_is_still_cut_off(start_server: ServerFactory, probe: ProbeFactory) -> None:
    """The other side of the rule: a reader that takes nothing is closed 4008 once the kernel refuses
    more than max_buffer, and its buffer stays bounded."""
    srv = await start_server(max_buffer=256 * 1024)
    writer = await never_reading_subscriber(srv.port, "pub:stall")
    async with asyncio.timeout(5):
        while not srv.node.hub.subscribers("pub:stall"):
            await asyncio.sleep(0.01)
    p = await probe(srv)
    blob = "y" * 60_000
    async with asyncio.timeout(30):
        while srv.node.hub.subscribers("pub:stall"):
            await p.ok("publish", channel="pub:stall", data=blob)
    cut = [c for c in srv.node.connections if getattr(c, "closed", False)]
    for c in cut:  # the stalled one, closing: what it holds stays near the bound
        held = c.transport.get_write_buffer_size()  # type: ignore[attr-defined]
        assert held <= 2 * 256 * 1024 + 70_000, held
    writer.close()


async def test_expired_subscription_token_ends_the_subscription(
    start_server: ServerFactory, probe: ProbeFactory, session: aiohttp.ClientSession
) -> None:
    """A subscription made with a subscription token ends when the token expires, with an
    `unsubscribe` push (code token_expired, resubscribe true); nothing after it is delivered."""
    srv = await start_server(
        token_secret=SECRET, namespaces={"priv": Namespace("priv", subscribe="token", publish=True)}
    )
    p = await probe(srv)
    await p.ok("connect", token=hs(claims("alice")))
    grant = hs({"sub": "alice", "channel": "priv:x", "exp": int(time.time()) + 1})
    await p.ok("subscribe", channel="priv:x", token=grant)
    async with session.post(
        f"{srv.http}/api/publish", headers=api_headers(), json={"channel": "priv:x", "data": "before"}
    ) as r:
        assert r.status == 200
    assert (await p.messages(1))[0]["data"] == "before"
    async with asyncio.timeout(10):
        push = await p.push(timeout=10)
    assert push == {
        "type": "unsubscribe",
        "channel": "priv:x",
        "code": "token_expired",
        "reason": "the subscription token expired",
        "resubscribe": True,
    }
    assert not srv.node.hub.subscribers("priv:x")
    async with session.post(
        f"{srv.http}/api/publish", headers=api_headers(), json={"channel": "priv:x", "data": "after"}
    ) as r:
        assert r.status == 200
    assert (await p.request("ping"))["ok"] is True
    assert p.pushes.empty()


async def test_renewed_token_with_fewer_channels_ends_those_subscriptions(
    start_server: ServerFactory, probe: ProbeFactory
) -> None:
    srv = await start_server(token_secret=SECRET)
    p = await probe(srv)
    await p.ok("connect", token=hs(claims("alice", channels=["pub:a", "pub:b"])))
    await p.ok("subscribe", channel="pub:a")
    await p.ok("subscribe", channel="pub:b")
    await p.ok("connect", token=hs(claims("alice", channels=["pub:a"])))
    push = await p.push()
    assert push["type"] == "unsubscribe" and push["channel"] == "pub:b"
    assert push["code"] == "permission_denied" and push["resubscribe"] is False
    assert [type(s).__name__ for s in srv.node.hub.subscribers("pub:a")] == ["WsConnection"]
    assert not srv.node.hub.subscribers("pub:b")


async def test_reads_never_write(
    start_server: ServerFactory, probe: ProbeFactory, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Page views, subscribes and history reads of channels nobody published to leave no rows behind
    (before: one `streams` row per channel ever viewed, never deleted)."""
    db = tmp_path / "reads.db"
    srv = await start_server(broker=f"sqlite:///{db}")
    p = await probe(srv)
    for i in range(50):
        async with session.get(f"{srv.http}/chat/room{i}") as r:
            assert r.status == 200
        await p.ok("subscribe", channel=f"pub:r{i}")
        await p.ok("history", channel=f"pub:h{i}")
    first = await p.ok("subscribe", channel="pub:later")
    async with session.post(
        f"{srv.http}/api/publish", headers=api_headers(), json={"channel": "pub:later", "data": 1}
    ) as r:
        assert r.status == 200
    # The position read before the first publish is still valid after it.
    msg = (await p.messages(1))[0]
    assert msg["offset"] == 1 and msg["epoch"] == first["epoch"]
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT channel FROM streams").fetchall() == [("pub:later",)]


def test_unknown_broker_scheme_is_one_clear_line(tmp_path: Path) -> None:
    """`--broker redis://…` before the Redis broker exists: one line naming the known schemes, no
    traceback, no password echoed, non-zero exit."""
    import subprocess

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tidings",
            "serve",
            "--port",
            "0",
            "--data-dir",
            str(tmp_path),
            "--broker",
            "nats://user:hunter2@127.0.0.1:4222",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in err and "hunter2" not in err, err
    assert "memory://" in err and "sqlite://" in err, err
    assert len(err.splitlines()) == 1, err


async def test_closing_inside_fan_out_never_reorders_events(
    start_server: ServerFactory, probe: ProbeFactory, session: aiohttp.ClientSession
) -> None:
    """A slow subscriber closed in the middle of a delivery: every other subscriber sees the message
    before that subscriber's leave, never [leave, message] (before: both orders were seen)."""
    srv = await start_server(max_buffer=64 * 1024)
    # A raw client that subscribes first and never reads: it is cut off during some delivery, before
    # the watchers (who subscribed after it) got that publication.
    writer = await never_reading_subscriber(srv.port, "chat:order")
    async with asyncio.timeout(5):
        while not srv.node.hub.is_live(
            "chat:order", next(iter(srv.node.hub.subscribers("chat:order")), None)
        ):  # type: ignore[arg-type]
            await asyncio.sleep(0.01)
    watchers = [await probe(srv) for _ in range(3)]
    for w in watchers:
        await w.ok("subscribe", channel="chat:order")
    blob = "z" * 30_000
    sent = 0
    async with asyncio.timeout(30):
        while len(srv.node.hub.subscribers("chat:order")) > 3:
            sent += 1
            async with session.post(
                f"{srv.http}/api/publish", headers=api_headers(), json={"channel": "chat:order", "data": blob}
            ) as r:
                assert r.status == 200
    for w in watchers:
        kinds = []
        async with asyncio.timeout(10):
            while "leave" not in kinds:
                kinds.append((await w.push())["type"])
        # The leave comes after every message delivered in the same loop turn as the cut.
        assert kinds.count("message") == sent and kinds[-1] == "leave", kinds
    writer.close()


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_one_failing_delivery_never_leaves_its_group_unacknowledged(
    start_server: ServerFactory,
    probe: ProbeFactory,
    session: aiohttp.ClientSession,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
) -> None:
    """A fan-out that fails for one publication (a bug in some sink or format) is logged; the other
    publications of the group are delivered and every one is acknowledged (before: the group hung)."""
    broker = "memory://" if kind == "memory" else f"sqlite:///{tmp_path / 'iso.db'}"
    srv = await start_server(broker=broker)
    p = await probe(srv)
    await p.ok("subscribe", channel="pub:fine")
    hub = srv.node.hub
    real = hub.deliver

    def deliver(pub: Any) -> int:
        if pub.channel == "pub:boom":
            raise RuntimeError("a broken sink")
        return real(pub)

    monkeypatch.setattr(hub, "deliver", deliver)
    body = {"publications": [{"channel": c, "data": c} for c in ("pub:boom", "pub:fine", "pub:boom")]}
    async with asyncio.timeout(5):
        async with session.post(f"{srv.http}/api/batch", headers=api_headers(), json=body) as r:
            results = (await r.json())["results"]
    assert r.status == 200 and [x.get("offset") for x in results] == [1, 1, 2], results
    assert [m["data"] for m in await p.messages(1)] == ["pub:fine"]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_history_memory_is_bounded_in_bytes(
    subprocess_server: Any, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """800 publications of 60 KiB of `[[],[],…]` over 16 channels, all read back: the server's RSS grows
    by about the configured cache, not by the parsed size (before: about 1 MB of RSS per message, 800 MB
    here, kept after the clients left)."""
    config = tmp_path / "mem.toml"
    config.write_text("history_cache_bytes = 8388608\napi_keys = ['" + "k" * 20 + "']\n")
    proc = subprocess_server("--config", str(config))
    assert proc.proc is not None
    headers = {"Authorization": "Bearer " + "k" * 20, "Content-Type": "application/json"}
    blob = "[" + ",".join(["[]"] * 20_000) + "]"  # 60 KB of JSON that parses into 20,001 lists
    before = rss_kib(proc.proc.pid)
    for _ in range(50):
        body = (
            '{"publications": ['
            + ",".join(f'{{"channel": "pub:m{c}", "data": {blob}}}' for c in range(16))
            + "]}"
        )
        async with session.post(
            f"{proc.http}/api/batch", headers=headers, data=io.BytesIO(body.encode())
        ) as r:
            assert r.status == 200, await r.text()
    for c in range(16):  # reads load every channel into the read cache
        async with session.get(f"{proc.http}/api/channels/pub:m{c}/history?limit=1000", headers=headers) as r:
            assert r.status == 200 and len((await r.json())["publications"]) == 50
    grown = rss_kib(proc.proc.pid) - before
    print(f"RSS grew by {grown} KiB")
    assert grown < 100 * 1024, f"RSS grew by {grown} KiB"
