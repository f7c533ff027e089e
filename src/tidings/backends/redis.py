"""redis:// and rediss:// — history and live fan-out shared by every node through one Redis.

Per channel ``C`` (every key carries the hash tag ``{C}``, so a channel's keys share one slot):

- ``{prefix}:{C}:m`` — hash: ``e`` the epoch, ``t`` the top offset;
- ``{prefix}:{C}:s`` — stream of the retained publications, entry id ``<offset>-1``, fields ``d`` (data),
  ``i`` (info), ``id``, ``t`` (Redis time in ms);
- ``{prefix}:{C}:k:<key>`` — an idempotency key (expires after the window);
- ``{prefix}:{C}:p`` — the Pub/Sub channel of its live publications and join/leave events.

A publish is one Lua script (``_PUBLISH``): idempotency check, offset increment, XADD with MAXLEN, TTLs
and PUBLISH of the encoded publication, so offsets are gapless across every node and a publish is
acknowledged only after Redis ran all of it. Queued groups go to Redis pipelined, one round trip for
everything waiting, one pipeline in flight (so acknowledgements keep request order).

Live delivery: one Pub/Sub subscription per channel per node, held only while the node has local
subscribers. Pub/Sub is at-most-once, so the node tracks the last offset it delivered per channel and
repairs from the stream: a message whose offset is not the next one, a Pub/Sub connection that came back,
or a periodic position check (one pipelined round trip for every local channel) makes it read the missing
range and deliver it in order before anything newer. When the stream cannot supply it (trimmed, expired,
or the channel's epoch changed), every local subscriber is told (``BrokerHandler.lost``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
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

try:
    import redis.asyncio as aioredis
    from redis.exceptions import NoScriptError, RedisError
except ImportError:  # pragma: no cover - the extra is not installed
    aioredis = None  # type: ignore[assignment]

__all__ = ["RedisBroker", "RedisTarget"]

log = logging.getLogger("tidings.redis")

# KEYS: meta, stream, idempotency key (meta again when there is none), the shared epoch0
# ARGV: data, info ('' = none), id, size, ttl ms, meta ttl ms, a fresh epoch (epoch0 when it is gone),
#       key? ('1'/''), key window ms, pubsub channel, epoch0 ttl ms
# A new stream starts in epoch0, the epoch every node reads a never-published channel in; when Redis lost
# epoch0 (restarted empty), a fresh one is made here, so a recreated stream never reuses an old epoch.
_PUBLISH = """
if ARGV[8] == '1' then
  local hit = redis.call('GET', KEYS[3])
  if hit then return {1, hit} end
end
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  epoch = redis.call('GET', KEYS[4])
  if not epoch then
    epoch = ARGV[7]
    redis.call('SET', KEYS[4], epoch, 'PX', ARGV[11])
  end
  redis.call('HSET', KEYS[1], 'e', epoch)
end
local top = redis.call('HINCRBY', KEYS[1], 't', 1)
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local size = tonumber(ARGV[4])
local ttl = tonumber(ARGV[5])
if size > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', size, top .. '-1',
             'd', ARGV[1], 'i', ARGV[2], 'id', ARGV[3], 't', ms)
  redis.call('PEXPIRE', KEYS[2], ttl)
  -- the head entry alone first: reading 64 entries into Lua on every publish cost ~340 us of Redis CPU
  local head = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
  if head[1] and tonumber(head[1][2][8]) < ms - ttl then
    head = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 64)
    local keep = nil
    for _, e in ipairs(head) do
      if tonumber(e[2][8]) >= ms - ttl then keep = e[1]; break end
    end
    if keep then redis.call('XTRIM', KEYS[2], 'MINID', keep) end
  end
else
  redis.call('DEL', KEYS[2])
end
redis.call('PEXPIRE', KEYS[1], ARGV[6])
local z = '\\0'
redis.call('PUBLISH', ARGV[10],
           'p' .. top .. z .. epoch .. z .. ARGV[3] .. z .. ms .. z .. ARGV[2] .. z .. ARGV[1])
if ARGV[8] == '1' then
  redis.call('SET', KEYS[3], top .. '\\0' .. epoch .. '\\0' .. ARGV[3], 'PX', ARGV[9])
end
return {0, top, epoch, ms}
"""

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

# How long a channel's meta outlives its last publish beyond the history TTL, and how long the shared
# epoch of never-published channels lives (shorter, so a channel forgotten after being idle that long
# starts again in an epoch it never had).
EPOCH0_TTL_MS = 86_400_000
META_EXTRA_MS = 2 * EPOCH0_TTL_MS
MAX_BACKLOG = 10_000  # live messages held per channel while it is being repaired
REPAIR_CHUNK = 1000
RECENT_IDS = 64


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """Where Redis is: parsed from the broker URL (credentials never logged)."""

    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False


@dataclass(slots=True)
class _Chan:
    """This node's view of one channel it has local subscribers for."""

    pchan: bytes
    epoch: str | None = None  # None until the subscription is confirmed and the position read
    top: int = 0  # last offset delivered here
    state: str = "new"  # new -> live; "repair" while the missing range is read
    backlog: list[tuple[int, str, Publication]] = field(default_factory=list)
    recent: deque[tuple[int, str]] = field(default_factory=lambda: deque(maxlen=RECENT_IDS))
    ready: asyncio.Event = field(default_factory=asyncio.Event)


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
        # Blocking: a burst of calls waits for a free connection (within ``timeout``), never fails.
        pool = aioredis.BlockingConnectionPool(
            host=target.host,
            port=target.port,
            db=target.db,
            username=target.username,
            password=target.password,
            connection_class=aioredis.SSLConnection if target.tls else aioredis.Connection,
            socket_timeout=timeout,
            socket_connect_timeout=min(timeout, 2.0),
            max_connections=pool_size,
            timeout=timeout,
        )
        self._client = aioredis.Redis(connection_pool=pool)
        self._sha_publish = ""
        self._sha_read = ""
        self._epoch0 = secrets.token_hex(4)
        self._handler: BrokerHandler | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: list[tuple[list[PublishRequest], PublishDone]] = []
        self._wake = asyncio.Event()
        self._chans: dict[str, _Chan] = {}
        self._pubsub: Any = None
        self._connected = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    # ------------------------------------------------------------------------------ keys

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
        except (RedisError, OSError, TimeoutError) as exc:
            await self._client.aclose()
            raise BrokerError(f"cannot reach Redis at {self.target.host}:{self.target.port}: {exc}") from exc
        self._tasks = [
            self._loop.create_task(self._publisher()),
            self._loop.create_task(self._listener()),
            self._loop.create_task(self._checker()),
        ]

    async def close(self) -> None:
        self._closing = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []
        for _reqs, done in self._queue:
            done(BrokerError("broker closed"))
        self._queue.clear()
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()
        await self._client.aclose()

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
                err = BrokerError(f"redis unavailable: {exc or type(exc).__name__}")
                for _, done in batch:
                    _answer(done, err)
                continue
            i = 0
            for reqs, done in batch:
                _answer(done, results[i : i + len(reqs)])
                i += len(reqs)

    async def _run_publish(self, reqs: list[PublishRequest]) -> PublishResult:
        ids = [new_publication_id() for _ in reqs]
        for attempt in (0, 1):
            pipe = self._client.pipeline(transaction=False)
            for r, pid in zip(reqs, ids, strict=True):
                meta = self._key(r.channel, "m")
                keys = [
                    meta,
                    self._key(r.channel, "s"),
                    self._key(r.channel, f"k:{r.key}") if r.key else meta,
                    self._epoch0_key,
                ]
                ttl_ms = max(1, int(r.opts.ttl * 1000))
                pipe.evalsha(
                    self._sha_publish,
                    4,
                    *keys,
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
                )
            try:
                replies = await pipe.execute()
                break
            except NoScriptError:
                if attempt:
                    raise
                await self._load_scripts()  # Redis restarted or flushed its script cache
        out: PublishResult = []
        for r, pid, rep in zip(reqs, ids, replies, strict=True):
            if rep[0] == 1:
                offset, epoch, first_id = rep[1].split(b"\0")
                out.append(Repeat(r.channel, int(offset), epoch.decode(), first_id.decode()))
            else:
                out.append(
                    Publication(
                        r.channel,
                        int(rep[1]),
                        rep[2].decode(),
                        pid,
                        int(rep[3]),
                        raw=r.raw,
                        raw_info=r.raw_info,
                    )
                )
        return out

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
                chan = self._chans[channel] = _Chan(self._key(channel, "p").encode())
                self._subscribe([chan.pchan])
        else:
            chan_gone = self._chans.pop(channel, None)
            if chan_gone is not None:
                chan_gone.ready.set()  # never leave a reader waiting
                self._unsubscribe([chan_gone.pchan])

    def _subscribe(self, pchans: list[bytes]) -> None:
        if self._pubsub is not None and self._connected.is_set() and pchans:
            assert self._loop is not None
            self._loop.create_task(self._command(self._pubsub.subscribe, pchans))

    def _unsubscribe(self, pchans: list[bytes]) -> None:
        if self._pubsub is not None and self._connected.is_set() and pchans:
            assert self._loop is not None
            self._loop.create_task(self._command(self._pubsub.unsubscribe, pchans))

    async def _command(self, fn: Any, pchans: list[bytes]) -> None:
        try:
            await fn(*pchans)
        except (RedisError, OSError) as exc:
            log.info("pubsub command failed (the listener reconnects): %s", exc)

    # ------------------------------------------------------------------------------ live stream

    async def _listener(self) -> None:
        """Hold the Pub/Sub connection: (re)connect with backoff, resubscribe every channel, and hand
        each message to :meth:`_on_message`."""
        delay = 0.05
        prefix_len = len(self.prefix) + 2
        while True:
            pubsub = self._client.pubsub()
            try:
                await pubsub.connect()  # type: ignore[no-untyped-call]
                self._pubsub = pubsub
                self._connected.set()  # from here on, a new interest subscribes on its own
                for chan in self._chans.values():
                    chan.state = "new"  # whatever was missed is repaired once resubscribed
                pchans = [c.pchan for c in self._chans.values()]
                # (the placeholder keeps the connection in Pub/Sub mode when there is nothing yet)
                await pubsub.subscribe(f"{self.prefix}:-", *pchans)
                delay = 0.05
                while True:
                    msg = await pubsub.get_message(timeout=None)
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
                self._connected.clear()
                self._pubsub = None
                if not self._closing:
                    log.warning("redis pubsub connection lost (%s); reconnecting in %.2fs", exc, delay)
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                await asyncio.sleep(delay)
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
                    self._lose(channel, chan, f"offset {pub.offset} was published twice (Redis lost data)")
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
            try:
                async with asyncio.timeout(self.timeout):
                    if chan.epoch is None:
                        res = await self._read(channel, HistoryOptions(size=0), None, 0)
                        chan.epoch, chan.top = res.position.epoch, res.position.offset
                    else:
                        while True:
                            res = await self._read(channel, HistoryOptions(), chan.top, REPAIR_CHUNK)
                            if self._chans.get(channel) is not chan:
                                return
                            if res.position.epoch != chan.epoch and not (
                                chan.top == 0 and res.position.offset == 0
                            ):
                                self._lose(channel, chan, "the channel's stream was lost (new epoch)")
                                return
                            if res.position.offset < chan.top:
                                self._lose(channel, chan, "the channel's stream went back (Redis lost data)")
                                return
                            chan.epoch = res.position.epoch
                            if res.position.offset > chan.top and res.first_offset > chan.top + 1:
                                self._lose(channel, chan, "history no longer holds the missing range")
                                return
                            for pub in res.publications:
                                if pub.offset == chan.top + 1:
                                    self._deliver(chan, pub)
                            if chan.top >= res.position.offset or not res.publications:
                                break
                break
            except (RedisError, OSError, TimeoutError) as exc:
                log.info("repair of %s waits for Redis: %s", channel, exc)
                await asyncio.sleep(delay)
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

    def _lose(self, channel: str, chan: _Chan, why: str) -> None:
        """Tell every local subscriber of ``channel`` that this node cannot keep it gapless."""
        log.warning("channel %s: %s; its subscribers are told to resubscribe", channel, why)
        if self._chans.get(channel) is chan:
            # Start over: the subscribers that come back set the channel up afresh.
            chan.epoch, chan.top, chan.state, chan.backlog = None, 0, "new", []
            chan.recent.clear()
            chan.ready.set()
        assert self._loop is not None and self._handler is not None
        self._loop.call_soon(self._handler.lost, channel)

    async def _checker(self) -> None:
        """Every ``check_interval``: one pipelined read of every local channel's top; a channel behind
        (a lost Pub/Sub message with nothing after it) is repaired, one in a new epoch is lost."""
        while True:
            await asyncio.sleep(self.check_interval)
            live = [(ch, c) for ch, c in self._chans.items() if c.state == "live"]
            # What each had delivered when the check was sent: Pub/Sub messages published after Redis
            # answered may be delivered before the answer is read, so only a top below this one is lost.
            sent = [c.top for _, c in live]
            try:
                async with asyncio.timeout(self.timeout):
                    await self._refresh_epoch0()
                    if not live:
                        continue
                    pipe = self._client.pipeline(transaction=False)
                    for ch, _ in live:
                        pipe.hmget(self._key(ch, "m"), "e", "t")
                    tops = await pipe.execute()
            except (RedisError, OSError, TimeoutError) as exc:
                log.info("position check skipped: %s", exc)
                continue
            for (ch, chan), (epoch, top), top_sent in zip(live, tops, sent, strict=True):
                if self._chans.get(ch) is not chan or chan.state != "live":
                    continue
                if epoch is None:
                    if chan.top > 0:
                        self._lose(ch, chan, "the channel's stream is gone")
                elif epoch.decode() != chan.epoch or int(top) < top_sent:
                    if chan.top > 0:
                        self._lose(ch, chan, "the channel's stream was lost (new epoch)")
                    else:
                        chan.epoch = epoch.decode()
                elif int(top) > chan.top:
                    chan.state = "repair"
                    assert self._loop is not None
                    self._loop.create_task(self._repair(ch, chan))


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
