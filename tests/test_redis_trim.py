"""The Redis publish script trims a stream's expired head (``history_ttl``) and nothing else.

The script looks at the head entry alone and reads further only when that one has expired (reading 64
entries into Lua on every publish cost ~340 µs of Redis CPU per publish: bench ``http-publish-redis``)."""

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
