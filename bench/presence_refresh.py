"""Cost of RedisPresence's periodic refresh and of a presence read, against a redis-server this script
starts on a free loopback port (no persistence).

    python bench/presence_refresh.py            # members/channels: 10k/1, 10k/1k, 10k/10k, 100k/10k

For each shape: the wall time of one full refresh (every member of one node rewritten: what the node does
every ``presence_ttl / 3``), Redis's own CPU for it (``INFO cpu``), and the mean time of a presence read
(``limit`` 1000) of one channel.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import tempfile
import time

import redis.asyncio as aioredis

from tidings.backends.redis_presence import RedisPresence

SHAPES = [(10_000, 1), (10_000, 1000), (10_000, 10_000), (100_000, 10_000)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def redis_cpu(c: aioredis.Redis) -> float:
    info = await c.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


async def measure(port: int) -> None:
    c = aioredis.Redis(port=port)
    async with asyncio.timeout(30):
        while True:
            try:
                await c.ping()
                break
            except (aioredis.ConnectionError, OSError):
                await asyncio.sleep(0.05)
    for members, channels in SHAPES:
        await c.flushall()
        store = RedisPresence(lambda: c, ttl=30.0)
        await store.start(dict)
        await store.close(forget=False)  # no writer task: the refresh is timed by hand below
        store._closed = False
        for i in range(members):
            store.add(f"ch:{i % channels}", f"client-{i}", f"user-{i}")
        store._dirty.clear()
        cpu0, t0 = await redis_cpu(c), time.perf_counter()
        await store._flush(full=True)
        wall, cpu = time.perf_counter() - t0, await redis_cpu(c) - cpu0
        t1 = time.perf_counter()
        for _ in range(100):
            found = await store.read("ch:0")
        read = (time.perf_counter() - t1) / 100
        print(
            f"{members:>7} members in {channels:>6} channels: full refresh {wall * 1000:6.0f} ms "
            f"(Redis CPU {cpu * 1000:4.0f} ms); read of a {found.count}-member channel "
            f"{read * 1000:.2f} ms"
        )
    await c.aclose()


def main() -> None:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=tmp,
            stdout=subprocess.DEVNULL,
        )
        try:
            asyncio.run(measure(port))
        finally:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
