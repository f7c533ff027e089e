"""redis+cluster:// — the Redis broker on a Redis Cluster (Redis 7: sharded Pub/Sub).

Everything of :mod:`tidings.backends.redis` holds; what differs:

- A channel's keys share one hash slot (``{prefix}:{C}:...``), so its Lua scripts run on one master. The
  shared ``{prefix}:epoch0`` of a single Redis would be cross-slot, so here every slot has its own:
  ``{prefix}:{<tag>}:epoch0``, where ``<tag>`` is a fixed string that hashes to that slot (a table computed
  once). A channel's publish and read scripts use the epoch0 of the channel's slot; the read script creates
  it (``SET ... PX``) when it is missing, so every node reads a never-published channel in the same epoch,
  and it moves with the slot (migration, failover). Its TTL (one day) is shorter than a channel's meta
  (history TTL + two days), so a channel whose stream was lost comes back in an epoch it never had.
- Publishing: one EVALSHA per publication, grouped per master, each group one pipeline on one connection
  of that master (all masters at once), one group in flight, answers in request order. With
  ``wait_replicas`` N a ``WAIT N timeout`` follows on the same connection: that master's publications are
  acknowledged only when N replicas have them (``unavailable`` otherwise). MOVED / ASK / TRYAGAIN /
  CLUSTERDOWN / NOSCRIPT replies (the script did not run) are re-sent to the right master within the
  timeout; a publication whose master failed mid-pipeline is answered ``unavailable``.
- Live fan-out by sharded Pub/Sub: the publish script SPUBLISHes on ``{prefix}:{C}:p`` (the channel's
  shard), join/leave events too; each node holds one Pub/Sub connection per master and SSUBSCRIBEs each
  channel it has local subscribers for on the master that owns its slot. A Pub/Sub connection that fails,
  a slot that moved (the server's SUNSUBSCRIBE), or a periodic check of the slot map resubscribes the
  channel on its current master, and every such channel is repaired from the stream as on a single Redis.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import functools
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..protocol import Publication, StreamPosition, new_publication_id
from .base import (
    BrokerError,
    HistoryOptions,
    HistoryResult,
    IdempotencyOptions,
    PublishRequest,
    Repeat,
)
from .redis import (
    _PUBLISH,
    _READ,
    EPOCH0_TTL_MS,
    RedisBroker,
    RedisTarget,
    _answer,
    _entry,
    _publish_reply,
    _text,
)

try:
    import redis.asyncio as aioredis
    from redis.asyncio.cluster import ClusterNode, PipelineCommand
    from redis.asyncio.cluster import RedisCluster as _ClusterClient
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff, NoBackoff
    from redis.exceptions import (
        AskError,
        ClusterDownError,
        MovedError,
        NoScriptError,
        RedisClusterException,
        RedisError,
        TryAgainError,
    )
    from redis.exceptions import ConnectionError as RedisConnectionError
except ImportError:  # pragma: no cover - the extra is not installed
    aioredis = None  # type: ignore[assignment]

__all__ = ["RedisClusterBroker", "slot_tag"]

log = logging.getLogger("tidings.redis")

SLOTS = 16384


def _replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"the Redis script changed: {old!r} not found once"
    return text.replace(old, new)


# The single-node scripts, with sharded Pub/Sub, and a read that creates the slot's epoch0 when it is gone
# (ARGV[5] a fresh epoch, ARGV[6] its TTL ms) so every node agrees on a never-published channel's epoch.
_PUBLISH_CLUSTER = _replace_once(_PUBLISH, "redis.call('PUBLISH',", "redis.call('SPUBLISH',")
_READ_CLUSTER = _replace_once(
    _READ,
    "if not m[1] then return {redis.call('GET', KEYS[3])} end",
    "if not m[1] then\n"
    "  local e0 = redis.call('GET', KEYS[3])\n"
    "  if not e0 then e0 = ARGV[5]; redis.call('SET', KEYS[3], e0, 'PX', ARGV[6]) end\n"
    "  return {e0}\n"
    "end",
)

# Replies after which the script did not run: it is sent again (to the slot's master now) in the timeout.
_NOT_RUN: tuple[type[Exception], ...] = ()
if aioredis is not None:
    _NOT_RUN = (MovedError, AskError, TryAgainError, ClusterDownError, NoScriptError)


@functools.cache
def _slot_tags() -> tuple[str, ...]:
    """For every hash slot, a short string that hashes to it (CRC16/XMODEM mod 16384, as Redis does)."""
    tags: list[str | None] = [None] * SLOTS
    missing, i = SLOTS, 0
    while missing:
        s = format(i, "x")
        slot = binascii.crc_hqx(s.encode(), 0) % SLOTS
        if tags[slot] is None:
            tags[slot] = s
            missing -= 1
        i += 1
    return tuple(t for t in tags if t is not None)


def key_slot(text: str) -> int:
    """The hash slot of a key (hash tag ``{...}`` honoured)."""
    b = text.encode()
    start = b.find(b"{")
    if start >= 0:
        end = b.find(b"}", start + 1)
        if end > start + 1:
            b = b[start + 1 : end]
    return binascii.crc_hqx(b, 0) % SLOTS


def slot_tag(slot: int) -> str:
    return _slot_tags()[slot]


@dataclass(slots=True)
class _NodeSub:
    """This node's Pub/Sub connection to one master."""

    name: str
    client: Any
    pubsub: Any
    channels: set[str] = field(default_factory=set)
    pending_unsub: dict[bytes, int] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None


class RedisClusterBroker(RedisBroker):
    """:class:`~tidings.backends.redis.RedisBroker` on a Redis Cluster (``redis+cluster://``)."""

    def __init__(
        self,
        nodes: Sequence[tuple[str, int]],
        *,
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
        prefix: str = "tidings",
        timeout: float = 5.0,
        check_interval: float = 2.0,
        pool_size: int = 32,
        wait_replicas: int = 0,
        wait_timeout: float = 1.0,
        idempotency: IdempotencyOptions | None = None,
    ) -> None:
        if aioredis is None:
            raise BrokerError("the Redis broker needs redis-py: pip install 'tidings[redis]'")
        if not nodes:
            raise ValueError("a Redis Cluster needs at least one startup node")
        host, port = nodes[0]
        super().__init__(
            RedisTarget(host=host, port=port, username=username, password=password, tls=tls),
            prefix=prefix,
            timeout=timeout,
            check_interval=check_interval,
            pool_size=1,
            idempotency=idempotency,
            wait_replicas=wait_replicas,
            wait_timeout=wait_timeout,
        )
        self.nodes = list(nodes)
        self._conn_kw: dict[str, Any] = {
            "username": username,
            "password": password,
            "ssl": tls,
            "socket_timeout": timeout,
            "socket_connect_timeout": min(timeout, 2.0),
        }
        # The single-node client made by RedisBroker never connected; the cluster client replaces it.
        self._cluster = _ClusterClient(
            startup_nodes=[ClusterNode(h, p) for h, p in nodes],
            max_connections=pool_size + 8,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 3),
            **self._conn_kw,
        )
        self._client = self._cluster  # (same commands, routed by slot)
        self._slots = asyncio.Semaphore(pool_size)  # commands in flight (the pool does not block)
        self._subs: dict[str, _NodeSub] = {}  # master name -> its Pub/Sub connection
        self._where: dict[str, str] = {}  # channel -> master it is SSUBSCRIBEd on
        self._subbed: dict[str, Any] = {}  # channel -> the _Chan that SSUBSCRIBE was sent for
        self._sync = asyncio.Event()
        self._refresh = False  # the slot map must be asked again before the next sync
        self.resent: dict[str, int] = {}  # publish replies after which the script was sent again, by kind

    def _epoch0_of(self, channel: str) -> str:
        return f"{self.prefix}:{{{slot_tag(key_slot(channel))}}}:epoch0"

    def _key_slot(self, channel: str) -> int:
        return key_slot(channel)

    def _master_of(self, channel: str) -> str:
        """``host:port`` of the master that holds ``channel`` (as this node's slot map says)."""
        return str(self._cluster.nodes_manager.get_node_from_slot(key_slot(channel)).name)

    # ------------------------------------------------------------------------------ lifecycle

    async def start(self, handler: Any) -> None:
        _slot_tags()  # (computed once, ~0.1 s)
        where = ",".join(f"{h}:{p}" for h, p in self.nodes)
        try:
            await super().start(handler)
        except BrokerError as exc:
            raise BrokerError(f"cannot reach the Redis Cluster at {where}: {exc.__cause__ or exc}") from exc
        except RedisClusterException as exc:
            with contextlib.suppress(Exception):
                await self._cluster.aclose()
            raise BrokerError(f"cannot reach the Redis Cluster at {where}: {exc}") from exc

    async def ping(self) -> None:
        """RedisBroker's PING (to the cluster client's default node); the cluster client's own
        errors (no slot map, no node reachable) count as not answering."""
        try:
            await super().ping()
        except RedisClusterException as exc:
            raise BrokerError(f"cannot reach the Redis Cluster: {exc}") from exc

    async def _checker(self) -> None:
        """RedisBroker's position check; the cluster client's own errors (no slot map yet, a slot not
        covered while failing over) count as Redis being unreachable: skipped, tried again later."""
        while True:
            try:
                await super()._checker()
            except RedisClusterException as exc:
                log.info("position check skipped: %s", exc)

    async def close(self) -> None:
        self._closing = True
        for sub in list(self._subs.values()):
            await self._drop_sub(sub)
        await super().close()

    async def _load_scripts(self) -> None:
        self._sha_publish = _text(await self._client.script_load(_PUBLISH_CLUSTER))
        self._sha_read = _text(await self._client.script_load(_READ_CLUSTER))

    async def _load_scripts_on(self, node: Any) -> None:
        await node.execute_command("SCRIPT", "LOAD", _PUBLISH_CLUSTER)
        await node.execute_command("SCRIPT", "LOAD", _READ_CLUSTER)

    async def _refresh_epoch0(self) -> None:
        """Nothing to do: the read and publish scripts create their slot's epoch0 when it is missing."""

    # ------------------------------------------------------------------------------ publish

    async def _publisher(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._queue = self._queue, []
            if not batch:
                continue
            reqs = [r for rs, _ in batch for r in rs]
            results: list[Publication | Repeat | BrokerError]
            try:
                async with asyncio.timeout(self.timeout):
                    results = await self._run_cluster_publish(reqs)
            except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
                err = BrokerError(f"redis unavailable: {exc or type(exc).__name__}")
                results = [err] * len(reqs)
            i = 0
            for rs, done in batch:
                mine = results[i : i + len(rs)]
                i += len(rs)
                failed = next((r for r in mine if isinstance(r, BrokerError)), None)
                if failed is not None:
                    _answer(done, failed)
                else:
                    _answer(done, [r for r in mine if not isinstance(r, BrokerError)])

    def _epoch0_for(self, channel: str) -> str:
        return self._epoch0_of(channel)

    def _publish_durable(self) -> bool:
        # A master's replica may lack the last writes (replication is asynchronous), so after a failover
        # or a restart every channel of that master goes on in a new epoch: clients are told.
        return False

    async def _run_cluster_publish(
        self, reqs: list[PublishRequest]
    ) -> list[Publication | Repeat | BrokerError]:
        """Every request's script, pipelined per master; a reply saying the script did not run is sent again
        (to the master that owns the slot now) until the caller's timeout. Returns one result per request."""
        client = self._cluster
        if client._initialize:
            await client.initialize()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout * 0.8
        ids = [new_publication_id() for _ in reqs]
        args = [
            ("EVALSHA", self._sha_publish, *self._publish_argv(r, pid))
            for r, pid in zip(reqs, ids, strict=True)
        ]
        out: list[Any] = [None] * len(reqs)
        todo = list(range(len(reqs)))
        asking: dict[int, Any] = {}  # request -> the node an ASK redirected it to
        delay = 0.02
        while todo:
            groups: dict[str, tuple[Any, list[int], set[int]]] = {}
            for i in todo:
                target = asking.pop(i, None)
                node = target or client.nodes_manager.get_node_from_slot(self._key_slot(reqs[i].channel))
                group = groups.setdefault(node.name, (node, [], set()))
                group[1].append(i)
                if target is not None:
                    group[2].add(i)
            runs = [self._node_publish(node, idx, ask, args) for node, idx, ask in groups.values()]
            replies = await asyncio.gather(*runs, return_exceptions=True)
            todo, again, moved, noscript = [], False, False, []
            for (node, idx, _), rep in zip(groups.values(), replies, strict=True):
                if isinstance(rep, BaseException):
                    if not isinstance(rep, Exception):
                        raise rep
                    # Unknown whether the scripts ran: those publications are answered unavailable.
                    self._refresh = True
                    client._initialize = True
                    err = BrokerError(f"redis unavailable: {rep or type(rep).__name__}")
                    for i in idx:
                        out[i] = err
                    continue
                for i, res in zip(idx, rep, strict=True):
                    if isinstance(res, _NOT_RUN):
                        kind = type(res).__name__
                        self.resent[kind] = self.resent.get(kind, 0) + 1
                    if isinstance(res, NoScriptError):
                        noscript.append(node)
                        todo.append(i)
                    elif isinstance(res, AskError):  # (redis-py's MovedError is an AskError too)
                        moved = moved or isinstance(res, MovedError)
                        target = client.get_node(host=res.host, port=res.port)
                        if target is not None:
                            asking[i] = target
                        todo.append(i)
                    elif isinstance(res, _NOT_RUN):
                        again = True
                        todo.append(i)
                    elif isinstance(res, Exception):
                        out[i] = (
                            res if isinstance(res, BrokerError) else BrokerError(f"redis unavailable: {res}")
                        )
                    else:
                        out[i] = res[0]  # the script's one reply (one publication per call here)
            if todo and loop.time() >= deadline:
                for i in todo:
                    out[i] = BrokerError("redis unavailable: the cluster did not take it in time")
                break
            # (a failure here leaves those requests to the next round or the deadline: the publications
            # already acknowledged by other masters are answered as such, never turned into errors)
            for node in {n.name: n for n in noscript}.values():
                with contextlib.suppress(RedisError, RedisClusterException, OSError):
                    await self._load_scripts_on(node)
            if again:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
            if again or moved:  # the slot map is asked again (the next groups go straight to the owner)
                with contextlib.suppress(RedisError, RedisClusterException, OSError):
                    await client.nodes_manager.initialize()
            todo.sort()
        results: list[Publication | Repeat | BrokerError] = []
        for r, pid, rep in zip(reqs, ids, out, strict=True):
            results.append(rep if isinstance(rep, BrokerError) else _publish_reply(r, pid, rep))
        return results

    async def _node_publish(
        self, node: Any, idx: list[int], ask: set[int], args: list[tuple[Any, ...]]
    ) -> list[Any]:
        """One pipeline on one connection of ``node``: the scripts of ``idx`` (ASKING before those an ASK
        sent here), then ``WAIT`` when replicas must have them. One result per request."""
        cmds: list[Any] = []
        mine: list[Any] = []
        for i in idx:
            if i in ask:
                cmds.append(PipelineCommand(len(cmds), "ASKING"))
            cmd = PipelineCommand(len(cmds), *args[i])
            cmds.append(cmd)
            mine.append(cmd)
        if self.wait_replicas:
            cmds.append(PipelineCommand(len(cmds), "WAIT", self.wait_replicas, self.wait_timeout_ms))
        await node.execute_pipeline(cmds)
        results = [c.result for c in mine]
        if self.wait_replicas:
            acked = cmds[-1].result
            if isinstance(acked, Exception) or int(acked) < self.wait_replicas:
                why = acked if isinstance(acked, Exception) else f"{acked} of {self.wait_replicas} replicas"
                err = BrokerError(f"redis unavailable: not replicated in time ({why})")
                return [err if not isinstance(r, _NOT_RUN) else r for r in results]
        return results

    # ------------------------------------------------------------------------------ history

    async def _read(
        self, channel: str, opts: HistoryOptions, since: int | None, limit: int | None
    ) -> HistoryResult:
        args = (
            "" if since is None else since + 1,
            -1 if limit is None else limit,
            opts.size,
            max(1, int(opts.ttl * 1000)),
            secrets.token_hex(4),
            EPOCH0_TTL_MS,
        )
        keys = (self._key(channel, "m"), self._key(channel, "s"), self._epoch0_of(channel))
        async with self._slots:
            try:
                try:
                    rep = await self._client.evalsha(self._sha_read, 3, *keys, *args)
                except NoScriptError:
                    await self._load_scripts()
                    rep = await self._client.evalsha(self._sha_read, 3, *keys, *args)
            except RedisClusterException as exc:  # (no slot map, slot not covered): Redis unreachable
                raise RedisConnectionError(str(exc)) from exc
        if len(rep) <= 1:  # nobody published to it: the epoch its first publish will have
            return HistoryResult([], StreamPosition(0, _text(rep[0])), 1)
        epoch = rep[0].decode()
        pubs = [_entry(channel, epoch, e) for e in rep[3]]
        if since is None:
            pubs.reverse()
        return HistoryResult(pubs, StreamPosition(int(rep[1]), epoch), int(rep[2]))

    # ------------------------------------------------------------------------------ events

    async def _send_event(self, pchan: str, payload: bytes) -> None:
        try:
            async with (
                asyncio.timeout(self.timeout),
                self._slots,
            ):  # (a burst of joins waits for a connection)
                node = self._cluster.get_node_from_key(pchan)
                await self._cluster.execute_command("SPUBLISH", pchan, payload, target_nodes=node)
        except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
            log.info("join/leave event not sent: %s", exc)

    # ------------------------------------------------------------------------------ sharded Pub/Sub

    def _subscribe(self, pchans: list[bytes]) -> None:
        self._sync.set()

    def _unsubscribe(self, pchans: list[bytes]) -> None:
        self._sync.set()

    def _channel_of(self, name: bytes) -> str:
        return name[len(self.prefix) + 2 : -3].decode()

    async def _listener(self) -> None:
        """Keep every wanted channel SSUBSCRIBEd on the master that owns its slot: woken by interest changes
        and failed Pub/Sub connections, and every ``check_interval`` (the slot map asked again then)."""
        delay = 0.05
        loop = asyncio.get_running_loop()
        next_refresh = loop.time() + self.check_interval
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_refresh - loop.time())):
                    await self._sync.wait()
            self._sync.clear()
            try:
                async with asyncio.timeout(self.timeout):
                    if self._refresh or loop.time() >= next_refresh:
                        self._refresh = False
                        next_refresh = loop.time() + self.check_interval
                        await self._cluster.nodes_manager.initialize()
                    await self._sync_subscriptions()
                delay = 0.05
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not self._closing:
                    log.warning("redis cluster pubsub sync failed (%s); again in %.2fs", exc, delay)
                self._refresh = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                self._sync.set()

    async def _sync_subscriptions(self) -> None:
        nm = self._cluster.nodes_manager
        for channel, name in list(self._where.items()):
            chan = self._chans.get(channel)
            owner = nm.get_node_from_slot(self._key_slot(channel)).name
            if chan is None or owner != name:
                del self._where[channel]
                sub = self._subs.get(name)
                if sub is not None and channel in sub.channels:
                    sub.channels.discard(channel)
                    pchan = self._key(channel, "p").encode()
                    sub.pending_unsub[pchan] = sub.pending_unsub.get(pchan, 0) + 1
                    await sub.pubsub.sunsubscribe(pchan)
                if chan is not None:
                    chan.state = "new"  # repaired once subscribed on its new master
            elif chan is not self._subbed.get(channel):
                # Interest went away and came back before this sync: still subscribed on the server, but
                # the new _Chan needs a confirmation of its own (SSUBSCRIBE again gives one).
                del self._where[channel]
        for channel, chan in list(self._chans.items()):
            if channel in self._where:
                continue
            node = nm.get_node_from_slot(self._key_slot(channel))
            sub = self._subs.get(node.name) or await self._open_sub(node)
            chan.state = "new"
            # (recorded first: the confirmation may be read before ssubscribe returns)
            sub.channels.add(channel)
            self._where[channel] = node.name
            self._subbed[channel] = chan
            try:
                await sub.pubsub.ssubscribe(chan.pchan)
            except BaseException:
                sub.channels.discard(channel)
                if self._where.get(channel) == node.name:
                    del self._where[channel]
                raise
            if sub.task is None:  # (reading starts once the connection is in Pub/Sub mode)
                assert self._loop is not None
                sub.task = self._loop.create_task(self._read_sub(sub))
        for channel in [c for c in self._subbed if c not in self._where]:
            del self._subbed[channel]
        for name, sub in list(self._subs.items()):
            if not sub.channels and name not in {n.name for n in nm.get_nodes_by_server_type("primary")}:
                await self._drop_sub(sub)

    async def _open_sub(self, node: Any) -> _NodeSub:
        # No retries inside redis-py: a failed connection comes back here, to be resubscribed per slot.
        client = aioredis.Redis(host=node.host, port=node.port, retry=Retry(NoBackoff(), 0), **self._conn_kw)
        pubsub = client.pubsub()
        sub = _NodeSub(node.name, client, pubsub)
        try:
            await pubsub.connect()  # type: ignore[no-untyped-call]
        except BaseException:
            with contextlib.suppress(Exception):
                await client.aclose()
            raise
        self._subs[node.name] = sub
        return sub

    async def _drop_sub(self, sub: _NodeSub) -> None:
        if self._subs.get(sub.name) is sub:
            del self._subs[sub.name]
        if sub.task is not None and sub.task is not asyncio.current_task():
            sub.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sub.task
        with contextlib.suppress(Exception):
            await sub.pubsub.aclose()
        with contextlib.suppress(Exception):
            await sub.client.aclose()

    async def _read_sub(self, sub: _NodeSub) -> None:
        try:
            while True:
                msg = await sub.pubsub.get_message(timeout=None)
                if msg is None:
                    continue
                kind = msg["type"]
                name = msg["channel"]
                if not isinstance(name, bytes):
                    continue
                channel = self._channel_of(name)
                chan = self._chans.get(channel)
                if kind == "sunsubscribe":
                    left = sub.pending_unsub.get(name, 0)
                    if left:
                        if left == 1:
                            del sub.pending_unsub[name]
                        else:
                            sub.pending_unsub[name] = left - 1
                    elif self._where.get(channel) == sub.name:
                        # The server dropped it: its slot moved to another master.
                        del self._where[channel]
                        sub.channels.discard(channel)
                        if chan is not None:
                            chan.state = "new"
                        self._refresh = True
                        self._sync.set()
                    continue
                if chan is None or chan.pchan != name or self._where.get(channel) != sub.name:
                    continue
                if kind == "smessage":
                    self._on_message(channel, chan, msg["data"])
                elif kind == "ssubscribe":
                    self._on_subscribed(channel, chan)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not self._closing:
                log.warning("redis cluster pubsub connection to %s lost (%s); resubscribing", sub.name, exc)
            for channel in sub.channels:
                if self._where.get(channel) == sub.name:
                    del self._where[channel]
                    if (chan := self._chans.get(channel)) is not None:
                        chan.state = "new"
            sub.channels.clear()
            self._refresh = True
            self._sync.set()
            await self._drop_sub(sub)
