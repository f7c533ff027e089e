"""``tidings.Client``: the asyncio WebSocket client. Reconnects with backoff and jitter and recovers every
subscription from the last position it saw, so an application loses nothing across a server restart."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from ..protocol import CloseCode, ErrorCode, Publication, StreamPosition

__all__ = ["Client", "ClientClosed", "ConnectionLost", "HistoryPage", "RequestError", "Subscription"]

log = logging.getLogger("tidings.client")


class RequestError(Exception):
    """The server refused a request: ``code`` is one of the documented error codes."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ConnectionLost(ConnectionError):
    """The connection dropped while a request was in flight; it may or may not have been applied."""


class ClientClosed(ConnectionError):
    """The client was closed, or the server told it not to reconnect."""


@dataclass(slots=True)
class HistoryPage:
    publications: list[Publication]
    position: StreamPosition
    recovered: bool | None = None


class Subscription:
    """Publications of one channel, in order, without duplicates, across reconnects.

    Iterate it (``async for pub in sub``). ``position`` is the last position seen; ``gaps`` counts the
    times the server could not recover (``recovered: false``), and ``on_gap`` is called then.
    """

    def __init__(
        self,
        client: Client,
        channel: str,
        since: StreamPosition | None,
        on_gap: Callable[[Subscription], None] | None,
    ) -> None:
        self.client = client
        self.channel = channel
        self.position = since
        self.on_gap = on_gap
        self.gaps = 0
        self.recovered: bool | None = None
        self._queue: asyncio.Queue[Publication | None] = asyncio.Queue()
        self._active = True

    def _accept(self, pub: Publication) -> None:
        pos = self.position
        if pos is not None and pos.epoch == pub.epoch and pub.offset <= pos.offset:
            return  # duplicate of something already delivered
        self.position = StreamPosition(pub.offset, pub.epoch)
        self._queue.put_nowait(pub)

    def _on_reply(self, result: dict[str, Any]) -> None:
        top = StreamPosition(int(result["offset"]), str(result["epoch"]))
        recovered = result.get("recovered")
        self.recovered = recovered
        if recovered is False:
            self.gaps += 1
            self.position = top
            log.warning("%s: could not recover missed publications (gap)", self.channel)
            if self.on_gap is not None:
                self.on_gap(self)
        elif recovered is None:
            self.position = top

    def _end(self) -> None:
        self._active = False
        self._queue.put_nowait(None)

    end_reason = ""  # why the server ended it (an ``unsubscribe`` push), if it did

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


class Client:
    """Connects to a tidings server's ``/ws``.

    ``async with Client("ws://127.0.0.1:8888/ws") as c: sub = await c.subscribe("chat:lobby")``.
    """

    def __init__(
        self,
        url: str = "ws://127.0.0.1:8888/ws",
        *,
        token: str | None = None,
        min_backoff: float = 0.1,
        max_backoff: float = 10.0,
        request_timeout: float = 10.0,
        heartbeat: float | None = 20.0,
    ) -> None:
        self.url = url
        self.token = token
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.request_timeout = request_timeout
        self.heartbeat = heartbeat
        self.subscriptions: dict[str, Subscription] = {}
        self.connects = 0  # successful connections so far
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._session: aiohttp.ClientSession | None = None
        self._runner: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._closed = False
        self._fatal: BaseException | None = None

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def connect(self, timeout: float | None = None) -> None:
        """Start the connection loop and wait for the first connection."""
        if self._runner is None:
            self._session = aiohttp.ClientSession()
            self._runner = asyncio.get_running_loop().create_task(self._run())
        await self._wait_connected(timeout or self.request_timeout)

    async def close(self) -> None:
        self._closed = True
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()
        self._fail_pending(ClientClosed("client closed"))
        for sub in self.subscriptions.values():
            sub._end()

    async def _wait_connected(self, timeout: float) -> None:
        if self._fatal is not None:
            raise self._fatal
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError:
            raise ConnectionError(f"not connected to {self.url} after {timeout:.1f}s") from None
        if self._fatal is not None:
            raise self._fatal

    # ------------------------------------------------------------------------------ requests

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one command and wait for its reply; raises RequestError for an error reply."""
        if self._closed:
            raise ClientClosed("client closed")
        await self._wait_connected(self.request_timeout)
        return await self._send_request(op, fields)

    async def _send_request(self, op: str, fields: dict[str, Any]) -> dict[str, Any]:
        ws = self._ws
        if ws is None or ws.closed:
            raise ConnectionLost("not connected")
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            await ws.send_str(orjson.dumps({"id": rid, "op": op, **fields}).decode())
            reply = await asyncio.wait_for(fut, self.request_timeout)
        finally:
            self._pending.pop(rid, None)
        if not reply.get("ok"):
            err = reply.get("error") or {}
            raise RequestError(str(err.get("code", ErrorCode.INTERNAL)), str(err.get("message", "")))
        result = reply.get("result") or {}
        assert isinstance(result, dict)
        return result

    async def subscribe(
        self,
        channel: str,
        since: StreamPosition | None = None,
        on_gap: Callable[[Subscription], None] | None = None,
    ) -> Subscription:
        """Subscribe; with ``since``, first receive everything published after it (if still retained)."""
        if channel in self.subscriptions:
            raise RequestError(str(ErrorCode.ALREADY_SUBSCRIBED), f"already subscribed to {channel!r}")
        sub = Subscription(self, channel, since, on_gap)
        self.subscriptions[channel] = sub
        try:
            result = await self.request("subscribe", **self._sub_fields(sub))
        except BaseException:
            self.subscriptions.pop(channel, None)
            raise
        sub._on_reply(result)
        return sub

    async def unsubscribe(self, channel: str) -> None:
        sub = self.subscriptions.pop(channel, None)
        if sub is not None:
            sub._end()
        await self.request("unsubscribe", channel=channel)

    async def publish(self, channel: str, data: Any) -> StreamPosition:
        """Publish; returns the publication's position once the server acknowledged (committed) it."""
        result = await self.request("publish", channel=channel, data=data)
        return StreamPosition(int(result["offset"]), str(result["epoch"]))

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

    @staticmethod
    def _sub_fields(sub: Subscription) -> dict[str, Any]:
        fields: dict[str, Any] = {"channel": sub.channel}
        if sub.position is not None:
            fields["since"] = sub.position.to_json()
        return fields

    def _fail_pending(self, exc: BaseException) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(exc)
        self._pending.clear()

    async def _run(self) -> None:
        attempt = 0
        assert self._session is not None
        while not self._closed:
            try:
                self._ws = await self._session.ws_connect(
                    self.url, heartbeat=self.heartbeat, max_msg_size=0, autoping=True
                )
            except (aiohttp.ClientError, OSError) as exc:
                attempt += 1
                delay = random.uniform(0, min(self.max_backoff, self.min_backoff * 2**attempt))
                log.info("connect to %s failed (%s); retrying in %.2fs", self.url, exc, delay)
                await asyncio.sleep(delay)
                continue
            reader = asyncio.get_running_loop().create_task(self._read(self._ws))
            close_code: int | None = None
            try:
                await self._on_connected()
                attempt = 0
                close_code = await reader
            except RequestError as exc:  # the token was refused: retrying cannot help
                self._stop(ClientClosed(f"connect refused: {exc}"))
                reader.cancel()
                return
            except (ConnectionLost, TimeoutError, aiohttp.ClientError, OSError) as exc:
                log.info("connection lost during setup: %s", exc)
                reader.cancel()
            finally:
                self._connected.clear()
                self._fail_pending(ConnectionLost("connection lost"))
                if not self._ws.closed:
                    await self._ws.close()
            if close_code is not None and close_code in CloseCode._value2member_map_:
                code = CloseCode(close_code)
                if code is not CloseCode.NORMAL and not code.reconnect:
                    self._stop(ClientClosed(f"server closed the connection: {code.value} {code.name}"))
                    return
            attempt += 1
            delay = random.uniform(0, min(self.max_backoff, self.min_backoff * 2**attempt))
            await asyncio.sleep(delay)

    def _stop(self, exc: ClientClosed) -> None:
        self._fatal = exc
        self._connected.set()  # wake waiters so they see the error
        for sub in self.subscriptions.values():
            sub._end()

    async def _on_connected(self) -> None:
        if self.token is not None:
            await self._send_request("connect", {"token": self.token})
        for sub in list(self.subscriptions.values()):
            try:
                result = await self._send_request("subscribe", self._sub_fields(sub))
            except RequestError as exc:
                log.warning("resubscribe to %s refused: %s", sub.channel, exc)
                self.subscriptions.pop(sub.channel, None)
                sub._end()
                continue
            sub._on_reply(result)
        self.connects += 1
        self._connected.set()

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> int | None:
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            obj = orjson.loads(msg.data)
            kind = obj.get("type")
            if kind == "message":
                sub = self.subscriptions.get(obj["channel"])
                if sub is not None:
                    sub._accept(Publication.from_json(obj))
            elif kind is None:
                fut = self._pending.get(obj.get("id"))
                if fut is not None and not fut.done():
                    fut.set_result(obj)
            elif kind == "disconnect":
                log.info("server disconnect: %s %s", obj.get("code"), obj.get("reason"))
            elif kind == "unsubscribe":  # the server ended one subscription: its rights ended
                sub = self.subscriptions.pop(obj.get("channel", ""), None)
                log.warning(
                    "the server ended the subscription to %s: %s (%s)",
                    obj.get("channel"),
                    obj.get("code"),
                    obj.get("reason"),
                )
                if sub is not None:
                    sub.end_reason = f"{obj.get('code')}: {obj.get('reason')}"
                    sub._end()
        return ws.close_code
