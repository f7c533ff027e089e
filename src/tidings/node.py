"""The running server's state shared by every transport: settings, policy gate, hub, broker, presence and
the subscription lifecycle."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Protocol

from aiohttp import web

from .backends.base import (
    Broker,
    BrokerError,
    PresenceStore,
    PublishDone,
    PublishRequest,
    PublishResult,
    StoresPush,
)
from .backends.push_local import LocalPushStore
from .config import Settings
from .hub import Hub
from .limits import ConnectionLimiter, FailureLimiter, parse_networks
from .metrics import Counters
from .policy import Policy
from .presence import presence_for
from .protocol import CloseCode, ErrorCode, Publication
from .push import PushService
from .stats import EventRing
from .subscriptions import Subscriptions
from .workers import WorkerInfo, worker_info

__all__ = ["NODE", "READY_CACHE", "Connection", "Node"]

READY_CACHE = 1.0  # seconds a readiness answer is reused: probes cannot hammer the broker


class Connection(Protocol):
    """What the node needs of any open client connection (to count it and to close it on shutdown)."""

    def close(self, code: CloseCode, reason: str | None = None) -> None: ...

    def reconfigure(self) -> None:
        """The node's settings changed (``Node.reload``): take the new limits, and end what the new rules
        no longer allow (each transport in its own way, documented in docs/configuration.md)."""
        ...


class Connections(set[Connection]):
    """The node's open connections. Adding or removing one whose ``user`` is set tells Web Push that
    user is online here (``push = "offline"`` skips their devices), whatever the transport; a connection
    that authenticates after it was added tells it itself (``PushService.connected``). A connection
    with an ``online_linger`` (a pending poll) keeps its user online that many seconds after it ended:
    the client polls again at once, and the publication that answered it must not be pushed to them too.

    ``by_kind`` counts them per transport (each connection's ``kind``: ws, chatsocket, echo, sse,
    stream, poll), for ``GET /api/stats``."""

    def __init__(self, node: Node) -> None:
        super().__init__()
        self._node = node
        self.by_kind: dict[str, int] = {}

    def add(self, conn: Connection) -> None:
        if conn not in self:
            super().add(conn)
            kind = getattr(conn, "kind", "other")
            self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
            user = getattr(conn, "user", "")
            if user:
                self._node.push.connected(user)

    def discard(self, conn: object) -> None:
        if conn in self:
            super().discard(conn)
            kind = getattr(conn, "kind", "other")
            self.by_kind[kind] -= 1
            user = getattr(conn, "user", "")
            if user:
                linger: float = getattr(conn, "online_linger", 0.0)
                if linger > 0:  # a long-poll client, between two polls, is still here
                    asyncio.get_running_loop().call_later(linger, self._node.push.disconnected, user)
                else:
                    self._node.push.disconnected(user)


class Node:
    def __init__(self, settings: Settings, broker: Broker, presence: PresenceStore | None = None) -> None:
        self.settings = settings
        self.broker = broker
        self.counters = Counters()  # the metrics' plain ints (tidings.metrics): one object per process
        # With --workers: this worker's place (metrics carry its index); None for a single process.
        self.worker: WorkerInfo | None = worker_info(os.environ)
        self.policy = Policy(settings)
        self.hub = Hub(
            max_pending_bytes=settings.max_buffer, on_interest=broker.interest, counters=self.counters
        )
        self.presence: PresenceStore = presence or presence_for(
            broker, ttl=settings.presence_ttl, limit=settings.presence_limit
        )
        self.subscriptions = Subscriptions(self.hub, broker, self.presence, self.counters)
        self.connections = Connections(self)
        self.errors = EventRing()  # recent error replies and error closes (GET /api/stats)
        self.slow_consumers = EventRing()  # recent slow-consumer closes (4008)
        self.drained = asyncio.Event()  # set whenever the last connection goes away
        self.started = time.time()
        self.conn_limits = ConnectionLimiter(settings.max_connections, settings.max_connections_per_ip)
        self.auth_failures = FailureLimiter(settings.api_failures_per_minute)
        self.trusted_proxies = parse_networks(settings.trusted_proxies)
        self.draining = False  # set on SIGTERM (or app shutdown): /readyz answers 503 from then on
        self._ready_at = -READY_CACHE
        self._ready_reason: str | None = None
        self._ready_check: asyncio.Future[str | None] | None = None
        store = (
            broker.push_store(online_ttl=settings.presence_ttl)
            if isinstance(broker, StoresPush)
            else LocalPushStore(None)
        )
        self.push = PushService(settings, self.policy, store)
        # What else runs by the settings (the HTTP edge, the heartbeat): told by reload(), in order.
        self.reload_hooks: list[Callable[[Settings], None]] = []

    def reload(self, settings: Settings) -> None:
        """Run by ``settings`` from now on: the one place the settings of a running node change (SIGHUP,
        ``tidings reload``). ``settings`` keeps the running value of every option that cannot change
        live (``config.reloaded``). The policy goes first (its token verifier may refuse a key file:
        then nothing changed); then the limits, the hooks, and every open connection re-checks itself
        against the new rules and budgets."""
        self.policy.reload(settings)
        self.settings = settings
        self.push.settings = settings
        self.hub.max_pending = settings.max_buffer
        self.conn_limits.total_max = settings.max_connections
        self.conn_limits.per_ip_max = settings.max_connections_per_ip
        self.auth_failures.limit = settings.api_failures_per_minute
        self.trusted_proxies = parse_networks(settings.trusted_proxies)
        for hook in self.reload_hooks:
            hook(settings)
        for conn in list(self.connections):
            conn.reconfigure()

    async def unready_reason(self) -> str | None:
        """None when this node should get traffic (``/readyz`` 200); else why not: ``draining``, or
        the broker's failure. The broker is asked (:meth:`Broker.ping`) at most once per
        ``READY_CACHE`` seconds; concurrent callers share one check in flight."""
        if self.draining:
            return "draining"
        if time.monotonic() - self._ready_at < READY_CACHE:
            return self._ready_reason
        if self._ready_check is None:
            self._ready_check = asyncio.ensure_future(self._check_broker())
        return await asyncio.shield(self._ready_check)

    async def _check_broker(self) -> str | None:
        limit = self.settings.redis_timeout or 5.0  # the SQLite writer gets as long as Redis would
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(limit):
                await self.broker.ping()
            reason = None
            self.counters.broker_op("ping", time.perf_counter() - t0)
        except BrokerError as exc:
            reason = f"broker: {exc}"
        except TimeoutError:
            reason = f"broker: no answer within {limit:g} s"
        finally:
            self._ready_check = None
        self._ready_at = time.monotonic()
        self._ready_reason = reason
        return reason

    def forget(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if not self.connections:
            self.drained.set()

    async def start(self) -> None:
        await self.broker.start(self.subscriptions)
        try:
            await self.presence.start(self.hub.channels)
        except BaseException:
            await self.broker.close()
            raise
        try:
            await self.push.start()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        try:
            await self.push.close()
            await self.presence.close()  # before the broker: a shared store uses its connections
        finally:
            await self.broker.close()

    def submit(
        self, reqs: list[PublishRequest], done: PublishDone, *, source: str, started: float | None = None
    ) -> None:
        """Hand publish requests that passed the gate to the broker as one group (one queue item, one
        transaction); ``done`` gets the publications in order, or the group's BrokerError.

        ``source`` (``http``, ``ws``, ``chatsocket``, ``page``) and ``started`` (``time.perf_counter()``
        when the request arrived; default now) are for the metrics: publications by namespace and
        source, the publish duration up to this acknowledgement and the broker's part of it.

        Every publish path comes through here: once the broker acknowledged a group, its publications
        in push namespaces are offered to Web Push (queued, never awaited), on this node only."""
        if self.push.enabled:
            done = self._then_push(done)
        self.broker.publish_many(reqs, self._counted(reqs, done, source, started))

    def _counted(
        self, reqs: list[PublishRequest], done: PublishDone, source: str, started: float | None
    ) -> PublishDone:
        counters = self.counters
        namespace = self.policy.namespace
        errors = self.errors
        t1 = time.perf_counter()
        t0 = t1 if started is None else started

        def finish(result: PublishResult | BrokerError) -> None:
            try:
                done(result)
            finally:
                now = time.perf_counter()
                counters.broker_op("publish", now - t1)
                if isinstance(result, BrokerError):
                    errors.add(source="broker", code=str(ErrorCode.UNAVAILABLE), message=str(result))
                else:
                    counters.publish_seconds.observe(now - t0)
                    for pub in result:
                        if isinstance(pub, Publication):  # a Repeat stored nothing
                            counters.published(namespace(pub.channel).name or "_default", source)

        return finish

    def _then_push(self, done: PublishDone) -> PublishDone:
        offer = self.push.offer

        def finish(result: PublishResult | BrokerError) -> None:
            try:
                done(result)
            finally:
                if not isinstance(result, BrokerError):
                    for pub in result:
                        if isinstance(pub, Publication):  # a Repeat was pushed when first published
                            offer(pub)

        return finish

    async def publish(
        self, reqs: list[PublishRequest], *, source: str, started: float | None = None
    ) -> PublishResult:
        """:meth:`submit`, awaited. Raises BrokerError."""
        done: asyncio.Future[PublishResult | BrokerError] = asyncio.get_running_loop().create_future()

        def finish(result: PublishResult | BrokerError) -> None:
            if not done.done():
                done.set_result(result)

        self.submit(reqs, finish, source=source, started=started)
        result = await done
        if isinstance(result, BrokerError):
            raise result
        return result


NODE = web.AppKey("tidings.node", Node)
