"""Web Push registrations and the cross-node "user online" signal in Redis (single node, Sentinel and
Cluster alike: every command touches one key, so one slot).

Keys (``h`` = the first 32 hex digits of the SHA-256 of a device's endpoint):

- ``{prefix}:push:d:<h>`` — string: the device (JSON: endpoint, keys, owner, user, channels);
- ``{prefix}:push:c:<channel>`` — hash: ``h`` -> the device JSON, for every device of that channel (one
  HGETALL per publication finds them all);
- ``{prefix}:push:o:<owner>`` — set of ``h``: an owner's devices (the per-user cap);
- ``{prefix}:push:all`` — set of ``h``: every device (the server-wide cap);
- ``{prefix}:push:u:<user>`` — sorted set: node id -> expiry (Redis time, ms): the nodes where ``user``
  has a live connection.

A registration writes these keys one after the other (no cross-slot transaction on Cluster): the device
key last but one, so a registration cut half way leaves at worst channel entries that point to a device
that later sends answer 404/410 for, which deletes it. A cap is checked by adding first and taking back
when over (SADD, SCARD, SREM): two concurrent registrations near the cap can both be refused, never both
admitted past it.

"User online": a node adds itself to ``push:u:<user>`` when it gets its first live connection of the
user, removes itself when it loses the last one, and refreshes all its users every ``ttl / 3``; an entry
expires ``ttl`` after its last refresh (Redis's clock). So a user going on- or offline on a running node is
seen by every node at once (one round trip later), and the users of a node that died are seen offline
at most ``ttl`` (``presence_ttl``) after its last refresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
from collections.abc import Callable, Iterable
from typing import Any

import orjson

from .base import BrokerError, PushDevice, PushLimitError
from .redis_presence import FAILURES

__all__ = ["RedisPushStore"]

log = logging.getLogger("tidings.redis")

# KEYS: push:u:<user>. ARGV: node id, ttl ms ('' removes the node). Redis's clock, one key.
_ONLINE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[2] == '' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS: push:u:<user>. ARGV: the asking node's id. 1 when another node has a live entry.
_ONLINE_ELSEWHERE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, n in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')) do
  if n ~= ARGV[1] then return 1 end
end
return 0
"""


def _h(endpoint: str) -> str:
    return hashlib.sha256(endpoint.encode()).hexdigest()[:32]


class RedisPushStore:
    """The :class:`~tidings.backends.base.PushStore` of the Redis brokers. ``client`` gives the broker's
    Redis client (``redis.asyncio.Redis`` or ``RedisCluster``)."""

    def __init__(
        self,
        client: Callable[[], Any],
        *,
        prefix: str = "tidings",
        ttl: float = 30.0,
        timeout: float = 5.0,
        node_id: str | None = None,
    ) -> None:
        self._client = client
        self.prefix = prefix
        self.ttl = ttl
        self.timeout = timeout
        self.node_id = node_id or f"{os.getpid()}-{secrets.token_hex(6)}"
        self._online: set[str] = set()  # users with a live connection here
        self._changes: asyncio.Queue[tuple[str, bool]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def _key(self, kind: str, name: str = "") -> str:
        return f"{self.prefix}:push:{kind}:{name}" if name else f"{self.prefix}:push:{kind}"

    async def _do(self, what: str, coro: Any) -> Any:
        try:
            async with asyncio.timeout(self.timeout):
                return await coro
        except FAILURES as exc:
            raise BrokerError(f"push subscriptions: {what}: {exc or type(exc).__name__}") from exc

    # ------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._writer())

    async def close(self, *, forget: bool = True) -> None:
        """Stop refreshing; ``forget``: also mark this node's users offline here now (a clean stop).
        Without it they expire after ``ttl``, as after a crash."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if forget and self._online:  # a clean stop: this node's users are offline here now, not after the TTL
            with contextlib.suppress(BrokerError):
                await self._do(
                    "online", asyncio.gather(*(self._write_online(u, False) for u in self._online))
                )

    # ------------------------------------------------------------------------------ devices

    async def add(self, device: PushDevice, *, max_per_owner: int, max_total: int) -> None:
        r = self._client()
        h = _h(device.endpoint)
        raw = orjson.dumps(device.to_json())
        old_raw = await self._do("read", r.get(self._key("d", h)))
        old = PushDevice.from_json(orjson.loads(old_raw)) if old_raw else None
        owner_key = self._key("o", device.owner)
        all_key = self._key("all")
        added_owner = bool(await self._do("add", r.sadd(owner_key, h)))
        if added_owner and int(await self._do("count", r.scard(owner_key))) > max_per_owner:
            await self._do("undo", r.srem(owner_key, h))
            raise PushLimitError("owner", max_per_owner)
        added_all = bool(await self._do("add", r.sadd(all_key, h)))
        if added_all and int(await self._do("count", r.scard(all_key))) > max_total:
            await self._do("undo", r.srem(all_key, h))
            if added_owner:
                await self._do("undo", r.srem(owner_key, h))
            raise PushLimitError("server", max_total)
        if old is not None:
            gone = [ch for ch in old.channels if ch not in device.channels]
            await self._do("write", asyncio.gather(*(r.hdel(self._key("c", ch), h) for ch in gone)))
            if old.owner != device.owner:
                await self._do("write", r.srem(self._key("o", old.owner), h))
        await self._do("write", r.set(self._key("d", h), raw))
        await self._do(
            "write", asyncio.gather(*(r.hset(self._key("c", ch), h, raw) for ch in device.channels))
        )

    async def remove(self, endpoint: str) -> PushDevice | None:
        r = self._client()
        h = _h(endpoint)
        old_raw = await self._do("read", r.get(self._key("d", h)))
        if not old_raw:
            return None
        old = PushDevice.from_json(orjson.loads(old_raw))
        await self._do(
            "delete",
            asyncio.gather(
                *(r.hdel(self._key("c", ch), h) for ch in old.channels),
                r.srem(self._key("o", old.owner), h),
                r.srem(self._key("all"), h),
            ),
        )
        await self._do("delete", r.delete(self._key("d", h)))
        return old

    async def get(self, endpoint: str) -> PushDevice | None:
        raw = await self._do("read", self._client().get(self._key("d", _h(endpoint))))
        dev = PushDevice.from_json(orjson.loads(raw)) if raw else None
        return dev if dev is not None and dev.endpoint == endpoint else None

    async def devices(self, channel: str) -> list[PushDevice]:
        found = await self._do("read", self._client().hgetall(self._key("c", channel)))
        return [PushDevice.from_json(orjson.loads(v)) for v in found.values()]

    # ------------------------------------------------------------------------------ online

    def set_online(self, user: str, online: bool) -> None:
        if online:
            self._online.add(user)
        else:
            self._online.discard(user)
        self._changes.put_nowait((user, online))

    async def online_elsewhere(self, users: Iterable[str]) -> set[str]:
        users = list(users)
        if not users:
            return set()
        r = self._client()
        found = await self._do(
            "online",
            asyncio.gather(*(r.eval(_ONLINE_ELSEWHERE, 1, self._key("u", u), self.node_id) for u in users)),
        )
        return {u for u, hit in zip(users, found, strict=True) if int(hit)}

    def _write_online(self, user: str, online: bool) -> Any:
        ttl = "" if not online else str(int(self.ttl * 1000))
        return self._client().eval(_ONLINE, 1, self._key("u", user), self.node_id, ttl)

    async def _writer(self) -> None:
        """Sends this node's online changes in order (a leave is never overtaken by an older join), and
        refreshes every online user every ``ttl / 3``."""
        loop = asyncio.get_running_loop()
        interval = self.ttl / 3
        next_refresh = loop.time() + interval
        while True:
            try:
                async with asyncio.timeout(max(0.0, next_refresh - loop.time())):
                    user, online = await self._changes.get()
                # The newest state of each user among the changes waiting now, in one go.
                latest = {user: online}
                while not self._changes.empty():
                    u, on = self._changes.get_nowait()
                    latest[u] = on
                writes = [self._write_online(u, on) for u, on in latest.items()]
            except TimeoutError:
                next_refresh = loop.time() + interval
                writes = [self._write_online(u, True) for u in list(self._online)]
            try:
                await self._do("online", asyncio.gather(*writes))
            except BrokerError as exc:
                log.warning("push: cannot write the online state: %s", exc)
