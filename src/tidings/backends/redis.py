"""redis://, rediss:// and redis+sentinel:// — history and live fan-out shared by every node through one
Redis (with Sentinel: whichever server the sentinels name as the master, asked on every new connection).

Per channel ``C`` (every key carries the hash tag ``{C}``, so a channel's keys share one slot):

- ``{prefix}:{C}:m`` — hash: ``e`` the epoch, ``t`` the top offset;
- ``{prefix}:{C}:s`` — stream of the retained publications, entry id ``<offset>-1``, fields ``d`` (data),
  ``i`` (info), ``id``, ``t`` (Redis time in ms);
- ``{prefix}:{C}:k:<key>`` — an idempotency key (expires after the window);
- ``{prefix}:{C}:p`` — the Pub/Sub channel of its live publications and join/leave events;
- ``{prefix}:{C}:b`` — a marker written with replication off (in no AOF, on no replica): missing after
  Redis restarted or failed over, when the channel goes on in a new epoch unless Redis fsyncs every write.

A publish is one Lua script (``_PUBLISH``): idempotency check, offset increment, XADD with MAXLEN, TTLs
and PUBLISH of the encoded publication, so offsets are gapless across every node and a publish is
acknowledged only after Redis ran all of it. Queued groups go to Redis pipelined, one round trip for
everything waiting, one pipeline in flight (so acknowledgements keep request order).

With ``wait_replicas`` (``redis_wait_replicas``) the group's pipeline ends with ``WAIT N timeout`` on the
same connection; fewer replicas than N answer the whole group ``unavailable``.

Live delivery: one Pub/Sub subscription per channel per node, held only while the node has local
subscribers, on one of ``pubsub_shards`` connections (``crc32(channel) % shards``), each with its own
listener and reconnect. Pub/Sub is at-most-once, so the node tracks the last offset it delivered per
channel and repairs from the stream: a message whose offset is not the next one, a Pub/Sub connection
that came back, or a periodic position check (one pipelined round trip for every local channel) makes it
read the missing range and deliver it in order before anything newer. When the stream cannot supply it
(trimmed, expired, or the channel's epoch changed), every local subscriber is told
(``BrokerHandler.lost``). When the stream went back under what this node delivered (a failover without
WAIT), the channel's epoch is retired in Redis first, so clients positioned in it get
``recovered: false`` on every node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..protocol import Event, Publication, StreamPosition, new_publication_id
from .base import (
    BrokerError,
    BrokerHandler,
    HistoryOptions,
    HistoryResult,
    IdempotencyOptions,
    PublishDone,
    PublishRequest,
    PublishResult,
    Repeat,
)
from .redis_presence import RedisPresence
from .redis_push import RedisPushStore

try:
    import redis.asyncio as aioredis
    from redis.asyncio.sentinel import (
        Sentinel,
        SentinelConnectionPool,
        SentinelManagedConnection,
        SentinelManagedSSLConnection,
    )
    from redis.exceptions import NoScriptError, RedisError, ResponseError
except ImportError:  # pragma: no cover - the extra is not installed
    aioredis = None  # type: ignore[assignment]
try:
    from hiredis import pack_command as _pack
except ImportError:  # pragma: no cover - redis-py without hiredis packs in Python
    _pack = None  # type: ignore[assignment]


class WaitError(RedisError if aioredis is not None else Exception):  # type: ignore[misc]
    """WAIT returned fewer replicas than ``redis_wait_replicas``: the group answers ``unavailable``."""


__all__ = ["RedisBroker", "RedisTarget"]

log = logging.getLogger("tidings.redis")

# One script call publishes up to PUBLISH_PER_CALL publications, in order, one reply each. Per publication:
# KEYS: meta, stream, idempotency key (meta again when there is none), the shared epoch0, the channel's
#       in-memory marker, the channel's idempotency keys by expiry (a sorted set)
# ARGV: data, info ('' = none), id, size, ttl ms, meta ttl ms, a fresh epoch (epoch0 when it is gone),
#       key? ('1'/''), key window ms, pubsub channel, epoch0 ttl ms, durable? ('1' = appendfsync always),
#       keys kept per channel at most (the oldest are forgotten first)
# What is the same for every publication of a channel in the call (its epoch, the marker, the TTLs, the
# expiry of old head entries, the cap on its idempotency keys) is done once per channel; per publication
# it is the idempotency check, the offset increment, XADD and PUBLISH. (Run per publication, that shared
# part was most of Redis's CPU: bench/results/2026-12-03-redis-script.md.)
# A new stream starts in epoch0, the epoch every node reads a never-published channel in; when Redis lost
# epoch0 (restarted empty), a fresh one is made here, so a recreated stream never reuses an old epoch.
# The marker is written with replication off, so it is in no AOF and on no replica: a channel that has
# its meta but no marker is in a Redis that restarted (or was failed over to) since its last publish,
# which may have come back behind what it acknowledged (AOF everysec after a machine crash, RDB, an
# asynchronous replica). Unless Redis fsyncs every write, such a channel goes on in a fresh epoch, so no
# offset is ever reused within an epoch and every client positioned in the old one is told.
# Replies: {0, offset, epoch, ms}, or {1, "<offset>\0<epoch>\0<id>"} for an idempotency key seen before.
_PUBLISH = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local z = '\\0'
local chans, order, out = {}, {}, {}
for i = 0, #KEYS / 6 - 1 do
  local k, a = i * 6, i * 13
  local meta = KEYS[k + 1]
  local keyed = ARGV[a + 8] == '1'
  local hit = keyed and redis.call('GET', KEYS[k + 3])
  if hit then
    out[i + 1] = {1, hit}
  else
    local c = chans[meta]
    if not c then
      local epoch = redis.call('HGET', meta, 'e')
      if not epoch then
        epoch = redis.call('GET', KEYS[k + 4])
        if not epoch then
          epoch = ARGV[a + 7]
          redis.call('SET', KEYS[k + 4], epoch, 'PX', ARGV[a + 11])
        end
        redis.call('HSET', meta, 'e', epoch)
      elseif ARGV[a + 12] ~= '1' and redis.call('EXISTS', KEYS[k + 5]) == 0 then
        epoch = ARGV[a + 7]
        redis.call('HSET', meta, 'e', epoch)
      end
      redis.set_repl(redis.REPL_NONE)
      redis.call('SET', KEYS[k + 5], '1', 'PX', ARGV[a + 6])
      redis.set_repl(redis.REPL_ALL)
      c = {epoch = epoch, stream = KEYS[k + 2], size = tonumber(ARGV[a + 4]),
           ttl = tonumber(ARGV[a + 5]), mttl = ARGV[a + 6], keys = KEYS[k + 6], keyed = false,
           window = ARGV[a + 9], cap = tonumber(ARGV[a + 13])}
      chans[meta] = c
      order[#order + 1] = meta
    end
    local top = redis.call('HINCRBY', meta, 't', 1)
    if c.size > 0 then
      redis.call('XADD', c.stream, 'MAXLEN', '~', c.size, top .. '-1',
                 'd', ARGV[a + 1], 'i', ARGV[a + 2], 'id', ARGV[a + 3], 't', ms)
    end
    redis.call('PUBLISH', ARGV[a + 10], 'p' .. top .. z .. c.epoch .. z .. ARGV[a + 3] .. z .. ms
               .. z .. ARGV[a + 2] .. z .. ARGV[a + 1])
    if keyed then
      redis.call('SET', KEYS[k + 3], top .. z .. c.epoch .. z .. ARGV[a + 3], 'PX', ARGV[a + 9])
      redis.call('ZADD', c.keys, ms + tonumber(ARGV[a + 9]), KEYS[k + 3])
      c.keyed = true
    end
    out[i + 1] = {0, top, c.epoch, ms}
  end
end
for _, meta in ipairs(order) do
  local c = chans[meta]
  if c.size > 0 then
    redis.call('PEXPIRE', c.stream, c.ttl)
    -- the head entry alone first: reading 64 entries into Lua on every publish cost ~340 us of Redis CPU
    local head = redis.call('XRANGE', c.stream, '-', '+', 'COUNT', 1)
    if head[1] and tonumber(head[1][2][8]) < ms - c.ttl then
      head = redis.call('XRANGE', c.stream, '-', '+', 'COUNT', 64)
      local keep = nil
      for _, e in ipairs(head) do
        if tonumber(e[2][8]) >= ms - c.ttl then keep = e[1]; break end
      end
      if keep then redis.call('XTRIM', c.stream, 'MINID', keep) end
    end
  else
    redis.call('DEL', c.stream)
  end
  redis.call('PEXPIRE', meta, c.mttl)
  if c.keyed then
    redis.call('ZREMRANGEBYSCORE', c.keys, '-inf', ms)
    local over = redis.call('ZCARD', c.keys) - c.cap
    if over > 0 then
      local old = redis.call('ZPOPMIN', c.keys, over)
      for j = 1, #old, 2 do redis.call('DEL', old[j]) end
    end
    redis.call('PEXPIRE', c.keys, c.window)
  end
end
return out
"""
PUBLISH_PER_CALL = 64  # publications per _PUBLISH call (keeps each call's run short)

# KEYS: meta, stream, epoch0. ARGV: from offset ('' = the newest), limit (-1 = all), size, ttl ms.
# Returns {epoch0} for a channel without a stream, else {epoch, top, first retained offset, entries}.
_READ = """
local m = redis.call('HMGET', KEYS[1], 'e', 't')
if not m[1] then return {redis.call('GET', KEYS[3])} end
local top = tonumber(m[2])
local size = tonumber(ARGV[3])
local now = redis.call('TIME')
local cutoff = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - tonumber(ARGV[4])
local first = top + 1
if size > 0 then
  local lo = top - size + 1
  local start = '-'
  while true do
    local chunk = redis.call('XRANGE', KEYS[2], start, '+', 'COUNT', 64)
    if #chunk == 0 then break end
    local found = false
    for _, e in ipairs(chunk) do
      if tonumber(e[2][8]) >= cutoff then
        first = tonumber(string.match(e[1], '^(%d+)'))
        found = true
        break
      end
    end
    if found then break end
    start = '(' .. chunk[#chunk][1]
  end
  if first < lo then first = lo end
end
local limit = tonumber(ARGV[2])
local out = {}
if first <= top and limit ~= 0 then
  if ARGV[1] == '' then
    if limit < 0 then
      out = redis.call('XREVRANGE', KEYS[2], '+', first .. '-0')
    else
      out = redis.call('XREVRANGE', KEYS[2], '+', first .. '-0', 'COUNT', limit)
    end
  else
    local from = math.max(tonumber(ARGV[1]), first)
    if limit < 0 then
      out = redis.call('XRANGE', KEYS[2], from .. '-0', '+')
    else
      out = redis.call('XRANGE', KEYS[2], from .. '-0', '+', 'COUNT', limit)
    end
  end
end
return {m[1], top, first, out}
"""

# KEYS: meta. ARGV: the epoch to retire, its successor. The channel keeps its top offset.
_RETIRE = """
local e = redis.call('HGET', KEYS[1], 'e')
if e == ARGV[1] then
  redis.call('HSET', KEYS[1], 'e', ARGV[2])
  return ARGV[2]
end
return e
"""

# How long a channel's meta outlives its last publish beyond the history TTL, and how long the shared
# epoch of never-published channels lives (shorter, so a channel forgotten after being idle that long
# starts again in an epoch it never had).
EPOCH0_TTL_MS = 86_400_000
META_EXTRA_MS = 2 * EPOCH0_TTL_MS
MAX_BACKLOG = 10_000  # live messages held per channel while it is being repaired
REPAIR_CHUNK = 1000
RECENT_IDS = 64
ACKED_CHANNELS = 10_000


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """Where Redis is: parsed from the broker URL (credentials never logged)."""

    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    # Sentinel (redis+sentinel://): where the sentinels are and the master they name; host/port above are
    # then the first sentinel's. username/password are the master's, sentinel_* the sentinels' own.
    sentinels: tuple[tuple[str, int], ...] = ()
    master_name: str = ""
    sentinel_username: str | None = None
    sentinel_password: str | None = None

    def describe(self) -> str:
        """Where Redis is, for an error message (no credentials)."""
        if self.sentinels:
            addrs = ",".join(f"{h}:{p}" for h, p in self.sentinels)
            return f"the master {self.master_name!r} of the sentinels at {addrs}"
        return f"Redis at {self.host}:{self.port}"


@dataclass(slots=True)
class _Chan:
    """This node's view of one channel it has local subscribers for."""

    pchan: bytes
    shard: int = 0  # which Pub/Sub connection holds its subscription
    epoch: str | None = None  # None until the subscription is confirmed and the position read
    top: int = 0  # last offset delivered here
    state: str = "new"  # new -> live; "repair" while the missing range is read
    backlog: list[tuple[int, str, Publication]] = field(default_factory=list)
    recent: deque[tuple[int, str]] = field(default_factory=lambda: deque(maxlen=RECENT_IDS))
    ready: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(slots=True)
class _Shard:
    """One of the node's Pub/Sub connections, with its own listener task and reconnect backoff."""

    index: int
    pubsub: Any = None
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    connects: int = 0  # how many times it (re)connected


if aioredis is not None:

    class _SentinelBlockingPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
        """The master's connections, found through the sentinels (asked again on every new connection,
        so a failover moves them), from a pool that waits for a free connection like the standalone one."""


class RedisBroker:
    """The :class:`~tidings.backends.base.Broker` for a Redis shared by several nodes."""

    is_shared = True

    def __init__(
        self,
        target: RedisTarget,
        *,
        prefix: str = "tidings",
        timeout: float = 5.0,
        check_interval: float = 2.0,
        pool_size: int = 32,
        idempotency: IdempotencyOptions | None = None,
        wait_replicas: int = 0,
        wait_timeout: float = 1.0,
        pubsub_shards: int = 4,
    ) -> None:
        if aioredis is None:
            raise BrokerError("the Redis broker needs redis-py: pip install 'tidings[redis]'")
        if not prefix or any(c in prefix for c in "{}"):
            raise ValueError("redis_prefix must be non-empty and hold no '{' or '}'")
        self.target = target
        self.prefix = prefix
        self.timeout = timeout
        self.check_interval = check_interval
        self.idempotency = idempotency or IdempotencyOptions()
        self.pool_size = pool_size
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = max(1, int(wait_timeout * 1000))
        if wait_replicas and wait_timeout >= timeout:
            raise ValueError("redis_wait_timeout must be below redis_timeout")
        self._sentinel: Any = None
        self._client: Any = self._make_client()
        self._shards = [_Shard(i) for i in range(max(1, pubsub_shards))]
        self._sha_publish = ""
        self._sha_read = ""
        self._epoch0 = secrets.token_hex(4)
        self._durable = False  # Redis fsyncs its AOF before it answers (appendfsync always)
        self._handler: BrokerHandler | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: list[tuple[list[PublishRequest], PublishDone]] = []
        self._wake = asyncio.Event()
        self._down = False  # the publisher's last round trip failed to reach Redis
        self._back = asyncio.Event()  # set (and replaced) when the publisher reaches Redis again
        self._chans: dict[str, _Chan] = {}
        # channel -> (epoch, offset) of the newest publication this node had acknowledged there, for the
        # ACKED_CHANNELS most recently published channels: an offset at or below it in the same epoch
        # means Redis went back (a failover without WAIT) and reuses offsets.
        self._acked: dict[str, tuple[str, int]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    # ------------------------------------------------------------------------------ connections

    def _make_client(self) -> Any:
        """The one place this broker's connections are made: a ``redis.asyncio.Redis`` over a blocking
        pool (a burst of calls waits for a free connection within ``timeout``, never fails), to the
        standalone server or, with Sentinel, to whichever server the sentinels name as the master. The
        Pub/Sub connections come from the same pool. A broker for another topology overrides this."""
        t = self.target
        common: dict[str, Any] = {
            "db": t.db,
            "username": t.username,
            "password": t.password,
            "socket_timeout": self.timeout,
            "socket_connect_timeout": min(self.timeout, 2.0),
            "max_connections": self.pool_size,
            "timeout": self.timeout,
        }
        if t.sentinels:
            sentinel_kwargs = {
                "socket_timeout": min(self.timeout, 2.0),
                "socket_connect_timeout": min(self.timeout, 2.0),
                "username": t.sentinel_username,
                "password": t.sentinel_password,
            }
            self._sentinel = Sentinel(list(t.sentinels), sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
            return self._sentinel.master_for(
                t.master_name,
                connection_pool_class=_SentinelBlockingPool,
                connection_class=SentinelManagedSSLConnection if t.tls else SentinelManagedConnection,
                **common,
            )
        pool = aioredis.BlockingConnectionPool(
            host=t.host,
            port=t.port,
            connection_class=aioredis.SSLConnection if t.tls else aioredis.Connection,
            **common,
        )
        return aioredis.Redis(connection_pool=pool)

    def _shard_of(self, channel: str) -> int:
        """A channel's Pub/Sub connection: crc32 of its name, the same on every node and every run."""
        return zlib.crc32(channel.encode()) % len(self._shards)

    # ------------------------------------------------------------------------------ keys, presence

    def redis_client(self) -> Any:
        """The client every command goes through (a subclass for Redis Cluster hands its own)."""
        return self._client

    def presence_store(self, *, ttl: float, limit: int) -> RedisPresence:
        """Presence over every node sharing this Redis (``backends/redis_presence.py``)."""
        return RedisPresence(
            self.redis_client, prefix=self.prefix, ttl=ttl, timeout=self.timeout, limit=limit
        )

    def push_store(self, *, online_ttl: float) -> RedisPushStore:
        """Web Push registrations and the "user online" signal in this Redis (``backends/redis_push.py``)."""
        return RedisPushStore(self.redis_client, prefix=self.prefix, ttl=online_ttl, timeout=self.timeout)

    def _key(self, channel: str, kind: str) -> str:
        return f"{self.prefix}:{{{channel}}}:{kind}"

    # ------------------------------------------------------------------------------ lifecycle

    async def start(self, handler: BrokerHandler) -> None:
        self._handler = handler
        self._loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout):
                await self._client.ping()
                await self._load_scripts()
                await self._refresh_epoch0()
                await self._refresh_durable()
        except (RedisError, OSError, TimeoutError) as exc:
            await self._close_clients()
            why = str(exc) or f"no answer within redis_timeout ({self.timeout:g} s)"
            raise BrokerError(f"cannot reach {self.target.describe()}: {why}") from exc
        self._tasks = [
            self._loop.create_task(self._publisher()),
            self._loop.create_task(self._listener()),
            self._loop.create_task(self._checker()),
        ]

    async def ping(self) -> None:
        """PING through the command pool, within ``redis_timeout``."""
        try:
            async with asyncio.timeout(self.timeout):
                await self._client.ping()
        except (RedisError, OSError, TimeoutError) as exc:
            why = str(exc) or f"no answer within redis_timeout ({self.timeout:g} s)"
            raise BrokerError(f"cannot reach {self.target.describe()}: {why}") from exc

    async def _close_clients(self) -> None:
        await self._client.aclose()
        if self._sentinel is not None:
            with contextlib.suppress(Exception):
                await self._sentinel.aclose()

    async def close(self) -> None:
        self._closing = True
        for t in self._tasks:
            t.cancel()
        pending: set[asyncio.Task[None]] = set(self._tasks)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=0.1)
        # A listener blocked in redis-py's read without a timeout may not take the cancellation until its
        # connection goes: close the Pub/Sub connections, then wait (bounded) for the tasks to end.
        for shard in self._shards:
            if shard.pubsub is not None:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(self.timeout):
                        await shard.pubsub.aclose()
        if pending:
            _, pending = await asyncio.wait(pending, timeout=self.timeout)
            if pending:
                log.warning("%d Redis broker task(s) did not end on close", len(pending))
        self._tasks = []
        for _reqs, done in self._queue:
            done(BrokerError("broker closed"))
        self._queue.clear()
        await self._close_clients()

    async def _load_scripts(self) -> None:
        self._sha_publish = _text(await self._client.script_load(_PUBLISH))
        self._sha_read = _text(await self._client.script_load(_READ))

    @property
    def _epoch0_key(self) -> str:
        return f"{self.prefix}:epoch0"

    async def _refresh_epoch0(self) -> None:
        """The epoch every node gives a channel nobody published to (and the one it starts in)."""
        key = self._epoch0_key
        await self._client.set(key, secrets.token_hex(4), nx=True, px=EPOCH0_TTL_MS)
        value = await self._client.get(key)
        if value:
            self._epoch0 = _text(value)

    async def _refresh_durable(self) -> None:
        """Whether Redis keeps every write it acknowledged across a restart (AOF, appendfsync always):
        then a restarted Redis keeps each channel's epoch. Unknown (CONFIG refused): assume not."""
        try:
            cfg = await self._client.config_get("append*")
        except RedisError:
            self._durable = False
            return
        values = {_text(k or ""): _text(v or "") for k, v in cfg.items()}
        self._durable = values.get("appendonly") == "yes" and values.get("appendfsync") == "always"

    # ------------------------------------------------------------------------------ publish

    def publish_many(self, reqs: list[PublishRequest], done: PublishDone) -> None:
        if self._closing or not self._tasks:
            done(BrokerError("broker closed"))
            return
        self._queue.append((reqs, done))
        self._wake.set()

    async def _publisher(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._queue = self._queue, []
            if not batch:
                continue
            try:
                async with asyncio.timeout(self.timeout):
                    results = await self._run_publish([r for reqs, _ in batch for r in reqs])
            except (RedisError, OSError, TimeoutError) as exc:
                self._reached(isinstance(exc, WaitError))
                err = BrokerError(f"redis unavailable: {exc or type(exc).__name__}")
                for _, done in batch:
                    _answer(done, err)
                continue
            self._reached(True)
            i = 0
            for reqs, done in batch:
                _answer(done, results[i : i + len(reqs)])
                i += len(reqs)

    def _reached(self, ok: bool) -> None:
        if not ok:
            self._down = True
        elif self._down:
            self._down = False
            self._back.set()  # wake the Pub/Sub connections and repairs waiting out their backoff
            self._back = asyncio.Event()

    async def _backoff(self, delay: float, back: asyncio.Event) -> None:
        """Sleep ``delay``, or less: until the publisher reached Redis again since ``back`` was taken
        (after a failover or a restart the Pub/Sub connections come back with it, not up to 2 s later)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(back.wait(), delay)

    def _epoch0_for(self, channel: str) -> str:
        """The key of the epoch a never-published ``channel`` is in (one per slot on Redis Cluster)."""
        return self._epoch0_key

    def _publish_durable(self) -> bool:
        """Whether every acknowledged write survives what can happen to this Redis (the script's ARGV[12]):
        its own restart (``appendfsync always``) and, with Sentinel, a failover too (``WAIT`` for at least
        one replica; without it the promoted replica may lack the tail, so the channel goes on in a new
        epoch and clients are told)."""
        return self._durable and (self._sentinel is None or self.wait_replicas >= 1)

    def _publish_argv(self, r: PublishRequest, pid: str) -> tuple[Any, ...]:
        """numkeys, KEYS and ARGV of ``_PUBLISH`` for one request: its one calling convention."""
        meta = self._key(r.channel, "m")
        ttl_ms = max(1, int(r.opts.ttl * 1000))
        return (
            6,
            meta,
            self._key(r.channel, "s"),
            self._key(r.channel, f"k:{r.key}") if r.key else meta,
            self._epoch0_for(r.channel),
            self._key(r.channel, "b"),
            self._key(r.channel, "ki"),
            r.raw,
            r.raw_info or b"",
            pid,
            r.opts.size,
            ttl_ms,
            ttl_ms + META_EXTRA_MS,
            secrets.token_hex(4),
            "1" if r.key else "",
            max(1, int(self.idempotency.window * 1000)),
            self._key(r.channel, "p"),
            EPOCH0_TTL_MS,
            "1" if self._publish_durable() else "",
            self.idempotency.max_keys,
        )

    async def _run_publish(self, reqs: list[PublishRequest]) -> PublishResult:
        ids = [new_publication_id() for _ in reqs]
        calls: list[tuple[list[Any], list[Any]]] = []
        for start in range(0, len(reqs), PUBLISH_PER_CALL):
            keys: list[Any] = []
            args: list[Any] = []
            for r, pid in zip(reqs[start : start + PUBLISH_PER_CALL], ids[start:], strict=False):
                argv = self._publish_argv(r, pid)
                keys += argv[1:7]
                args += argv[7:]
            calls.append((keys, args))
        for attempt in (0, 1):
            cmds: list[tuple[Any, ...]] = [
                ("EVALSHA", self._sha_publish, len(keys), *keys, *args) for keys, args in calls
            ]
            if self.wait_replicas:
                # Same connection, after the writes: acknowledged only once N replicas have them.
                cmds.append(("WAIT", self.wait_replicas, self.wait_timeout_ms))
            try:
                replies = await self._pipeline(cmds)
                break
            except NoScriptError:
                if attempt:
                    raise
                await self._load_scripts()  # Redis restarted or flushed its script cache
        if self.wait_replicas:
            acked = int(replies.pop())
            if acked < self.wait_replicas:
                # The publications are in the master (and may survive); not acknowledged: a retry with
                # the idempotency key is safe.
                raise WaitError(f"{acked} of {self.wait_replicas} replicas acknowledged in time")
        out: PublishResult = []
        replies = [rep for call in replies for rep in call]
        for r, pid, rep in zip(reqs, ids, replies, strict=True):
            result = _publish_reply(r, pid, rep)
            if isinstance(result, Publication):
                self._note_acked(result)
            out.append(result)
        return out

    async def _pipeline(self, cmds: list[tuple[Any, ...]]) -> list[Any]:
        """Send ``cmds`` in one write on one pooled connection and read every reply (a non-transactional
        pipeline). Not redis-py's Pipeline: its command packer copies the growing buffer once per argument
        (quadratic in a script call's ~1,100 arguments: most of this process's CPU per publication);
        hiredis packs in C. A reply that is an error raises after every reply was read (the connection
        stays in step); any other failure drops the connection."""
        pool = self._client.connection_pool
        conn = await pool.get_connection()
        try:
            packed = conn.pack_commands(cmds) if _pack is None else [_pack(cmd) for cmd in cmds]
            await conn.send_packed_command(packed, check_health=False)
            replies: list[Any] = []
            error: Exception | None = None
            for _ in cmds:
                try:
                    replies.append(await conn.read_response())
                except ResponseError as exc:
                    error = error or exc
                    replies.append(exc)
            if error is not None:
                raise error
            return replies
        except ResponseError:
            raise
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        finally:
            await pool.release(conn)

    def _note_acked(self, pub: Publication) -> None:
        """Remember the newest acknowledged offset per channel; one that did not grow in the same epoch
        means Redis lost what this node acknowledged and gave its offsets to others: retire the epoch,
        so that a client positioned there gets ``recovered: false`` even where nobody was subscribed."""
        acked = self._acked
        prev = acked.pop(pub.channel, None)
        acked[pub.channel] = (pub.epoch, pub.offset)
        if len(acked) > ACKED_CHANNELS:
            del acked[next(iter(acked))]
        if prev is not None and prev[0] == pub.epoch and pub.offset <= prev[1]:
            why = f"offset {pub.offset} was acknowledged again after {prev[1]} (Redis lost data)"
            chan = self._chans.get(pub.channel)
            if chan is not None and chan.epoch == pub.epoch:
                self._lose(pub.channel, chan, why, reused=True)
            else:
                log.warning("channel %s: %s; its epoch is retired", pub.channel, why)
                assert self._loop is not None
                self._loop.create_task(self._retire(pub.channel, pub.epoch))

    # ------------------------------------------------------------------------------ history

    async def history(
        self, channel: str, opts: HistoryOptions, *, since: int | None = None, limit: int | None = None
    ) -> HistoryResult:
        chan = self._chans.get(channel)
        try:
            async with asyncio.timeout(self.timeout):
                if chan is not None:
                    await chan.ready.wait()  # live messages after this read reach the hub
                return await self._read(channel, opts, since, limit)
        except (RedisError, OSError, TimeoutError) as exc:
            raise BrokerError(f"redis unavailable: {exc or type(exc).__name__}") from exc

    async def _read(
        self, channel: str, opts: HistoryOptions, since: int | None, limit: int | None
    ) -> HistoryResult:
        args = (
            "" if since is None else since + 1,
            -1 if limit is None else limit,
            opts.size,
            max(1, int(opts.ttl * 1000)),
        )
        keys = (self._key(channel, "m"), self._key(channel, "s"), self._epoch0_key)
        try:
            rep = await self._client.evalsha(self._sha_read, 3, *keys, *args)
        except NoScriptError:
            await self._load_scripts()
            rep = await self._client.evalsha(self._sha_read, 3, *keys, *args)
        if len(rep) <= 1:  # nobody published to it: the epoch its first publish will have
            if rep and rep[0]:
                self._epoch0 = _text(rep[0])
            return HistoryResult([], StreamPosition(0, self._epoch0), 1)
        epoch = rep[0].decode()
        pubs = [_entry(channel, epoch, e) for e in rep[3]]
        if since is None:
            pubs.reverse()
        return HistoryResult(pubs, StreamPosition(int(rep[1]), epoch), int(rep[2]))

    # ------------------------------------------------------------------------------ events, interest

    def publish_event(self, event: Event) -> None:
        payload = b"e" + event.kind.encode() + b"\0" + event.client.encode() + b"\0" + event.user.encode()
        assert self._loop is not None
        self._loop.create_task(self._send_event(self._key(event.channel, "p"), payload))

    async def _send_event(self, pchan: str, payload: bytes) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await self._client.publish(pchan, payload)
        except (RedisError, OSError, TimeoutError) as exc:
            log.info("join/leave event not sent: %s", exc)

    def interest(self, channel: str, on: bool) -> None:
        if on:
            if channel not in self._chans:
                shard = self._shard_of(channel)
                chan = self._chans[channel] = _Chan(self._key(channel, "p").encode(), shard)
                self._subscribe([chan.pchan])
        else:
            chan_gone = self._chans.pop(channel, None)
            if chan_gone is not None:
                chan_gone.ready.set()  # never leave a reader waiting
                self._unsubscribe([chan_gone.pchan])

    def _by_shard(self, pchans: list[bytes]) -> dict[int, list[bytes]]:
        out: dict[int, list[bytes]] = {}
        cut = len(self.prefix) + 2
        for p in pchans:
            out.setdefault(self._shard_of(p[cut:-3].decode()), []).append(p)
        return out

    def _subscribe(self, pchans: list[bytes]) -> None:
        for k, mine in self._by_shard(pchans).items():
            shard = self._shards[k]
            if shard.pubsub is not None and shard.connected.is_set():
                assert self._loop is not None
                self._loop.create_task(self._command(shard.pubsub.subscribe, mine))

    def _unsubscribe(self, pchans: list[bytes]) -> None:
        for k, mine in self._by_shard(pchans).items():
            shard = self._shards[k]
            if shard.pubsub is not None and shard.connected.is_set():
                assert self._loop is not None
                self._loop.create_task(self._command(shard.pubsub.unsubscribe, mine))

    async def _command(self, fn: Any, pchans: list[bytes]) -> None:
        try:
            await fn(*pchans)
        except (RedisError, OSError) as exc:
            log.info("pubsub command failed (the listener reconnects): %s", exc)

    # ------------------------------------------------------------------------------ live stream

    def _shard_name(self, shard: _Shard) -> str:
        """The Pub/Sub connection's CLIENT SETNAME (what ``CLIENT LIST TYPE pubsub`` shows)."""
        return f"{self.prefix}:pubsub:{shard.index}"

    async def _listener(self) -> None:
        """Every Pub/Sub connection's listener (a broker for another topology overrides this)."""
        await asyncio.gather(*(self._shard_listener(shard) for shard in self._shards))

    async def _shard_listener(self, shard: _Shard) -> None:
        """Hold one Pub/Sub connection: (re)connect with backoff, resubscribe the channels of this shard
        (only those: a dropped connection repairs its own channels), and hand each message to
        :meth:`_on_message`. With Sentinel, every connect asks the sentinels for the master."""
        delay = 0.05
        prefix_len = len(self.prefix) + 2
        while True:
            pubsub = self._client.pubsub()
            back = self._back
            try:
                await pubsub.connect()
                conn = pubsub.connection
                await conn.send_command("CLIENT", "SETNAME", self._shard_name(shard))
                await conn.read_response()
                shard.pubsub = pubsub
                shard.connects += 1
                shard.connected.set()  # from here on, a new interest subscribes on its own
                mine = [c for c in self._chans.values() if c.shard == shard.index]
                for chan in mine:
                    chan.state = "new"  # whatever was missed is repaired once resubscribed
                # (the placeholder keeps the connection in Pub/Sub mode when there is nothing yet)
                await pubsub.subscribe(f"{self.prefix}:-", *[c.pchan for c in mine])
                delay = 0.05
                while True:
                    # (a bounded wait: redis-py's read without a timeout can swallow a cancellation,
                    # so the listener also looks at ``_closing`` at least every second)
                    msg = await pubsub.get_message(timeout=1.0)
                    if self._closing:
                        return
                    if msg is None:
                        continue
                    kind = msg["type"]
                    name: bytes = msg["channel"]
                    channel = name[prefix_len:-3].decode()
                    found = self._chans.get(channel)
                    if found is None or found.pchan != name:
                        continue
                    chan = found
                    if kind == "message":
                        self._on_message(channel, chan, msg["data"])
                    elif kind == "subscribe":
                        self._on_subscribed(channel, chan)
                    elif kind == "unsubscribe":
                        chan.state = "new"  # interest came back before the old unsubscribe: resync
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                shard.connected.clear()
                shard.pubsub = None
                if not self._closing:  # (a warning when it drops, the retries after it at info)
                    level = logging.WARNING if delay == 0.05 else logging.INFO
                    what = "redis pubsub connection %d: %s; reconnecting in %.2fs"
                    log.log(level, what, shard.index, exc, delay)
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                await self._backoff(delay, back)
                delay = min(delay * 2, 2.0)

    def _on_subscribed(self, channel: str, chan: _Chan) -> None:
        """The Pub/Sub subscription is active: from now on nothing is missed silently. A new channel
        takes the stream's top as its start; one that had delivered before repairs from there."""
        if chan.state == "repair":
            return
        chan.state = "repair"
        assert self._loop is not None
        self._loop.create_task(self._repair(channel, chan))

    def _on_message(self, channel: str, chan: _Chan, data: bytes) -> None:
        if data[:1] == b"e":
            kind, client, user = data[1:].split(b"\0", 2)
            assert self._handler is not None
            if chan.state == "live":
                self._handler.deliver_event(Event(kind.decode(), channel, client.decode(), user.decode()))
            return
        head, epoch_b, pid_b, ms_b, info, raw = data[1:].split(b"\0", 5)
        pub = Publication(
            channel,
            int(head),
            epoch_b.decode(),
            pid_b.decode(),
            int(ms_b),
            raw=raw,
            raw_info=info or None,
        )
        if chan.state != "live":
            chan.backlog.append((pub.offset, pub.epoch, pub))
            if len(chan.backlog) > MAX_BACKLOG:
                self._lose(channel, chan, "too many live messages while repairing")
            return
        self._take(channel, chan, pub)

    def _take(self, channel: str, chan: _Chan, pub: Publication) -> None:
        """One live publication, in a live channel: deliver it, drop a duplicate, or repair a gap."""
        if pub.epoch != chan.epoch:
            if chan.top == 0:  # nothing delivered yet: any epoch starts from its offset 1
                chan.epoch = pub.epoch
            else:
                self._lose(channel, chan, f"epoch changed from {chan.epoch} to {pub.epoch}")
                return
        if pub.offset == chan.top + 1:
            self._deliver(chan, pub)
        elif pub.offset <= chan.top:
            for off, pid in chan.recent:
                if off == pub.offset and pid != pub.id:
                    why = f"offset {pub.offset} was published twice (Redis lost data)"
                    self._lose(channel, chan, why, reused=True)
                    return
        else:  # a gap: read the missing range, then this and what follows
            chan.state = "repair"
            chan.backlog.append((pub.offset, pub.epoch, pub))
            assert self._loop is not None
            self._loop.create_task(self._repair(channel, chan))

    def _deliver(self, chan: _Chan, pub: Publication) -> None:
        chan.top = pub.offset
        chan.recent.append((pub.offset, pub.id))
        assert self._handler is not None
        try:
            self._handler.deliver(pub)
        except Exception:
            log.exception("delivering %s offset %d failed", pub.channel, pub.offset)

    async def _repair(self, channel: str, chan: _Chan) -> None:
        """Bring ``chan`` up to the stream's top from history, then go live with what arrived meanwhile.
        A new channel starts at the top; retries while Redis is unreachable."""
        delay = 0.05
        while self._chans.get(channel) is chan:
            back = self._back
            try:
                async with asyncio.timeout(self.timeout):
                    if chan.epoch is None:
                        res = await self._read(channel, HistoryOptions(size=0), None, 0)
                        chan.epoch, chan.top = res.position.epoch, res.position.offset
                    else:
                        # The first read includes the last offset delivered here, to check it still holds
                        # the same publication: after a failover without WAIT the new master may have
                        # lost it and given its offset to another one.
                        known = next((pid for off, pid in reversed(chan.recent) if off == chan.top), None)
                        while True:
                            since = chan.top - 1 if known is not None else chan.top
                            res = await self._read(channel, HistoryOptions(), since, REPAIR_CHUNK)
                            if self._chans.get(channel) is not chan:
                                return
                            if res.position.epoch != chan.epoch and not (
                                chan.top == 0 and res.position.offset == 0
                            ):
                                self._lose(channel, chan, "the channel's stream was lost (new epoch)")
                                return
                            if res.position.offset < chan.top:
                                why = (
                                    f"the channel's stream went back from {chan.top} to "
                                    f"{res.position.offset} in epoch {chan.epoch} (Redis lost data)"
                                )
                                self._lose(channel, chan, why, reused=True)
                                return
                            chan.epoch = res.position.epoch
                            if res.position.offset > chan.top and res.first_offset > chan.top + 1:
                                self._lose(channel, chan, "history no longer holds the missing range")
                                return
                            for pub in res.publications:
                                if pub.offset == chan.top and known is not None and pub.id != known:
                                    why = f"offset {pub.offset} holds another publication (Redis lost data)"
                                    self._lose(channel, chan, why, reused=True)
                                    return
                                if pub.offset == chan.top + 1:
                                    self._deliver(chan, pub)
                            known = None
                            if chan.top >= res.position.offset or not res.publications:
                                break
                break
            except (RedisError, OSError, TimeoutError) as exc:
                log.info("repair of %s waits for Redis: %s", channel, exc)
                await self._backoff(delay, back)
                delay = min(delay * 2, 2.0)
        if self._chans.get(channel) is not chan:
            return
        backlog, chan.backlog = chan.backlog, []
        chan.state = "live"
        chan.ready.set()
        for i, (_, _, pub) in enumerate(backlog):
            self._take(channel, chan, pub)
            if chan.state != "live":  # a new gap, or lost: the rest waits for that
                if self._chans.get(channel) is chan:
                    chan.backlog = [*[b for b in backlog[i + 1 :]], *chan.backlog]
                return

    def _lose(self, channel: str, chan: _Chan, why: str, *, reused: bool = False) -> None:
        """Tell every local subscriber of ``channel`` that this node cannot keep it gapless. ``reused``:
        Redis lost publications of the channel's epoch and gives (or will give) their offsets to others,
        so the epoch is retired first (:meth:`_retire`)."""
        log.warning("channel %s: %s; its subscribers are told to resubscribe", channel, why)
        epoch = chan.epoch
        if self._chans.get(channel) is chan:
            # Start over: the subscribers that come back set the channel up afresh.
            chan.epoch, chan.top, chan.state, chan.backlog = None, 0, "new", []
            chan.recent.clear()
            chan.ready.set()
        assert self._loop is not None and self._handler is not None
        if reused and epoch is not None:
            self._loop.create_task(self._retire(channel, epoch))
        else:
            self._loop.call_soon(self._handler.lost, channel)

    async def _retire(self, channel: str, epoch: str) -> None:
        """Move ``channel`` from ``epoch`` to a new one (compare-and-set: several nodes finding the same
        loss retire it once), then tell the local subscribers. Redis went back under publications this
        node delivered (a failover without WAIT, an older AOF): offsets of that epoch now name other
        publications, so a client positioned in it, here or on any node, must get ``recovered: false``
        rather than a replay that skips what was published under the offsets it already saw."""
        delay = 0.05
        for _ in range(8):
            try:
                async with asyncio.timeout(self.timeout):
                    await self._client.eval(_RETIRE, 1, self._key(channel, "m"), epoch, secrets.token_hex(4))
                break
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("channel %s: cannot retire epoch %s yet: %s", channel, epoch, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        assert self._handler is not None
        self._handler.lost(channel)

    async def _checker(self) -> None:
        """Every ``check_interval``: one pipelined read of every local channel's top; a channel behind
        (a lost Pub/Sub message with nothing after it) is repaired, one in a new epoch is lost."""
        while True:
            await asyncio.sleep(self.check_interval)
            try:
                async with asyncio.timeout(self.timeout):
                    await self._refresh_epoch0()
                    await self._refresh_durable()
                    # Each channel's position as it is now, before the read: Redis's top can only be at
                    # or past it. (Compared with chan.top after the read, a live delivery that came in
                    # meanwhile would look like a stream that went back.)
                    live = [(ch, c, c.epoch, c.top) for ch, c in self._chans.items() if c.state == "live"]
                    if not live:
                        continue
                    pipe = self._client.pipeline(transaction=False)
                    for ch, *_ in live:
                        pipe.hmget(self._key(ch, "m"), "e", "t")
                    tops = await pipe.execute()
            except (RedisError, OSError, TimeoutError) as exc:
                log.info("position check skipped: %s", exc)
                continue
            for (ch, chan, was_epoch, was_top), (epoch, top) in zip(live, tops, strict=True):
                if self._chans.get(ch) is not chan or chan.state != "live" or chan.epoch != was_epoch:
                    continue
                if epoch is None:
                    if was_top > 0:
                        self._lose(ch, chan, "the channel's stream is gone")
                elif epoch.decode() != was_epoch:
                    if was_top > 0:
                        self._lose(ch, chan, "the channel's stream was lost (new epoch)")
                    else:
                        chan.epoch = epoch.decode()
                elif int(top) < was_top:
                    why = f"the stream went back from {was_top} to {int(top)} in epoch {chan.epoch}"
                    self._lose(ch, chan, why + " (Redis lost data)", reused=True)
                elif int(top) > chan.top:
                    chan.state = "repair"
                    assert self._loop is not None
                    self._loop.create_task(self._repair(ch, chan))


def _publish_reply(r: PublishRequest, pid: str, rep: list[Any]) -> Publication | Repeat:
    """What ``_PUBLISH`` answered for request ``r`` (publication id ``pid``): ``{0, offset, epoch, ms}``,
    or ``{1, "<offset> <epoch> <id>"}`` (NUL-separated) for an idempotency key seen before."""
    if rep[0] == 1:
        offset, epoch, first_id = rep[1].split(b"\0")
        return Repeat(r.channel, int(offset), epoch.decode(), first_id.decode())
    return Publication(
        r.channel, int(rep[1]), rep[2].decode(), pid, int(rep[3]), raw=r.raw, raw_info=r.raw_info
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _answer(done: PublishDone, result: PublishResult | BrokerError) -> None:
    try:
        done(result)
    except Exception:
        log.exception("a publish callback failed")


def _entry(channel: str, epoch: str, e: list[Any]) -> Publication:
    eid, fields = e
    f = dict(zip(fields[::2], fields[1::2], strict=True))
    return Publication(
        channel,
        int(eid.split(b"-", 1)[0]),
        epoch,
        f[b"id"].decode(),
        int(f[b"t"]),
        raw=f[b"d"],
        raw_info=f[b"i"] or None,
    )
