"""The /ws endpoint: the v1 JSON protocol over WebSocket (see docs/protocol.md).

The socket itself is a :class:`~tidings.transports.wsbase.WsProtocol` (no task per connection). A task
exists only while a command that waits on storage (subscribe, history) runs; the commands behind it wait
in order.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any

from aiohttp import web

from ..auth import ANONYMOUS, Action, TokenError, check_permission
from ..backends.base import BrokerError, PublishRequest
from ..config import Namespace
from ..history import subscribe_with_replay
from ..hub import frame_of
from ..limits import TokenBucket
from ..node import Node
from ..presence import join_leave_event, presence
from ..protocol import (
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
from .flush import Flusher
from .wsbase import WsProtocol, upgrade

__all__ = ["WsConnection", "ws_handler"]

_PUSH_BEFORE_CLOSE = frozenset({CloseCode.GOING_AWAY, CloseCode.UNSUPPORTED_DATA, CloseCode.INTERNAL_ERROR})

log = logging.getLogger("tidings.ws")

MAX_BAD_FRAMES = 100  # malformed frames in a row before the connection is closed with 4400
MAX_REFUSED = 50  # rate-limited commands in a row before the connection is closed with 4030
MAX_BACKLOG = 64  # commands queued behind a running one before reading pauses
_PUSH_BEFORE_CLOSE = frozenset({CloseCode.GOING_AWAY, CloseCode.UNSUPPORTED_DATA, CloseCode.INTERNAL_ERROR})


class WsConnection(WsProtocol):
    """One client on /ws: the v1 JSON protocol, and the hub's Sink."""

    __slots__ = (
        "_auth_handle",
        "_backlog",
        "_bad",
        "_expiry_handle",
        "_paused",
        "_pub_reqs",
        "_pub_rids",
        "_refused",
        "_task",
        "bucket",
        "channels",
        "granted",
        "identity",
    )

    def __init__(
        self, node: Node, transport: asyncio.Transport, ip: str, flusher: Flusher, deflate: bool = False
    ) -> None:
        super().__init__(node, transport, ip, flusher, deflate)
        self.identity = ANONYMOUS
        self.granted: dict[str, float] = {}  # channel -> expiry of its subscription token
        self.channels: set[str] = set()
        self.bucket = TokenBucket(node.settings.client_rate, node.settings.client_rate * 2)
        self._bad = 0
        self._refused = 0
        self._task: asyncio.Task[None] | None = None
        self._backlog: collections.deque[bytes] | None = None
        self._paused = False
        self._pub_reqs: list[PublishRequest] | None = None  # publishes of the current read
        self._pub_rids: list[int | str | None] | None = None
        self._auth_handle: asyncio.TimerHandle | None = None
        self._expiry_handle: asyncio.TimerHandle | None = None

    @property
    def user(self) -> str:
        return self.identity.user

    def start(self, tail: bytes, request: web.Request) -> None:
        token = request.query.get("token")
        if token is not None:
            try:
                self.authenticate(token)
            except TokenError as exc:
                self.register()
                expired = exc.code is ErrorCode.TOKEN_EXPIRED
                self.close(CloseCode.TOKEN_EXPIRED if expired else CloseCode.UNAUTHORIZED)
                return
        elif not self.node.settings.allow_anonymous:
            self._auth_handle = asyncio.get_running_loop().call_later(
                self.node.settings.auth_timeout, self.close, CloseCode.AUTH_TIMEOUT
            )
        super().start(tail, request)

    def allow_ping(self) -> bool:
        return self.bucket.take()  # pings count against the command rate: no free CPU

    def last_words(self, code: CloseCode, reason: str) -> bytes | None:
        """The ``disconnect`` push, for clients whose WebSocket API hides close codes."""
        if code >= 4000 or code in _PUSH_BEFORE_CLOSE:
            return text_frame(disconnect_push(int(code), reason, code.reconnect))
        return None

    def detach(self) -> None:
        """Leave every channel (a closing connection takes no more publications)."""
        hub = self.node.hub
        for channel in self.channels:
            hub.remove(channel, self)
            ns = self.node.settings.namespace_for(channel)
            if ns is not None and ns.join_leave:
                hub.broadcast_raw(channel, join_leave_event("leave", channel, self))
        self.channels.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        for handle in (self._auth_handle, self._expiry_handle):
            if handle is not None:
                handle.cancel()
        if self._task is not None:
            self._task.cancel()
        self._backlog = None

    # ------------------------------------------------------------------------------ commands

    def _send(self, payload: bytes) -> None:
        if not self._closing:
            self.offer(text_frame(payload))

    def reply_error(self, rid: int | str | None, code: ErrorCode, message: str) -> None:
        self._send(encode_error(rid, code, message))

    def on_text(self, text: bytes) -> None:
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
        self.after_frames()
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
        """Checked now; queued with the other publishes of this read, sent to the broker together."""
        ns = self.node.namespace(cmd.channel, cmd.id)
        self._allow(ns, cmd.channel, "publish", cmd.id)
        info: dict[str, Any] | None = None
        if self.user:
            info = {"user": self.user, "client": self.client_id}
            if self.identity.info:
                info["info"] = self.identity.info
        req = self.node.publish_request(cmd.channel, cmd.data, ns, info, rid=cmd.id)
        if self._pub_reqs is None or self._pub_rids is None:
            self._pub_reqs, self._pub_rids = [req], [cmd.id]
        else:
            self._pub_reqs.append(req)
            self._pub_rids.append(cmd.id)

    def after_frames(self) -> None:
        """Hand every publish of this read to the broker as one group, answered by one callback."""
        reqs, rids = self._pub_reqs, self._pub_rids
        if not reqs or rids is None:
            return
        self._pub_reqs = self._pub_rids = None

        def done(result: list[Publication] | BrokerError) -> None:
            if isinstance(result, BrokerError):
                for rid in rids:
                    self.reply_error(rid, ErrorCode.UNAVAILABLE, str(result))
                return
            for rid, pub in zip(rids, result, strict=True):
                self._send(encode_ok(rid, {"offset": pub.offset, "epoch": pub.epoch, "id": pub.id}))

        self.node.broker.publish_many(reqs, done)

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


async def ws_handler(request: web.Request) -> web.StreamResponse:
    return await upgrade(request, WsConnection)
