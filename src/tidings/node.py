"""The running server's state shared by every transport: settings, policy gate, hub, broker, presence and
the subscription lifecycle."""

from __future__ import annotations

import asyncio
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
    Repeat,
    StoresPush,
)
from .backends.push_local import LocalPushStore
from .config import Settings
from .hub import Hub
from .limits import ConnectionLimiter, FailureLimiter, parse_networks
from .policy import Policy
from .presence import presence_for
from .protocol import CloseCode, ErrorCode, Publication
from .push import PushService
from .stats import EventRing
from .subscriptions import Subscriptions

__all__ = ["NODE", "Connection", "Node"]


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
        self.policy = Policy(settings)
        self.hub = Hub(max_pending_bytes=settings.max_buffer, on_interest=broker.interest)
        self.presence: PresenceStore = presence or presence_for(
            broker, ttl=settings.presence_ttl, limit=settings.presence_limit
        )
        self.subscriptions = Subscriptions(self.hub, broker, self.presence)
        self.connections = Connections(self)
        self.published = 0  # publications the broker acknowledged (every publish path: submit)
        self.errors = EventRing()  # recent error replies and error closes (GET /api/stats)
        self.slow_consumers = EventRing()  # recent slow-consumer closes (4008)
        self.drained = asyncio.Event()  # set whenever the last connection goes away
        self.started = time.time()
        self.conn_limits = ConnectionLimiter(settings.max_connections, settings.max_connections_per_ip)
        self.auth_failures = FailureLimiter(settings.api_failures_per_minute)
        self.trusted_proxies = parse_networks(settings.trusted_proxies)
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

    def submit(self, reqs: list[PublishRequest], done: PublishDone) -> None:
        """Hand publish requests that passed the gate to the broker as one group (one queue item, one
        transaction); ``done`` gets the publications in order, or the group's BrokerError.

        Every publish path comes through here: once the broker acknowledged a group, its publications
        in push namespaces are offered to Web Push (queued, never awaited), on this node only."""
        if self.push.enabled:
            done = self._then_push(done)
        self.broker.publish_many(reqs, self._counted(done))

    def _counted(self, done: PublishDone) -> PublishDone:
        def finish(result: PublishResult | BrokerError) -> None:
            if isinstance(result, BrokerError):
                self.errors.add(source="broker", code=str(ErrorCode.UNAVAILABLE), message=str(result))
            else:
                self.published += sum(type(p) is not Repeat for p in result)
            done(result)

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

    async def publish(self, reqs: list[PublishRequest]) -> PublishResult:
        """:meth:`submit`, awaited. Raises BrokerError."""
        done: asyncio.Future[PublishResult | BrokerError] = asyncio.get_running_loop().create_future()

        def finish(result: PublishResult | BrokerError) -> None:
            if not done.done():
                done.set_result(result)

        self.submit(reqs, finish)
        result = await done
        if isinstance(result, BrokerError):
            raise result
        return result


NODE = web.AppKey("tidings.node", Node)
