"""``tidings.HTTPClient``: the HTTP API for asyncio backends (publish, broadcast, batch, history, presence,
channels, health). Requests are shaped and replies read in :mod:`tidings.client.calls`, shared with
:class:`~tidings.client.sync.SyncHTTPClient`; this module only moves bytes with aiohttp."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import aiohttp

from ..protocol import Publication, StreamPosition
from . import calls
from .calls import ApiError, Attempts, BatchEntry, Call, PublishResult, RetryPolicy

__all__ = ["ApiError", "BatchEntry", "HTTPClient", "PublishResult", "RetryPolicy"]

T = TypeVar("T")

# No answer: worth another attempt (with the same idempotency keys).
TRANSIENT: tuple[type[BaseException], ...] = (
    TimeoutError,
    aiohttp.ClientConnectionError,
    aiohttp.ClientPayloadError,
)


class HTTPClient:
    """``async with HTTPClient("http://127.0.0.1:8888", api_key) as api: await api.publish(ch, data)``.

    ``timeout`` bounds each attempt (seconds); a request that timed out or whose connection failed is
    sent again up to ``retries`` times within ``retry_deadline`` seconds, with the same idempotency keys,
    so a publication is stored once even when an answer was lost. ``retry_count`` counts those retries.
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8888",
        api_key: str = "",
        *,
        timeout: float = 10.0,
        retries: int = 3,
        retry_deadline: float = 30.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.retry = RetryPolicy(retries=retries, deadline=retry_deadline)
        self.retry_count = 0  # attempts that were retries, over the client's life
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> HTTPClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection pool (the client can still be used: a new pool is made)."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def call(self, call: Call[T]) -> T:
        """Send one request (with retries) and read its reply."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        attempts = Attempts(self.retry, self.timeout, asyncio.get_running_loop().time)
        headers = calls.headers(self.api_key, call)
        while True:
            timeout = aiohttp.ClientTimeout(total=attempts.attempt_timeout())
            try:
                async with self._session.request(
                    call.method, self.base_url + call.target, data=call.body, headers=headers, timeout=timeout
                ) as resp:
                    status, raw = resp.status, await resp.read()
            except TRANSIENT as exc:
                pause = attempts.retry_after()
                if pause is None:
                    raise calls.give_up(exc, attempts.n) from exc
                self.retry_count += 1
                await asyncio.sleep(pause)
                continue
            return call.parse(calls.decode(status, raw))

    async def publish(
        self,
        channel: str,
        data: Any,
        info: dict[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> PublishResult:
        """Publish one message; returns ``{offset, epoch, id}``. Without ``idempotency_key`` one is
        generated, so the automatic retries never store it twice."""
        return await self.call(calls.publish_call(channel, data, info, idempotency_key))

    async def broadcast(
        self,
        channels: list[str],
        data: Any,
        info: dict[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> list[dict[str, Any]]:
        """The same data to many channels: one result per channel (position, or ``error``)."""
        return await self.call(calls.broadcast_call(channels, data, info, idempotency_key))

    async def batch(self, entries: Iterable[BatchEntry | Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Many publications in one request (``POST /api/batch``): ``entries`` are :class:`BatchEntry`
        or mappings ``{channel, data, info?, idempotency_key?}``; one result per entry, in order."""
        return await self.call(calls.batch_call(entries))

    async def history(
        self, channel: str, *, limit: int | None = None, since: StreamPosition | None = None
    ) -> tuple[list[Publication], StreamPosition, bool | None]:
        """``(publications, position, recovered)``: oldest first; ``recovered`` only with ``since``."""
        return await self.call(calls.history_call(channel, limit=limit, since=since))

    async def presence(self, channel: str) -> list[dict[str, Any]]:
        """The clients subscribed to ``channel``: ``[{"client", "user"}, ...]``."""
        return await self.call(calls.presence_call(channel))

    async def channels(self) -> dict[str, int]:
        """Channels with subscribers on this node: ``{channel: subscribers}``."""
        return await self.call(calls.channels_call())

    async def health(self) -> dict[str, Any]:
        return await self.call(calls.health_call())
