"""One broker contract, run unchanged against every broker (``memory://``, ``sqlite:///...``, ``redis://``
and ``redis+cluster://`` on a real 3-master cluster).

Network-free: brokers are built with :func:`broker_from_url` and started with a recording handler.
Every wait is on an event or a bounded poll under ``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest

from tidings.backends import (
    Broker,
    BrokerError,
    BrokerOptions,
    BrokerURLError,
    HistoryOptions,
    MemoryBroker,
    SqliteBroker,
    broker_from_url,
)
from tidings.backends.base import (
    PresenceList,
    PublishRequest,
    PublishResult,
    PushDevice,
    PushLimitError,
    Repeat,
    SharesPresence,
    StoresPush,
)
from tidings.backends.redis import RedisBroker
from tidings.backends.redis_cluster import RedisClusterBroker
from tidings.backends.redis_push import RedisPushStore
from tidings.backends.stream import Stream, now_ms
from tidings.presence import presence_for
from tidings.protocol import Event, Publication, StreamPosition
from tidings.subscriptions import can_recover

OPTS = HistoryOptions()
WAIT = 5.0


class RecordingHandler:
    """A :class:`BrokerHandler` that records what it is handed and wakes waiters."""

    def __init__(self) -> None:
        self.pubs: list[Publication] = []
        self.events: list[Event] = []
        self.lost_channels: list[str] = []
        self.changed = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        self.off_loop = 0  # deliveries made from a thread other than the loop's

    def _check_loop(self) -> None:
        try:
            if asyncio.get_running_loop() is not self.loop:
                self.off_loop += 1
        except RuntimeError:
            self.off_loop += 1

    def deliver(self, pub: Publication) -> object:
        self._check_loop()
        self.pubs.append(pub)
        self.changed.set()
        return 1

    def deliver_event(self, event: Event) -> None:
        self._check_loop()
        self.events.append(event)
        self.changed.set()

    def lost(self, channel: str) -> None:
        self._check_loop()
        self.lost_channels.append(channel)
        self.changed.set()

    async def until(self, pred: Callable[[], bool], timeout: float = WAIT) -> None:
        async with asyncio.timeout(timeout):
            while not pred():
                self.changed.clear()
                await self.changed.wait()


@dataclass
class Done:
    """A ``done`` callback that records every call."""

    calls: list[PublishResult | BrokerError] = field(default_factory=list)
    event: asyncio.Event = field(default_factory=asyncio.Event)

    def __call__(self, result: PublishResult | BrokerError) -> None:
        self.calls.append(result)
        self.event.set()

    async def wait(self) -> PublishResult | BrokerError:
        async with asyncio.timeout(WAIT):
            await self.event.wait()
        assert len(self.calls) == 1
        return self.calls[0]


@dataclass
class Fixture:
    kind: str
    broker: Broker
    handler: RecordingHandler
    db: Path | None
    watched: set[str] = field(default_factory=set)
    broker_options: BrokerOptions = field(default_factory=BrokerOptions)

    async def watch(self, *channels: str) -> None:
        """Declare interest in ``channels`` the way a node's hub does when it gets a first subscriber,
        and wait for the broker to be ready for them (the history read a subscription makes): from then
        on every publication of them is delivered, by any broker."""
        for ch in channels:
            if ch not in self.watched:
                self.watched.add(ch)
                self.broker.interest(ch, True)
                await self.broker.history(ch, OPTS, limit=0)

    async def publish_any(self, *reqs: PublishRequest) -> PublishResult:
        await self.watch(*(r.channel for r in reqs))
        done = Done()
        self.broker.publish_many(list(reqs), done)
        result = await done.wait()
        assert not isinstance(result, BrokerError), result
        return result

    async def publish(self, *reqs: PublishRequest) -> list[Publication]:
        pubs = await self.publish_any(*reqs)
        assert all(isinstance(p, Publication) for p in pubs)
        return [p for p in pubs if isinstance(p, Publication)]

    async def publish_one(self, channel: str, data: object, opts: HistoryOptions = OPTS) -> Publication:
        (pub,) = await self.publish(req(channel, data, opts))
        return pub


def req(channel: str, data: object, opts: HistoryOptions = OPTS, key: str | None = None) -> PublishRequest:
    return PublishRequest(channel, orjson.dumps(data), opts, key=key)


def ids(p: Publication | Repeat) -> tuple[str, int, str, str]:
    return (p.channel, p.offset, p.epoch, p.id)


KINDS = ["memory", "sqlite", "redis", "redis-cluster"]
BROKER_TYPES: dict[str, type] = {
    "memory": MemoryBroker,
    "sqlite": SqliteBroker,
    "redis": RedisBroker,
    "redis-cluster": RedisClusterBroker,
}


def url_for(kind: str, tmp_path: Path, redis_url: str = "") -> str:
    if kind in ("redis", "redis-cluster"):
        return redis_url
    return "memory://" if kind == "memory" else f"sqlite:///{tmp_path}/t.db"


async def _fixture(kind: str, tmp_path: Path, request: pytest.FixtureRequest, opts: BrokerOptions) -> Fixture:
    redis_url = ""
    if kind == "redis":
        redis_url = request.getfixturevalue("redis_url")
    elif kind == "redis-cluster":
        redis_url = request.getfixturevalue("redis_cluster").url
    broker = broker_from_url(url_for(kind, tmp_path, redis_url), opts)
    assert isinstance(broker, BROKER_TYPES[kind])
    handler = RecordingHandler()
    await broker.start(handler)
    return Fixture(
        kind, broker, handler, tmp_path / "t.db" if kind == "sqlite" else None, broker_options=opts
    )


@pytest.fixture(params=KINDS)
async def fx(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Fixture]:
    f = await _fixture(request.param, tmp_path, request, BrokerOptions())
    try:
        yield f
    finally:
        await f.broker.close()


async def build(kind: str, tmp_path: Path, opts: BrokerOptions, request: pytest.FixtureRequest) -> Fixture:
    return await _fixture(kind, tmp_path, request, opts)


async def next_ms() -> None:
    """Wait until the millisecond clock moves on (publish times are in ms)."""
    t = now_ms()
    async with asyncio.timeout(1):
        while now_ms() == t:
            await asyncio.sleep(0.001)


# ---------------------------------------------------------------------------------------- offsets


async def test_offsets_start_at_1_gapless_and_independent_per_channel(fx: Fixture) -> None:
    got: dict[str, list[int]] = {"a:1": [], "a:2": [], "b:1": []}
    for i in range(5):
        for ch in got:
            if ch == "b:1" and i % 2:
                continue
            got[ch].append((await fx.publish_one(ch, i)).offset)
    assert got == {"a:1": [1, 2, 3, 4, 5], "a:2": [1, 2, 3, 4, 5], "b:1": [1, 2, 3]}


async def test_delivery_is_on_the_loop_in_order_and_never_inside_publish_many(fx: Fixture) -> None:
    done = Done()
    await fx.watch("c:x")
    fx.broker.publish_many([req("c:x", i) for i in range(10)], done)
    assert fx.handler.pubs == []  # nothing delivered inside the call
    assert done.calls == []
    result = await done.wait()
    assert not isinstance(result, BrokerError)
    await fx.handler.until(lambda: len(fx.handler.pubs) == 10)
    assert [p.offset for p in fx.handler.pubs] == list(range(1, 11))
    assert [p.data for p in fx.handler.pubs] == list(range(10))
    assert fx.handler.off_loop == 0
    # done: once, with the publications in request order (the very objects delivered)
    assert [(p.offset, p.data) for p in result] == [(p.offset, p.data) for p in fx.handler.pubs]
    assert len(done.calls) == 1


async def test_done_is_called_once_per_group_in_request_order(fx: Fixture) -> None:
    dones = [Done() for _ in range(4)]
    await fx.watch("d:x", "d:y")
    for i, d in enumerate(dones):
        fx.broker.publish_many([req("d:x", i), req("d:y", i)], d)
    results = [await d.wait() for d in dones]
    for i, r in enumerate(results):
        assert not isinstance(r, BrokerError)
        assert [(p.channel, p.offset, p.data) for p in r] == [("d:x", i + 1, i), ("d:y", i + 1, i)]
    await fx.handler.until(lambda: len(fx.handler.pubs) == 8)
    assert all(len(d.calls) == 1 for d in dones)


async def test_group_is_atomic_and_ordered_over_several_channels(fx: Fixture) -> None:
    await fx.publish_one("g:b", "before")
    group = [req(ch, i) for i, ch in enumerate(["g:a", "g:b", "g:a", "g:c", "g:b", "g:a"])]
    pubs = await fx.publish(*group)
    assert [(p.channel, p.offset, p.data) for p in pubs] == [
        ("g:a", 1, 0),
        ("g:b", 2, 1),
        ("g:a", 2, 2),
        ("g:c", 1, 3),
        ("g:b", 3, 4),
        ("g:a", 3, 5),
    ]
    await fx.handler.until(lambda: len(fx.handler.pubs) == 7)
    got = [(p.channel, p.offset) for p in fx.handler.pubs[1:]]
    if fx.kind == "redis-cluster":
        # Channels of different slots live on different masters, each with its own Pub/Sub connection:
        # every channel's publications arrive in order, but the order across masters is not kept
        # (docs/scaling.md, Redis Cluster). Channels of one master keep the group's order.
        assert isinstance(fx.broker, RedisClusterBroker)
        for where in {fx.broker._master_of(ch) for ch in ("g:a", "g:b", "g:c")}:
            mine = [(p.channel, p.offset) for p in pubs if fx.broker._master_of(p.channel) == where]
            assert [g for g in got if fx.broker._master_of(g[0]) == where] == mine
        return
    want = [(p.channel, p.offset) for p in pubs]
    if getattr(fx.broker, "is_shared", False):
        # Each channel in offset order; channels on different Pub/Sub connections (redis_pubsub_shards)
        # may interleave otherwise than they were published (docs/scaling.md).
        assert sorted(got) == sorted(want)
        for ch in ("g:a", "g:b", "g:c"):
            assert [x for x in got if x[0] == ch] == [x for x in want if x[0] == ch]
    else:
        assert got == want


# ---------------------------------------------------------------------------------------- epochs


async def test_epoch_is_stable_and_an_unpublished_channel_reads_as_offset_0(fx: Fixture) -> None:
    before = await fx.broker.history("e:new", OPTS, since=0)
    assert before.publications == [] and before.position.offset == 0 and before.first_offset == 1
    seen = StreamPosition(0, before.position.epoch)
    pubs = [await fx.publish_one("e:new", i) for i in range(3)]
    assert {p.epoch for p in pubs} == {before.position.epoch}  # the position read before stays valid
    after = await fx.broker.history("e:new", OPTS, since=0)
    assert after.position == StreamPosition(3, before.position.epoch)
    assert can_recover(after, seen)
    assert [p.data for p in after.publications] == [0, 1, 2]
    # and subscribing at 0 in whatever epoch recovers from the first publication on
    assert can_recover(after, StreamPosition(0, "some-other-epoch"))
    assert not can_recover(after, StreamPosition(1, "some-other-epoch"))


# ---------------------------------------------------------------------------------------- history


async def test_history_since_and_limit(fx: Fixture) -> None:
    for i in range(1, 11):
        await fx.publish_one("h:x", i)
    h = fx.broker.history
    res = await h("h:x", OPTS, since=3, limit=4)
    assert [p.offset for p in res.publications] == [4, 5, 6, 7]  # oldest first, since exclusive
    assert [p.data for p in res.publications] == [4, 5, 6, 7]
    assert res.position.offset == 10 and res.first_offset == 1
    assert [p.offset for p in (await h("h:x", OPTS, since=7)).publications] == [8, 9, 10]
    assert (await h("h:x", OPTS, since=10)).publications == []
    assert [p.offset for p in (await h("h:x", OPTS, since=0, limit=2)).publications] == [1, 2]
    # without since: the newest `limit`, oldest first
    assert [p.offset for p in (await h("h:x", OPTS, limit=3)).publications] == [8, 9, 10]
    assert [p.offset for p in (await h("h:x", OPTS)).publications] == list(range(1, 11))
    assert (await h("h:x", OPTS, limit=0)).publications == []
    assert (await h("h:x", OPTS, limit=0)).position.offset == 10


async def test_history_size_limit_per_namespace(fx: Fixture) -> None:
    small = HistoryOptions(size=3)
    for i in range(1, 8):
        await fx.publish_one("s:x", i, small)
        await fx.publish_one("s:big", i)
    res = await fx.broker.history("s:x", small, since=0)
    assert [p.offset for p in res.publications] == [5, 6, 7]
    assert res.first_offset == 5 and res.position.offset == 7
    assert not can_recover(res, StreamPosition(2, res.position.epoch))
    assert can_recover(await fx.broker.history("s:x", small, since=4), StreamPosition(4, res.position.epoch))
    assert len((await fx.broker.history("s:big", OPTS)).publications) == 7  # other channels unaffected


async def test_history_ttl(fx: Fixture) -> None:
    short = HistoryOptions(size=100, ttl=0.2)
    for i in range(3):
        await fx.publish_one("t:x", i, short)
    assert len((await fx.broker.history("t:x", short)).publications) == 3
    async with asyncio.timeout(3):
        while (await fx.broker.history("t:x", short)).publications:
            await asyncio.sleep(0.02)
    res = await fx.broker.history("t:x", short, since=0)
    assert res.publications == [] and res.position.offset == 3 and res.first_offset == 4
    assert (await fx.publish_one("t:x", 3, short)).offset == 4  # offsets go on


async def test_size_0_keeps_nothing_but_counts_offsets(fx: Fixture) -> None:
    none = HistoryOptions(size=0)
    offsets = [(await fx.publish_one("z:x", i, none)).offset for i in range(4)]
    assert offsets == [1, 2, 3, 4]
    res = await fx.broker.history("z:x", none, since=0)
    assert res.publications == [] and res.position.offset == 4 and res.first_offset == 5
    await fx.handler.until(lambda: len(fx.handler.pubs) == 4)  # still delivered live


# ---------------------------------------------------------------------------------------- failure


async def test_failed_commit_rolls_back_and_loses_no_offset(fx: Fixture) -> None:
    if fx.kind != "sqlite":
        # memory has no commit that can fail; Redis runs a group's scripts one by one (tests/test_redis.py)
        pytest.skip(f"not applicable to {fx.kind}: no group commit that can fail")
    assert fx.db is not None
    await fx.publish_one("f:x", 1)
    await fx.publish_one("f:y", 1)
    with sqlite3.connect(fx.db) as other:
        other.execute(
            "CREATE TRIGGER fail BEFORE INSERT ON pubs WHEN NEW.channel = 'f:bad' "
            "BEGIN SELECT RAISE(ABORT, 'disk on fire'); END"
        )
    other.close()
    # one group over several channels: the bad row fails the whole transaction
    done = Done()
    fx.broker.publish_many([req("f:x", 2), req("f:bad", 0), req("f:y", 2)], done)
    result = await done.wait()
    assert isinstance(result, BrokerError)
    with sqlite3.connect(fx.db) as other:
        other.execute("DROP TRIGGER fail")
    other.close()
    pubs = await fx.publish(req("f:x", 3), req("f:bad", 3), req("f:y", 3))
    assert [(p.channel, p.offset) for p in pubs] == [("f:x", 2), ("f:bad", 1), ("f:y", 2)]
    for ch in ("f:x", "f:y"):
        res = await fx.broker.history(ch, OPTS, since=0)
        assert [(p.offset, p.data) for p in res.publications] == [(1, 1), (2, 3)]
    await fx.handler.until(lambda: len(fx.handler.pubs) == 5)
    assert [p.data for p in fx.handler.pubs] == [1, 1, 3, 3, 3]  # the failed group was never delivered


async def test_reads_never_write(fx: Fixture) -> None:
    results = await asyncio.gather(*(fx.broker.history(f"r:never{i}", OPTS, since=0) for i in range(1000)))
    assert all(r.publications == [] and r.position.offset == 0 for r in results)
    if fx.kind == "redis":
        assert isinstance(fx.broker, RedisBroker)
        assert await fx.broker._client.dbsize() == 1  # only the shared epoch0 key
        pub = await fx.publish_one("r:never5", "x")
        assert pub.position() == StreamPosition(1, results[5].position.epoch)
        return
    if fx.kind == "redis-cluster":  # only the epoch0 key of each slot those channels hash to
        assert isinstance(fx.broker, RedisClusterBroker)
        keys = await fx.broker._cluster.keys("*", target_nodes=fx.broker._cluster.PRIMARIES)
        expected = {fx.broker._epoch0_of(f"r:never{i}") for i in range(1000)}
        assert {k.decode() if isinstance(k, bytes) else k for k in keys} == expected
        # channels of one slot read one epoch, and a publish afterwards lands in the epoch reads saw
        by_slot: dict[str, set[str]] = {}
        for i, r in enumerate(results):
            by_slot.setdefault(fx.broker._epoch0_of(f"r:never{i}"), set()).add(r.position.epoch)
        assert all(len(e) == 1 for e in by_slot.values())
        pub = await fx.publish_one("r:never5", "x")
        assert pub.position() == StreamPosition(1, results[5].position.epoch)
        return
    if fx.db is None:  # memory: no stream was created for them either
        assert isinstance(fx.broker, MemoryBroker)
        assert len(fx.broker._streams) == 0
        return
    db = sqlite3.connect(fx.db)
    try:
        assert db.execute("SELECT COUNT(*) FROM streams").fetchone()[0] == 0
        assert db.execute("SELECT COUNT(*) FROM pubs").fetchone()[0] == 0
    finally:
        db.close()
    # and a publish afterwards still lands in the epoch those reads saw
    pub = await fx.publish_one("r:never5", "x")
    assert pub.position() == StreamPosition(1, results[5].position.epoch)


# ---------------------------------------------------------------------------------------- idempotency


async def test_a_repeated_key_stores_and_delivers_once_and_answers_the_first_result(fx: Fixture) -> None:
    first = await fx.publish_one("i:x", "before")
    (pub,) = await fx.publish_any(req("i:x", "once", key="k1"))
    assert isinstance(pub, Publication)
    # five retries: alone, and several in one group with a fresh publish between them
    repeats = [(await fx.publish_any(req("i:x", "again", key="k1")))[0] for _ in range(3)]
    group = await fx.publish_any(req("i:x", "x", key="k1"), req("i:x", "new"), req("i:x", "y", key="k1"))
    repeats += [group[0], group[2]]
    assert all(isinstance(r, Repeat) and ids(r) == ids(pub) for r in repeats)
    assert isinstance(group[1], Publication) and group[1].offset == pub.offset + 1
    # the same key on another channel is another publication; a keyless publish is never a repeat
    (other,) = await fx.publish_any(req("i:y", "once", key="k1"))
    assert isinstance(other, Publication) and other.offset == 1
    res = await fx.broker.history("i:x", OPTS, since=0)
    assert [p.data for p in res.publications] == ["before", "once", "new"]
    await fx.handler.until(lambda: len(fx.handler.pubs) == 4)
    assert [p.data for p in fx.handler.pubs] == ["before", "once", "new", "once"]  # delivered once each
    assert first.offset == 1


async def test_two_new_requests_with_one_key_in_one_group_store_once(fx: Fixture) -> None:
    a, b = await fx.publish_any(req("i:g", 1, key="same"), req("i:g", 2, key="same"))
    assert isinstance(a, Publication) and isinstance(b, Repeat) and ids(b) == ids(a)
    res = await fx.broker.history("i:g", OPTS, since=0)
    assert [p.data for p in res.publications] == [1]


@pytest.mark.parametrize("kind", KINDS)
async def test_idempotency_keys_expire_after_the_window(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    fx = await build(kind, tmp_path, BrokerOptions(idempotency_window=0.3), request)
    try:
        (a,) = await fx.publish_any(req("i:w", 1, key="k"))
        (again,) = await fx.publish_any(req("i:w", 1, key="k"))
        assert isinstance(again, Repeat) and again.offset == a.offset
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 0.3
        while loop.time() < deadline + 0.05:  # the window runs out (a clock condition, bounded)
            await asyncio.sleep(0.05)
        (later,) = await fx.publish_any(req("i:w", 1, key="k"))
        assert isinstance(later, Publication) and later.offset == a.offset + 1
    finally:
        await fx.broker.close()


@pytest.mark.parametrize("kind", KINDS)
async def test_idempotency_keys_are_bounded_in_count_oldest_first(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    fx = await build(kind, tmp_path, BrokerOptions(idempotency_max_keys=10), request)
    try:
        for i in range(30):
            await fx.publish_any(req("i:n", i, key=f"k{i}"))
        if isinstance(fx.broker, SqliteBroker):
            assert fx.broker.idempotency_keys <= 10
            assert fx.db is not None
            db = sqlite3.connect(fx.db)
            try:
                assert db.execute("SELECT COUNT(*) FROM idempotency").fetchone()[0] <= 10
            finally:
                db.close()
        elif isinstance(fx.broker, RedisBroker):  # (and the Cluster's): at most max_keys per channel
            client = fx.broker.redis_client()
            kept = [await client.exists(fx.broker._key("i:n", f"k:k{i}")) for i in range(30)]
            assert sum(kept) == 10 and kept[-10:] == [1] * 10  # the newest ten
            assert await client.zcard(fx.broker._key("i:n", "ki")) == 10
        else:
            assert isinstance(fx.broker, MemoryBroker)
            assert len(fx.broker._keys) <= 10
        (old,) = await fx.publish_any(req("i:n", 0, key="k0"))
        (recent,) = await fx.publish_any(req("i:n", 29, key="k29"))
        assert isinstance(old, Publication)  # forgotten: stored again
        assert isinstance(recent, Repeat) and recent.offset == 30
    finally:
        await fx.broker.close()


async def test_sqlite_idempotency_survives_a_restart_and_a_failed_commit_remembers_nothing(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    fx = await build("sqlite", tmp_path, BrokerOptions(), request)
    (a,) = await fx.publish_any(req("i:r", 1, key="k"))
    await fx.broker.close()
    fx = await build("sqlite", tmp_path, BrokerOptions(), request)
    try:
        (again,) = await fx.publish_any(req("i:r", 1, key="k"))
        assert isinstance(again, Repeat) and ids(again) == ids(a)
        assert fx.db is not None
        with sqlite3.connect(fx.db) as other:
            other.execute(
                "CREATE TRIGGER fail BEFORE INSERT ON pubs WHEN NEW.channel = 'i:bad' "
                "BEGIN SELECT RAISE(ABORT, 'disk on fire'); END"
            )
        other.close()
        done = Done()
        fx.broker.publish_many([req("i:r", 2, key="k2"), req("i:bad", 0)], done)
        assert isinstance(await done.wait(), BrokerError)
        with sqlite3.connect(fx.db) as other:
            other.execute("DROP TRIGGER fail")
        other.close()
        (retry,) = await fx.publish_any(req("i:r", 2, key="k2"))
        assert isinstance(retry, Publication) and retry.offset == 2  # the key went with the rollback
    finally:
        await fx.broker.close()


# ---------------------------------------------------------------------------------------- events


async def test_publish_event_is_delivered_on_the_loop(fx: Fixture) -> None:
    ev = Event("join", "ev:x", "c1", "u1")
    await fx.watch("ev:x")
    fx.broker.publish_event(ev)
    assert fx.handler.events == []  # not inside the call
    await fx.handler.until(lambda: len(fx.handler.events) == 1)
    (got,) = fx.handler.events
    assert (got.kind, got.channel, got.client, got.user) == ("join", "ev:x", "c1", "u1")
    assert fx.handler.off_loop == 0
    assert fx.handler.pubs == []


async def test_interest_exists_and_does_not_fail(fx: Fixture) -> None:
    fx.broker.interest("i:x", True)
    fx.broker.interest("i:x", False)
    fx.broker.interest("i:never", False)
    assert (await fx.publish_one("i:x", 1)).offset == 1


# ---------------------------------------------------------------------------------------- presence
# Every broker's node has a PresenceStore (``presence_for``): a local one for memory and SQLite, the
# broker's shared one for Redis. Writes of a shared store reach Redis on their own task, so reads wait
# for them with a bounded poll.


async def until_true(check: Callable[[], Awaitable[bool]], timeout: float = WAIT) -> float:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.02)
    return loop.time() - t0


async def test_presence_lists_in_join_order_at_most_limit_counts_all_and_forgets_the_removed(
    fx: Fixture,
) -> None:
    store = presence_for(fx.broker, ttl=30.0, limit=2)
    await store.start(lambda: {"p:x": 3})
    try:
        for c in ("c3", "c2", "c1"):  # join order is not name order
            store.add("p:x", c, f"user-{c}")
        store.remove("p:x", "c2")
        store.add("p:x", "c4", "user-c4")
        store.remove("p:x", "never-there")

        async def three() -> bool:
            return (await store.read("p:x")).count == 3

        await until_true(three)
        found = await store.read("p:x")
        ids = [c["client"] for c in found.clients]
        assert len(ids) == 2 and ids == [c for c in ("c3", "c1", "c4") if c in ids]  # limit, join order
        store.remove("p:x", "c4")

        async def two() -> bool:
            return (await store.read("p:x")).count == 2

        await until_true(two)
        assert await store.clients("p:x") == [
            {"client": "c3", "user": "user-c3"},
            {"client": "c1", "user": "user-c1"},
        ]
        assert await store.read("p:empty") == PresenceList([], 0)
        assert await store.channels() == {"p:x": 3}  # this node's own channels, always
    finally:
        await store.close()


async def test_presence_of_a_node_that_stopped_refreshing_expires_after_the_ttl(
    fx: Fixture, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if not isinstance(fx.broker, SharesPresence):
        pytest.skip(
            f"not applicable to {fx.kind}: its presence is local to the node's process, which takes its "
            "members with it when it stops (no other node ever sees them), so there is no TTL to expire"
        )
    ttl = 1.0
    other = await build(fx.kind, tmp_path, BrokerOptions(), request)  # a second node, same Redis
    alive = presence_for(fx.broker, ttl=ttl, limit=100)
    dead = presence_for(other.broker, ttl=ttl, limit=100)
    clean = presence_for(other.broker, ttl=ttl, limit=100)
    await alive.start(lambda: {"p:t": 1})
    await dead.start(lambda: {"p:t": 1, "p:dead": 2})
    await clean.start(lambda: {"p:clean": 1})
    try:
        alive.add("p:t", "a1", "ua")
        dead.add("p:t", "d1", "ud")
        clean.add("p:t", "c1", "uc")

        async def all_three() -> bool:
            return (await alive.read("p:t")).count == 3

        await until_true(all_three)

        async def merged() -> bool:
            return await alive.channels() == {"p:clean": 1, "p:dead": 2, "p:t": 2}

        await until_true(merged)
        # a node that shuts down cleanly takes its members and channels out at once
        await clean.close()
        # (join order over nodes is the order Redis got their writes in: each node writes on its own)
        assert sorted(c["client"] for c in await alive.clients("p:t")) == ["a1", "d1"]
        assert await alive.channels() == {"p:dead": 2, "p:t": 2}
        # one that stops refreshing (a crash) drops out within the TTL; the live node's member stays
        await dead.close(forget=False)  # a shared store can stop without clearing (RedisPresence)

        async def only_alive() -> bool:
            return await alive.clients("p:t") == [{"client": "a1", "user": "ua"}]

        took = await until_true(only_alive, ttl + 2)
        assert took <= ttl + 0.5, took

        async def only_alive_channels() -> bool:
            return await alive.channels() == {"p:t": 1}

        await until_true(only_alive_channels, ttl + 2)
        await asyncio.sleep(2 * ttl)  # several refresh intervals: the live one keeps its member
        assert (await alive.read("p:t")) == PresenceList([{"client": "a1", "user": "ua"}], 1)
    finally:
        await alive.close()
        await other.broker.close()


# ---------------------------------------------------------------------------------------- bounds


async def test_memory_history_is_bounded_in_bytes_lru_first(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    bound = 60 * 1024
    fx = await build("memory", tmp_path, BrokerOptions(max_history_bytes=bound), request)
    assert isinstance(fx.broker, MemoryBroker)
    try:
        blob = "x" * 10 * 1024
        for i in range(200):
            await fx.publish_one(f"m:{i % 20:02d}", blob)
            assert fx.broker._streams.bytes <= bound
        # the channels published to least recently lost theirs; their position is kept
        old = await fx.broker.history("m:00", OPTS, since=0)
        assert old.publications == [] and old.position.offset == 10
        assert not can_recover(old, StreamPosition(0, old.position.epoch))
        new = await fx.broker.history("m:19", OPTS, since=0)
        assert len(new.publications) >= 1 and new.publications[-1].offset == 10
        assert new.first_offset <= 10
        kept = [len((await fx.broker.history(f"m:{i:02d}", OPTS)).publications) for i in range(20)]
        assert sum(kept) * (10 * 1024) <= bound
        first_kept = next(i for i, k in enumerate(kept) if k)
        assert all(kept[first_kept + 1 :]), kept  # every channel after the first one kept holds some
    finally:
        await fx.broker.close()


async def test_sqlite_read_cache_is_bounded_in_bytes_lru_first(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    bound = 300 * 1024  # the 20 channels end with about 2 MiB: the last two or three fit
    fx = await build(
        "sqlite", tmp_path, BrokerOptions(history_cache_bytes=bound, max_history_bytes=0), request
    )
    assert isinstance(fx.broker, SqliteBroker)
    try:
        blob = "x" * 10 * 1024
        for i in range(200):
            ch = f"q:{i % 20:02d}"
            await fx.broker.history(ch, OPTS, since=0)  # read: the channel is cached
            await fx.publish_one(ch, blob)
            assert fx.broker._cache.bytes <= bound
        assert fx.broker._cache.get("q:00") is None  # least recently used: dropped first
        assert fx.broker._cache.get("q:19") is not None
        # the cache is only a cache: every channel's history is still complete from the disk
        for ch in ("q:00", "q:07", "q:19"):
            res = await fx.broker.history(ch, OPTS, since=0)
            assert [p.offset for p in res.publications] == list(range(1, 11))
            assert fx.broker._cache.bytes <= bound
    finally:
        await fx.broker.close()


async def test_sqlite_history_bigger_than_the_read_cache_is_still_served(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A channel whose history does not fit the cache is read from disk every time, and counts nothing."""
    bound = 20 * 1024
    fx = await build(
        "sqlite", tmp_path, BrokerOptions(history_cache_bytes=bound, max_history_bytes=0), request
    )
    assert isinstance(fx.broker, SqliteBroker)
    try:
        await fx.publish(*(req("big:x", "x" * 10 * 1024) for _ in range(5)))
        for _ in range(2):
            res = await fx.broker.history("big:x", OPTS, since=0)
            assert [p.offset for p in res.publications] == [1, 2, 3, 4, 5]
            assert fx.broker._cache.get("big:x") is None and fx.broker._cache.bytes == 0
    finally:
        await fx.broker.close()


async def test_sqlite_disk_history_is_bounded_in_bytes_oldest_channels_first(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    bound = 100 * 1024
    fx = await build("sqlite", tmp_path, BrokerOptions(max_history_bytes=bound), request)
    assert isinstance(fx.broker, SqliteBroker)
    try:
        blob = "x" * 10 * 1024
        for i in range(20):
            await fx.publish(*(req(f"k:{i:02d}", blob) for _ in range(2)))
            assert fx.broker.disk_bytes <= bound
            await next_ms()  # each channel's last publish at a distinct time
        assert fx.broker.disk_bytes > bound // 2
        db = sqlite3.connect(fx.db or "")
        try:
            on_disk = db.execute("SELECT COALESCE(SUM(length(data)), 0) FROM pubs").fetchone()[0]
        finally:
            db.close()
        assert on_disk <= bound
        old = await fx.broker.history("k:00", OPTS, since=0)
        assert old.publications == [] and old.position.offset == 2
        assert not can_recover(old, StreamPosition(0, old.position.epoch))  # recovered: false
        new = await fx.broker.history("k:19", OPTS, since=0)
        assert [p.offset for p in new.publications] == [1, 2]
        assert can_recover(new, StreamPosition(0, new.position.epoch))
        kept = [bool((await fx.broker.history(f"k:{i:02d}", OPTS)).publications) for i in range(20)]
        assert kept == sorted(kept), kept  # the oldest ones lost theirs, the newest kept theirs
        assert (await fx.publish_one("k:00", "again")).offset == 3
    finally:
        await fx.broker.close()


# ---------------------------------------------------------------------------------------- sqlite cache


@pytest.mark.parametrize("stale", ["epoch", "top"])
async def test_sqlite_stale_cache_is_discarded_never_served(
    tmp_path: Path, stale: str, request: pytest.FixtureRequest
) -> None:
    fx = await build("sqlite", tmp_path, BrokerOptions(), request)
    assert isinstance(fx.broker, SqliteBroker)
    try:
        real = [await fx.publish_one("sc:x", i) for i in range(2)]
        epoch = real[0].epoch
        assert [p.data for p in (await fx.broker.history("sc:x", OPTS)).publications] == [0, 1]
        # A cached stream that does not match the database
        if stale == "epoch":
            fakes = [Publication("sc:x", o, "stale", f"f{o}", now_ms(), raw=b'"fake"') for o in (1, 2)]
            wrong = Stream("stale", 2, fakes)
        else:
            fakes = [Publication("sc:x", o, epoch, f"f{o}", now_ms(), raw=b'"fake"') for o in (1, 2, 3, 4)]
            wrong = Stream(epoch, 4, fakes)
        fx.broker._cache.put("sc:x", wrong)
        pub = await fx.publish_one("sc:x", 2)
        assert pub.position() == StreamPosition(3, epoch)
        res = await fx.broker.history("sc:x", OPTS, since=0)
        db = sqlite3.connect(fx.db or "")
        try:
            rows = db.execute("SELECT offset, data FROM pubs WHERE channel='sc:x' ORDER BY offset").fetchall()
        finally:
            db.close()
        assert [(p.offset, p.raw) for p in res.publications] == [(o, bytes(d)) for o, d in rows]
        assert [p.data for p in res.publications] == [0, 1, 2]
        assert res.position == StreamPosition(3, epoch)
    finally:
        await fx.broker.close()


# ---------------------------------------------------------------------------------------- URLs


@pytest.mark.parametrize("url", ["nats://x", "bogus://", "kafka://user:secret@h:6379/0", "nothing"])
def test_unknown_scheme_names_the_known_ones_and_hides_the_password(url: str) -> None:
    with pytest.raises(BrokerURLError) as exc:
        broker_from_url(url)
    msg = str(exc.value)
    assert "memory://" in msg and "sqlite://" in msg and "redis://" in msg
    assert "secret" not in msg and "user:" not in msg


# ---------------------------------------------------------------------------------------- Web Push
# Every broker keeps Web Push registrations (``push_store``): memory in memory (not durable), SQLite in a
# table of its file, Redis in keys. Each test has its own key prefix (Redis is shared between tests).


def push_device(endpoint: str, owner: str, *channels: str) -> PushDevice:
    user = owner.removeprefix("user:") if owner.startswith("user:") else ""
    return PushDevice(endpoint, "p" * 87, "a" * 22, owner, user, channels)


async def push_fixture(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Fixture:
    return await build(kind, tmp_path, BrokerOptions(redis_prefix=f"push{secrets.token_hex(4)}"), request)


@pytest.mark.parametrize("kind", KINDS)
async def test_push_store_registers_replaces_removes_and_caps(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    fx = await push_fixture(kind, tmp_path, request)
    assert isinstance(fx.broker, StoresPush)
    store = fx.broker.push_store(online_ttl=30.0)
    await store.start()
    caps = {"max_per_owner": 2, "max_total": 3}
    try:
        d1 = push_device("https://push.example/1", "user:a", "p:x", "p:y")
        await store.add(d1, **caps)
        assert await store.get(d1.endpoint) == d1
        assert await store.devices("p:x") == [d1] and await store.devices("p:y") == [d1]
        assert await store.devices("p:none") == []
        d1b = push_device(d1.endpoint, "user:a", "p:y", "p:z")  # the same endpoint: replaces
        await store.add(d1b, **caps)
        assert await store.devices("p:x") == [] and await store.devices("p:z") == [d1b]
        d2 = push_device("https://push.example/2", "user:a", "p:y")
        await store.add(d2, **caps)
        with pytest.raises(PushLimitError) as err:
            await store.add(push_device("https://push.example/3", "user:a", "p:y"), **caps)
        assert err.value.scope == "owner"
        await store.add(d2, **caps)  # re-registering is not one more
        d3 = push_device("https://push.example/3", "ip:192.0.2.1", "p:y")
        await store.add(d3, **caps)
        with pytest.raises(PushLimitError) as err:
            await store.add(push_device("https://push.example/4", "user:b", "p:y"), **caps)
        assert err.value.scope == "server"
        assert sorted(d.endpoint for d in await store.devices("p:y")) == [
            d1.endpoint,
            d2.endpoint,
            d3.endpoint,
        ]
        assert await store.remove(d2.endpoint) == d2
        assert await store.remove(d2.endpoint) is None
        assert await store.get(d2.endpoint) is None
        assert sorted(d.endpoint for d in await store.devices("p:y")) == [d1.endpoint, d3.endpoint]
        await store.add(push_device("https://push.example/4", "user:a", "p:y"), **caps)  # room again
    finally:
        await store.close()
    # Durable where the broker is: the same registrations after a restart (memory keeps nothing).
    await fx.broker.close()
    again = await build(kind, tmp_path, fx.broker_options, request) if kind != "memory" else None
    if again is None:
        return
    assert isinstance(again.broker, StoresPush)
    store = again.broker.push_store(online_ttl=30.0)
    await store.start()
    try:
        assert await store.get(d1.endpoint) == d1b
        assert sorted(d.endpoint for d in await store.devices("p:y")) == [
            d1.endpoint,
            d3.endpoint,
            "https://push.example/4",
        ]
    finally:
        await store.close()
        await again.broker.close()


@pytest.mark.parametrize("kind", KINDS)
async def test_push_user_online_is_seen_by_other_nodes_and_expires_after_the_ttl(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    a = await push_fixture(kind, tmp_path, request)
    try:
        assert isinstance(a.broker, StoresPush)
        if not isinstance(a.broker, SharesPresence):
            local = a.broker.push_store(online_ttl=30.0)
            local.set_online("u", True)
            assert await local.online_elsewhere(["u"]) == set()  # one node: there is no elsewhere
            return
        b = await build(kind, tmp_path, a.broker_options, request)  # a second node, same Redis
        ttl = 1.0
        sa = a.broker.push_store(online_ttl=ttl)
        sb = b.broker.push_store(online_ttl=ttl)
        await sa.start()
        await sb.start()
        try:
            sa.set_online("u1", True)
            sa.set_online("u2", True)

            async def seen(want: set[str]) -> Callable[[], Awaitable[bool]]:
                async def check() -> bool:
                    return await sb.online_elsewhere(["u1", "u2", "u3"]) == want

                return check

            await until_true(await seen({"u1", "u2"}))
            assert await sa.online_elsewhere(["u1", "u2"]) == set()  # its own node does not count
            sa.set_online("u1", False)
            took = await until_true(await seen({"u2"}))
            assert took < 0.5, took  # a leave is seen at once, not after the TTL
            await asyncio.sleep(2 * ttl)  # refreshed meanwhile: still online
            assert await sb.online_elsewhere(["u2"]) == {"u2"}
            assert isinstance(sa, RedisPushStore)
            await sa.close(forget=False)  # a node that stopped refreshing (a crash)
            took = await until_true(await seen(set()), ttl + 2)
            assert took <= ttl + 0.5, took
        finally:
            await sa.close()
            await sb.close()
            await b.broker.close()
    finally:
        await a.broker.close()
