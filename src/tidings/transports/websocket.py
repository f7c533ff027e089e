"""The /ws endpoint: the v1 JSON protocol over WebSocket (see docs/protocol.md)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from ..auth import ANONYMOUS, Action, TokenError, check_permission
from ..backends.base import BrokerError
from ..config import Namespace
from ..history import subscribe_with_replay
from ..hub import frame_of
from ..limits import TokenBucket, client_ip
from ..node import NODE, Node
from ..presence import join_leave_event, presence
from ..protocol import (
    CLOSE_REASONS,
    PROTOCOL_VERSION,
    CloseCode,
    Command,
    ConnectCmd,
    ErrorCode,
    HistoryCmd,
    PingCmd,
    PresenceCmd,
    ProtocolError,
    Publication,
    PublishCmd,
    SubscribeCmd,
    UnsubscribeCmd,
    decode_frame,
    disconnect_push,
    encode_error,
    encode_ok,
    parse_command,
    text_frame,
)
from .flush import FLUSHER, Flusher
from .origin import origin_allowed

__all__ = ["WsConnection", "ws_handler"]

log = logging.getLogger("tidings.ws")

_ids = itertools.count(1)
CLOSE_GRACE = 5.0  # seconds a closing peer gets to take its last frames before the socket is aborted
MAX_BAD_FRAMES = 100  # malformed frames in a row before the connection is closed with 4400
MAX_REFUSED = 50  # rate-limited commands in a row before the connection is closed with 4030


class WsConnection:
    """One client on /ws. Implements the hub's Sink: frames are queued and flushed once per iteration."""

    __slots__ = (
        "_abort_handle",
        "_auth_handle",
        "_bad",
        "_buffer",
        "_buffered",
        "_close_task",
        "_closing",
        "_expiry_handle",
        "_flusher",
        "_refused",
        "_ws",
        "bucket",
        "channels",
        "client_id",
        "granted",
        "identity",
        "ip",
        "node",
        "transport",
    )

    def __init__(
        self, node: Node, ws: web.WebSocketResponse, request: web.Request, flusher: Flusher, ip: str
    ) -> None:
        self.node = node
        self._ws = ws
        self.transport = request.transport
        self.ip = ip
        self._flusher = flusher
        self.client_id = f"{next(_ids):x}-{secrets.token_hex(4)}"
        self.identity = ANONYMOUS
        self.granted: dict[str, float] = {}  # channel -> expiry of its subscription token
        self.channels: set[str] = set()
        self.bucket = TokenBucket(node.settings.client_rate, node.settings.client_rate * 2)
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._closing = False
        self._bad = 0
        self._refused = 0
        self._abort_handle: asyncio.TimerHandle | None = None
        self._auth_handle: asyncio.TimerHandle | None = None
        self._expiry_handle: asyncio.TimerHandle | None = None
        self._close_task: asyncio.Task[bool] | None = None

    @property
    def user(self) -> str:
        return self.identity.user

    # ------------------------------------------------------------------------------ Sink

    def offer(self, frame: bytes) -> bool:
        if self._closing:
            return False
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        size = self._buffered + len(frame)
        if size + transport.get_write_buffer_size() > self.node.settings.max_buffer:
            self.close(CloseCode.SLOW_CONSUMER)
            return False
        if not self._buffer:
            self._flusher.mark(self)
        self._buffer.append(frame)
        self._buffered = size
        return True

    def flush(self) -> None:
        if not self._buffer:
            return
        data = b"".join(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
        self._buffer.clear()
        self._buffered = 0
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def close(self, code: CloseCode, reason: str | None = None) -> None:
        if self._closing:
            return
        self._closing = True
        reason = reason or CLOSE_REASONS.get(code, "")
        if code != CloseCode.NORMAL:
            log.info("closing %s (%s): %d %s", self.client_id, self.ip, code, reason)
        # The disconnect push goes out even past the buffer limit: it is the last thing this peer gets.
        self._buffer.append(text_frame(disconnect_push(int(code), reason, code.reconnect)))
        self.flush()
        loop = asyncio.get_running_loop()
        self._close_task = loop.create_task(self._ws.close(code=int(code), message=reason.encode()[:120]))
        self._abort_handle = loop.call_later(CLOSE_GRACE, self._abort)

    def _abort(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

    # ------------------------------------------------------------------------------ commands

    def _send(self, payload: bytes) -> None:
        """Replies bypass the slow-consumer limit only if the connection is still open."""
        if not self._closing:
            self.offer(text_frame(payload))

    def reply_error(self, rid: int | str | None, code: ErrorCode, message: str) -> None:
        self._send(encode_error(rid, code, message))

    async def handle_text(self, text: str) -> None:
        try:
            cmd = parse_command(decode_frame(text))
        except ProtocolError as exc:
            self._bad += 1
            if self._bad > MAX_BAD_FRAMES:
                self.close(CloseCode.BAD_PROTOCOL)
                return
            self.reply_error(exc.id, exc.code, exc.message)
            return
        self._bad = 0
        if not (self.bucket.take() and self.node.user_rates.take(self.user or self.client_id)):
            self._refused += 1
            if self._refused > MAX_REFUSED:
                self.close(CloseCode.RATE_LIMITED)
            else:
                self.reply_error(cmd.id, ErrorCode.RATE_LIMITED, "too many commands; slow down")
            return
        self._refused = 0
        try:
            await self.dispatch(cmd)
        except ProtocolError as exc:
            self.reply_error(cmd.id if exc.id is None else exc.id, exc.code, exc.message)
        except BrokerError as exc:
            self.reply_error(cmd.id, ErrorCode.UNAVAILABLE, str(exc))

    async def dispatch(self, cmd: Command) -> None:
        if isinstance(cmd, ConnectCmd):
            self.connect(cmd)
            return
        if isinstance(cmd, PingCmd):
            self._send(encode_ok(cmd.id))
            return
        if self.identity.anonymous and not self.node.settings.allow_anonymous:
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "send connect with a token first", cmd.id)
        if isinstance(cmd, PublishCmd):
            self.publish(cmd)
        elif isinstance(cmd, SubscribeCmd):
            await self.subscribe(cmd)
        elif isinstance(cmd, UnsubscribeCmd):
            self.unsubscribe(cmd)
        elif isinstance(cmd, HistoryCmd):
            await self.history(cmd)
        elif isinstance(cmd, PresenceCmd):
            self.presence(cmd)

    # ------------------------------------------------------------------------------ auth

    def authenticate(self, token: str) -> None:
        """Verify a connection token; on failure count it against the address and raise TokenError."""
        try:
            identity = self.node.tokens.connection(token)
        except TokenError:
            self.node.auth_failures.fail(self.ip)
            raise
        if not self.identity.anonymous and identity.user != self.identity.user:
            raise TokenError(ErrorCode.PERMISSION_DENIED, "a connection cannot change its user")
        self.identity = identity
        if self._auth_handle is not None:
            self._auth_handle.cancel()
            self._auth_handle = None
        if self._expiry_handle is not None:
            self._expiry_handle.cancel()
        if identity.expires is not None:
            delay = max(0.0, identity.expires - time.time())
            self._expiry_handle = asyncio.get_running_loop().call_later(
                delay, self.close, CloseCode.TOKEN_EXPIRED
            )

    def connect(self, cmd: ConnectCmd) -> None:
        if cmd.token is None:
            if not self.node.settings.allow_anonymous:
                raise ProtocolError(ErrorCode.UNAUTHORIZED, "a token is required", cmd.id)
        else:
            try:
                self.authenticate(cmd.token)
            except TokenError as exc:
                self.reply_error(cmd.id, exc.code, exc.message)
                if exc.code is not ErrorCode.PERMISSION_DENIED:
                    self.close(
                        CloseCode.TOKEN_EXPIRED
                        if exc.code is ErrorCode.TOKEN_EXPIRED
                        else CloseCode.UNAUTHORIZED
                    )
                return
        result: dict[str, Any] = {"client": self.client_id, "version": PROTOCOL_VERSION, "user": self.user}
        if self.identity.expires is not None:
            result["expires"] = int(self.identity.expires)
        self._send(encode_ok(cmd.id, result))

    def _granted(self, channel: str) -> bool:
        exp = self.granted.get(channel)
        if exp is None:
            return False
        if exp < time.time():
            del self.granted[channel]
            return False
        return True

    def _allow(self, ns: Namespace, channel: str, action: Action, rid: int | str | None) -> None:
        check_permission(ns, self.identity, channel, action, granted=self._granted(channel), rid=rid)

    # ------------------------------------------------------------------------------ ops

    def publish(self, cmd: PublishCmd) -> None:
        ns = self.node.namespace(cmd.channel, cmd.id)
        self._allow(ns, cmd.channel, "publish", cmd.id)
        info: dict[str, Any] | None = None
        if self.user:
            info = {"user": self.user, "client": self.client_id}
            if self.identity.info:
                info["info"] = self.identity.info
        fut = self.node.publish(cmd.channel, cmd.data, ns, info, rid=cmd.id)
        rid = cmd.id

        def done(f: asyncio.Future[Publication]) -> None:
            if f.cancelled():
                return
            exc = f.exception()
            if exc is not None:
                self.reply_error(rid, ErrorCode.UNAVAILABLE, str(exc))
            else:
                pub = f.result()
                self._send(encode_ok(rid, {"offset": pub.offset, "epoch": pub.epoch, "id": pub.id}))

        fut.add_done_callback(done)

    async def subscribe(self, cmd: SubscribeCmd) -> None:
        ns = self.node.namespace(cmd.channel, cmd.id)
        if cmd.token is not None:
            try:
                self.granted[cmd.channel] = self.node.tokens.subscription(
                    cmd.token, cmd.channel, self.identity
                )
            except TokenError as exc:
                if exc.code is not ErrorCode.PERMISSION_DENIED:
                    self.node.auth_failures.fail(self.ip)
                raise ProtocolError(exc.code, exc.message, cmd.id) from None
        self._allow(ns, cmd.channel, "subscribe", cmd.id)
        if cmd.channel not in self.channels and len(self.channels) >= self.node.settings.max_subscriptions:
            raise ProtocolError(
                ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                f"at most {self.node.settings.max_subscriptions} subscriptions per connection",
                cmd.id,
            )
        hub = self.node.hub
        outcome = await subscribe_with_replay(hub, self.node.broker, cmd.channel, self, ns.history, cmd.since)
        if outcome is None:
            raise ProtocolError(
                ErrorCode.ALREADY_SUBSCRIBED, f"already subscribed to {cmd.channel!r}", cmd.id
            )
        if self._closing:
            hub.remove(cmd.channel, self)
            return
        self.channels.add(cmd.channel)
        result: dict[str, Any] = {"channel": cmd.channel, **outcome.position.to_json()}
        if outcome.recovered is not None:
            result["recovered"] = outcome.recovered
        self._send(encode_ok(cmd.id, result))
        for pub in outcome.replay:
            if not self.offer(frame_of(pub)):
                return
        hub.go_live(cmd.channel, self, outcome.live_after)
        if ns.join_leave:
            hub.broadcast_raw(cmd.channel, join_leave_event("join", cmd.channel, self), exclude=self)

    def unsubscribe(self, cmd: UnsubscribeCmd) -> None:
        ns = self.node.namespace(cmd.channel, cmd.id)
        if not self.node.hub.remove(cmd.channel, self):
            raise ProtocolError(ErrorCode.NOT_SUBSCRIBED, f"not subscribed to {cmd.channel!r}", cmd.id)
        self.channels.discard(cmd.channel)
        self._send(encode_ok(cmd.id))
        if ns.join_leave:
            self.node.hub.broadcast_raw(cmd.channel, join_leave_event("leave", cmd.channel, self))

    async def history(self, cmd: HistoryCmd) -> None:
        ns = self.node.namespace(cmd.channel, cmd.id)
        self._allow(ns, cmd.channel, "history", cmd.id)
        res, recovered = await self.node.history(cmd.channel, ns, cmd.since, cmd.limit)
        result: dict[str, Any] = {
            "publications": [p.to_json() for p in res.publications],
            **res.position.to_json(),
        }
        if recovered is not None:
            result["recovered"] = recovered
        self._send(encode_ok(cmd.id, result))

    def presence(self, cmd: PresenceCmd) -> None:
        ns = self.node.namespace(cmd.channel, cmd.id)
        self._allow(ns, cmd.channel, "presence", cmd.id)
        if not ns.presence:
            raise ProtocolError(ErrorCode.NOT_AVAILABLE, f"presence is off in namespace {ns.name!r}", cmd.id)
        clients = presence(self.node.hub, cmd.channel)
        self._send(encode_ok(cmd.id, {"clients": clients, "count": len(clients)}))

    # ------------------------------------------------------------------------------ teardown

    async def wait_closed(self) -> None:
        """Let a close started by :meth:`close` finish (bounded by the abort grace)."""
        if self._close_task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._close_task), CLOSE_GRACE + 1)
            except (TimeoutError, ConnectionError):
                self._abort()

    def detach(self) -> None:
        hub = self.node.hub
        for channel in self.channels:
            hub.remove(channel, self)
            ns = self.node.settings.namespace_for(channel)
            if ns is not None and ns.join_leave:
                hub.broadcast_raw(channel, join_leave_event("leave", channel, self))
        self.channels.clear()
        self._closing = True
        for handle in (self._abort_handle, self._auth_handle, self._expiry_handle):
            if handle is not None:
                handle.cancel()


async def ws_handler(request: web.Request) -> web.StreamResponse:
    node = request.app[NODE]
    settings = node.settings
    if not origin_allowed(request, settings.allowed_origins):
        raise web.HTTPForbidden(text="cross-origin WebSocket refused\n")
    ip = client_ip(request, node.trusted_proxies)
    wait = node.auth_failures.blocked_for(ip)
    if wait > 0:
        raise web.HTTPTooManyRequests(
            text="too many failed authentications\n", headers={"Retry-After": str(int(wait) + 1)}
        )
    ws = web.WebSocketResponse(
        max_msg_size=settings.max_message_size,
        heartbeat=settings.ping_interval or None,
        autoping=True,
        compress=settings.compression,
    )
    await ws.prepare(request)
    if not node.conn_limits.acquire(ip):
        reason = CLOSE_REASONS[CloseCode.TOO_MANY_CONNECTIONS]
        await ws.send_str(disconnect_push(int(CloseCode.TOO_MANY_CONNECTIONS), reason, True).decode())
        await ws.close(code=int(CloseCode.TOO_MANY_CONNECTIONS), message=reason.encode())
        return ws
    conn = WsConnection(node, ws, request, request.app[FLUSHER], ip)
    node.connections.add(conn)
    try:
        token = request.query.get("token")
        if token is not None:
            try:
                conn.authenticate(token)
            except TokenError as exc:
                conn.close(
                    CloseCode.TOKEN_EXPIRED if exc.code is ErrorCode.TOKEN_EXPIRED else CloseCode.UNAUTHORIZED
                )
        elif not settings.allow_anonymous:
            conn._auth_handle = asyncio.get_running_loop().call_later(
                settings.auth_timeout, conn.close, CloseCode.AUTH_TIMEOUT
            )
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await conn.handle_text(msg.data)
            elif msg.type == WSMsgType.BINARY:
                conn.close(CloseCode.UNSUPPORTED_DATA)
                break
            else:
                break
        if ws.close_code == WSCloseCode.MESSAGE_TOO_BIG:
            log.info("closed %s (%s): message too big", conn.client_id, conn.ip)
        await conn.wait_closed()
    finally:
        node.connections.discard(conn)
        node.conn_limits.release(ip)
        conn.detach()
    return ws
