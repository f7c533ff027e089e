"""Fan-out, history limits, recovery and the slow-consumer cut-off, against a real server."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest

from tidings.protocol import CloseCode
from tidings.transports.formats import ws_frame, ws_zframe

from .conftest import ProbeFactory, Server, ServerFactory, api_headers
from .rawws import client_frame, raw_upgrade, read_frame, read_until_close


async def publish(session: aiohttp.ClientSession, srv: Server, channel: str, data: Any) -> dict[str, Any]:
    async with session.post(
        f"{srv.http}/api/publish", json={"channel": channel, "data": data}, headers=api_headers()
    ) as r:
        assert r.status == 200, await r.text()
        result: dict[str, Any] = await r.json()
        return result


@pytest.fixture(params=["memory", "sqlite"])
async def any_server(request: pytest.FixtureRequest, start_server: ServerFactory, tmp_path: Any) -> Server:
    broker = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path}/t.db"
    # This suite pushes hundreds of commands per second through one connection: lift the rate limits.
    return await start_server(broker=broker, client_rate=0.0, user_rate=0.0)


async def test_fanout_many_subscribers_several_channels(
    any_server: Server, probe: ProbeFactory, session: aiohttp.ClientSession
) -> None:
    channels = [f"pub:room{i}" for i in range(4)]
    subs: dict[str, list[Any]] = {ch: [] for ch in channels}
    for i in range(40):
        p = await probe(any_server)
        ch = channels[i % 4]
        await p.ok("subscribe", channel=ch)
        subs[ch].append(p)
    for n in range(10):
        for ch in channels:
            await publish(session, any_server, ch, {"n": n, "ch": ch})
    for ch, probes in subs.items():
        for p in probes:
            msgs = await p.messages(10)
            assert [m["data"] for m in msgs] == [{"n": n, "ch": ch} for n in range(10)]
            assert [m["offset"] for m in msgs] == list(range(1, 11))
            assert p.pushes.empty()  # nothing from other channels


async def test_ws_publish_reaches_other_clients_and_acks(any_server: Server, probe: ProbeFactory) -> None:
    a, b = await probe(any_server), await probe(any_server)
    await a.ok("subscribe", channel="pub:x")
    await b.ok("subscribe", channel="pub:x")
    res = await b.ok("publish", channel="pub:x", data={"hello": "world"})
    assert res["offset"] == 1 and res["epoch"] and res["id"]
    for p in (a, b):
        (m,) = await p.messages(1)
        assert m["data"] == {"hello": "world"} and m["id"] == res["id"] and m["type"] == "message"


async def test_history_size_limit(
    any_server: Server, probe: ProbeFactory, session: aiohttp.ClientSession
) -> None:
    for i in range(12):
        await publish(session, any_server, "small:h", i)
    p = await probe(any_server)
    h = await p.ok("history", channel="small:h")
    assert [x["data"] for x in h["publications"]] == [7, 8, 9, 10, 11]
    assert h["offset"] == 12
    h2 = await p.ok("history", channel="small:h", limit=2)
    assert [x["offset"] for x in h2["publications"]] == [11, 12]


async def test_history_ttl(any_server: Server, probe: ProbeFactory, session: aiohttp.ClientSession) -> None:
    await publish(session, any_server, "ttl:t", "old")
    p = await probe(any_server)
    assert len((await p.ok("history", channel="ttl:t"))["publications"]) == 1
    # The ttl namespace keeps publications 0.5 s; wait on the clock, bounded.
    async with asyncio.timeout(5):
        while (await p.ok("history", channel="ttl:t"))["publications"]:
            await asyncio.sleep(0.1)
    await publish(session, any_server, "ttl:t", "new")
    h = await p.ok("history", channel="ttl:t")
    assert [x["data"] for x in h["publications"]] == ["new"]
    # A position from before the expiry can no longer be recovered.
    r = await p.ok("subscribe", channel="ttl:t", since={"offset": 0, "epoch": h["epoch"]})
    assert r["recovered"] is False


async def test_recovery_after_disconnect(
    any_server: Server, probe: ProbeFactory, session: aiohttp.ClientSession
) -> None:
    p = await probe(any_server)
    first = await p.ok("subscribe", channel="pub:rec")
    for i in range(3):
        await publish(session, any_server, "pub:rec", i)
    seen = await p.messages(3)
    last = {"offset": seen[-1]["offset"], "epoch": seen[-1]["epoch"]}
    assert last["epoch"] == first["epoch"]
    await p.close()
    for i in range(50):
        await publish(session, any_server, "pub:rec", 100 + i)
    q = await probe(any_server)
    r = await q.ok("subscribe", channel="pub:rec", since=last)
    assert r["recovered"] is True and r["offset"] == 53
    got = await q.messages(50)
    assert [m["data"] for m in got] == [100 + i for i in range(50)]
    assert [m["offset"] for m in got] == list(range(4, 54))
    # ...then live ones, with nothing duplicated in between.
    await publish(session, any_server, "pub:rec", "live")
    (m,) = await q.messages(1)
    assert m["data"] == "live" and m["offset"] == 54
    assert q.pushes.empty()


async def test_recovery_while_publishing_has_no_gap_or_duplicate(
    any_server: Server, probe: ProbeFactory
) -> None:
    """Publications racing the subscribe are either replayed or delivered live, never both, never lost."""
    pub = await probe(any_server)
    for i in range(20):
        await pub.ok("publish", channel="pub:race", data=i)
    total = 300

    async def writer() -> None:
        for i in range(20, total):
            await pub.ok("publish", channel="pub:race", data=i)

    task = asyncio.create_task(writer())
    subs = []
    for _ in range(10):
        q = await probe(any_server)
        r = await q.ok(
            "subscribe",
            channel="pub:race",
            since={"offset": 5, "epoch": (await pub.ok("history", channel="pub:race", limit=1))["epoch"]},
        )
        assert r["recovered"] is True
        subs.append(q)
    await task
    for q in subs:
        got = await q.messages(total - 5)
        assert [m["data"] for m in got] == list(range(5, total))
        assert q.pushes.empty()


@pytest.mark.parametrize("case", ["wrong_epoch", "gap_beyond_history", "future_offset"])
async def test_recovered_false(
    any_server: Server, probe: ProbeFactory, session: aiohttp.ClientSession, case: str
) -> None:
    for i in range(10):
        res = await publish(session, any_server, "small:g", i)  # history keeps 5
    epoch = res["epoch"]
    since = {
        "wrong_epoch": {"offset": 8, "epoch": "not-" + epoch},
        "gap_beyond_history": {"offset": 2, "epoch": epoch},  # 3..5 are gone
        "future_offset": {"offset": 99, "epoch": epoch},
    }[case]
    p = await probe(any_server)
    r = await p.ok("subscribe", channel="small:g", since=since)
    assert r["recovered"] is False and r["offset"] == 10 and r["epoch"] == epoch
    # Nothing partial was replayed; live messages still flow.
    await publish(session, any_server, "small:g", "live")
    (m,) = await p.messages(1)
    assert m["data"] == "live"
    assert p.pushes.empty()


async def test_recover_at_edge_of_history(
    any_server: Server, probe: ProbeFactory, session: aiohttp.ClientSession
) -> None:
    for i in range(10):
        res = await publish(session, any_server, "small:e", i)  # keeps offsets 6..10
    p = await probe(any_server)
    r = await p.ok("subscribe", channel="small:e", since={"offset": 5, "epoch": res["epoch"]})
    assert r["recovered"] is True
    assert [m["offset"] for m in await p.messages(5)] == [6, 7, 8, 9, 10]


async def test_memory_broker_restart_changes_epoch(start_server: ServerFactory, probe: ProbeFactory) -> None:
    a = await start_server()
    p = await probe(a)
    r1 = await p.ok("publish", channel="pub:e", data=1)
    await a.stop()
    b = await start_server()
    q = await probe(b)
    r = await q.ok("subscribe", channel="pub:e", since={"offset": r1["offset"], "epoch": r1["epoch"]})
    assert r["recovered"] is False and r["epoch"] != r1["epoch"]


async def test_slow_consumer_is_cut_off_and_others_unaffected(
    start_server: ServerFactory, probe: ProbeFactory
) -> None:
    srv = await start_server(max_buffer=64 * 1024, client_rate=0.0, user_rate=0.0)
    good = await probe(srv)
    await good.ok("subscribe", channel="pub:slow")
    reader, writer = await raw_upgrade(srv.port, rcvbuf=4096)
    writer.write(client_frame(b'{"id":1,"op":"subscribe","channel":"pub:slow"}'))
    await writer.drain()
    publisher = await probe(srv)
    blob = "x" * 8000
    n = 0
    async with asyncio.timeout(20):
        # Publish until the server gives up on the reader; the good client keeps up all along.
        while len(srv.node.hub.subscribers("pub:slow")) == 2:
            await publisher.ok("publish", channel="pub:slow", data={"n": n, "blob": blob})
            n += 1
            got = await good.messages(1)
            assert got[0]["data"]["n"] == n - 1
            assert n < 5000, "slow consumer was never cut off"
    # The slow client, reading again, finds the disconnect push and the close code 4008.
    code, frames = await asyncio.wait_for(read_until_close(reader), 10)
    assert code == CloseCode.SLOW_CONSUMER
    assert b'"type":"disconnect"' in frames[-1] and b'"reconnect":true' in frames[-1]
    writer.close()
    await publisher.ok("publish", channel="pub:slow", data={"n": "after"})
    assert (await good.messages(1))[0]["data"] == {"n": "after"}


async def test_channels_and_health(
    server: Server, probe: ProbeFactory, session: aiohttp.ClientSession
) -> None:
    p = await probe(server)
    await p.ok("subscribe", channel="pub:a")
    await p.ok("subscribe", channel="chat:b")
    async with session.get(f"{server.http}/api/channels", headers=api_headers()) as r:
        body = await r.json()
    assert body == {
        "channels": [{"channel": "chat:b", "subscribers": 1}, {"channel": "pub:a", "subscribers": 1}]
    }
    async with session.get(f"{server.http}/healthz") as r:
        assert r.status == 200 and (await r.json())["status"] == "ok"


async def test_broadcast_and_http_history(
    server: Server, probe: ProbeFactory, session: aiohttp.ClientSession
) -> None:
    a, b = await probe(server), await probe(server)
    await a.ok("subscribe", channel="pub:1")
    await b.ok("subscribe", channel="pub:2")
    async with session.post(
        f"{server.http}/api/broadcast",
        headers=api_headers(),
        json={"channels": ["pub:1", "pub:2", "bad channel"], "data": "all"},
    ) as r:
        body = await r.json()
    assert [x.get("offset") for x in body["results"]] == [1, 1, None]
    assert body["results"][2]["error"]["code"] == "invalid_channel"
    assert (await a.messages(1))[0]["data"] == "all"
    assert (await b.messages(1))[0]["data"] == "all"
    for i in range(5):
        await publish(session, server, "pub:1", i)
    async with session.get(
        f"{server.http}/api/channels/pub:1/history",
        headers=api_headers(),
        params={"since": "3", "limit": "2"},
    ) as r:
        h = await r.json()
    assert [x["offset"] for x in h["publications"]] == [4, 5] and h["recovered"] is True


async def test_presence_and_join_leave(server: Server, probe: ProbeFactory) -> None:
    a, b = await probe(server), await probe(server)
    await a.ok("subscribe", channel="chat:p")
    await b.ok("subscribe", channel="chat:p")
    join = await a.push()
    assert join["type"] == "join" and join["channel"] == "chat:p"
    pres = await a.ok("presence", channel="chat:p")
    assert pres["count"] == 2
    await b.close()
    leave = await a.push()
    assert leave["type"] == "leave" and leave["client"] == join["client"]
    assert (await a.ok("presence", channel="chat:p"))["count"] == 1


async def test_http_batch_keeps_order_per_channel(
    server: Server, probe: ProbeFactory, session: aiohttp.ClientSession
) -> None:
    p = await probe(server)
    await p.ok("subscribe", channel="pub:batch")
    pubs = [{"channel": "pub:batch" if i % 2 else "pub:other", "data": i} for i in range(200)]
    pubs.insert(50, {"channel": "nope nope", "data": "bad"})
    async with session.post(
        f"{server.http}/api/batch", headers=api_headers(), json={"publications": pubs}
    ) as r:
        body = await r.json()
    results = body["results"]
    assert len(results) == 201 and results[50]["error"]["code"] == "invalid_channel"
    mine = [res["offset"] for res, pub in zip(results, pubs, strict=True) if pub["channel"] == "pub:batch"]
    assert mine == list(range(1, 101))
    got = await p.messages(100)
    assert [m["data"] for m in got] == list(range(1, 200, 2))


async def test_compression_one_frame_for_all_deflate_peers(
    start_server: ServerFactory, probe: ProbeFactory, session: aiohttp.ClientSession
) -> None:
    srv = await start_server(compression=True)
    zipped = [await probe(srv, compress=15) for _ in range(3)]
    plain = await probe(srv, compress=0)
    for p in (*zipped, plain):
        await p.ok("subscribe", channel="pub:z")
        assert p.ws.compress == (15 if p is not plain else 0)
    big = {"text": "tidings " * 500}
    pub = await publish(session, srv, "pub:z", big)
    await publish(session, srv, "pub:z", "small")
    for p in (*zipped, plain):
        got = await p.messages(2)
        assert [m["data"] for m in got] == [big, "small"]
    # Compressed once: the cached frame is a deflate frame (RSV1) much smaller than the plain one.
    res = await srv.node.broker.history("pub:z", srv.settings.namespace_for("pub:z").history)  # type: ignore[union-attr]
    first = res.publications[0]
    assert first.id == pub["id"] and first.cache is not None
    zframe, frame = first.cache[ws_zframe], first.cache[ws_frame]
    assert zframe is not None and frame is not None
    assert zframe[0] & 0x40 and len(zframe) < len(frame) / 10


async def test_publishes_of_one_read_are_grouped_and_answered_each(
    any_server: Server, probe: ProbeFactory
) -> None:
    """Many publish frames in one TCP write: each is checked on its own, the valid ones are stored in
    order with consecutive offsets, and every one gets its own reply."""
    watcher = await probe(any_server)
    await watcher.ok("subscribe", channel="pub:grp")
    reader, writer = await raw_upgrade(any_server.port)
    frames = []
    for i in range(60):
        if i % 10 == 5:
            frames.append({"id": i, "op": "publish", "channel": "ro:nope", "data": i})  # not allowed
        elif i % 10 == 7:
            frames.append({"id": i, "op": "publish", "channel": "bad name", "data": i})
        else:
            frames.append({"id": i, "op": "publish", "channel": "pub:grp", "data": i})
    writer.write(b"".join(client_frame(orjson.dumps(f)) for f in frames))
    await writer.drain()
    replies: dict[int, dict[str, Any]] = {}
    async with asyncio.timeout(10):
        while len(replies) < 60:
            _, payload = await read_frame(reader)
            obj = orjson.loads(payload)
            replies[obj["id"]] = obj
    good = [i for i in range(60) if i % 10 not in (5, 7)]
    assert [replies[i]["result"]["offset"] for i in good] == list(range(1, len(good) + 1))
    assert all(replies[i]["error"]["code"] == "permission_denied" for i in range(5, 60, 10))
    assert all(replies[i]["error"]["code"] == "invalid_channel" for i in range(7, 60, 10))
    assert [m["data"] for m in await watcher.messages(len(good))] == good
    writer.close()
