"""``tidings.Client``: the asyncio WebSocket client (parity with tidings.js, see docs/python-client.md).

It reconnects with backoff and jitter and recovers every subscription from the last position it saw, so
an application loses nothing across a server restart; renews connection and subscription tokens in-band
before they expire; retries transient refusals; and never drops a subscription without telling the
application (an ``unsubscribed`` event, and the :class:`Subscription` ends with ``end_reason``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import itertools
import logging
import random
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final, Literal

import aiohttp
import orjson

from ..protocol import CloseCode, ErrorCode, Publication, StreamPosition

__all__ = [
    "EVENTS",
    "Client",
    "ClientClosed",
    "ConnectedEvent",
    "ConnectionLost",
    "DisconnectEvent",
    "GapEvent",
    "HistoryPage",
    "PresenceEvent",
    "ReconnectingEvent",
    "RequestError",
    "RequestTimeout",
    "State",
    "SubscribedEvent",
    "Subscription",
    "TidingsError",
    "TokenGetter",
    "UnsubscribedEvent",
]

log = logging.getLogger("tidings.client")

State = Literal["disconnected", "connecting", "connected", "closed"]
TokenGetter = Callable[[], "str | Awaitable[str]"]
"""A function returning a token, or a coroutine function (``async def``) returning one."""
Handler = Callable[..., Any]

EVENTS: Final = frozenset(
    {
        "state",
        "connected",
        "disconnect",
        "reconnecting",
        "subscribed",
        "gap",
        "join",
        "leave",
        "unsubscribed",
        "error",
        "message",
    }
)
# Refusals of a (re)subscribe worth retrying on the same connection (token_expired: with a fresh token).
TRANSIENT: Final = frozenset({"unavailable", "rate_limited", "token_expired", "internal", "timeout"})
# Refusals of ``connect`` after which a new connection (with a fresh token) may succeed.
CONNECT_TRANSIENT: Final = frozenset({"unavailable", "rate_limited", "internal", "timeout"})
_CONNECT_FINAL = (ErrorCode.UNAUTHORIZED, ErrorCode.TOKEN_EXPIRED)
STABLE_AFTER = 5.0  # seconds a connection must have lived for the backoff to start over


# ---------------------------------------------------------------------------------------------- errors


class TidingsError(Exception):
    """Base of the client's errors: ``code`` is a server error code or a client one (``timeout``,
    ``disconnected``, ``closed``, ``token``, ``bad_frame``); ``channel`` and ``op`` when they apply."""

    def __init__(
        self, message: str, *, code: str = "internal", channel: str | None = None, op: str | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.channel = channel
        self.op = op


class RequestError(TidingsError):
    """The server refused a request: ``code`` is one of the documented error codes."""

    def __init__(self, code: str, message: str, *, channel: str | None = None, op: str | None = None) -> None:
        super().__init__(f"{code}: {message}", code=code, channel=channel, op=op)
        self.message = message


class RequestTimeout(RequestError, TimeoutError):
    """No reply within the request timeout (code ``timeout``); the server may still act on it."""

    def __init__(self, message: str, *, channel: str | None = None, op: str | None = None) -> None:
        super().__init__("timeout", message, channel=channel, op=op)


class ConnectionLost(TidingsError, ConnectionError):
    """The connection dropped while a request was in flight (code ``disconnected``); it may or may not
    have been applied."""

    def __init__(
        self, message: str = "connection lost", *, channel: str | None = None, op: str | None = None
    ):
        super().__init__(message, code="disconnected", channel=channel, op=op)


class ClientClosed(TidingsError, ConnectionError):
    """The client was closed, or stopped for good (the server said not to reconnect, or refused the
    credentials): code ``closed``."""

    def __init__(self, message: str = "client closed") -> None:
        super().__init__(message, code="closed")


# ---------------------------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class ConnectedEvent:
    """``connected``: the server answered ``connect``; subscriptions are being restored."""

    client: str
    version: int
    user: str = ""


@dataclass(frozen=True, slots=True)
class DisconnectEvent:
    """``disconnect``: the connection closed. ``code``/``reason`` come from the server's ``disconnect``
    push if there was one, else from the close frame (1006: dropped). ``reconnect`` False: the client
    stopped (state ``closed``)."""

    code: int
    reason: str
    reconnect: bool


@dataclass(frozen=True, slots=True)
class ReconnectingEvent:
    """``reconnecting``: attempt number ``attempt`` starts in ``delay`` seconds."""

    attempt: int
    delay: float


@dataclass(frozen=True, slots=True)
class SubscribedEvent:
    """``subscribed``: each successful (re)subscribe. ``recovered`` only when sent with ``since``."""

    channel: str
    offset: int
    epoch: str
    recovered: bool | None


@dataclass(frozen=True, slots=True)
class GapEvent:
    """``gap``: publications may be missing; reload history. ``reason``: ``not_recovered`` (the server
    could not replay), ``epoch`` (the stream restarted: drop what you have), ``missing`` (a push skipped
    offsets ``missing`` = (first, last); should not happen)."""

    channel: str
    reason: Literal["not_recovered", "epoch", "missing"]
    epoch_changed: bool
    previous: StreamPosition | None
    position: StreamPosition
    missing: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class PresenceEvent:
    """``join`` / ``leave`` (namespaces with ``join_leave``)."""

    channel: str
    client: str
    user: str


@dataclass(frozen=True, slots=True)
class UnsubscribedEvent:
    """``unsubscribed``: a subscription ended without the application asking: the server ended it (its
    grant expired and could not be renewed, or the rights were withdrawn), or a re-subscribe was refused
    for good. The :class:`Subscription` has ended (``end_code``, ``end_reason``). Never for
    ``insufficient_state``: then the client subscribes again from its position by itself."""

    channel: str
    code: str
    reason: str
    resubscribe: bool


@dataclass(slots=True)
class HistoryPage:
    publications: list[Publication]
    position: StreamPosition
    recovered: bool | None = None


def renew_delay(ttl: float) -> float:
    """When to renew a token that expires in ``ttl`` seconds (docs/protocol.md)."""
    return ttl * 0.5 if ttl < 120 else ttl - 60


async def _fetch_token(fn: TokenGetter, channel: str | None = None) -> str:
    try:
        token = fn()
        if inspect.isawaitable(token):
            token = await token
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        what = f"get_token for {channel}" if channel else "get_token"
        raise TidingsError(f"{what} failed: {exc!r}", code="token", channel=channel) from exc
    if not isinstance(token, str) or not token:
        raise TidingsError("get_token must return a non-empty string", code="token", channel=channel)
    return token


# ---------------------------------------------------------------------------------------------- subscription


class Subscription:
    """Publications of one channel, in order, without duplicates, across reconnects.

    Iterate it (``async for pub in sub``) or ``await sub.get()``. ``position`` is the last position seen;
    ``gaps`` counts the ``gap`` events (``on_gap`` is called then). When the subscription ends without
    ``unsubscribe()`` (a refused re-subscribe, a grant that ended, the client stopped) ``end_code`` and
    ``end_reason`` say why, iteration stops and ``get()`` raises :class:`ClientClosed`.
    """

    def __init__(
        self,
        client: Client,
        channel: str,
        since: StreamPosition | None,
        on_gap: Callable[[Subscription], None] | None,
        token: str | None = None,
        get_token: TokenGetter | None = None,
    ) -> None:
        self.client = client
        self.channel = channel
        self.position = since
        self.on_gap = on_gap
        self.token = token
        self.get_token = get_token
        self.gaps = 0
        self.recovered: bool | None = None
        self.end_code: str | None = None
        self.end_reason = ""  # why it ended, if it did: "<code>: <reason>"
        self.expires_in: float | None = None  # ttl of the grant, from the last subscribe/refresh reply
        self._queue: asyncio.Queue[Publication | None] = asyncio.Queue()
        self._active = True
        self._first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._renewal: asyncio.Task[None] | None = None
        self._driver: asyncio.Task[None] | None = None
        self._driver_conn: _Conn | None = None
        self._again = False  # subscribe once more after the running attempt

    @property
    def active(self) -> bool:
        return self._active

    def _end(self, code: str | None = None, reason: str = "") -> None:
        if not self._active:
            return
        self._active = False
        if code is not None:
            self.end_code = code
            self.end_reason = f"{code}: {reason}" if reason else code
        if self._renewal is not None:
            self._renewal.cancel()
            self._renewal = None
        if not self._first.done():
            self._first.set_exception(RequestError(code or "closed", reason or "ended", channel=self.channel))
            self._first.exception()  # retrieved: nobody may be waiting
        self._queue.put_nowait(None)

    async def get(self, timeout: float | None = None) -> Publication:
        """The next publication (raises ClientClosed when the subscription ended)."""
        item = await asyncio.wait_for(self._queue.get(), timeout)
        if item is None:
            self._queue.put_nowait(None)
            why = f": {self.end_reason}" if self.end_reason else ""
            raise ClientClosed(f"subscription to {self.channel} ended{why}")
        return item

    def __aiter__(self) -> AsyncIterator[Publication]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[Publication]:
        while True:
            item = await self._queue.get()
            if item is None:
                self._queue.put_nowait(None)
                return
            yield item

    async def unsubscribe(self) -> None:
        await self.client.unsubscribe(self.channel)


# ---------------------------------------------------------------------------------------------- connection


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future[dict[str, Any]]
    on_ok: Callable[[dict[str, Any]], None] | None


class _Conn:
    """One WebSocket connection and what lives only as long as it does."""

    __slots__ = ("alive", "close_reason", "disconnect", "pending", "tasks", "ws")

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.pending: dict[int, _Pending] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.alive = True
        self.disconnect: DisconnectEvent | None = None  # the server's ``disconnect`` push
        self.close_reason = ""  # the reason of the server's close frame

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("client task failed", exc_info=task.exception())

    def end(self, exc: BaseException) -> None:
        self.alive = False
        for task in list(self.tasks):
            task.cancel()
        for p in self.pending.values():
            if not p.future.done():
                p.future.set_exception(exc)
        self.pending.clear()


class Client:
    """Connects to a tidings server's ``/ws``.

    ``async with Client("ws://127.0.0.1:8888/ws") as c: sub = await c.subscribe("chat:lobby")``.
    Every option, method and event is documented in docs/python-client.md.
    """

    def __init__(
        self,
        url: str = "ws://127.0.0.1:8888/ws",
        *,
        token: str | None = None,
        get_token: TokenGetter | None = None,
        min_backoff: float = 0.1,
        max_backoff: float = 10.0,
        request_timeout: float = 10.0,
        publish_timeout: float = 30.0,
        heartbeat: float | None = 20.0,
        reconnect: bool = True,
    ) -> None:
        self.url = url
        self._where = url.split("?", 1)[0]  # for log lines and errors: a ?token= stays out of them
        self.token = token
        self.get_token = get_token
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.request_timeout = request_timeout
        self.publish_timeout = publish_timeout
        self.heartbeat = heartbeat
        self.reconnect = reconnect
        self.state: State = "disconnected"
        self.client_id: str | None = None
        self.user: str | None = None
        self.expires_in: float | None = None  # ttl of the connection token, from the last connect reply
        self.subscriptions: dict[str, Subscription] = {}
        self.connects = 0  # successful connections so far
        self.publish_retries = 0  # publishes sent again (same idempotency key) after a timeout or drop
        self.renewals = 0  # in-band token renewals that succeeded (connection and subscription tokens)
        self._ids = itertools.count(1)
        self._handlers: dict[str, list[Handler]] = {}
        self._bg: set[asyncio.Task[Any]] = set()
        self._conn: _Conn | None = None
        self._session: aiohttp.ClientSession | None = None
        self._runner: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._closed = False
        self._fatal: ClientClosed | None = None

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self.state == "connected"

    # ------------------------------------------------------------------------------ events

    def on(self, event: str, fn: Handler) -> Callable[[], None]:
        """Call ``fn`` (a function or a coroutine function) on ``event``; returns a function that
        removes it. An exception in ``fn`` is logged and never breaks the client."""
        if event not in EVENTS:
            raise ValueError(f"unknown event {event!r}; known: {', '.join(sorted(EVENTS))}")
        self._handlers.setdefault(event, []).append(fn)
        return lambda: self.off(event, fn)

    def off(self, event: str, fn: Handler | None = None) -> None:
        """Remove ``fn`` from ``event``, or every handler of ``event``."""
        handlers = self._handlers.get(event)
        if not handlers:
            return
        if fn is None:
            handlers.clear()
        else:
            with contextlib.suppress(ValueError):
                handlers.remove(fn)

    def once(self, event: str, fn: Handler) -> Callable[[], None]:
        """Like ``on``, for the next ``event`` only."""

        def wrapper(*args: Any) -> Any:
            remove()
            return fn(*args)

        remove = self.on(event, wrapper)
        return remove

    def _emit(self, event: str, *args: Any) -> None:
        for fn in list(self._handlers.get(event, ())):
            try:
                result = fn(*args)
                if inspect.isawaitable(result):
                    task = asyncio.ensure_future(result)
                    self._bg.add(task)
                    task.add_done_callback(self._handler_done)
            except Exception:
                log.exception("tidings client: %s handler failed", event)

    def _handler_done(self, task: asyncio.Task[Any]) -> None:
        self._bg.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("tidings client: async event handler failed", exc_info=task.exception())

    def _set_state(self, state: State) -> None:
        prev = self.state
        if prev == state:
            return
        self.state = state
        self._emit("state", state, prev)

    def _error(self, exc: TidingsError) -> None:
        log.info("tidings client error: %s", exc)
        self._emit("error", exc)

    # ------------------------------------------------------------------------------ lifecycle

    async def connect(self, timeout: float | None = None) -> None:
        """Start the connection loop and wait for the first connection (ConnectionError after
        ``timeout``, default ``request_timeout``; ClientClosed if the server refused for good)."""
        if self._fatal is not None:
            raise self._fatal
        if self._closed:
            raise ClientClosed("client closed")
        if self._runner is None:
            self._session = aiohttp.ClientSession()
            self._runner = asyncio.get_running_loop().create_task(self._run())
        await self._wait_connected(timeout or self.request_timeout)

    async def close(self) -> None:
        """Close for good: no reconnect; waiting requests fail with ClientClosed, subscriptions end."""
        self._closed = True
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None
        if self._conn is not None:
            self._conn.end(ClientClosed("client closed"))
            if not self._conn.ws.closed:
                await self._conn.ws.close()
            self._conn = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        for sub in list(self.subscriptions.values()):
            sub._end()
        self._connected.set()  # wake waiters so they see the client is closed
        self._set_state("closed")
        for task in list(self._bg):
            task.cancel()

    async def _wait_connected(self, timeout: float) -> _Conn:
        if self._fatal is not None:
            raise self._fatal
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError:
            raise ConnectionError(f"not connected to {self._where} after {timeout:.1f}s") from None
        if self._fatal is not None:
            raise self._fatal
        if self._closed or self._conn is None:
            raise ClientClosed("client closed")
        return self._conn

    def _stop(self, exc: ClientClosed) -> None:
        """Stop for good (the server refused the credentials or said not to reconnect)."""
        log.warning("tidings client stopped: %s", exc)
        self._fatal = exc
        self._closed = True
        self._connected.set()  # wake waiters so they see the error
        for sub in list(self.subscriptions.values()):
            sub._end("closed", str(exc))
        self._set_state("closed")

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with full jitter: uniform in [min, min(max, min * 2**attempt)]."""
        cap = min(self.max_backoff, self.min_backoff * 2 ** min(attempt, 30))
        return random.uniform(self.min_backoff, max(self.min_backoff, cap))

    # ------------------------------------------------------------------------------ requests

    async def request(self, op: str, *, timeout: float | None = None, **fields: Any) -> dict[str, Any]:
        """Send one command (waiting up to ``request_timeout`` for a connection) and wait for its reply;
        raises RequestError for an error reply, RequestTimeout, ConnectionLost if the connection drops."""
        if self._closed:
            raise self._fatal or ClientClosed("client closed")
        conn = await self._wait_connected(self.request_timeout)
        return await self._call(conn, op, fields, timeout=timeout)

    async def _call(
        self,
        conn: _Conn,
        op: str,
        fields: dict[str, Any],
        *,
        timeout: float | None = None,
        on_ok: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """One command on ``conn``. ``on_ok`` runs in the reader, in frame order, before later pushes."""
        channel = fields.get("channel")
        channel = channel if isinstance(channel, str) else None
        if not conn.alive or conn.ws.closed:
            raise ConnectionLost("not connected", channel=channel, op=op)
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        conn.pending[rid] = _Pending(fut, on_ok)
        wait = self.request_timeout if timeout is None else timeout
        try:
            await conn.ws.send_str(orjson.dumps({"id": rid, "op": op, **fields}).decode())
            reply = await asyncio.wait_for(fut, wait)
        except TimeoutError:
            raise RequestTimeout(f"{op} got no reply within {wait:.1f}s", channel=channel, op=op) from None
        except TidingsError:
            raise
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise ConnectionLost(f"connection lost: {exc}", channel=channel, op=op) from exc
        finally:
            conn.pending.pop(rid, None)
        if not reply.get("ok"):
            err = reply.get("error") or {}
            code, msg = str(err.get("code", ErrorCode.INTERNAL)), str(err.get("message", ""))
            raise RequestError(code, msg, channel=channel, op=op)
        result = reply.get("result") or {}
        assert isinstance(result, dict)
        return result

    async def subscribe(
        self,
        channel: str,
        since: StreamPosition | None = None,
        on_gap: Callable[[Subscription], None] | None = None,
        *,
        token: str | None = None,
        get_token: TokenGetter | None = None,
        timeout: float | None = None,
    ) -> Subscription:
        """Subscribe; with ``since``, first receive everything published after it (if still retained).

        ``token`` is a fixed subscription token; ``get_token`` (sync or async, overrides ``token``) is
        called before each (re)subscribe and to renew the grant in-band before it expires. Returns once
        the server accepted (transient refusals are retried within ``timeout``, default
        ``request_timeout``); raises RequestError for a permanent refusal and drops the subscription.
        """
        if channel in self.subscriptions:
            raise RequestError(
                str(ErrorCode.ALREADY_SUBSCRIBED), f"already subscribed to {channel!r}", channel=channel
            )
        wait = timeout or self.request_timeout
        deadline = asyncio.get_running_loop().time() + wait
        conn = await self._wait_connected(wait)
        sub = Subscription(self, channel, since, on_gap, token, get_token)
        self.subscriptions[channel] = sub
        self._drive(conn, sub)
        left = max(0.0, deadline - asyncio.get_running_loop().time())
        try:
            await asyncio.wait_for(asyncio.shield(sub._first), left)
        except TimeoutError:
            self._forget(sub, unsubscribe=True)
            raise RequestTimeout(
                f"subscribe to {channel} not accepted within {wait:.1f}s", channel=channel, op="subscribe"
            ) from None
        except BaseException:
            self._forget(sub)
            raise
        return sub

    def _forget(self, sub: Subscription, unsubscribe: bool = False) -> None:
        """Drop a subscription the application will not get (its first subscribe failed)."""
        if self.subscriptions.get(sub.channel) is sub:
            del self.subscriptions[sub.channel]
        sub._end("unsubscribed")
        conn = self._conn
        if unsubscribe and conn is not None and conn.alive:  # it may have been accepted meanwhile
            conn.spawn(self._quiet_unsubscribe(conn, sub.channel))

    async def _quiet_unsubscribe(self, conn: _Conn, channel: str) -> None:
        with contextlib.suppress(TidingsError):
            await self._call(conn, "unsubscribe", {"channel": channel})

    async def unsubscribe(self, channel: str) -> None:
        """Stop the subscription (ends its iteration); nothing is sent if it is not subscribed."""
        sub = self.subscriptions.pop(channel, None)
        if sub is not None:
            sub._end()
        conn = self._conn
        if conn is None or not conn.alive or self._closed:
            return
        try:
            await self._call(conn, "unsubscribe", {"channel": channel})
        except RequestError as exc:
            if exc.code != ErrorCode.NOT_SUBSCRIBED:
                raise
        except ConnectionLost:
            pass  # the server forgets the subscription with the connection

    def position(self, channel: str) -> StreamPosition | None:
        """The last position delivered (or announced by the server) on ``channel``."""
        sub = self.subscriptions.get(channel)
        return sub.position if sub is not None else None

    async def publish(
        self,
        channel: str,
        data: Any,
        *,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> StreamPosition:
        """Publish; returns the publication's position once the server stored it.

        A random ``idempotency_key`` is generated unless given. When the reply does not come (the
        request timed out, or the connection dropped: after the reconnect) the same publication is sent
        again with the same key until ``timeout`` (default ``publish_timeout``) has passed, so it is
        stored exactly once. Error replies are raised at once (RequestError)."""
        key = idempotency_key if idempotency_key is not None else secrets.token_hex(16)
        loop = asyncio.get_running_loop()
        limit = self.publish_timeout if timeout is None else timeout
        deadline = loop.time() + limit
        fields = {"channel": channel, "data": data, "idempotency_key": key}
        while True:
            if self._closed:
                raise self._fatal or ClientClosed("client closed")
            left = deadline - loop.time()
            try:
                conn = await self._wait_connected(max(0.01, left))
                result = await self._call(
                    conn, "publish", fields, timeout=max(0.01, min(self.request_timeout, left))
                )
                return StreamPosition(int(result["offset"]), str(result["epoch"]))
            except (ConnectionLost, RequestTimeout) as exc:
                if self._closed:
                    raise self._fatal or ClientClosed("client closed") from exc
                if loop.time() >= deadline:
                    raise
                self.publish_retries += 1
                log.info("publish to %s: %s; sending again with the same key", channel, exc)

    async def history(
        self, channel: str, *, limit: int | None = None, since: StreamPosition | None = None
    ) -> HistoryPage:
        fields: dict[str, Any] = {"channel": channel}
        if limit is not None:
            fields["limit"] = limit
        if since is not None:
            fields["since"] = since.to_json()
        r = await self.request("history", **fields)
        return HistoryPage(
            [Publication.from_json(p) for p in r["publications"]],
            StreamPosition(int(r["offset"]), str(r["epoch"])),
            r.get("recovered"),
        )

    async def presence(self, channel: str) -> list[dict[str, Any]]:
        r = await self.request("presence", channel=channel)
        clients = r["clients"]
        assert isinstance(clients, list)
        return clients

    async def ping(self) -> None:
        await self.request("ping")

    # ------------------------------------------------------------------------------ connection loop

    async def _run(self) -> None:
        attempt = 0
        assert self._session is not None
        while not self._closed:
            self._set_state("connecting")
            up_for = 0.0
            try:
                token = await self._connection_token()
                ws = await asyncio.wait_for(
                    self._session.ws_connect(
                        self.url, heartbeat=self.heartbeat, max_msg_size=0, autoping=True
                    ),
                    self.request_timeout,
                )
            except TidingsError as exc:  # get_token failed
                self._error(exc)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                log.info("connect to %s failed: %s", self._where, exc or type(exc).__name__)
            else:
                started = time.monotonic()
                event, stop = await self._serve(_Conn(ws), token)
                if self._closed:
                    return
                up_for = time.monotonic() - started
                if stop is None and not (event.reconnect and self.reconnect):
                    stop = ClientClosed(f"server closed the connection: {event.code} {event.reason}".rstrip())
                if stop is None and event.code == CloseCode.TOKEN_EXPIRED and self.get_token is None:
                    # A fixed token stays expired: reconnecting with it can only be refused again.
                    stop = ClientClosed("the connection token expired and there is no get_token to renew it")
                self._emit("disconnect", DisconnectEvent(event.code, event.reason, stop is None))
                if stop is not None:
                    self._stop(stop)
                    session, self._session = self._session, None
                    await session.close()  # nothing more to connect; close() need not be called
                    return
            if self._closed:
                return
            self._set_state("disconnected")
            attempt = 1 if up_for >= STABLE_AFTER else attempt + 1
            delay = self._backoff(attempt)
            self._emit("reconnecting", ReconnectingEvent(attempt, delay))
            await asyncio.sleep(delay)

    async def _connection_token(self) -> str | None:
        if self.get_token is not None:
            self.token = await _fetch_token(self.get_token)
        return self.token

    async def _serve(self, conn: _Conn, token: str | None) -> tuple[DisconnectEvent, ClientClosed | None]:
        """Run one connection until it closes: what the ``disconnect`` event says, and why to stop."""
        reader = asyncio.get_running_loop().create_task(self._read(conn))
        stop: ClientClosed | None = None
        try:
            try:
                result = await self._call(conn, "connect", {"token": token} if token else {})
            except RequestTimeout:
                log.info("connect to %s: no reply in time", self._where)
            except ConnectionLost:
                pass
            except RequestError as exc:
                self._error(exc)
                retry = exc.code in CONNECT_TRANSIENT or (
                    exc.code == ErrorCode.TOKEN_EXPIRED and self.get_token is not None
                )
                if not retry:
                    stop = ClientClosed(f"connect refused: {exc}")
            else:
                self._connected_on(conn, result)
                await asyncio.shield(reader)
        finally:
            self._connected.clear()
            if self._conn is conn:
                self._conn = None
            conn.end(ConnectionLost("connection lost"))
            for sub in self.subscriptions.values():
                sub._renewal = None
            if not conn.ws.closed:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.ws.close(), 2.0)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
        return self._close_event(conn), stop

    def _close_event(self, conn: _Conn) -> DisconnectEvent:
        push = conn.disconnect
        if push is not None:
            return push
        code = conn.ws.close_code
        if code is None:
            return DisconnectEvent(1006, "connection dropped", True)
        reconnect = True
        if code in CloseCode._value2member_map_:
            cc = CloseCode(code)
            reconnect = cc is CloseCode.NORMAL or cc.reconnect
        return DisconnectEvent(code, conn.close_reason, reconnect)

    def _connected_on(self, conn: _Conn, result: dict[str, Any]) -> None:
        self.client_id = str(result.get("client", "")) or None
        self.user = str(result.get("user", ""))
        self._conn = conn
        self._schedule_renewal(conn, result)
        for sub in list(self.subscriptions.values()):
            self._drive(conn, sub)
        self.connects += 1
        self._connected.set()
        self._set_state("connected")
        self._emit(
            "connected", ConnectedEvent(self.client_id or "", int(result.get("version", 1)), self.user)
        )

    # ------------------------------------------------------------------------------ connection token

    @staticmethod
    def _ttl(result: dict[str, Any]) -> float | None:
        ttl = result.get("ttl")
        if isinstance(ttl, int | float) and not isinstance(ttl, bool):
            return float(ttl)
        expires = result.get("expires")  # a server without ``ttl``: from our own clock
        if isinstance(expires, int | float) and not isinstance(expires, bool):
            return float(expires) - time.time()
        return None

    def _schedule_renewal(self, conn: _Conn, result: dict[str, Any]) -> None:
        ttl = self._ttl(result)
        self.expires_in = ttl
        if ttl is None or self.get_token is None:
            return
        conn.spawn(self._renew_connection(conn, ttl))

    async def _renew_connection(self, conn: _Conn, ttl: float) -> None:
        """Renew the connection token in-band before it expires: ``connect`` with a fresh token."""
        get_token = self.get_token
        assert get_token is not None

        async def renew() -> dict[str, Any]:
            token = await _fetch_token(get_token)
            result = await self._call(conn, "connect", {"token": token})
            self.token = token
            return result

        # unauthorized: the server closes with 4001 (stop); token_expired: 4002, the reconnect gets a
        # fresh token. Giving up at expiry: the server closes with 4002 too.
        result = await self._renew_in_band(conn, ttl, renew, lambda: True, quiet=(), final=_CONNECT_FINAL)
        if result is not None:
            self.renewals += 1
            self._schedule_renewal(conn, result)

    async def _renew_in_band(
        self,
        conn: _Conn,
        ttl: float,
        renew: Callable[[], Awaitable[dict[str, Any]]],
        wanted: Callable[[], bool],
        *,
        quiet: tuple[str, ...],
        final: tuple[str, ...],
    ) -> dict[str, Any] | None:
        """At :func:`renew_delay` of ``ttl``, ``renew()``; a failure is reported (``error``; not for codes
        in ``quiet``) and retried with backoff until the token would have expired. Returns the reply, or
        None when the connection dropped, ``wanted()`` turned false, a ``quiet``/``final`` code came, or
        time ran out (the server then ends what the token granted, which has its own path)."""
        loop = asyncio.get_running_loop()
        expiry = loop.time() + ttl
        await asyncio.sleep(max(0.0, renew_delay(ttl)))
        attempt = 0
        while conn.alive and wanted():
            try:
                return await renew()
            except ConnectionLost:
                return None
            except TidingsError as exc:
                if exc.code in quiet:
                    return None
                self._error(exc)
                if exc.code in final:
                    return None
                attempt += 1
                left = expiry - loop.time()
                if left <= 0:
                    return None
                await asyncio.sleep(min(self._backoff(attempt), left))
        return None

    # ------------------------------------------------------------------------------ subscriptions

    def _drive(self, conn: _Conn, sub: Subscription) -> None:
        """Start (re)subscribing ``sub`` on ``conn``; if that is under way already, it subscribes once
        more when done (the server may have ended what it just accepted)."""
        if sub._driver is not None and not sub._driver.done() and sub._driver_conn is conn:
            sub._again = True
            return
        sub._again = False
        sub._driver_conn = conn
        sub._driver = conn.spawn(self._subscribe_on(conn, sub))

    async def _subscribe_on(self, conn: _Conn, sub: Subscription) -> None:
        """(Re)subscribe ``sub`` on ``conn``; transient refusals are retried with backoff on the same
        connection, permanent ones end the subscription and tell the application."""
        attempt = 0
        timed_out = False
        while conn.alive and sub.active and self.subscriptions.get(sub.channel) is sub:
            try:
                token = await _fetch_token(sub.get_token, sub.channel) if sub.get_token else sub.token
                if timed_out:  # the server may hold it already: start over, from our position
                    try:
                        await self._call(conn, "unsubscribe", {"channel": sub.channel})
                    except RequestError as exc:
                        if isinstance(exc, RequestTimeout):
                            raise
                    timed_out = False  # not_subscribed is fine
            except ConnectionLost:
                return
            except TidingsError as exc:  # get_token failed, or the unsubscribe timed out
                if exc.code == "token":
                    self._error(exc)
                attempt += 1
                await asyncio.sleep(self._backoff(attempt))
                continue
            fields: dict[str, Any] = {"channel": sub.channel}
            since = sub.position
            if since is not None:
                fields["since"] = since.to_json()
            if token:
                fields["token"] = token
            try:
                await self._call(
                    conn,
                    "subscribe",
                    fields,
                    on_ok=functools.partial(self._on_subscribed, conn, sub, since),
                )
                if not sub._again:
                    return
                sub._again = False
                continue
            except ConnectionLost:
                return  # the next connection subscribes again
            except RequestError as exc:
                if not sub.active or self.subscriptions.get(sub.channel) is not sub:
                    return
                if exc.code == ErrorCode.ALREADY_SUBSCRIBED:  # a race with an earlier attempt
                    timed_out = True  # unsubscribe first, then subscribe from our position
                    attempt += 1
                    await asyncio.sleep(self._backoff(attempt))
                    continue
                permanent = exc.code not in TRANSIENT or (
                    exc.code == ErrorCode.TOKEN_EXPIRED and sub.get_token is None
                )
                if permanent:
                    self._refused(sub, exc)
                    return
                timed_out = isinstance(exc, RequestTimeout)
                if sub._first.done():
                    self._error(exc)
                attempt += 1
                delay = self._backoff(attempt)
                log.info("subscribe to %s: %s; retrying in %.2fs", sub.channel, exc.code, delay)
                await asyncio.sleep(delay)

    def _refused(self, sub: Subscription, exc: RequestError) -> None:
        """A permanent refusal: the subscription ends, and the application hears of it."""
        first = not sub._first.done()
        if self.subscriptions.get(sub.channel) is sub:
            del self.subscriptions[sub.channel]
        if first:  # subscribe() is waiting: it raises this
            sub._first.set_exception(exc)
            sub._end(exc.code, exc.message)
            return
        sub._end(exc.code, exc.message)
        log.warning("re-subscribe to %s refused: %s", sub.channel, exc)
        self._error(exc)
        self._emit("unsubscribed", UnsubscribedEvent(sub.channel, exc.code, exc.message, False))

    def _on_subscribed(
        self, conn: _Conn, sub: Subscription, since: StreamPosition | None, result: dict[str, Any]
    ) -> None:
        """The subscribe reply, in frame order (before the replay that follows it)."""
        if not sub.active or self.subscriptions.get(sub.channel) is not sub:
            return
        top = StreamPosition(int(result["offset"]), str(result["epoch"]))
        recovered = result.get("recovered")
        sub.recovered = recovered
        if since is None:
            if sub.position is None:
                sub.position = top
        elif recovered is not True:
            sub.position = top
            changed = since.epoch != top.epoch
            self._gap(
                sub, GapEvent(sub.channel, "epoch" if changed else "not_recovered", changed, since, top)
            )
        self._emit("subscribed", SubscribedEvent(sub.channel, top.offset, top.epoch, recovered))
        if not sub._first.done():
            sub._first.set_result(None)
        ttl = self._ttl(result) if "ttl" in result or "expires" in result else None
        sub.expires_in = ttl
        if ttl is not None and sub.get_token is not None:
            sub._renewal = conn.spawn(self._renew_grant(conn, sub, ttl))

    def _gap(self, sub: Subscription, event: GapEvent) -> None:
        sub.gaps += 1
        log.warning("%s: publications may be missing (%s)", sub.channel, event.reason)
        if sub.on_gap is not None:
            try:
                sub.on_gap(sub)
            except Exception:
                log.exception("on_gap failed")
        self._emit("gap", event)

    async def _renew_grant(self, conn: _Conn, sub: Subscription, ttl: float) -> None:
        """Renew a subscription's grant in-band (``refresh``) before it expires."""
        get_token = sub.get_token
        assert get_token is not None

        async def renew() -> dict[str, Any]:
            token = await _fetch_token(get_token, sub.channel)
            return await self._call(conn, "refresh", {"channel": sub.channel, "token": token})

        # not_subscribed: ended meanwhile; unknown_op: an older server; running out of time: the server
        # ends it with an ``unsubscribe`` push and the client subscribes again.
        result = await self._renew_in_band(
            conn,
            ttl,
            renew,
            lambda: sub.active and self.subscriptions.get(sub.channel) is sub,
            quiet=(ErrorCode.NOT_SUBSCRIBED, ErrorCode.UNKNOWN_OP),
            final=(),
        )
        if result is None:
            return
        self.renewals += 1
        ttl2 = self._ttl(result)
        sub.expires_in = ttl2
        if ttl2 is not None:
            sub._renewal = conn.spawn(self._renew_grant(conn, sub, ttl2))

    def _deliver(self, sub: Subscription, pub: Publication) -> None:
        """Exactly once, in offset order; older or repeated offsets are dropped."""
        pos = sub.position
        if pos is not None:
            if pub.epoch != pos.epoch:
                if pos.offset != 0:  # offset 0 belongs to no publication: any epoch continues it
                    prev = StreamPosition(pub.offset - 1, pub.epoch)
                    self._gap(sub, GapEvent(sub.channel, "epoch", True, pos, prev))
            elif pub.offset <= pos.offset:
                return
            elif pub.offset > pos.offset + 1:
                prev = StreamPosition(pub.offset - 1, pub.epoch)
                self._gap(
                    sub, GapEvent(sub.channel, "missing", False, pos, prev, (pos.offset + 1, pub.offset - 1))
                )
        sub.position = StreamPosition(pub.offset, pub.epoch)
        sub._queue.put_nowait(pub)
        self._emit("message", pub)

    def _on_unsubscribe_push(self, conn: _Conn, obj: dict[str, Any]) -> None:
        channel = str(obj.get("channel", ""))
        code, reason = str(obj.get("code", "")), str(obj.get("reason", ""))
        resubscribe = bool(obj.get("resubscribe"))
        sub = self.subscriptions.get(channel)
        if sub is None:
            return
        if sub._renewal is not None:
            sub._renewal.cancel()
            sub._renewal = None
        # ``insufficient_state``: the node could not keep the stream gapless (docs/protocol.md); the
        # subscription goes on from our position, as after a reconnect (its reply says ``recovered``).
        # An ended grant (``token_expired``) goes on only with a ``get_token`` for a fresh token.
        again = code == ErrorCode.INSUFFICIENT_STATE or (sub.get_token is not None and conn.alive)
        if resubscribe and again:
            log.info("the server ended the subscription to %s (%s); subscribing again", channel, code)
            if conn.alive:
                self._drive(conn, sub)
            return  # else the next connection subscribes again
        log.warning("the server ended the subscription to %s: %s (%s)", channel, code, reason)
        del self.subscriptions[channel]
        sub._end(code, reason)
        self._emit("unsubscribed", UnsubscribedEvent(channel, code, reason, resubscribe))

    # ------------------------------------------------------------------------------ frames

    async def _read(self, conn: _Conn) -> None:
        """Read frames until the connection closes; never raises."""
        while True:
            try:
                msg = await conn.ws.receive()
            except Exception as exc:
                log.info("tidings client: read failed: %r", exc)
                return
            if msg.type == aiohttp.WSMsgType.TEXT:
                try:
                    self._on_frame(conn, msg.data)
                except Exception as exc:
                    log.exception("tidings client: bad frame")
                    self._error(TidingsError(f"unreadable frame: {exc!r}", code="bad_frame"))
            elif msg.type == aiohttp.WSMsgType.CLOSE:
                conn.close_reason = str(msg.extra or "")
                return
            elif msg.type in (aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                return

    def _on_frame(self, conn: _Conn, data: str) -> None:
        obj = orjson.loads(data)
        if not isinstance(obj, dict):
            raise ValueError("a frame must be a JSON object")
        kind = obj.get("type")
        if kind is None:
            rid = obj.get("id")
            pending = conn.pending.get(rid) if isinstance(rid, int) else None
            if pending is None:
                if rid is None and obj.get("ok") is False:
                    err = obj.get("error") or {}
                    self._error(RequestError(str(err.get("code", "")), str(err.get("message", ""))))
                return
            if pending.future.done():
                return
            if obj.get("ok") and pending.on_ok is not None:
                result = obj.get("result") or {}
                try:
                    pending.on_ok(result)
                except Exception:
                    log.exception("tidings client: reply handler failed")
            pending.future.set_result(obj)
        elif kind == "message":
            sub = self.subscriptions.get(obj.get("channel", ""))
            if sub is not None and sub.active:
                self._deliver(sub, Publication.from_json(obj))
        elif kind in ("join", "leave"):
            event = PresenceEvent(
                str(obj.get("channel", "")), str(obj.get("client", "")), str(obj.get("user", ""))
            )
            self._emit(kind, event)
        elif kind == "disconnect":
            log.info("server disconnect: %s %s", obj.get("code"), obj.get("reason"))
            conn.disconnect = DisconnectEvent(
                int(obj.get("code", 1006)), str(obj.get("reason", "")), bool(obj.get("reconnect"))
            )
        elif kind == "unsubscribe":
            self._on_unsubscribe_push(conn, obj)
