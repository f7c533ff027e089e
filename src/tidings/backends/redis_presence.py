"""Presence and the channel list over every node sharing one Redis (``RedisPresence``).

Per channel ``C`` (hash tag ``{C}``: both keys in the channel's slot, so this works on Redis Cluster):

- ``{prefix}:{C}:pr`` — hash: client -> ``<joined µs>\\0<node>\\0<seq>\\0<user>`` (joined = Redis time of
  its first write, kept by later refreshes, so answers list clients in join order over every node);
- ``{prefix}:{C}:pe`` — sorted set: client -> expiry (Redis time, ms).

Per node (one key each, so one slot each):

- ``{prefix}:nodes`` — sorted set: node id -> expiry (ms);
- ``{prefix}:node:<id>`` — hash: channel -> this node's local subscriber count, rewritten whole.

Every write is a Lua script on one key's slot and uses Redis's clock (``TIME``), so nodes' clocks never
matter. A node's members are written when they join or leave and all of them again every
``presence_ttl / 3`` (one pipelined round trip for the lot, one script call per channel); their expiry is
``presence_ttl`` after the last write. A node that dies stops refreshing: its members drop out of every
answer within ``presence_ttl``, its node entry too. Redis restarted empty gets everything back at the next
refresh. Reads drop expired members (a bounded number per read) and answer at most ``limit`` clients;
the count is all of them.

One writer task sends every write of this node in order, one pipeline in flight, so a leave can never be
overtaken by an older refresh of the same member.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections.abc import Callable
from typing import Any

from .base import MAX_LISTED_CHANNELS, BrokerError, LocalChannels, PresenceList

try:
    from redis.asyncio.cluster import RedisCluster as ClusterClient
    from redis.crc import key_slot
    from redis.exceptions import NoScriptError, RedisClusterException, RedisError
except ImportError:  # pragma: no cover - the extra is not installed
    NoScriptError = RedisError = RedisClusterException = Exception  # type: ignore[assignment,misc]
    ClusterClient = None  # type: ignore[assignment,misc]

# What "Redis did not do it" looks like (RedisClusterException is not a RedisError).
FAILURES = (RedisError, RedisClusterException, OSError, TimeoutError)

__all__ = ["MAX_NODES", "MAX_NODE_CHANNELS", "RedisPresence"]

log = logging.getLogger("tidings.redis")

MAX_NODES = 1000  # live nodes read for /api/channels
MAX_NODE_CHANNELS = 10_000  # channels one node writes to its hash (its most subscribed ones)
PURGE = 256  # expired members one read removes at most
CHUNK = 500  # members per script call (and per HSET/HMGET inside it)

# KEYS: (pr, pe) of one or more channels (all in one slot on Redis Cluster). ARGV: ttl ms, then per
# channel the number of its (client, value) pairs and the pairs; value '' removes the client.
_WRITE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local us = t[1] .. string.format('%06d', tonumber(t[2]))
local ttl = tonumber(ARGV[1])
local a = 2
for k = 1, #KEYS, 2 do
  local pr, pe = KEYS[k], KEYS[k + 1]
  local added = false
  local n = tonumber(ARGV[a])
  a = a + 1
  for _ = 1, n do
    local c, v = ARGV[a], ARGV[a + 1]
    a = a + 2
    if v == '' then
      redis.call('ZREM', pe, c)
      redis.call('HDEL', pr, c)
    else
      local old = redis.call('HGET', pr, c)
      local j = old and string.match(old, '^(%d+)') or us
      redis.call('HSET', pr, c, j .. '\\0' .. v)
      redis.call('ZADD', pe, now + ttl, c)
      added = true
    end
  end
  if added then
    for _, key in ipairs({pr, pe}) do
      if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
    end
  end
end
return 1
"""

# KEYS: pr, pe. ARGV: limit, purge. Returns {count, clients, values}.
_READ = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
if #old > 0 then
  redis.call('ZREM', KEYS[2], unpack(old))
  redis.call('HDEL', KEYS[1], unpack(old))
end
local n = redis.call('ZCOUNT', KEYS[2], '(' .. now, '+inf')
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. now, '+inf', 'LIMIT', 0, tonumber(ARGV[1]))
local vals = {}
for i = 1, #ids, 500 do
  local got = redis.call('HMGET', KEYS[1], unpack(ids, i, math.min(i + 499, #ids)))
  for _, v in ipairs(got) do vals[#vals + 1] = v end
end
return {n, ids, vals}
"""

# KEYS: the node's hash. ARGV: ttl ms, then (channel, count) pairs: the node's whole channel list.
_NODE = """
redis.call('DEL', KEYS[1])
for i = 2, #ARGV, 1000 do
  redis.call('HSET', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
if #ARGV > 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return 1
"""

# KEYS: nodes. ARGV: node id ('' = only read), ttl ms, max. Returns the live node ids.
_NODES = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if ARGV[1] ~= '' then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
  if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
end
return redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf', 'LIMIT', 0, tonumber(ARGV[3]))
"""

_SCRIPTS = {"write": _WRITE, "read": _READ, "node": _NODE, "nodes": _NODES}


class RedisPresence:
    """The :class:`~tidings.backends.base.PresenceStore` of every node sharing one Redis.

    ``client`` gives the Redis client to use (the broker's: a ``redis.asyncio.Redis`` or a
    ``RedisCluster``); every command touches one key's slot. ``ttl``: seconds a node's members outlive
    its last refresh (refreshed every ``ttl / 3``). ``limit``: clients listed in one answer."""

    def __init__(
        self,
        client: Callable[[], Any],
        *,
        prefix: str = "tidings",
        ttl: float = 30.0,
        timeout: float = 5.0,
        limit: int = 1000,
        node_id: str | None = None,
    ) -> None:
        if ttl <= 0:
            raise ValueError("presence_ttl must be above 0")
        self._client = client
        self.prefix = prefix
        self.ttl = ttl
        self.timeout = timeout
        self.limit = max(1, limit)
        self.node_id = node_id or f"{os.getpid()}-{secrets.token_hex(6)}"
        self.refresh_interval = ttl / 3
        self._tick = min(1.0, self.refresh_interval)  # how soon a changed channel list reaches Redis
        self._members: dict[str, dict[str, str]] = {}  # channel -> client -> value (node, seq, user)
        self._dirty: dict[str, set[str]] = {}  # channel -> clients to write (or remove)
        self._seq = 0
        self._shas: dict[str, str] = {}
        self._local: LocalChannels = _nothing
        self._written: dict[str, int] | None = None  # the channel list Redis holds for this node
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    # ------------------------------------------------------------------------------ keys

    def _key(self, channel: str, kind: str) -> str:
        return f"{self.prefix}:{{{channel}}}:{kind}"

    @property
    def _nodes_key(self) -> str:
        return f"{self.prefix}:nodes"

    def _node_key(self, node: str) -> str:
        return f"{self.prefix}:node:{node}"

    # ------------------------------------------------------------------------------ lifecycle

    async def start(self, local_channels: LocalChannels) -> None:
        self._local = local_channels
        try:
            async with asyncio.timeout(self.timeout):
                await self._load_scripts()
        except FAILURES as exc:
            raise BrokerError(f"presence: cannot reach Redis: {exc or type(exc).__name__}") from exc
        self._task = asyncio.get_running_loop().create_task(self._writer())

    async def close(self, *, forget: bool = True) -> None:
        """Stop refreshing. ``forget``: also take this node's members and channels out of Redis now
        (a clean shutdown; bounded by the timeout). Without it they expire after ``ttl``, as after a crash."""
        self._closed = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            # bounded: the writer also stops on its own at its next wake-up (``_closed``)
            await asyncio.wait({self._task}, timeout=self.timeout)
            self._task = None
        if not forget:
            return
        for channel, members in self._members.items():
            self._dirty.setdefault(channel, set()).update(members)
        self._members.clear()
        try:
            async with asyncio.timeout(min(self.timeout, 2.0)):
                await self._flush(full=False)
                client = self._client()
                await client.delete(self._node_key(self.node_id))
                await client.zrem(self._nodes_key, self.node_id)
        except FAILURES as exc:
            log.info("presence not cleared at shutdown (it expires in %.0fs): %s", self.ttl, exc)

    async def _load_scripts(self) -> None:
        client = self._client()
        for name, text in _SCRIPTS.items():
            sha = await client.script_load(text)
            self._shas[name] = sha.decode() if isinstance(sha, bytes) else sha

    # ------------------------------------------------------------------------------ writes

    def add(self, channel: str, client: str, user: str) -> None:
        self._seq += 1
        self._members.setdefault(channel, {})[client] = f"{self.node_id}\0{self._seq}\0{user}"
        self._mark(channel, client)

    def remove(self, channel: str, client: str) -> None:
        members = self._members.get(channel)
        if members is None or members.pop(client, None) is None:
            return
        if not members:
            del self._members[channel]
        self._mark(channel, client)

    def _mark(self, channel: str, client: str) -> None:
        self._dirty.setdefault(channel, set()).add(client)
        self._wake.set()

    async def _writer(self) -> None:
        """Write what changed as soon as it changed, the channel list when it changed (checked every
        ``_tick``), and everything every ``refresh_interval``. Redis unreachable: retried every tick."""
        loop = asyncio.get_running_loop()
        next_full = loop.time()
        while not self._closed:
            # A timer sets the event rather than a timeout around the wait: on Python 3.11 a cancel
            # that lands as an asyncio.timeout expires can be swallowed, and close() would wait forever.
            timer = loop.call_later(max(0.0, min(self._tick, next_full - loop.time())), self._wake.set)
            try:
                await self._wake.wait()
            finally:
                timer.cancel()
            if self._closed:
                return
            self._wake.clear()
            full = loop.time() >= next_full
            try:
                async with asyncio.timeout(self.timeout):
                    await self._flush(full=full)
            except Exception as exc:  # the writer never stops: whatever failed is retried next tick
                level = logging.INFO if isinstance(exc, FAILURES) else logging.WARNING
                log.log(level, "presence write failed (retried): %s", exc or type(exc).__name__)
                # Whatever Redis holds is unknown (it may come back empty): write everything again.
                self._written = None
                next_full = loop.time()
                await asyncio.sleep(self._tick)
                continue
            if full:
                next_full = loop.time() + self.refresh_interval

    async def _flush(self, *, full: bool) -> None:
        """(``execute_command("EVALSHA")``: redis-py's cluster pipeline refuses its ``evalsha`` method,
        but routes the command by its first key like any other.)

        One pipelined round trip: the changed (or, ``full``, all) members and, when it changed or
        ``full``, this node's channel list and liveness. What was taken is put back if it fails."""
        dirty, self._dirty = self._dirty, {}
        if full:
            for channel, members in self._members.items():
                dirty.setdefault(channel, set()).update(members)
        local = None if self._closed else dict(self._local())
        node = local is not None and (full or local != self._written)
        if not dirty and not node:
            return
        ttl_ms = max(1, int(self.ttl * 1000))
        try:
            for attempt in (0, 1):
                client = self._client()
                pipe = client.pipeline(transaction=False)
                for keys, args in self._write_calls(dirty, _is_cluster(client)):
                    pipe.execute_command("EVALSHA", self._shas["write"], len(keys), *keys, ttl_ms, *args)
                if node and local is not None:
                    top = sorted(local.items(), key=lambda kv: -kv[1])[:MAX_NODE_CHANNELS]
                    flat = [x for ch, n in top for x in (ch, n)]
                    node_key = self._node_key(self.node_id)
                    pipe.execute_command("EVALSHA", self._shas["node"], 1, node_key, ttl_ms, *flat)
                    pipe.execute_command(
                        "EVALSHA", self._shas["nodes"], 1, self._nodes_key, self.node_id, ttl_ms, 0
                    )
                try:
                    await pipe.execute()
                    break
                except NoScriptError:
                    if attempt:
                        raise
                    await self._load_scripts()  # Redis restarted or flushed its scripts
        except BaseException:
            for channel, clients in dirty.items():
                self._dirty.setdefault(channel, set()).update(clients)
            raise
        if node:
            self._written = local

    def _write_calls(
        self, dirty: dict[str, set[str]], cluster: bool
    ) -> list[tuple[list[str], list[str | int]]]:
        """The ``_WRITE`` calls for ``dirty``: up to ``CHUNK`` members each, several channels per call
        (on Redis Cluster only channels of one slot together), so a refresh of many small channels is a
        few commands, not one per channel."""
        calls: list[tuple[list[str], list[str | int]]] = []
        open_calls: dict[int, tuple[list[str], list[str | int]]] = {}  # slot -> call being filled
        for channel in sorted(dirty):
            members = self._members.get(channel, {})
            pairs = [(c, members.get(c, "")) for c in sorted(dirty[channel])]
            keys = [self._key(channel, "pr"), self._key(channel, "pe")]
            slot = key_slot(keys[0].encode()) if cluster else 0
            for i in range(0, len(pairs), CHUNK):
                part = pairs[i : i + CHUNK]
                call = open_calls.get(slot)
                if call is None or (len(call[1]) - len(call[0]) // 2) // 2 + len(part) > CHUNK:
                    call = open_calls[slot] = ([], [])
                    calls.append(call)
                call[0].extend(keys)
                call[1].append(len(part))
                call[1].extend(x for pair in part for x in pair)
        return calls

    # ------------------------------------------------------------------------------ reads

    async def _eval(self, name: str, keys: list[str], *args: Any) -> Any:
        client = self._client()
        try:
            return await client.evalsha(self._shas[name], len(keys), *keys, *args)
        except NoScriptError:
            await self._load_scripts()  # Redis restarted or flushed its scripts
            return await client.evalsha(self._shas[name], len(keys), *keys, *args)

    async def read(self, channel: str) -> PresenceList:
        keys = [self._key(channel, "pr"), self._key(channel, "pe")]
        try:
            async with asyncio.timeout(self.timeout):
                count, ids, values = await self._eval("read", keys, self.limit, PURGE)
        except FAILURES as exc:
            raise BrokerError(f"redis unavailable: {exc or type(exc).__name__}") from exc
        listed: list[tuple[int, str, int, str, str]] = []
        for cid, value in zip(ids, values, strict=True):
            if value is None:
                continue
            joined, node, seq, user = value.split(b"\0", 3)
            listed.append((int(joined), node.decode(), int(seq), cid.decode(), user.decode()))
        listed.sort()
        return PresenceList([{"client": c, "user": u} for _, _, _, c, u in listed], int(count))

    async def clients(self, channel: str) -> list[dict[str, str]]:
        return (await self.read(channel)).clients

    async def channels(self) -> dict[str, int]:
        """This node's channels (its own hub, fresh) plus every other live node's last written list:
        one read of the live nodes, then one pipelined read of their hashes (one key each)."""
        total = dict(self._local())
        try:
            async with asyncio.timeout(self.timeout):
                nodes = await self._eval("nodes", [self._nodes_key], "", 0, MAX_NODES)
                others = [n.decode() for n in nodes if n.decode() != self.node_id]
                hashes: list[dict[bytes, bytes]] = []
                if others:
                    pipe = self._client().pipeline(transaction=False)
                    for n in others:
                        pipe.hgetall(self._node_key(n))
                    hashes = await pipe.execute()
        except FAILURES as exc:
            raise BrokerError(f"redis unavailable: {exc or type(exc).__name__}") from exc
        for h in hashes:
            for ch, n in h.items():
                name = ch.decode()
                total[name] = total.get(name, 0) + int(n)
        return dict(sorted(total.items())[:MAX_LISTED_CHANNELS])


def _is_cluster(client: Any) -> bool:
    return ClusterClient is not None and isinstance(client, ClusterClient)


def _nothing() -> dict[str, int]:
    return {}
