"""Redis high availability with real servers: the ``redis+sentinel://`` broker through a Sentinel failover
(master SIGKILLed during a stream of publishes), ``redis_wait_replicas`` (WAIT after every group), and the
Pub/Sub connections split over ``redis_pubsub_shards``.

The failover tests count, for every subscriber that stayed subscribed, what became of each acknowledged
publication: delivered, or flagged (the subscriber got ``insufficient_state``, resubscribed with ``since``
and was answered ``recovered: false`` after the publication was acknowledged). lost = acknowledged and
neither; it must be 0. A publish answered 503 is not acknowledged and not counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tidings.backends import BrokerOptions, BrokerURLError, broker_from_url
from tidings.backends.redis import _PUBLISH, RedisBroker
from tidings.config import Namespace

from .conftest import API_KEY, Probe, ProbeFactory, ServerFactory
from .redis_servers import RedisSentinel, RedisServer, wait_until

AUTH = {"Authorization": f"Bearer {API_KEY}"}


# ------------------------------------------------------------------------------------------ URLs, start


def test_sentinel_urls_parse() -> None:
    b = broker_from_url("redis+sentinel://u:p%40ss@a:26379,b:5000,[::1]:7/mymaster?db=3&sentinel_password=sp")
    assert isinstance(b, RedisBroker)
    t = b.target
    assert t.sentinels == (("a", 26379), ("b", 5000), ("::1", 7))
    assert (t.master_name, t.db, t.username, t.password) == ("mymaster", 3, "u", "p@ss")
    assert (t.sentinel_username, t.sentinel_password) == (None, "sp")
    d = broker_from_url("redis+sentinel://h/m")
    assert isinstance(d, RedisBroker)
    assert (d.target.sentinels, d.target.db, d.target.password) == ((("h", 26379),), 0, None)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+sentinel://a:1,b:x/m", "host:port"),
        ("redis+sentinel://a:1,,b:2/m", "host:port"),
        ("redis+sentinel://a:99999/m", "host:port"),
        ("redis+sentinel://a:1", "master name"),
        ("redis+sentinel://a:1/m/0", "master name"),
        ("redis+sentinel://a:1/m?db=x", "database number"),
        ("redis+sentinel://a:1/m?password=x", "not password"),
        ("redis+sentinel://a:1/m?db=1&db=2", "repeated"),
        ("redis://h:6379/0?x=1", "no query"),
    ],
)
def test_bad_sentinel_urls_are_one_clear_error(url: str, says: str) -> None:
    with pytest.raises(BrokerURLError) as exc:
        broker_from_url(url)
    assert says in str(exc.value) and "\n" not in str(exc.value)


def test_bad_redis_options_are_refused() -> None:
    for opts, says in (
        (BrokerOptions(redis_wait_replicas=-1), "redis_wait_replicas"),
        (
            BrokerOptions(redis_wait_replicas=1, redis_wait_timeout=5.0, redis_timeout=5.0),
            "redis_wait_timeout",
        ),
        (BrokerOptions(redis_pubsub_shards=0), "redis_pubsub_shards"),
        (BrokerOptions(redis_pubsub_shards=40, redis_pool_size=32), "redis_pool_size"),
    ):
        with pytest.raises(BrokerURLError, match=says):
            broker_from_url("redis+sentinel://h/m", opts)


def serve(tmp_path: Path, broker: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "tidings",
            "serve",
            "--port",
            "0",
            "--data-dir",
            str(tmp_path / "d"),
            "--broker",
            broker,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"TIDINGS_REDIS_TIMEOUT": "2", **os.environ},
    )


@pytest.mark.timeout(60)
def test_serve_with_a_bad_sentinel_url_or_no_sentinel_says_so_in_one_line(tmp_path: Path) -> None:
    r = serve(tmp_path, "redis+sentinel://127.0.0.1:1,127.0.0.1:x/m")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("tidings: "), r.stderr
    assert "host:port" in r.stderr
    # nothing listens there: the sentinels cannot name a master
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    t0 = time.monotonic()
    r = serve(tmp_path, f"redis+sentinel://:secret@127.0.0.1:{dead}/tidings")
    assert r.returncode != 0 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("tidings: cannot start: ") and "sentinels at 127.0.0.1:" in r.stderr
    assert "secret" not in r.stderr and "Traceback" not in r.stderr
    assert time.monotonic() - t0 < 20


# ------------------------------------------------------------------------------------------ WAIT


async def http_publish(s: aiohttp.ClientSession, base: str, channel: str, data: Any) -> tuple[int, Any]:
    async with s.post(f"{base}/api/publish", json={"channel": channel, "data": data}, headers=AUTH) as r:
        return r.status, await r.json()


@pytest.mark.timeout(60)
async def test_wait_with_too_few_replicas_answers_503_within_the_timeout(
    start_server: ServerFactory, probe: ProbeFactory, redis_server: RedisServer
) -> None:
    srv = await start_server(
        broker=redis_server.url, redis_wait_replicas=1, redis_wait_timeout=0.5, redis_timeout=2.0
    )
    async with aiohttp.ClientSession() as s:
        t0 = time.monotonic()
        status, body = await http_publish(s, srv.http, "pub:w", "no replica")
        elapsed = time.monotonic() - t0
        assert status == 503 and body["error"]["code"] == "unavailable", body
        assert 0.5 <= elapsed < 2.0, elapsed
        p = await probe(srv)
        r = await p.request("publish", channel="pub:w", data="ws")
        assert r["ok"] is False and r["error"]["code"] == "unavailable", r
    # not acknowledged, yet in Redis (at-least-once: a retry with the idempotency key stores nothing twice)
    assert redis_server.command("XLEN", "tidings:{pub:w}:s") == 2


@pytest.mark.timeout(90)
async def test_wait_with_a_replica_acknowledges(
    start_server: ServerFactory, redis_sentinel: RedisSentinel
) -> None:
    srv = await start_server(
        broker=redis_sentinel.url, redis_wait_replicas=1, redis_wait_timeout=1.0, redis_timeout=3.0
    )
    async with aiohttp.ClientSession() as s:
        for i in range(20):
            status, body = await http_publish(s, srv.http, "pub:w1", i)
            assert status == 200, body
    # acknowledged = on the replica already
    assert redis_sentinel.replica.command("XLEN", "tidings:{pub:w1}:s") == 20


# ------------------------------------------------------------------------------------------ shards


def pubsub_clients(srv: RedisServer) -> dict[str, dict[str, str]]:
    """name -> CLIENT LIST fields of the Pub/Sub connections named ``tidings:pubsub:N``."""
    out: dict[str, dict[str, str]] = {}
    for line in str(srv.command("CLIENT", "LIST", "TYPE", "pubsub")).splitlines():
        f = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        if f.get("name", "").startswith("tidings:pubsub:"):
            out[f["name"]] = f
    return out


@pytest.mark.timeout(60)
async def test_channels_are_split_over_the_pubsub_shards_and_a_killed_one_repairs_only_its_own(
    start_server: ServerFactory, probe: ProbeFactory, redis_server: RedisServer
) -> None:
    shards = 4
    srv = await start_server(broker=redis_server.url, redis_pubsub_shards=shards, redis_check_interval=30.0)
    broker = srv.node.broker
    assert isinstance(broker, RedisBroker)
    channels = [f"pub:s{i}" for i in range(12)]
    by_shard = {k: [c for c in channels if zlib.crc32(c.encode()) % shards == k] for k in range(shards)}
    assert all(by_shard.values()), by_shard  # every shard holds some of them
    sub = await probe(srv)
    for c in channels:
        await sub.ok("subscribe", channel=c)

    def settled() -> dict[str, dict[str, str]] | None:
        cl = pubsub_clients(redis_server)
        want = {f"tidings:pubsub:{k}": 1 + len(v) for k, v in by_shard.items()}  # + the placeholder
        return cl if {n: int(f["sub"]) for n, f in cl.items()} == want else None

    before = await asyncio.to_thread(wait_until, settled, 10, "one Pub/Sub connection per shard")
    assert len(before) == shards

    repaired: list[str] = []
    repair = broker._repair

    async def recording(channel: str, chan: Any) -> None:
        repaired.append(channel)
        await repair(channel, chan)

    broker._repair = recording  # type: ignore[method-assign]
    victim = 2
    n = 120
    async with aiohttp.ClientSession() as s:
        for i in range(n):
            if i == n // 2:
                killed = redis_server.command(
                    "CLIENT", "KILL", "ID", before[f"tidings:pubsub:{victim}"]["id"]
                )
                assert killed == 1
            status, body = await http_publish(s, srv.http, channels[i % len(channels)], i)
            assert status == 200, body
        got = await sub.messages(n, timeout=20)

    after = await asyncio.to_thread(wait_until, settled, 10, "the killed shard to come back")
    assert after[f"tidings:pubsub:{victim}"]["id"] != before[f"tidings:pubsub:{victim}"]["id"]
    for k in range(shards):
        if k != victim:  # the others were never touched
            assert after[f"tidings:pubsub:{k}"]["id"] == before[f"tidings:pubsub:{k}"]["id"]
    assert sorted(set(repaired)) == sorted(by_shard[victim])
    # nothing lost, nothing twice, each channel in order
    assert sorted(m["data"] for m in got) == list(range(n))
    for c in channels:
        offs = [m["offset"] for m in got if m["channel"] == c]
        assert offs == list(range(1, len(offs) + 1)), (c, offs)


# ------------------------------------------------------------------------------------------ failover


@dataclass
class Sub:
    """One /ws subscriber that resubscribes with ``since`` when told ``insufficient_state``."""

    probe: Probe
    channel: str
    got: list[tuple[float, int, str, Any]] = field(default_factory=list)  # (t, offset, epoch, data)
    # (when, offset) of each resubscribe answered recovered: false: what this subscriber did not get up to
    # that offset it has been told about
    told: list[tuple[float, int]] = field(default_factory=list)
    resubscribed: int = 0
    task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        while True:
            p = await self.probe.pushes.get()
            if p["type"] == "message" and p["channel"] == self.channel:
                self.got.append((time.monotonic(), p["offset"], p["epoch"], p["data"]))
            elif p["type"] == "unsubscribe" and p["channel"] == self.channel:
                assert p["code"] == "insufficient_state" and p["resubscribe"] is True, p
                since = {"offset": self.got[-1][1], "epoch": self.got[-1][2]} if self.got else None
                while True:  # while Redis is failing over, a subscribe with since may be unavailable
                    r = await self.probe.request("subscribe", channel=self.channel, since=since, timeout=10)
                    if r.get("ok"):
                        break
                    assert r["error"]["code"] == "unavailable", r
                    await asyncio.sleep(0.2)
                self.resubscribed += 1
                if r["result"].get("recovered") is False:
                    self.told.append((time.monotonic(), r["result"]["offset"]))


@dataclass
class Acked:
    sent: float  # when the publish request went out (before Redis ran it)
    t: float  # when it was acknowledged
    offset: int
    epoch: str
    id: str
    data: int


def count(subs: list[Sub], acked: list[Acked]) -> tuple[int, int, int]:
    """(delivered, flagged, lost) over every (subscriber, acknowledged publication) pair. Flagged: not
    delivered, and a later ``recovered: false`` covered it (the publish went out before that reply and its
    offset is at most the position the reply resumed from)."""
    delivered = flagged = lost = 0
    for sub in subs:
        seen = {d for _, _, _, d in sub.got}
        for a in acked:
            if a.data in seen:
                delivered += 1
            elif any(a.sent < t and a.offset <= off for t, off in sub.told):
                flagged += 1
            else:
                lost += 1
    return delivered, flagged, lost


def check_segments(sub: Sub) -> None:
    """Between two 'told' events a subscriber's stream is gapless and without duplicates."""
    marks = sorted(t for t, _ in sub.told)
    seg: list[tuple[int, str]] = []
    k = 0
    for t, off, epoch, _ in sub.got:
        while k < len(marks) and marks[k] < t:
            k += 1
            seg = []
        if seg and seg[-1][1] == epoch:
            assert off == seg[-1][0] + 1, f"gap or duplicate: {seg[-1]} then {(off, epoch)}"
        seg.append((off, epoch))


async def failover_run(
    start_server: ServerFactory,
    probe: ProbeFactory,
    group: RedisSentinel,
    *,
    wait_replicas: int,
) -> dict[str, Any]:
    """3 subscribers, 2 publishers over HTTP; after 100 acknowledged publishes the replica is stopped
    (SIGSTOP) and its link cut (CLIENT KILL TYPE replica), 6 more publishes are answered, the master is
    SIGKILLed and the replica resumed and promoted by the sentinels; the old master comes back as the new
    one's replica; publishing goes on until 60 more are acknowledged."""
    t_start = time.monotonic()
    channel = "ha:failover"
    srv = await start_server(
        namespaces={"ha": Namespace("ha", publish=True, history_size=100_000)},
        broker=group.url,
        redis_wait_replicas=wait_replicas,
        redis_wait_timeout=0.3,
        redis_timeout=2.0,
        redis_check_interval=0.3,
    )
    subs = [Sub(await probe(srv), channel) for _ in range(3)]
    for sub in subs:
        await sub.probe.ok("subscribe", channel=channel)
        sub.task = asyncio.get_running_loop().create_task(sub.run())
    acked: list[Acked] = []
    refused = [0]
    counter = iter(range(1_000_000))
    stop = asyncio.Event()
    answered = asyncio.Condition()

    async def publisher(s: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            n = next(counter)
            sent = time.monotonic()
            try:
                status, body = await http_publish(s, srv.http, channel, n)
            except aiohttp.ClientError:
                status, body = 0, None
            if status == 200:
                acked.append(Acked(sent, time.monotonic(), body["offset"], body["epoch"], body["id"], n))
            else:
                assert status == 503 and body["error"]["code"] == "unavailable", (status, body)
                refused[0] += 1
            async with answered:
                answered.notify_all()

    async def until(pred: Any, timeout: float, what: str) -> None:
        try:
            async with asyncio.timeout(timeout), answered:
                await answered.wait_for(pred)
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what}") from None

    async with aiohttp.ClientSession() as s:
        pubs = [asyncio.get_running_loop().create_task(publisher(s)) for _ in range(2)]
        try:
            await until(lambda: len(acked) >= 100, 20, "100 acknowledged publishes")
            old, new = group.master, group.replica
            # The replica falls behind: stopped, and its link cut (the master's writes from now on stay in
            # the master's backlog; a running replica would reconnect within a second and catch up).
            new.pause()
            old.command("CLIENT", "KILL", "TYPE", "replica")
            mark = len(acked) + refused[0]
            await until(lambda: len(acked) + refused[0] >= mark + 6, 10, "publishes while the replica lags")
            old.kill()  # SIGKILL the master
            new.resume()
            t_kill = time.monotonic()
            acked_before_kill = len(acked)

            def switched() -> bool:
                ports = {group.master_port(x) for x in group.sentinels if x.running}
                return ports == {new.port} and new.role() == "master"

            await asyncio.to_thread(wait_until, switched, 30, "the sentinels to promote the replica", 0.05)
            t_promoted = time.monotonic()
            await group.arestart(old)  # back as the new master's replica (WAIT can be met again)
            target = len(acked) + 60

            def resumed() -> bool:  # 60 more acknowledged, and every subscriber gets live ones again
                after = {a.data for a in acked if a.t > t_promoted}
                return len(acked) >= target and all(any(d in after for *_, d in x.got[-5:]) for x in subs)

            await until(resumed, 30, "60 more acknowledged, and live delivery to every subscriber")
        finally:
            stop.set()
            for t in pubs:
                with contextlib.suppress(Exception):
                    await t
    # every subscriber converges: each acknowledged publication delivered or flagged
    deadline = time.monotonic() + 20
    while count(subs, acked)[2] and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    for sub in subs:
        assert sub.task is not None
        sub.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sub.task
        check_segments(sub)
    delivered, flagged, lost = count(subs, acked)
    stream = group.master.command("XRANGE", f"tidings:{{{channel}}}:s", "-", "+")
    ids_on_new_master = {dict(zip(f[::2], f[1::2], strict=True))["id"] for _, f in stream}
    missing = [a for a in acked if a.id not in ids_on_new_master]
    return {
        "acked": len(acked),
        "acked_before_kill": acked_before_kill,
        "refused": refused[0],
        "delivered": delivered,
        "flagged": flagged,
        "lost": lost,
        "missing_on_new_master": len(missing),
        "told": sum(len(x.told) for x in subs),
        "failover_s": round(t_promoted - t_kill, 2),
        "told_after_promotion_s": [round(t - t_promoted, 2) for x in subs for t, _ in x.told],
        "runtime_s": round(time.monotonic() - t_start, 2),
        "subs": subs,
    }


@pytest.mark.timeout(120)
async def test_sentinel_failover_with_wait_loses_nothing_acknowledged(
    start_server: ServerFactory, probe: ProbeFactory, redis_sentinel: RedisSentinel
) -> None:
    r = await failover_run(start_server, probe, redis_sentinel, wait_replicas=1)
    print({k: v for k, v in r.items() if k != "subs"})
    assert r["lost"] == 0, r
    assert r["missing_on_new_master"] == 0, r  # WAIT: acknowledged = on the replica that took over
    assert r["refused"] > 0  # while the replica lagged and while no master was reachable
    assert r["acked"] > r["acked_before_kill"]  # the broker went on with the new master


@pytest.mark.timeout(120)
async def test_sentinel_failover_without_wait_tells_every_client_what_it_lost(
    start_server: ServerFactory, probe: ProbeFactory, redis_sentinel: RedisSentinel
) -> None:
    r = await failover_run(start_server, probe, redis_sentinel, wait_replicas=0)
    print({k: v for k, v in r.items() if k != "subs"})
    # without WAIT the master acknowledged what the lagging replica never got: gone from the new master
    assert r["missing_on_new_master"] > 0, r
    # ... and every subscriber was told (recovered: false), none left with a silent gap
    assert r["lost"] == 0, r
    assert all(sub.told for sub in r["subs"]), r
    assert r["acked"] > r["acked_before_kill"]


@pytest.mark.timeout(60)
async def test_an_offset_reused_while_pubsub_was_away_retires_the_epoch(
    start_server: ServerFactory, probe: ProbeFactory, redis_server: RedisServer
) -> None:
    """What a failover without WAIT can leave: Redis lost offsets 4 and 5 after this node delivered them,
    and gave 4..6 to other publications that no node saw live. The node finds it when its Pub/Sub
    connection comes back (offset 5 holds another publication id), retires the epoch, and the subscriber
    is told: its resubscribe with ``since`` answers ``recovered: false``, never a silent skip to 6."""
    srv = await start_server(broker=redis_server.url, redis_pubsub_shards=1, redis_check_interval=30.0)
    sub = await probe(srv)
    await sub.ok("subscribe", channel="pub:re")
    async with aiohttp.ClientSession() as s:
        for i in range(5):
            assert (await http_publish(s, srv.http, "pub:re", i))[0] == 200
    got = await sub.messages(5)
    epoch = got[-1]["epoch"]
    meta, stream = "tidings:{pub:re}:m", "tidings:{pub:re}:s"
    kept = redis_server.command("XRANGE", stream, "-", "3-1")  # the stream as the replica had it
    redis_server.command("DEL", stream)
    for eid, fields in kept:
        redis_server.command("XADD", stream, eid, *fields)
    redis_server.command("HSET", meta, "t", 3)
    for n in (4, 5, 6):  # the _PUBLISH script, its Pub/Sub message sent where no node listens
        keys = [meta, stream, meta, "tidings:epoch0", "tidings:{pub:re}:b", "tidings:{pub:re}:ki"]
        args = [f'"other{n}"', "", f"other-{n}", 200, 3_600_000, 90_000_000, "ffffffff", "", 1000]
        rep = redis_server.command("EVAL", _PUBLISH, 6, *keys, *args, "nowhere", 86_400_000, "", 10)[0]
        assert rep[1] == n
    assert redis_server.command("CLIENT", "KILL", "TYPE", "pubsub") >= 1
    async with asyncio.timeout(10):
        push = await sub.push(timeout=10)
    assert push["type"] == "unsubscribe" and push["code"] == "insufficient_state", push  # not message 6
    assert redis_server.command("HGET", meta, "e") != epoch  # retired in Redis: every node sees it
    r = await sub.ok("subscribe", channel="pub:re", since={"offset": 5, "epoch": epoch})
    assert r["recovered"] is False and r["epoch"] != epoch and r["offset"] == 6


@pytest.mark.timeout(60)
async def test_the_position_check_under_load_reports_no_loss(
    start_server: ServerFactory, probe: ProbeFactory, redis_server: RedisServer
) -> None:
    """The periodic check reads each channel's top while live messages keep moving the node's position:
    it must compare with the position from before its read (a steady stream is not a stream that went
    back)."""
    srv = await start_server(
        broker=redis_server.url, redis_check_interval=0.02, client_rate=1e6, user_rate=1e6
    )
    sub = await probe(srv)
    await sub.ok("subscribe", channel="pub:busy")
    counter = iter(range(1_000_000))
    deadline = time.monotonic() + 3.0

    async def publisher(s: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline:
            status, body = await http_publish(s, srv.http, "pub:busy", next(counter))
            assert status == 200, body

    async with aiohttp.ClientSession() as s:
        await asyncio.gather(*(publisher(s) for _ in range(4)))
    n = next(counter)
    got = await sub.messages(n, timeout=30)
    assert sorted(m["data"] for m in got) == list(range(n))
    assert [m["offset"] for m in got] == list(range(1, n + 1))
    with contextlib.suppress(TimeoutError):
        extra = await sub.push(timeout=0.5)
        raise AssertionError(f"unexpected push: {extra}")


def lose_after(srv: RedisServer, channel: str, keep: int) -> None:
    """Make Redis forget a channel's publications after offset ``keep`` (what the promoted replica of a
    master that died before replicating them holds)."""
    meta, stream = f"tidings:{{{channel}}}:m", f"tidings:{{{channel}}}:s"
    kept = srv.command("XRANGE", stream, "-", f"{keep}-1")
    srv.command("DEL", stream)
    for eid, fields in kept:
        srv.command("XADD", stream, eid, *fields)
    srv.command("HSET", meta, "t", keep)


@pytest.mark.timeout(60)
async def test_a_publisher_acknowledged_again_at_an_old_offset_retires_the_epoch(
    start_server: ServerFactory, probe: ProbeFactory, redis_server: RedisServer
) -> None:
    """Nobody is subscribed anywhere (the client was away during the failover): the node that publishes
    remembers what it acknowledged, finds offset 4 acknowledged again after 5, and retires the epoch, so
    the client coming back with ``since`` 5 is told ``recovered: false`` instead of getting offset 6 only
    (and never the publications now at 4 and 5)."""
    srv = await start_server(broker=redis_server.url)
    async with aiohttp.ClientSession() as s:
        acks = [(await http_publish(s, srv.http, "pub:away", i))[1] for i in range(5)]
        seen = acks[-1]
        lose_after(redis_server, "pub:away", 3)
        for i in range(3):
            status, body = await http_publish(s, srv.http, "pub:away", f"new{i}")
            assert status == 200 and body["offset"] == 4 + i, body
    async with asyncio.timeout(5):  # the retirement is one round trip behind the acknowledgement
        while redis_server.command("HGET", "tidings:{pub:away}:m", "e") == seen["epoch"]:
            await asyncio.sleep(0.02)
    p = await probe(srv)
    r = await p.ok("subscribe", channel="pub:away", since={"offset": seen["offset"], "epoch": seen["epoch"]})
    assert r["recovered"] is False and r["offset"] == 6, r
