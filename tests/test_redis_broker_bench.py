"""Two things the benchmarks (bench/ ``*-redis`` scenarios) found in the Redis broker.

- The publish script trims a stream's expired head (``history_ttl``) and nothing else; it looks at the
  head entry alone and reads further only when that one has expired (reading 64 entries into Lua on every
  publish cost ~340 µs of Redis CPU per publish: ``http-publish-redis``).
- The periodic position check must not take a publication that overtook its reply for a lost stream
  (``fanout-1ch-sat-redis`` lost 60 % of its deliveries: every subscriber was told to resubscribe)."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from tests.redis_servers import RedisServer
from tidings.backends import BrokerOptions, broker_from_url
from tidings.backends.base import BrokerError, HistoryOptions, PublishRequest, PublishResult
from tidings.protocol import Event, Publication

pytestmark = pytest.mark.timeout(30)


class _Handler:
    def deliver(self, pub: Publication) -> None: ...

    def deliver_event(self, event: Event) -> None: ...

    def lost(self, channel: str) -> None: ...


async def _publish(broker: object, channel: str, n: int, opts: HistoryOptions) -> None:
    fut: asyncio.Future[PublishResult | BrokerError] = asyncio.get_running_loop().create_future()
    reqs = [PublishRequest(channel, orjson.dumps({"i": i}), opts) for i in range(n)]
    broker.publish_many(reqs, fut.set_result)  # type: ignore[attr-defined]
    res = await asyncio.wait_for(fut, 5)
    assert not isinstance(res, BrokerError), res


async def test_expired_head_is_trimmed_and_live_entries_stay(redis_server: RedisServer) -> None:
    broker = broker_from_url(redis_server.url, BrokerOptions())
    await broker.start(_Handler())  # type: ignore[arg-type]
    try:
        short = HistoryOptions(size=100, ttl=1.0)
        stream = "tidings:{t:x}:s"
        await _publish(broker, "t:x", 5, short)  # offsets 1..5
        await asyncio.sleep(0.6)
        await _publish(broker, "t:x", 1, short)  # 6: the head is 0.6 s old, within the TTL: no trim
        assert redis_server.command("XLEN", stream) == 6
        await asyncio.sleep(0.6)  # 1..5 are now 1.2 s old, 6 is 0.6 s old (the key's own expiry moved on)
        await _publish(broker, "t:x", 1, short)  # 7: trims the expired head 1..5, keeps 6
        assert redis_server.command("XLEN", stream) == 2
        first = redis_server.command("XRANGE", stream, "-", "+", "COUNT", 1)
        assert first[0][0] == "6-1"
    finally:
        await broker.close()


class _Recorder(_Handler):
    def __init__(self) -> None:
        self.offsets: list[int] = []
        self.lost_calls: list[str] = []

    def deliver(self, pub: Publication) -> None:
        self.offsets.append(pub.offset)

    def lost(self, channel: str) -> None:
        self.lost_calls.append(channel)


async def test_position_check_during_a_stream_of_publishes_loses_nothing(redis_server: RedisServer) -> None:
    """The periodic position check reads a channel's top on one connection while live publications
    arrive on the Pub/Sub connection: a publication that overtakes the check's reply is no sign of a
    lost stream."""
    broker = broker_from_url(redis_server.url, BrokerOptions(redis_check_interval=0.01))
    rec = _Recorder()
    await broker.start(rec)  # type: ignore[arg-type]
    try:
        broker.interest("c:x", True)
        await broker.history("c:x", HistoryOptions(), limit=0)  # subscribed, positioned
        opts = HistoryOptions(size=100)
        n = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2.0
        while loop.time() < deadline and not rec.lost_calls:
            await asyncio.gather(*(_publish(broker, "c:x", 1, opts) for _ in range(4)))
            n += 4
        async with asyncio.timeout(5):
            while len(rec.offsets) < n and not rec.lost_calls:
                await asyncio.sleep(0.01)
        assert rec.lost_calls == []
        assert rec.offsets == list(range(1, n + 1))
    finally:
        await broker.close()
