"""The running server's state shared by every transport: settings, hub, broker and the channel rules."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

import orjson
from aiohttp import web

from .auth import TokenVerifier
from .backends.base import Broker, BrokerError, HistoryResult, PublishRequest
from .config import Namespace, Settings
from .history import can_recover
from .hub import Hub
from .limits import ConnectionLimiter, FailureLimiter, RateLimiter, parse_networks
from .protocol import CloseCode, ErrorCode, ProtocolError, Publication, StreamPosition, is_valid_channel

__all__ = ["NODE", "Connection", "Node"]

NS_CACHE_SIZE = 10_000


class Connection(Protocol):
    """What the node needs of any open client connection (to count it and to close it on shutdown)."""

    def close(self, code: CloseCode, reason: str | None = None) -> None: ...


class Node:
    def __init__(self, settings: Settings, broker: Broker) -> None:
        self.settings = settings
        self.broker = broker
        self.hub = Hub(max_pending_bytes=settings.max_buffer)
        self.connections: set[Connection] = set()
        self._ns_cache: dict[str, Namespace] = {}  # valid channel -> its rules
        self.drained = asyncio.Event()  # set whenever the last connection goes away
        self.started = time.time()
        self.tokens = TokenVerifier(settings)
        self.conn_limits = ConnectionLimiter(settings.max_connections, settings.max_connections_per_ip)
        self.user_rates = RateLimiter(settings.user_rate, settings.user_rate * 2)
        self.auth_failures = FailureLimiter(settings.api_failures_per_minute)
        self.trusted_proxies = parse_networks(settings.trusted_proxies)

    def forget(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if not self.connections:
            self.drained.set()

    async def start(self) -> None:
        await self.broker.start(self.hub.deliver)

    async def close(self) -> None:
        await self.broker.close()

    def namespace(self, channel: object, rid: int | str | None = None) -> Namespace:
        """The rules for ``channel``; ProtocolError invalid_field, invalid_channel or unknown_namespace."""
        if isinstance(channel, str):
            known = self._ns_cache.get(channel)
            if known is not None:  # validated before: skip the regex on the hot path
                return known
        if channel is None:
            raise ProtocolError(ErrorCode.INVALID_FIELD, "channel is required", rid)
        if not is_valid_channel(channel):
            raise ProtocolError(
                ErrorCode.INVALID_CHANNEL,
                "channel must be 1-255 characters of letters, digits and _-:.@/=",
                rid,
            )
        assert isinstance(channel, str)
        ns = self.settings.namespace_for(channel)
        if ns is None:
            raise ProtocolError(ErrorCode.UNKNOWN_NAMESPACE, f"no namespace configured for {channel!r}", rid)
        if len(self._ns_cache) >= NS_CACHE_SIZE:
            self._ns_cache.clear()
        self._ns_cache[channel] = ns
        return ns

    def publish(
        self,
        channel: str,
        data: Any,
        ns: Namespace,
        info: dict[str, Any] | None = None,
        rid: int | str | None = None,
    ) -> asyncio.Future[Publication]:
        """One publication, size-checked, as a future. The channel and permission checks are the caller's."""
        fut: asyncio.Future[Publication] = asyncio.get_running_loop().create_future()
        req = self.publish_request(channel, data, ns, info, rid)

        def done(result: list[Publication] | BrokerError) -> None:
            if fut.done():
                return
            if isinstance(result, BrokerError):
                fut.set_exception(result)
            else:
                fut.set_result(result[0])

        self.broker.publish_many([req], done)
        return fut

    def publish_request(
        self,
        channel: str,
        data: Any,
        ns: Namespace,
        info: dict[str, Any] | None = None,
        rid: int | str | None = None,
    ) -> PublishRequest:
        """A size-checked request for ``broker.publish_many`` (message_too_large if ``data`` is too big)."""
        limit = ns.max_message_size or self.settings.max_message_size
        encoded = orjson.dumps(data)
        if len(encoded) > limit:
            raise ProtocolError(
                ErrorCode.MESSAGE_TOO_LARGE, f"data is {len(encoded)} bytes; the limit here is {limit}", rid
            )
        return PublishRequest(channel, data, ns.history, info, encoded)

    async def history(
        self, channel: str, ns: Namespace, since: StreamPosition | None, limit: int | None
    ) -> tuple[HistoryResult, bool | None]:
        """History for a reader; with ``since`` also whether it was complete (the recovery verdict)."""
        if ns.history_size <= 0:
            raise ProtocolError(ErrorCode.NOT_AVAILABLE, f"namespace {ns.name!r} keeps no history")
        if since is None:
            return await self.broker.history(channel, ns.history, limit=limit), None
        res = await self.broker.history(channel, ns.history, since=since.offset, limit=limit)
        ok = can_recover(res, since)
        if not ok:
            res.publications = []
        return res, ok


NODE = web.AppKey("tidings.node", Node)
