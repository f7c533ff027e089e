"""The Redis broker's own ceiling: publishes through ``RedisBroker.publish_many`` with no HTTP, no
WebSocket and no subscriber, against a redis-server of its own.

    python bench/redis_floor.py                      # Redis on CPU 0, this process on CPU 1
    python bench/redis_floor.py --group 100 --groups-in-flight 8

Each round hands ``--groups-in-flight`` groups of ``--group`` publications (100-byte data, over 10
channels) to the broker at once, the way the HTTP API hands it one group per request, and waits for all.
Reported, per publication: this process's CPU (tidings' broker code and redis-py), redis-server's CPU
(utime+stime from /proc, so including its network I/O), the publish script's own time from Redis's
``INFO commandstats``, and the rate. Redis's CPU per publication bounds what one Redis can take
(1 / that), whatever the number of tidings processes in front of it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # make `bench` and `tests` importable
import orjson
from tests.redis_servers import RedisServer

from bench import procstat
from tidings.backends import BrokerOptions, broker_from_url
from tidings.backends.base import BrokerError, HistoryOptions, PublishRequest, PublishResult
from tidings.protocol import Event, Publication


class _Handler:
    def deliver(self, pub: Publication) -> None: ...

    def deliver_event(self, event: Event) -> None: ...

    def lost(self, channel: str) -> None: ...


async def run(a: argparse.Namespace, redis: RedisServer) -> dict[str, object]:
    broker = broker_from_url(redis.url, BrokerOptions())
    await broker.start(_Handler())  # type: ignore[arg-type]
    opts = HistoryOptions(size=200)
    data = orjson.dumps({"t": time.time_ns(), "pad": "x" * 66})
    groups = [
        [PublishRequest(f"bench:c{(g * a.group + i) % 10}", data, opts) for i in range(a.group)]
        for g in range(a.groups_in_flight)
    ]
    loop = asyncio.get_running_loop()

    async def one_round() -> int:
        futs = []
        for reqs in groups:
            fut: asyncio.Future[PublishResult | BrokerError] = loop.create_future()
            broker.publish_many(reqs, fut.set_result)
            futs.append(fut)
        n = 0
        for res in await asyncio.gather(*futs):
            assert not isinstance(res, BrokerError), res
            n += len(res)
        return n

    try:
        await one_round()  # warm up (scripts loaded, connections open)
        assert redis.pid is not None
        redis.command("CONFIG", "RESETSTAT")
        me0, r0, t0 = procstat.sample(os.getpid()), procstat.sample(redis.pid), time.monotonic()
        n = 0
        while time.monotonic() - t0 < a.seconds:
            n += await one_round()
        me1, r1, t1 = procstat.sample(os.getpid()), procstat.sample(redis.pid), time.monotonic()
        ev = redis.info("commandstats").get("cmdstat_evalsha", "")
        usec = float(dict(kv.split("=") for kv in ev.split(",")).get("usec", 0)) if ev else 0.0
    finally:
        await broker.close()
    return {
        "publications": n,
        "seconds": round(t1 - t0, 2),
        "rate": round(n / (t1 - t0)),
        "group": a.group,
        "groups_in_flight": a.groups_in_flight,
        "tidings_cpu_us_per_pub": round((me1 - me0).cpu_us / n, 2),
        "redis_cpu_us_per_pub": round((r1 - r0).cpu_us / n, 2),
        "redis_script_us_per_pub": round(usec / n, 2),
        "redis_cpu_util": round((r1 - r0).cpu_util, 2),
        "tidings_cpu_util": round((me1 - me0).cpu_util, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--group", type=int, default=100, help="publications per publish_many call")
    ap.add_argument("--groups-in-flight", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--redis-cpu", type=int, default=0)
    ap.add_argument("--cpu", type=int, default=1, help="CPU of this process (the broker's side)")
    a = ap.parse_args()
    a.seconds = min(a.seconds, 60.0)
    os.sched_setaffinity(0, {a.cpu})
    with tempfile.TemporaryDirectory(prefix="tidings-redis-floor-") as tmp:
        redis = RedisServer(Path(tmp), name="floor").start()
        try:
            assert redis.pid is not None
            os.sched_setaffinity(redis.pid, {a.redis_cpu})
            out = asyncio.run(run(a, redis))
        finally:
            redis.kill()
    print(orjson.dumps(out).decode())


if __name__ == "__main__":
    main()
