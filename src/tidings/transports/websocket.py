"""The /ws endpoint: the v1 JSON protocol over WebSocket (see docs/protocol.md).

aiohttp parses the HTTP upgrade request; once it is accepted, the connection's transport is handed to
:class:`WsConnection`, an ``asyncio.Protocol`` that parses frames itself (``protocol.frames``). An idle
connection is then one small object: no task, no reader queue, no per-connection timer (pings come from
one :class:`Heartbeat` for all connections). A task exists only while a command that waits on storage
(subscribe, history) runs; commands behind it wait in order.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import hashlib
import itertools
import logging
import secrets
import socket
import time
from typing import Any

from aiohttp import web

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
from ..protocol.frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameError,
    FrameParser,
    close_frame,
    control_frame,
)
from .flush import FLUSHER, Flusher
from .origin import origin_allowed

__all__ = ["HEARTBEAT", "Heartbeat", "WsConnection", "ws_handler"]

log = logging.getLogger("tidings.ws")

_ids = itertools.count(1)
CLOSE_GRACE = 5.0  # seconds a closing peer gets to take its last frames before the socket is aborted
MAX_BAD_FRAMES = 100  # malformed frames in a row before the connection is closed with 4400
MAX_REFUSED = 50  # rate-limited commands in a row before the connection is closed with 4030
MAX_BACKLOG = 64  # commands queued behind a running one before reading pauses
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3
_PUSH_BEFORE_CLOSE = frozenset({CloseCode.GOING_AWAY, CloseCode.UNSUPPORTED_DATA, CloseCode.INTERNAL_ERROR})


class WsConnection(asyncio.Protocol):
    """One client on /ws: the socket's protocol and the hub's Sink. Frames queued for it during one loop
    iteration go out in one write (see :class:`~tidings.transports.flush.Flusher`)."""

    __slots__ = (
        "_abort_handle",
        "_auth_handle",
        "_backlog",
        "_bad",
        "_buffer",
        "_buffered",
        "_closing",
        "_expiry_handle",
        "_flusher",
        "_parser",
        "_paused",
        "_refused",
        "_task",
        "_tbuf",
        "bucket",
        "channels",
        "client_id",
        "counted",
        "deflate",
        "granted",
        "identity",
        "ip",
        "node",
        "pinged",
        "rx",
        "transport",
    )

    def __init__(
        self, node: Node, transport: asyncio.Transport, ip: str, flusher: Flusher, *, deflate: bool = False
    ) -> None:
        self.node = node
        self.transport = transport
        self.ip = ip
        self._flusher = flusher
        self.deflate = deflate
        self.counted = False  # holds a place in the connection limits
        self.client_id = f"{next(_ids):x}-{secrets.token_hex(4)}"
        self.identity = ANONYMOUS
        self.granted: dict[str, float] = {}  # channel -> expiry of its subscription token
        self.channels: set[str] = set()
        self.bucket = TokenBucket(node.settings.client_rate, node.settings.client_rate * 2)
        self._parser = FrameParser(node.settings.max_message_size, deflate=deflate)
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._tbuf = 0  # the transport's buffer after the last flush: an upper bound until the next one
        self._closing = False
        self._bad = 0
        self._refused = 0
        self._task: asyncio.Task[None] | None = None
        self._backlog: collections.deque[bytes] | None = None
        self._paused = False
        self.rx = True  # something arrived since the last heartbeat tick
        self.pinged = False
        self._abort_handle: asyncio.TimerHandle | None = None
        self._auth_handle: asyncio.TimerHandle | None = None
        self._expiry_handle: asyncio.TimerHandle | None = None

    @property
    def user(self) -> str:
        return self.identity.user

    # ------------------------------------------------------------------------------ Sink

    def offer(self, frame: bytes) -> bool:
        if self._closing:
            return False
        size = self._buffered + len(frame)
        if size + self._tbuf > self.node.settings.max_buffer:
            self.close(CloseCode.SLOW_CONSUMER)
            return False
        if not self._buffer:
            self._flusher.mark(self)
        self._buffer.append(frame)
        self._buffered = size
        return True

    def flush(self) -> None:
        buf = self._buffer
        if not buf:
            return
        data = b"".join(buf) if len(buf) > 1 else buf[0]
        buf.clear()
        self._buffered = 0
        transport = self.transport
        if not transport.is_closing():
            transport.write(data)
            self._tbuf = transport.get_write_buffer_size()

    def close(self, code: CloseCode, reason: str | None = None) -> None:
        """Say why (a disconnect push), send the close frame, and drop the socket once the peer answered
        (or after CLOSE_GRACE seconds)."""
        if self._closing:
            return
        self._closing = True
        reason = reason or CLOSE_REASONS.get(code, "")
        if code != CloseCode.NORMAL:
            log.info("closing %s (%s): %d %s", self.client_id, self.ip, code, reason)
        # The last frames go out even past the buffer limit: they are the last this peer gets.
        if code >= 4000 or code in _PUSH_BEFORE_CLOSE:
            self._buffer.append(text_frame(disconnect_push(int(code), reason, code.reconnect)))
        self._buffer.append(close_frame(int(code), reason))
        self.flush()
        self._detach()
        self._abort_handle = asyncio.get_running_loop().call_later(CLOSE_GRACE, self.transport.abort)

    def ping(self) -> None:
        if not self._closing:
            self.pinged = True
            self.offer(control_frame(OP_PING))

    # ------------------------------------------------------------------------------ asyncio.Protocol

    def start(self, tail: bytes, token: str | None) -> None:
        """Called once the handshake response is written and this object owns the transport."""
        self.node.connections.add(self)
        self.node.drained.clear()
        self.transport.resume_reading()
        if token is not None:
            try:
                self.authenticate(token)
            except TokenError as exc:
                expired = exc.code is ErrorCode.TOKEN_EXPIRED
                self.close(CloseCode.TOKEN_EXPIRED if expired else CloseCode.UNAUTHORIZED)
                return
        elif not self.node.settings.allow_anonymous:
            self._auth_handle = asyncio.get_running_loop().call_later(
                self.node.settings.auth_timeout, self.close, CloseCode.AUTH_TIMEOUT
            )
        if tail:
            self.data_received(tail)

    def data_received(self, data: bytes) -> None:
        self.rx = True
        self.pinged = False
        try:
            frames = self._parser.feed(data)
        except FrameError as exc:
            self._protocol_error(exc.code, exc.reason)
            return
        for opcode, payload in frames:
            if self._closing:
                if opcode == OP_CLOSE:
                    self.transport.close()
                return
            if opcode == OP_TEXT:
                self._on_text(payload)
            elif opcode == OP_PING:
                if self.bucket.take():  # pings count against the command rate: no free CPU
                    self.offer(control_frame(OP_PONG, payload))
            elif opcode == OP_CLOSE:
                self._on_close_frame(payload)
            elif opcode == OP_BINARY:
                self.close(CloseCode.UNSUPPORTED_DATA)
            # OP_PONG: being alive is all it says

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        node = self.node
        node.forget(self)
        if self.counted:
            self.counted = False
            node.conn_limits.release(self.ip)
        self._closing = True
        self._detach()
        for handle in (self._abort_handle, self._auth_handle, self._expiry_handle):
            if handle is not None:
                handle.cancel()
        if self._task is not None:
            self._task.cancel()
        self._backlog = None
        self._buffer.clear()

    def _detach(self) -> None:
        """Leave every channel (a closing connection takes no more publications)."""
        hub = self.node.hub
        for channel in self.channels:
            hub.remove(channel, self)
            ns = self.node.settings.namespace_for(channel)
            if ns is not None and ns.join_leave:
                hub.broadcast_raw(channel, join_leave_event("leave", channel, self))
        self.channels.clear()

    def _protocol_error(self, code: int, reason: str) -> None:
        """_Fail the WebSocket connection_ (RFC 6455 §7.1.7): close frame, then close the socket."""
        if not self._closing:
            self._closing = True
            log.info("closing %s (%s): %d %s", self.client_id, self.ip, code, reason)
            self.flush()
            self.transport.write(close_frame(code, reason))
            self._detach()
            self._abort_handle = asyncio.get_running_loop().call_later(CLOSE_GRACE, self.transport.abort)
        self.transport.close()

    def _on_close_frame(self, payload: bytes) -> None:
        """Answer the peer's close: with its code when that is a valid one (RFC 6455 §7.4), else 1002."""
        if len(payload) == 1:
            code = 1002
        elif not payload:
            code = 1000
        else:
            code = int.from_bytes(payload[:2], "big")
            valid = 1000 <= code <= 1003 or 1007 <= code <= 1011 or 3000 <= code <= 4999
            if not valid:
                code = 1002
        self._closing = True
        self.flush()
        self.transport.write(close_frame(code))
        self._detach()
        self.transport.close()

    # ------------------------------------------------------------------------------ commands

    def _send(self, payload: bytes) -> None:
        if not self._closing:
            self.offer(text_frame(payload))

    def reply_error(self, rid: int | str | None, code: ErrorCode, message: str) -> None:
        self._send(encode_error(rid, code, message))

    def _on_text(self, text: bytes) -> None:
        if self._task is not None:  # a command is waiting on storage: keep order
            backlog = self._backlog
            if backlog is None:
                backlog = self._backlog = collections.deque()
            backlog.append(text)
            if len(backlog) >= MAX_BACKLOG and not self._paused:
                self._paused = True
                self.transport.pause_reading()
            return
        self._handle(text)

    def _handle(self, text: bytes) -> None:
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
            self.dispatch(cmd)
        except ProtocolError as exc:
            self.reply_error(cmd.id if exc.id is None else exc.id, exc.code, exc.message)

    def dispatch(self, cmd: Command) -> None:
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
        elif isinstance(cmd, UnsubscribeCmd):
            self.unsubscribe(cmd)
        elif isinstance(cmd, PresenceCmd):
            self.presence(cmd)
        elif isinstance(cmd, SubscribeCmd | HistoryCmd):
            self._task = asyncio.get_running_loop().create_task(self._run_async(cmd))

    async def _run_async(self, cmd: SubscribeCmd | HistoryCmd) -> None:
        try:
            if isinstance(cmd, SubscribeCmd):
                await self.subscribe(cmd)
            else:
                await self.history(cmd)
        except ProtocolError as exc:
            self.reply_error(cmd.id if exc.id is None else exc.id, exc.code, exc.message)
        except BrokerError as exc:
            self.reply_error(cmd.id, ErrorCode.UNAVAILABLE, str(exc))
        except Exception:
            log.exception("command failed on %s", self.client_id)
            self.reply_error(cmd.id, ErrorCode.INTERNAL, "internal error")
        finally:
            self._task = None
        backlog = self._backlog
        while backlog and self._task is None and not self._closing:
            self._handle(backlog.popleft())
        if self._paused and (not backlog or len(backlog) < MAX_BACKLOG // 2) and not self._closing:
            self._paused = False
            self.transport.resume_reading()

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
            if self.identity.anonymous and not self.node.settings.allow_anonymous:
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


class Heartbeat:
    """One timer for every connection: each tick, a connection that sent nothing since the last tick is
    pinged; one that then stays silent for another tick is dropped (its peer is gone)."""

    def __init__(self, node: Node, interval: float) -> None:
        self.node = node
        self.interval = interval
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        if self.interval > 0:
            self._handle = asyncio.get_running_loop().call_later(self.interval, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        for conn in list(self.node.connections):
            if not isinstance(conn, WsConnection):
                continue
            if conn.rx:
                conn.rx = False
            elif conn.pinged:
                log.info("dropping %s (%s): no pong", conn.client_id, conn.ip)
                conn.transport.abort()
            else:
                conn.ping()
        self._handle = asyncio.get_running_loop().call_later(self.interval, self._tick)


HEARTBEAT = web.AppKey("tidings.heartbeat", Heartbeat)


def _handshake_error(text: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=text + "\n", headers={"Sec-WebSocket-Version": "13"})


def _accept(request: web.Request) -> bytes:
    """Check the upgrade request (RFC 6455 §4.2.1) and return the Sec-WebSocket-Accept value."""
    h = request.headers
    if request.method != "GET":
        raise web.HTTPMethodNotAllowed(request.method, ["GET"])
    if "websocket" not in h.get("Upgrade", "").lower():
        raise _handshake_error("expected a WebSocket upgrade (Upgrade: websocket)")
    if "upgrade" not in h.get("Connection", "").lower():
        raise _handshake_error("expected Connection: Upgrade")
    if h.get("Sec-WebSocket-Version") != "13":
        raise _handshake_error("only WebSocket version 13 is supported")
    key = h.get("Sec-WebSocket-Key", "")
    try:
        ok = len(base64.b64decode(key, validate=True)) == 16
    except ValueError:
        ok = False
    if not ok:
        raise _handshake_error("invalid Sec-WebSocket-Key")
    return base64.b64encode(hashlib.sha1(key.encode() + _WS_GUID).digest())


def _wants_deflate(request: web.Request) -> bool:
    """permessage-deflate offered, and acceptable with no context takeover and full windows."""
    for offer in request.headers.get("Sec-WebSocket-Extensions", "").split(","):
        params = [p.strip().lower() for p in offer.split(";")]
        if params[0] != "permessage-deflate":
            continue
        if any(p.startswith("server_max_window_bits=") and p != "server_max_window_bits=15" for p in params):
            continue  # we compress with the full window, once for every receiver
        return True
    return False


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
    accept = _accept(request)
    transport = request.transport
    handler = request.protocol
    if transport is None or transport.is_closing():
        raise web.HTTPBadRequest(text="connection closed\n")
    deflate = settings.compression and _wants_deflate(request)
    head = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n"
    )
    if deflate:
        head += (
            b"Sec-WebSocket-Extensions: permessage-deflate; "
            b"server_no_context_takeover; client_no_context_takeover\r\n"
        )
    # Take the socket over from aiohttp: its request handler lets go of the transport (so it neither
    # writes a response nor closes it) and is released; this connection becomes the transport's protocol.
    # (uvloop's transports are not registered asyncio.Transport subclasses: no isinstance check here)
    transport.pause_reading()
    sock = transport.get_extra_info("socket")
    if sock is not None:  # pushes are small and latency matters: no Nagle delay
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    tail = bytes(getattr(handler, "_message_tail", b""))
    conn = WsConnection(node, transport, ip, request.app[FLUSHER], deflate=deflate)
    transport.write(head + b"\r\n")
    transport.set_protocol(conn)
    handler.transport = None
    handler.connection_lost(None)
    conn.counted = node.conn_limits.acquire(ip)
    if not conn.counted:
        transport.resume_reading()  # to see the peer's answer to the close frame
        conn.close(CloseCode.TOO_MANY_CONNECTIONS)
    else:
        conn.start(tail, request.query.get("token"))
    # Never sent: aiohttp's side of this connection has no transport any more.
    return web.Response(status=101)
