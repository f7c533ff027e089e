"""The real-Redis test infrastructure itself (tests/redis_servers.py and the fixtures in conftest.py):
standalone restarts with and without persistence, a 3-master Cluster, Sentinel and Cluster failovers."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.sentinel import Sentinel

from . import redis_servers
from .conftest import require_redis
from .redis_servers import RedisCluster, RedisSentinel, RedisServer, StartError

pytestmark = pytest.mark.timeout(60)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_restart_with_aof_keeps_data(make_redis_server: Callable[..., RedisServer]) -> None:
    srv = make_redis_server(persistence="aof")
    url, pid = srv.url, srv.pid
    assert url == f"redis://127.0.0.1:{srv.port}/0"
    assert srv.command("SET", "k", "v") == "OK"
    srv.stop()
    assert pid is not None and not alive(pid) and not srv.running
    srv.start()
    assert srv.url == url and srv.pid != pid
    assert srv.cli("GET", "k") == "v"
    assert srv.info("persistence")["aof_enabled"] == "1"


def test_restart_without_persistence_loses_data(redis_server: RedisServer) -> None:
    redis_server.command("SET", "k", "v")
    pid = redis_server.pid
    redis_server.kill()
    assert pid is not None and not alive(pid)
    redis_server.start()
    assert redis_server.command("GET", "k") is None
    # Persistence may change across a restart, in the same directory.
    redis_server.command("SET", "k", "v2")
    redis_server.restart(persistence="aof")
    assert redis_server.command("GET", "k") is None  # it was not persisted before
    redis_server.command("SET", "k", "v3")
    redis_server.restart()
    assert redis_server.command("GET", "k") == "v3"


def test_pause_makes_redis_unresponsive(redis_server: RedisServer) -> None:
    redis_server.pause()
    try:
        with pytest.raises(OSError):  # connects (the kernel accepts), then no answer
            redis_server.command("PING", timeout=0.3)
    finally:
        redis_server.resume()
    assert redis_server.command("PING") == "PONG"


def test_a_server_that_cannot_start_says_why(tmp_path: Path) -> None:
    require_redis()
    srv = RedisServer(tmp_path / "bad", args=["--no-such-option", "1"])
    with pytest.raises(StartError, match="no-such-option"):
        srv.start(timeout=5)
    assert not srv.running


def test_missing_redis_fails_under_ci_and_skips_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_servers, "REDIS_SERVER", "/nonexistent/redis-server")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="redis-server not found"):
        require_redis()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="apt-get install redis-server"):
        require_redis()


async def test_shared_redis_is_empty_for_each_test(shared_redis: RedisServer, redis_url: str) -> None:
    for _ in range(2):  # two "uses": what one wrote, the next does not see
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            assert await client.dbsize() == 0
            await client.set("left-behind", "1")
        finally:
            await client.aclose()
        assert shared_redis.cli("GET", "left-behind") == "1"
        # what the redis_url fixture does before every test:
        shared_redis.flushall()


async def test_cluster_is_ok_and_serves_redis_py(redis_cluster: RedisCluster) -> None:
    assert redis_cluster.url == "redis+cluster://" + ",".join(n.addr for n in redis_cluster.nodes)
    assert len(redis_cluster.masters()) == 3 and redis_cluster.is_ok()
    for n in redis_cluster.nodes:
        assert redis_servers._info(n.command("CLUSTER", "INFO"))["cluster_state"] == "ok"
    client = aioredis.RedisCluster(
        startup_nodes=[ClusterNode(h, p) for h, p in redis_cluster.startup_nodes], decode_responses=True
    )
    try:
        keys = [f"tidings:{{ch{i}}}:m" for i in range(20)]
        for k in keys:
            await client.set(k, k)
        for k in keys:
            assert await client.get(k) == k
    finally:
        await client.aclose()
    # Each key is on the master that owns its slot, and on no other.
    owners = {redis_cluster.master_for_key(k).port for k in keys}
    assert len(owners) == 3
    for k in keys:
        holder = redis_cluster.master_for_key(k)
        assert holder.command("EXISTS", k) == 1
    assert redis_cluster.cli("GET", keys[0]) == keys[0]  # redis-cli -c follows MOVED


@pytest.mark.failover
async def test_sentinel_failover_promotes_the_replica(redis_sentinel: RedisSentinel) -> None:
    old, replica = redis_sentinel.master, redis_sentinel.replica
    assert redis_sentinel.url.startswith("redis+sentinel://127.0.0.1:")
    assert redis_sentinel.url.endswith("/tidings")
    sentinel = Sentinel(redis_sentinel.sentinel_addrs, socket_timeout=2, decode_responses=True)  # type: ignore[no-untyped-call]
    master = sentinel.master_for("tidings", socket_timeout=2)
    try:
        async with master.pipeline(transaction=False) as pipe:  # one connection: WAIT waits for the SET
            assert await pipe.set("k", "v").execute_command("WAIT", 1, 2000).execute() == [True, 1]
        new = await redis_sentinel.akill_master()
        assert new is replica and redis_sentinel.master is replica and new.role() == "master"
        assert not old.running
        assert await master.get("k") == "v"  # redis-py asks the sentinels again and follows
        assert await sentinel.discover_master("tidings") == ("127.0.0.1", new.port)
    finally:
        await master.aclose()
        for s in sentinel.sentinels:
            await s.aclose()
    # The old master comes back as a replica of the new one (what the next test's fixture does).
    await redis_sentinel.arestart(old)
    assert old.role() == "slave" and redis_sentinel.master is new


@pytest.mark.failover
async def test_cluster_failover_promotes_a_replica(redis_cluster_replicas: RedisCluster) -> None:
    cluster = redis_cluster_replicas
    assert len(cluster.masters()) == 3 and len(cluster.nodes) == 6
    key = "tidings:{failover}:m"
    victim = cluster.master_for_key(key)
    (replica,) = cluster.replicas_of(victim)
    # WAIT on the connection that wrote (on a connection of its own it would return at once).
    assert victim.pipeline(["SET", key, "v"], ["WAIT", 1, 2000]) == ["OK", 1]
    new = await cluster.akill_master(victim)
    assert new is replica and cluster.master_for_key(key) is replica
    assert replica.command("GET", key) == "v"
    client = aioredis.RedisCluster(
        startup_nodes=[ClusterNode(h, p) for h, p in cluster.startup_nodes], decode_responses=True
    )
    try:
        assert await client.get(key) == "v"
    finally:
        await client.aclose()
    await cluster.arestart_node(victim)
    assert victim.role() == "slave" and cluster.replicas_of(replica) == [victim]


def test_ports_are_free_loopback_ports_and_bus_ports() -> None:
    p = redis_servers.free_port(bus=True)
    assert 10000 <= p < 22000
    for port in (p, p + 10000):
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
