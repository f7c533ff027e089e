"""``tidings.SyncHTTPClient``: the HTTP API without an event loop, for Django/Flask views, scripts, Celery
tasks and thread pools. Same methods, retries and idempotency keys as
:class:`~tidings.client.http.HTTPClient` (requests are shaped and replies read in
:mod:`tidings.client.calls`); the bytes move over a urllib3 connection pool.

Why urllib3 (2.x): it is the library under requests, well kept, with a thread-safe connection pool that
keeps connections alive between requests, per-request connect/read timeouts, no event loop and no
dependencies of its own; requests on top of it would add four packages and nothing this client needs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import urllib3
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import ProtocolError
from urllib3.exceptions import TimeoutError as Urllib3Timeout

from ..protocol import Publication, StreamPosition
from . import calls
from .calls import ApiError, Attempts, BatchEntry, Call, PublishResult, RetryPolicy

__all__ = ["SyncHTTPClient"]

T = TypeVar("T")

# No answer: worth another attempt (with the same idempotency keys). NewConnectionError is a
# ConnectTimeoutError in urllib3 2, so refused connections are covered by its TimeoutError.
TRANSIENT: tuple[type[BaseException], ...] = (Urllib3Timeout, ProtocolError, OSError)


class SyncHTTPClient:
    """``api = SyncHTTPClient("http://127.0.0.1:8888", api_key); api.publish("chat:lobby", {"text": "hi"})``.

    Thread-safe: share one instance (for example one per process, created at import time) between
    threads; connections are kept alive and reused (up to ``pool_size`` idle ones; more are opened when
    more threads call at once, and closed after use). ``timeout`` bounds each attempt (connect and each
    read, seconds); a request that timed out or whose connection failed is sent again up to ``retries``
    times within ``retry_deadline`` seconds, with the same idempotency keys. No event loop is used.
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8888",
        api_key: str = "",
        *,
        timeout: float = 10.0,
        retries: int = 3,
        retry_deadline: float = 30.0,
        pool_size: int = 10,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        url = urllib3.util.parse_url(self.base_url)
        self._prefix = (url.path or "").rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.retry = RetryPolicy(retries=retries, deadline=retry_deadline)
        self._lock = threading.Lock()
        self._retry_count = 0
        self.pool_size = pool_size
        self._pool = self._new_pool()

    def __enter__(self) -> SyncHTTPClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the pooled connections (the client stays usable: new ones are opened)."""
        old, self._pool = self._pool, self._new_pool()
        old.close()

    def _new_pool(self) -> urllib3.HTTPConnectionPool:
        # block=False: a thread never waits for a pooled connection; beyond pool_size it opens one more.
        return urllib3.connection_from_url(self.base_url, maxsize=self.pool_size, block=False, retries=False)

    @property
    def retry_count(self) -> int:
        """Attempts that were retries, over the client's life."""
        return self._retry_count

    def pool_stats(self) -> dict[str, int]:
        """``{"connections": opened so far, "requests": sent so far}`` of the connection pool."""
        return {"connections": self._pool.num_connections, "requests": self._pool.num_requests}

    def call(self, call: Call[T]) -> T:
        """Send one request (with retries) and read its reply."""
        attempts = Attempts(self.retry, self.timeout)
        headers = calls.headers(self.api_key, call)
        while True:
            t = attempts.attempt_timeout()
            try:
                resp = self._pool.urlopen(
                    call.method,
                    self._prefix + call.target,
                    body=call.body,
                    headers=headers,
                    timeout=urllib3.Timeout(connect=t, read=t),
                    retries=False,
                    redirect=False,
                    preload_content=True,
                )
            except TRANSIENT as exc:
                pause = attempts.retry_after()
                if pause is None:
                    raise calls.give_up(exc, attempts.n) from exc
                with self._lock:
                    self._retry_count += 1
                time.sleep(pause)
                continue
            except Urllib3Error as exc:  # not a transport failure (e.g. a bad URL): no retry
                raise ApiError(0, "bad_request", str(exc)) from exc
            return call.parse(calls.decode(resp.status, resp.data))

    def publish(
        self,
        channel: str,
        data: Any,
        info: dict[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> PublishResult:
        """Publish one message; returns ``{offset, epoch, id}``. Without ``idempotency_key`` one is
        generated, so the automatic retries never store it twice."""
        return self.call(calls.publish_call(channel, data, info, idempotency_key))

    def broadcast(
        self,
        channels: list[str],
        data: Any,
        info: dict[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> list[dict[str, Any]]:
        """The same data to many channels: one result per channel (position, or ``error``)."""
        return self.call(calls.broadcast_call(channels, data, info, idempotency_key))

    def batch(self, entries: Iterable[BatchEntry | Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Many publications in one request; one result per entry, in order."""
        return self.call(calls.batch_call(entries))

    def history(
        self, channel: str, *, limit: int | None = None, since: StreamPosition | None = None
    ) -> tuple[list[Publication], StreamPosition, bool | None]:
        """``(publications, position, recovered)``: oldest first; ``recovered`` only with ``since``."""
        return self.call(calls.history_call(channel, limit=limit, since=since))

    def presence(self, channel: str) -> list[dict[str, Any]]:
        """The clients subscribed to ``channel``: ``[{"client", "user"}, ...]``."""
        return self.call(calls.presence_call(channel))

    def channels(self) -> dict[str, int]:
        """Channels with subscribers on this node: ``{channel: subscribers}``."""
        return self.call(calls.channels_call())

    def health(self) -> dict[str, Any]:
        return self.call(calls.health_call())
