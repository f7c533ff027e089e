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

from ..auth import TokenError
from ..backends.base import BrokerError, PublishRequest, PublishResult
from ..node import Node
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
    PublishCmd,
    RefreshCmd,
    SubscribeCmd,
    UnsubscribeCmd,
    decode_frame,
    disconnect_push,
    encode_error,
    encode_ok,
    parse_command,
    text_frame,
    unsubscribe_push,
)
from ..subscriptions import SubscribeOutcome
from .flush import Flusher
from .wsbase import WsProtocol, token_close_code, upgrade

__all__ = ["WsConnection", "ws_handler"]

log = logging.getLogger("tidings.ws")

MAX_BAD_FRAMES = 100  # malformed frames in a row before the connection is closed with 4400
MAX_BACKLOG = 64  # commands queued behind a running one before reading pauses
MAX_TIMER = 86400.0 * 30  # timers further out than this are re-armed when they fire
MAX_EXPIRES = 2**53  # a token's exp as the connect reply reports it (JSON-safe integer)
_PUSH_BEFORE_CLOSE = frozenset({CloseCode.GOING_AWAY, CloseCode.UNSUPPORTED_DATA, CloseCode.INTERNAL_ERROR})


class WsConnection(WsProtocol):
    """One client on /ws: the v1 JSON protocol, and the hub's Sink. Every command goes through the
    policy gate (``self.session``) and every subscription through the node's subscription lifecycle."""

    __slots__ = (
        "_auth_handle",
        "_backlog",
        "_bad",
        "_expiry_handle",
        "_grant_handle",
        "_paused",
        "_pub_reqs",
        "_pub_rids",
        "_task",
    )
    IN_BAND_AUTH = True
    kind = "ws"

    def __init__(
        self, node: Node, transport: asyncio.Transport, ip: str, flusher: Flusher, deflate: bool = False
    ) -> None:
        super().__init__(node, transport, ip, flusher, deflate)
        self._bad = 0
        self._task: asyncio.Task[None] | None = None
        self._backlog: collections.deque[bytes] | None = None
        self._paused = False
        self._pub_reqs: list[PublishRequest] | None = None  # publishes of the current read
        self._pub_rids: list[int | str | None] | None = None
        self._auth_handle: asyncio.TimerHandle | None = None
        self._expiry_handle: asyncio.TimerHandle | None = None
        self._grant_handle: asyncio.TimerHandle | None = None

    def on_anonymous(self) -> None:
        if self._auth_handle is None:
            self._auth_handle = asyncio.get_running_loop().call_later(
                self.node.settings.auth_timeout, self.close, CloseCode.AUTH_TIMEOUT
            )

    def reconfigure(self) -> None:
        """A reload: new budgets and limits (``WsProtocol``), then every subscription the new rules no
        longer allow ends with an ``unsubscribe`` push (the code says which rule: ``permission_denied``,
        ``unknown_namespace``, ``unauthorized``)."""
        super().reconfigure()
        if not self._closing:
            self._recheck()

    def allow_ping(self) -> bool:
        return self.session.take()  # pings count against the command budget: no free CPU

    def last_words(self, code: CloseCode, reason: str) -> bytes | None:
        """The ``disconnect`` push, for clients whose WebSocket API hides close codes."""
        if code >= 4000 or code in _PUSH_BEFORE_CLOSE:
            return text_frame(disconnect_push(int(code), reason, code.reconnect))
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        for handle in (self._auth_handle, self._expiry_handle, self._grant_handle):
            if handle is not None:
                handle.cancel()
        if self._task is not None:
            self._task.cancel()
        self._backlog = None

    # ------------------------------------------------------------------------------ commands

    def _send(self, payload: bytes) -> None:
        if not self._closing:
            self.msgs_out += 1
            self.offer(text_frame(payload))

    def reply_error(self, rid: int | str | None, code: ErrorCode, message: str) -> None:
        self.node.counters.error(str(code))
        self.node.errors.add(source="ws", code=str(code), message=message, client=self.client_id)
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
        if not self.spend():
            self.reply_error(cmd.id, ErrorCode.RATE_LIMITED, "too many commands; slow down")
            return
        try:
            self.dispatch(cmd)
        except ProtocolError as exc:
            self.reply_error(cmd.id if exc.id is None else exc.id, exc.code, exc.message)

    def dispatch(self, cmd: Command) -> None:
        if isinstance(cmd, ConnectCmd):
            self.connect(cmd)
        elif isinstance(cmd, PingCmd):
            self._send(encode_ok(cmd.id))
        elif isinstance(cmd, PublishCmd):
            self.publish(cmd)
        elif isinstance(cmd, UnsubscribeCmd):
            self.unsubscribe(cmd)
        elif isinstance(cmd, RefreshCmd):
            self.refresh(cmd)
        elif isinstance(cmd, SubscribeCmd | HistoryCmd | PresenceCmd):
            self._task = asyncio.get_running_loop().create_task(self._run_async(cmd))

    async def _run_async(self, cmd: SubscribeCmd | HistoryCmd | PresenceCmd) -> None:
        try:
            if isinstance(cmd, SubscribeCmd):
                await self.subscribe(cmd)
            elif isinstance(cmd, HistoryCmd):
                await self.history(cmd)
            else:
                await self.presence(cmd)
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
        """Verify a connection token (TokenError if bad), arm its expiry, and end the subscriptions the
        new token no longer allows."""
        super().authenticate(token)
        if self._auth_handle is not None:
            self._auth_handle.cancel()
            self._auth_handle = None
        if self._expiry_handle is not None:
            self._expiry_handle.cancel()
        self._expiry_handle = None
        self._arm_expiry()
        self._recheck()

    def _arm_expiry(self) -> None:
        """Close with 4002 when the connection token expires (a far expiry is re-armed when reached)."""
        expires = self.session.identity.expires
        if expires is None or self._closing:
            return
        left = expires - time.time()
        if left <= 0:
            self.close(CloseCode.TOKEN_EXPIRED)
            return
        self._expiry_handle = asyncio.get_running_loop().call_later(min(left, MAX_TIMER), self._arm_expiry)

    def connect(self, cmd: ConnectCmd) -> None:
        if cmd.token is None:
            if self.session.identity.anonymous and not self.node.settings.allow_anonymous:
                raise ProtocolError(ErrorCode.UNAUTHORIZED, "a token is required", cmd.id)
        else:
            try:
                self.authenticate(cmd.token)
            except TokenError as exc:
                self.reply_error(cmd.id, exc.code, exc.message)
                if exc.code is not ErrorCode.PERMISSION_DENIED:
                    self.close(token_close_code(exc))
                return
        identity = self.session.identity
        result: dict[str, Any] = {"client": self.client_id, "version": PROTOCOL_VERSION, "user": self.user}
        if identity.expires is not None:
            result.update(_lifetime(identity.expires))
        self._send(encode_ok(cmd.id, result))

    def lost(self, channel: str) -> None:
        """The node ended this subscription (it could not keep it gapless): say so; the client subscribes
        again from its last position (its grant, if any, is kept for that)."""
        self._send(
            unsubscribe_push(
                channel,
                ErrorCode.INSUFFICIENT_STATE,
                "the server could not keep this subscription gapless; subscribe again with since",
                True,
            )
        )

    def _recheck(self) -> None:
        """End every subscription the client may no longer hold (an expired subscription token, a
        connection token renewed with fewer channels, rules changed by a reload), each with an
        ``unsubscribe`` push; then arm the
        timer for the next grant to expire."""
        subs = self.node.subscriptions
        for channel in list(subs.channels_of(self)):
            why = self.session.still_allowed(channel)
            if why is not None:
                subs.unsubscribe(self, channel)
                self.session.grants.pop(channel, None)
                resubscribe = why.code is ErrorCode.TOKEN_EXPIRED
                self._send(unsubscribe_push(channel, why.code, why.message, resubscribe))
        if self._grant_handle is not None:
            self._grant_handle.cancel()
            self._grant_handle = None
        mine = subs.channels_of(self)
        expiries = [exp for ch, exp in self.session.grants.items() if ch in mine]
        if expiries and not self._closing:
            delay = min(max(0.0, min(expiries) - time.time()) + 0.01, MAX_TIMER)
            self._grant_handle = asyncio.get_running_loop().call_later(delay, self._recheck)

    # ------------------------------------------------------------------------------ ops

    def refresh(self, cmd: RefreshCmd) -> None:
        """Renew the grant of a subscription with a fresh subscription token (no resubscribe, no gap). A
        bad token leaves the current grant as it was: it still ends at its own expiry."""
        self.node.policy.namespace(cmd.channel, cmd.id)
        if cmd.channel not in self.node.subscriptions.channels_of(self):
            raise ProtocolError(ErrorCode.NOT_SUBSCRIBED, f"not subscribed to {cmd.channel!r}", cmd.id)
        self._grant(cmd.channel, cmd.token, cmd.id)
        expires = self.session.grants[cmd.channel]
        self._recheck()  # re-arm the timer for the next grant to expire
        self._send(encode_ok(cmd.id, {"channel": cmd.channel, **_lifetime(expires)}))

    def publish(self, cmd: PublishCmd) -> None:
        """Checked now; queued with the other publishes of this read, sent to the broker together."""
        req = self.session.publication(cmd.channel, cmd.data, cmd.id, cmd.idempotency_key)
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

        def done(result: PublishResult | BrokerError) -> None:
            if isinstance(result, BrokerError):
                for rid in rids:
                    self.reply_error(rid, ErrorCode.UNAVAILABLE, str(result))
                return
            for rid, pub in zip(rids, result, strict=True):
                self._send(encode_ok(rid, {"offset": pub.offset, "epoch": pub.epoch, "id": pub.id}))

        self.node.submit(reqs, done, source="ws")

    async def subscribe(self, cmd: SubscribeCmd) -> None:
        if cmd.token is not None:
            self._grant(cmd.channel, cmd.token, cmd.id)
        ns = self.session.authorize(cmd.channel, "subscribe", cmd.id)
        subs = self.node.subscriptions
        mine = subs.channels_of(self)
        if cmd.channel not in mine and len(mine) >= self.node.settings.max_subscriptions:
            raise ProtocolError(
                ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                f"at most {self.node.settings.max_subscriptions} subscriptions per connection",
                cmd.id,
            )

        def ready(outcome: SubscribeOutcome) -> None:
            result: dict[str, Any] = {"channel": cmd.channel, **outcome.position.to_json()}
            if outcome.recovered is not None:
                result["recovered"] = outcome.recovered
            grant = self.session.grants.get(cmd.channel) if cmd.token is not None else None
            if grant is not None:
                result.update(_lifetime(grant))
            self._send(encode_ok(cmd.id, result))

        try:
            await subs.subscribe(self, cmd.channel, ns, cmd.since, ready)
        except ProtocolError as exc:
            exc.id = cmd.id
            raise
        if cmd.channel in self.session.grants:
            self._recheck()  # arm the grant's expiry

    def _grant(self, channel: str, token: str, rid: int | str | None) -> None:
        """Adopt a subscription token for ``channel``; ProtocolError (the token's error code) if bad."""
        try:
            self.session.grant(channel, token)
        except TokenError as exc:
            if exc.code is not ErrorCode.PERMISSION_DENIED:
                self.node.auth_failures.fail(self.ip)
            raise ProtocolError(exc.code, exc.message, rid) from None

    def unsubscribe(self, cmd: UnsubscribeCmd) -> None:
        self.node.policy.admit(self.session.identity, cmd.id)
        self.node.policy.namespace(cmd.channel, cmd.id)
        if not self.node.subscriptions.unsubscribe(self, cmd.channel):
            raise ProtocolError(ErrorCode.NOT_SUBSCRIBED, f"not subscribed to {cmd.channel!r}", cmd.id)
        self._send(encode_ok(cmd.id))

    async def history(self, cmd: HistoryCmd) -> None:
        ns = self.session.authorize(cmd.channel, "history", cmd.id)
        res, recovered = await self.node.subscriptions.history(cmd.channel, ns, cmd.since, cmd.limit)
        result: dict[str, Any] = {
            "publications": [p.wire_json() for p in res.publications],
            **res.position.to_json(),
        }
        if recovered is not None:
            result["recovered"] = recovered
        self._send(encode_ok(cmd.id, result))

    async def presence(self, cmd: PresenceCmd) -> None:
        ns = self.session.authorize(cmd.channel, "presence", cmd.id)
        if not ns.presence:
            raise ProtocolError(ErrorCode.NOT_AVAILABLE, f"presence is off in namespace {ns.name!r}", cmd.id)
        found = await self.node.presence.read(cmd.channel)
        self._send(encode_ok(cmd.id, {"clients": found.clients, "count": found.count}))


def _lifetime(expires: float) -> dict[str, Any]:
    """``expires`` (Unix seconds, JSON-safe) and ``ttl`` (seconds left by this server's clock) of a
    token, for a client to schedule its renewal without trusting its own clock."""
    return {"expires": int(min(expires, MAX_EXPIRES)), "ttl": round(max(0.0, expires - time.time()), 3)}


async def ws_handler(request: web.Request) -> web.StreamResponse:
    return await upgrade(request, WsConnection)
