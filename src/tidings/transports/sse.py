"""Plain-HTTP ways to subscribe: ``GET /sse`` (Server-Sent Events, for ``EventSource``), ``GET /stream``
(the same stream as newline-delimited JSON) and ``GET /poll`` (long-poll). See docs/http-api.md and
docs/devices.md.

Every request goes through the policy gate exactly as a ``/ws`` subscribe does (connection token in
``?token=`` or ``Authorization: Bearer``, subscription tokens in ``?sub_token=``, the namespace rules),
and every subscription through the node's subscription lifecycle (subscribe-then-replay, all-or-nothing
recovery). Nothing is refused after the ``200``: a request that may not subscribe gets its JSON error
before the stream starts, so an ``EventSource`` does not reconnect to a refusal.

``/sse`` and ``/stream`` take the socket over from aiohttp once the head is written (like the WebSocket
upgrade): an idle stream is one :class:`HttpStream` object, no task, no timer (keep-alives and the write
timeout come from the node's one :class:`~tidings.transports.wsbase.Heartbeat`). Its output queue is the
WebSocket's (:class:`~tidings.transports.wsbase.BufferedConnection`): bounded in bytes, a reader too slow
for it cut off (``event: disconnect`` with 4008, then the socket is closed).

Positions (the SSE ``id:``, ``?since=`` and ``Last-Event-ID``): one ``<offset>:<epoch>`` per channel, in
the order of the ``channel`` parameters, joined by ``;``; ``-`` for a channel with no position yet. A
channel that cannot be recovered from the position given gets ``event: reset`` and goes on live from the
channel's current position, never a silent gap.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from dataclasses import replace
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

import jwt
import orjson
from aiohttp import web
from multidict import CIMultiDict

from ..auth import TokenError
from ..backends.base import BrokerError
from ..config import Namespace
from ..logs import session_ended
from ..node import NODE, Node
from ..policy import Session
from ..protocol import (
    CLOSE_REASONS,
    HTTP_STATUS,
    CloseCode,
    ErrorCode,
    Event,
    Format,
    ProtocolError,
    Publication,
    StreamPosition,
    disconnect_push,
    encoded,
)
from ..subscriptions import SubscribeOutcome
from .flush import FLUSHER, Flusher
from .http_api import ApiError, client_session, json_response
from .origin import check_origin, log_refusal
from .pages import add_security_headers
from .wsbase import CLOSE_GRACE, BufferedConnection, take_over

__all__ = [
    "HttpStream",
    "format_positions",
    "ndjson_line",
    "parse_positions",
    "sse_data",
    "sse_event",
    "sse_routes",
]

log = logging.getLogger("tidings.sse")

MAX_TIMER = 86400.0 * 30  # token expiries further out than this are re-armed when reached
MAX_EPOCH = 64
_POSITION = re.compile(r"(\d{1,19}):([A-Za-z0-9_-]{0,64})")
SSE_KEEPALIVE = b":\n\n"  # a comment: EventSource ignores it, proxies see traffic
NDJSON_KEEPALIVE = b"\n"  # an empty line: NDJSON readers skip it


# ---------------------------------------------------------------------------------------------- formats


def sse_data(item: Publication | Event) -> bytes:
    """The part of an SSE event every subscriber shares: ``data:`` is the /ws push (``message`` events
    carry no ``event:`` line, so ``EventSource.onmessage`` gets them; join/leave are ``event: join`` /
    ``event: leave``). orjson writes no newline, so the JSON is one ``data:`` line."""
    if type(item) is Publication:
        return b"data: " + item.push_bytes() + b"\n\n"
    assert isinstance(item, Event)
    return b"event: " + item.kind.encode() + b"\ndata: " + item.push_bytes() + b"\n\n"


def sse_event(item: Publication | Event) -> bytes:
    """A whole SSE event for a stream of ONE channel: its ``id:`` is the publication's own position, so
    the bytes are the same for every subscriber of that channel."""
    data = encoded(item, sse_data)
    assert data is not None
    if type(item) is Publication:
        return b"id: %d:%s\n%s" % (item.offset, item.epoch.encode(), data)
    return data


def ndjson_line(item: Publication | Event) -> bytes:
    """The /ws push as one line of newline-delimited JSON (``/stream``)."""
    return item.push_bytes() + b"\n"


def format_positions(positions: list[StreamPosition | Publication | None]) -> bytes:
    """The SSE ``id:`` of a stream: each channel's position, in the order of its ``channel`` parameters."""
    return ";".join("-" if p is None else f"{p.offset}:{p.epoch}" for p in positions).encode()


def parse_positions(text: str, n: int, what: str) -> list[StreamPosition | None]:
    """``<offset>:<epoch>`` (or ``-``) per channel, ``;``-separated, exactly ``n`` of them; else
    ApiError invalid_field naming ``what`` (``since``, ``Last-Event-ID``)."""
    parts = text.split(";") if len(text) <= n * 86 else []
    if len(parts) != n:
        raise ApiError(
            ErrorCode.INVALID_FIELD,
            f"{what} must hold {n} position(s) '<offset>:<epoch>' (or '-'), one per channel, joined by ';'",
        )
    out: list[StreamPosition | None] = []
    for part in parts:
        if part == "-":
            out.append(None)
            continue
        m = _POSITION.fullmatch(part)
        if m is None or int(m[1]) > 2**63 - 1:
            raise ApiError(ErrorCode.INVALID_FIELD, f"{what}: {part[:40]!r} is not '<offset>:<epoch>'")
        out.append(StreamPosition(int(m[1]), m[2]))
    return out


# ---------------------------------------------------------------------------------------------- the gate


def _session(request: web.Request, node: Node) -> Session:
    """The request as the policy gate sees it (like a /ws connection; the token also in ``?token=``)."""
    return client_session(request, node, query_token=True)


def _channels(request: web.Request, node: Node, most: int) -> list[str]:
    channels = request.query.getall("channel", [])
    if not channels:
        raise ApiError(ErrorCode.INVALID_FIELD, "channel is required (?channel=name, repeated for more)")
    if len(channels) > most:
        raise ApiError(ErrorCode.TOO_MANY_SUBSCRIPTIONS, f"at most {most} channel(s) per request here")
    if len(set(channels)) != len(channels):
        raise ApiError(ErrorCode.INVALID_FIELD, "a channel is given twice")
    return channels


def _grants(request: web.Request, node: Node, session: Session, channels: list[str]) -> None:
    """Adopt the subscription tokens (``?sub_token=``, repeated): each names its channel in its
    ``channel`` claim, which must be one of the request's; it is verified by the gate's verifier."""
    tokens = request.query.getall("sub_token", [])
    if len(tokens) > len(channels):
        raise ApiError(ErrorCode.INVALID_FIELD, "more sub_token than channel parameters")
    for token in tokens:
        try:
            claimed = jwt.decode(token, options={"verify_signature": False}).get("channel")
        except jwt.InvalidTokenError:
            claimed = None
        if not isinstance(claimed, str) or claimed not in channels:
            node.auth_failures.fail(session.ip)
            raise ApiError(
                ErrorCode.UNAUTHORIZED, "each sub_token must be a subscription token for a channel asked"
            )
        try:
            session.grant(claimed, token)
        except TokenError as exc:
            if exc.code is not ErrorCode.PERMISSION_DENIED:
                node.auth_failures.fail(session.ip)
            raise ApiError(exc.code, exc.message) from None


def _authorize(request: web.Request, most: int) -> tuple[Node, Session, list[str], list[Namespace]]:
    """The checks a /ws subscribe makes, for every channel of the request (ProtocolError/ApiError)."""
    node = request.app[NODE]
    session = _session(request, node)
    channels = _channels(request, node, most)
    _grants(request, node, session, channels)
    spaces = [session.authorize(ch, "subscribe") for ch in channels]
    return node, session, channels, spaces


def _cross_origin(request: web.Request, node: Node) -> str | None:
    """The ``Access-Control-Allow-Origin`` for an allowed cross-origin page (None: same origin or no
    browser). A disallowed origin is refused (403), like a cross-origin WebSocket upgrade."""
    origin = request.headers.get("Origin")
    if origin is None:
        return None
    reason = check_origin(request, origin, node.settings.allowed_origins)
    if reason:
        log_refusal(request, "event stream", origin, reason)
        raise ApiError(ErrorCode.PERMISSION_DENIED, "cross-origin request refused (allowed_origins)")
    return origin


# ---------------------------------------------------------------------------------------------- streams


class HttpStream(BufferedConnection):
    """One ``/sse`` or ``/stream`` client: the hub's sink (:meth:`push` renders each publication once
    per format, through its cache) and the socket's protocol once the response head is written."""

    __slots__ = (
        "_abort_handle",
        "_expiry_handle",
        "_last_tbuf",
        "_stalled",
        "_task",
        "channels",
        "client_id",
        "counted",
        "ended",
        "format",
        "index",
        "ip",
        "kind",
        "positions",
        "session",
        "since",
        "spaces",
        "sse",
    )

    def __init__(
        self,
        node: Node,
        transport: asyncio.Transport,
        flusher: Flusher,
        session: Session,
        channels: list[str],
        spaces: list[Namespace],
        since: list[StreamPosition | None],
        *,
        sse: bool,
    ) -> None:
        self.node = node
        self.transport = transport
        self._flusher = flusher
        self._buffer = []
        self._buffered = 0
        self._tbuf = 0
        self._closing = False
        self._drained = None
        self.session = session
        self.client_id = session.client_id
        self.ip = session.ip
        self.channels = channels
        self.spaces = spaces
        self.since = since
        self.index = {ch: i for i, ch in enumerate(channels)}
        # What the client has, per channel (the SSE id): the last publication pushed, or where it started.
        self.positions: list[StreamPosition | Publication | None] = [None] * len(channels)
        self.sse = sse
        self.kind = "sse" if sse else "stream"
        self._begin()
        # One channel: the id is the publication's own position, so the whole event is shared.
        self.format: Format = (sse_event if len(channels) == 1 else sse_data) if sse else ndjson_line
        self.counted = False
        self.ended: set[str] = set()  # channels whose subscription the server ended (a reload's rules)
        self._task: asyncio.Task[None] | None = None
        self._abort_handle: asyncio.TimerHandle | None = None
        self._expiry_handle: asyncio.TimerHandle | None = None
        self._stalled = False
        self._last_tbuf = 0

    @property
    def user(self) -> str:
        return self.session.user

    @property
    def closed(self) -> bool:
        return self._closing

    # ------------------------------------------------------------------------------ start

    def start(self) -> None:
        """Count the stream in the node, start reading (to see the peer go), subscribe every channel.
        Its place in the connection limits was taken before the head was written (``counted``)."""
        node = self.node
        node.connections.add(self)
        node.drained.clear()
        self.transport.set_write_buffer_limits(high=self._high_water())
        self.transport.resume_reading()
        if self.sse:
            retry = int(node.settings.sse_retry * 1000)
            self.offer(b"retry: %d\n\n" % retry)
        self._arm_expiry()
        self._task = asyncio.get_running_loop().create_task(self._subscribe_all())

    async def _subscribe_all(self) -> None:
        subs = self.node.subscriptions
        recovered: dict[str, bool | None] = {}
        try:
            for i, channel in enumerate(self.channels):
                if channel in self.ended:
                    continue  # refused by a reload before its turn came

                def ready(outcome: SubscribeOutcome, i: int = i) -> None:
                    recovered[outcome.channel] = outcome.recovered
                    self._ready(i, outcome)

                if await subs.subscribe(self, channel, self.spaces[i], self.since[i], ready) is None:
                    return  # closed meanwhile
        except BrokerError as exc:
            log.warning("stream %s: cannot subscribe: %s", self.client_id, exc)
            self.close(CloseCode.INTERNAL_ERROR, "storage unavailable; reconnect")
            return
        except ProtocolError as exc:  # not expected: the channels were checked and are distinct
            self.close(CloseCode.INTERNAL_ERROR, exc.message)
            return
        finally:
            self._task = None
        said = []
        for ch, pos in zip(self.channels, self.positions, strict=True):
            if ch in self.ended or ch not in recovered:
                continue
            assert pos is not None
            said.append({"channel": ch, "offset": pos.offset, "epoch": pos.epoch, "recovered": recovered[ch]})
        self._control("subscribed", {"channels": said})

    def _ready(self, i: int, outcome: SubscribeOutcome) -> None:
        """History was read for channel ``i``: its position is where the replay starts (``since`` when it
        can be recovered), else the channel's top. A position that cannot be recovered is said (reset)."""
        since = self.since[i]
        if outcome.recovered and since is not None:
            self.positions[i] = since
            return
        self.positions[i] = outcome.position
        if outcome.recovered is False:
            self._control(
                "reset",
                {
                    "channel": outcome.channel,
                    **outcome.position.to_json(),
                    "reason": "publications after the position given are no longer in history "
                    "(or the channel's epoch changed): reload this channel's state, then go on "
                    "from here",
                },
            )

    def _control(self, kind: str, body: dict[str, Any]) -> None:
        """An event of this stream itself (reset, subscribed): with the id, so the position sticks."""
        payload = orjson.dumps({"type": kind, **body})
        self.msgs_out += 1
        if self.sse:
            ident = format_positions(self.positions)
            self.offer(b"id: %s\nevent: %s\ndata: %s\n\n" % (ident, kind.encode(), payload))
        else:
            self.offer(payload + b"\n")

    def _arm_expiry(self) -> None:
        """Close with 4002 when the connection token (or a subscription token) expires."""
        expiries = [
            e for e in (self.session.identity.expires, *self.session.grants.values()) if e is not None
        ]
        if not expiries or self._closing:
            return
        left = min(expiries) - time.time()
        if left <= 0:
            self.close(CloseCode.TOKEN_EXPIRED)
            return
        self._expiry_handle = asyncio.get_running_loop().call_later(min(left, MAX_TIMER), self._arm_expiry)

    def reconfigure(self) -> None:
        """A reload: the new ``max_buffer``; each channel the new rules no longer allow this client
        ends with ``event: unsubscribe`` (the ``/ws`` push's object), the others go on; a stream left
        with no channel ends with ``disconnect`` 4003 (reconnecting would be refused the same way)."""
        super().reconfigure()
        if self._closing:
            return
        subs = self.node.subscriptions
        for channel in self.channels:
            if channel in self.ended:
                continue
            why = self.session.still_allowed(channel)
            if why is None:
                continue
            self.ended.add(channel)
            subs.unsubscribe(self, channel)
            body = {"channel": channel, "code": str(why.code), "reason": why.message, "resubscribe": False}
            self._control("unsubscribe", body)
        if len(self.ended) == len(self.channels):
            self.close(CloseCode.FORBIDDEN, "the server's rules no longer allow this stream's channels")

    # ------------------------------------------------------------------------------ the sink

    def push(self, item: Publication | Event) -> None:
        if self._closing:
            return
        fmt = self.format
        try:
            body = item.cache[fmt]  # type: ignore[index]
        except (KeyError, TypeError):
            body = encoded(item, fmt)
        if body is None:
            return
        if type(item) is Publication:
            self.positions[self.index[item.channel]] = item
            if fmt is sse_data:  # several channels: the id is this stream's own
                self.offer(b"id: " + format_positions(self.positions) + b"\n" + body)
                return
        self.offer(body)

    def lost(self, channel: str) -> None:
        """The node could not keep a subscription gapless: the stream ends with 1012; the client
        reconnects with its last position (EventSource does by itself, with Last-Event-ID) and recovers."""
        self.close(CloseCode.SERVICE_RESTART)

    def close(self, code: CloseCode, reason: str | None = None) -> None:
        """Say why (``event: disconnect`` / a ``disconnect`` line), then end the response; the socket is
        aborted CLOSE_GRACE seconds from now if the peer does not take its last bytes."""
        if self._closing:
            return
        reason = reason or CLOSE_REASONS.get(code, "")
        self.close_code = int(code)
        if code != CloseCode.NORMAL:
            log.info("closing stream %s (%s): %d %s", self.client_id, self.ip, code, reason)
            self.noted(int(code), reason)
        self._closing = True
        words = disconnect_push(int(code), reason, code.reconnect)
        self._buffer.append(b"event: disconnect\ndata: " + words + b"\n\n" if self.sse else words + b"\n")
        self.flush()
        self.transport.close()
        loop = asyncio.get_running_loop()
        self._abort_handle = loop.call_later(CLOSE_GRACE, self.transport.abort)
        self._wake()
        loop.call_soon(self.node.subscriptions.drop, self)  # never from inside the hub's fan-out

    def beat(self) -> None:
        """The keep-alive, and the write timeout: a reader that took nothing since the last tick while
        bytes were waiting for it, and still nothing at this one, is dropped."""
        if self._closing:
            return
        size = self.transport.get_write_buffer_size()
        if size and size >= self._last_tbuf:
            if self._stalled:
                log.info("dropping stream %s (%s): write timeout", self.client_id, self.ip)
                self.transport.abort()
                return
            self._stalled = True
        else:
            self._stalled = False
        self._last_tbuf = size
        self.offer(SSE_KEEPALIVE if self.sse else NDJSON_KEEPALIVE)

    # ------------------------------------------------------------------------------ asyncio.Protocol

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)  # a stream's client has nothing more to say; what it sends is dropped

    def eof_received(self) -> bool | None:
        return False  # asyncio closes the transport

    def connection_lost(self, exc: Exception | None) -> None:
        node = self.node
        node.forget(self)
        if self.counted:
            self.counted = False
            node.conn_limits.release(self.ip)
        self._closing = True
        node.subscriptions.drop(self)
        for handle in (self._abort_handle, self._expiry_handle):
            if handle is not None:
                handle.cancel()
        if self._task is not None:
            self._task.cancel()
        self._wake()
        self._buffer.clear()
        self._ended(exc, self.client_id, self.ip, self.session.user)


def _acquire(node: Node, ip: str) -> None:
    """A place in the node's connection limits (the WebSocket's: per address and in total), or 429."""
    if not node.conn_limits.acquire(ip):
        raise ApiError(
            ErrorCode.RATE_LIMITED,
            "too many connections (max_connections_per_ip or max_connections): retry later",
            headers={"Retry-After": "5"},
        )


def _head(content_type: str, allow_origin: str | None) -> bytes:
    headers: CIMultiDict[str] = CIMultiDict()
    headers["Content-Type"] = content_type
    headers["Cache-Control"] = "no-store"
    headers["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once
    headers["Connection"] = "close"  # the body ends when the stream does
    if allow_origin is not None:
        headers["Access-Control-Allow-Origin"] = allow_origin
        headers["Vary"] = "Origin"
    add_security_headers(headers)
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return f"HTTP/1.1 200 OK\r\n{lines}\r\n".encode("latin-1")


async def _stream(request: web.Request, *, sse: bool) -> web.StreamResponse:
    node = request.app[NODE]
    allow_origin = _cross_origin(request, node)
    node, session, channels, spaces = _authorize(request, node.settings.max_subscriptions)
    since: list[StreamPosition | None] = [None] * len(channels)
    last = request.headers.get("Last-Event-ID") if sse else None
    if last:  # the browser's reconnect: newer than the ?since= of the URL it reconnects to
        since = parse_positions(last, len(channels), "Last-Event-ID")
    elif request.query.get("since"):
        since = parse_positions(request.query["since"], len(channels), "since")
    head = _head("text/event-stream; charset=utf-8" if sse else "application/x-ndjson", allow_origin)
    flusher = request.app[FLUSHER]
    _acquire(node, session.ip)
    try:
        conn = take_over(
            request, head, lambda t: HttpStream(node, t, flusher, session, channels, spaces, since, sse=sse)
        )
    except BaseException:
        node.conn_limits.release(session.ip)
        raise
    conn.counted = True
    conn.start()
    return web.Response(status=200)  # never sent: aiohttp's side of this connection has no transport


async def sse_handler(request: web.Request) -> web.StreamResponse:
    """``GET /sse?channel=…``: Server-Sent Events for EventSource."""
    return await _stream(request, sse=True)


async def stream_handler(request: web.Request) -> web.StreamResponse:
    """``GET /stream?channel=…``: the same stream as newline-delimited JSON."""
    return await _stream(request, sse=False)


# ---------------------------------------------------------------------------------------------- long-poll


POLL_ONLINE_LINGER = 5.0  # seconds a long-poll client's user stays online after its poll was answered


class PollWaiter(asyncio.Protocol):
    """A pending ``/poll``: the hub's sink for one channel. It collects the replay after ``since``; once
    it is held (:meth:`hold`), the first publication answers at once (as do the timeout and the node
    shutting down). What it collects is bounded by ``max_buffer`` bytes: beyond, the answer is the prefix
    so far, and the client polls on from there.

    While it waits it is the socket's protocol, taken over from aiohttp like an SSE stream (no request
    handler, task or coroutine frame held per pending poll); the answer is written here and the socket is
    handed back to a fresh aiohttp request handler for the client's next request (keep-alive)."""

    __slots__ = (
        "_answer",
        "_limit",
        "_reusable",
        "_settled",
        "_timer",
        "channel",
        "client_id",
        "pubs",
        "refused",
        "session",
        "size",
        "started",
        "user",
    )
    kind = "poll"
    online_linger = POLL_ONLINE_LINGER  # Web Push "offline": the user is online between two polls

    def __init__(self, session: Session, channel: str, limit: int) -> None:
        self.session = session
        self.channel = channel
        self.refused: ProtocolError | None = None  # a reload's rules no longer allow the channel
        self.client_id = session.client_id
        self.user = session.user
        self.pubs: list[Publication] = []
        self.size = 0
        self.started = time.monotonic()
        self._limit = limit
        self._settled = False
        self._answer: Callable[[bool], None] | None = None  # set while held: writes the answer
        self._timer: asyncio.TimerHandle | None = None
        self._reusable = True  # no byte came from the client while held

    @property
    def closed(self) -> bool:
        return self._settled

    def writable(self) -> None:
        return None

    def push(self, item: Publication | Event) -> None:
        if type(item) is not Publication or self._settled:
            return
        self.pubs.append(item)
        self.size += item.size
        if self._answer is not None or self.size >= self._limit:
            self.settle()

    def settle(self, reuse: bool = True) -> None:
        """Answer now, with what there is (``reuse``: the socket may serve the client's next request)."""
        if self._settled:
            return
        self._settled = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        answer, self._answer = self._answer, None
        if answer is not None:
            answer(reuse and self._reusable)

    def hold(self, timeout: float, answer: Callable[[bool], None], transport: asyncio.Transport) -> None:
        """Wait, as the socket's protocol, for the first live publication or ``timeout`` seconds. It
        reads meanwhile, to see the client go away (EOF, reset) at once."""
        self._answer = answer
        self._timer = asyncio.get_running_loop().call_later(timeout, self.settle)
        transport.resume_reading()

    def close(self, code: CloseCode, reason: str | None = None) -> None:
        self.settle(reuse=False)  # the node shuts down: answer now and close; the client polls on

    def reconfigure(self) -> None:
        """A reload: a channel the new rules no longer allow is answered now with the error a new poll
        would get (403 ``permission_denied``, ...)."""
        why = self.session.still_allowed(self.channel)
        if why is not None and not self._settled:
            self.refused = why
            self.settle(reuse=False)

    def lost(self, channel: str) -> None:
        self.settle()  # the client's next poll recovers from its position

    def data_received(self, data: bytes) -> None:
        """A request pipelined behind the held one: dropped (not buffered), and the answer says
        "Connection: close", so the client sends it again on a new connection."""
        self._reusable = False

    def eof_received(self) -> bool | None:
        return None  # the client is gone: the transport closes, connection_lost releases

    def connection_lost(self, exc: Exception | None) -> None:
        """The client went away while its poll was held: nothing to answer, only to release."""
        if not self._settled:
            answer, self._answer = self._answer, None
            self.settle()
            if answer is not None:
                answer(False)


def _timeout(request: web.Request, most: float) -> float:
    raw = request.query.get("timeout")
    if raw is None or raw == "":
        return min(30.0, most)
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= most:  # also NaN
        raise ApiError(ErrorCode.INVALID_FIELD, f"timeout must be a number of seconds from 0 to {most:g}")
    return value


def _answer(pubs: list[Publication], pos: StreamPosition, recovered: bool | None) -> web.Response:
    return json_response(
        {"publications": [p.wire_json() for p in pubs], **pos.to_json(), "recovered": recovered}
    )


async def poll_handler(request: web.Request) -> web.StreamResponse:
    """``GET /poll?channel=…&since=<offset>:<epoch>&timeout=<s>``: long-poll."""
    node = request.app[NODE]
    settings = node.settings
    allow_origin = _cross_origin(request, node)
    node, session, [channel], [ns] = _authorize(request, 1)
    timeout = _timeout(request, settings.poll_max_timeout)
    raw_since = request.query.get("since")
    since = parse_positions(raw_since, 1, "since")[0] if raw_since else None
    if raw_since and since is None:
        raise ApiError(ErrorCode.INVALID_FIELD, "since must be '<offset>:<epoch>'")
    if since is None:  # no position: the channel's current one, at once
        res = await node.subscriptions.read(channel, ns.history, limit=0)
        resp = _answer([], res.position, None)
    else:
        resp = await _hold(request, node, session, channel, ns, since, timeout, allow_origin)
    if allow_origin is not None:
        resp.headers["Access-Control-Allow-Origin"] = allow_origin
        resp.headers["Vary"] = "Origin"
    resp.headers["Cache-Control"] = "no-store"
    return resp


def _answer_bytes(body: bytes, allow_origin: str | None, keep_alive: bool, status: int = 200) -> bytes:
    """The whole HTTP response of a held poll (what ``_answer`` plus the handler's headers give)."""
    headers: CIMultiDict[str] = CIMultiDict()
    headers["Content-Type"] = "application/json"
    headers["Content-Length"] = str(len(body))
    headers["Date"] = formatdate(usegmt=True)
    headers["Cache-Control"] = "no-store"
    headers["Connection"] = "keep-alive" if keep_alive else "close"
    if allow_origin is not None:
        headers["Access-Control-Allow-Origin"] = allow_origin
        headers["Vary"] = "Origin"
    add_security_headers(headers)
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n{lines}\r\n".encode("latin-1") + body


async def _hold(
    request: web.Request,
    node: Node,
    session: Session,
    channel: str,
    ns: Namespace,
    since: StreamPosition,
    timeout: float,
    allow_origin: str | None,
) -> web.Response:
    """Subscribe (a pending poll is in no presence and makes no join/leave), answer the replay if there
    is one, else take the socket over and wait for the first live publication or the timeout."""
    _acquire(node, session.ip)  # a pending poll holds a place, like a WebSocket
    node.conn_limits.http += 1  # (while aiohttp's handler has it, the HTTP edge counts its descriptor)
    waiter = PollWaiter(session, channel, node.settings.max_buffer)
    node.connections.add(waiter)
    node.drained.clear()
    subs = node.subscriptions
    quiet = replace(ns, presence=False, join_leave=False)
    held = False

    def release() -> None:
        subs.drop(waiter)
        node.conn_limits.release(session.ip)
        node.forget(waiter)
        session_ended(
            "poll", session.client_id, session.ip, session.user, None, waiter.started, 0, len(waiter.pubs)
        )

    try:
        outcome = await subs.subscribe(waiter, channel, quiet, since, _nothing)
        if outcome is not None and outcome.recovered is False:
            return _answer([], outcome.position, False)
        if waiter.refused is not None:  # a reload's rules, while history was read
            raise ApiError(waiter.refused.code, waiter.refused.message)
        handler = request.protocol
        manager = getattr(handler, "_manager", None)
        if outcome is None or waiter.pubs or waiter.closed or timeout <= 0 or request.method != "GET":
            pubs = waiter.pubs
            # Cut short before history was read (shutdown): whether it can be recovered is not known yet.
            recovered = None if outcome is None and not pubs else True
            return _answer(pubs, pubs[-1].position() if pubs else since, recovered)
        # A request pipelined behind this one is already in the handler's queue: answer with
        # "Connection: close" so that the client sends it again on a new connection.
        keep_alive = request.keep_alive and manager is not None and not getattr(handler, "_messages", ())

        transport = request.transport

        def answer(reuse: bool) -> None:
            release()
            if transport is None or transport.is_closing():
                return
            pubs = waiter.pubs
            status = 200
            if waiter.refused is not None:  # a reload's rules: the error a new poll would get
                code = waiter.refused.code
                status = HTTP_STATUS[code]
                body = orjson.dumps({"error": {"code": str(code), "message": waiter.refused.message}})
            else:
                body = orjson.dumps(
                    {
                        "publications": [p.wire_json() for p in pubs],
                        **(pubs[-1].position() if pubs else since).to_json(),
                        "recovered": True,
                    }
                )
            again = reuse and keep_alive
            out = _answer_bytes(body, allow_origin, again, status)
            transport.write(out)
            node.counters.bytes_sent += len(out)
            if not again:
                transport.close()
                return
            fresh = manager()  # type: ignore[misc]  # the server's factory of request handlers
            transport.set_protocol(fresh)
            fresh.connection_made(transport)
            transport.resume_reading()

        take_over(request, b"", lambda t: waiter)  # (raises when the client is gone already)
        held = True
        assert transport is not None  # (take_over raised otherwise)
        waiter.hold(timeout, answer, transport)
        return web.Response(status=200)  # never sent: aiohttp's side of this connection has no transport
    finally:
        node.conn_limits.http -= 1
        if not held:
            release()


def _nothing(outcome: SubscribeOutcome) -> None:
    return None


def sse_routes() -> list[web.RouteDef]:
    return [
        web.get("/sse", sse_handler, allow_head=False),
        web.get("/stream", stream_handler, allow_head=False),
        web.get("/poll", poll_handler, allow_head=False),
    ]
