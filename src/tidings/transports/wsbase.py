"""The WebSocket transport shared by /ws, /chatsocket and /websocket.

aiohttp parses the HTTP upgrade request; once it is accepted (:func:`upgrade`), the connection's transport
is handed to a :class:`WsProtocol`, an ``asyncio.Protocol`` that parses frames itself
(``protocol.frames``). An idle connection is then one small object: no task, no reader queue, no
per-connection timer (pings come from one :class:`Heartbeat` for all connections). Frames queued for a
connection during one loop iteration go out in one write (:class:`~tidings.transports.flush.Flusher`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web

from ..auth import TokenError
from ..limits import client_ip
from ..logs import session_ended
from ..metrics import tcp_bytes_sent
from ..node import NODE, Node
from ..policy import Session
from ..protocol import CLOSE_REASONS, CloseCode, ErrorCode, Event, Format, Publication, encoded
from ..protocol.wsconn import (
    CloseReceived,
    Connection,
    ConnectionFailed,
    Message,
    Opcode,
    Ping,
    State,
)
from .flush import FLUSHER, Flusher
from .formats import ws_frame, ws_zframe
from .origin import origin_allowed

__all__ = [
    "CLOSE_GRACE",
    "HEARTBEAT",
    "MAX_REFUSED",
    "BufferedConnection",
    "Heartbeat",
    "WsProtocol",
    "take_over",
    "token_close_code",
    "upgrade",
]

log = logging.getLogger("tidings.ws")

MAX_REFUSED = 50  # commands over the budget in a row before the connection is closed with 4030
CLOSE_GRACE = 5.0  # seconds a closing peer gets to take its last frames before the socket is aborted
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3
_CLOSE_CODES = frozenset(int(c) for c in CloseCode)


def token_close_code(exc: TokenError) -> CloseCode:
    """The close code for a connection token that was refused."""
    return CloseCode.TOKEN_EXPIRED if exc.code is ErrorCode.TOKEN_EXPIRED else CloseCode.UNAUTHORIZED


class BufferedConnection(asyncio.Protocol):
    """What every connection the server writes pushes to shares (the WebSocket ones, SSE, NDJSON
    streams): an outgoing queue bounded in bytes, flushed once per loop iteration (``Flusher``), a peer
    too slow for it cut off (:meth:`close` with 4008), and the drain that paces replays
    (:meth:`writable`). Subclasses set the slots in their ``__init__`` and implement :meth:`close`."""

    __slots__ = (
        "_buffer",
        "_buffered",
        "_closing",
        "_drained",
        "_flusher",
        "_t0",
        "_tbuf",
        "bytes_in",
        "close_code",
        "msgs_in",
        "msgs_out",
        "node",
        "transport",
    )

    node: Node
    transport: asyncio.Transport
    kind: str  # the transport's name (ws, chatsocket, echo, sse, stream): metrics, session log lines, stats
    client_id: str
    ip: str
    _flusher: Flusher
    _buffer: list[bytes]
    _buffered: int
    _tbuf: int  # the transport's buffer after the last flush: an upper bound until the next one
    _closing: bool
    _drained: asyncio.Future[None] | None  # set while a replay waits for the drain
    # The session's figures, for its end line (``logs.session_ended``): set by :meth:`_begin`.
    _t0: float  # time.monotonic() at the start
    msgs_in: int  # data messages received
    msgs_out: int  # data messages queued: publications, events and replies
    close_code: int | None  # how it was closed (the close handshake's code, whoever started it)
    bytes_in: int  # bytes read from the socket (the metrics add open connections' in at scrape time)

    def _begin(self) -> None:
        self._t0 = time.monotonic()
        self.msgs_in = 0
        self.msgs_out = 0
        self.close_code = None
        self.bytes_in = 0

    def _ended(self, exc: Exception | None, client_id: str, ip: str, user: str) -> None:
        """The session is over (``connection_lost``): its one session line, its figures to the
        node's counters (``tidings.metrics``)."""
        self.node.counters.connection_ended(self.close_code, self.bytes_in, tcp_bytes_sent(self.transport))
        session_ended(
            self.kind,
            client_id,
            ip,
            user,
            self.close_code,
            self._t0,
            self.msgs_in,
            self.msgs_out,
            exc,
        )

    def close(self, code: CloseCode, reason: str | None = None) -> None:
        raise NotImplementedError

    @property
    def user(self) -> str:
        raise NotImplementedError

    def noted(self, code: int, reason: str) -> None:
        """A close of ours with an error code, for GET /api/stats: a slow consumer (with what it held
        back, in bytes) into the node's slow-consumer ring, any other error code into its error ring."""
        if code == CloseCode.SLOW_CONSUMER:
            self.node.slow_consumers.add(
                transport=self.kind,
                client=self.client_id,
                user=self.user,
                ip=self.ip,
                buffered=self._buffered + self._tbuf,
            )
        elif code not in (CloseCode.NORMAL, CloseCode.GOING_AWAY):
            self.node.errors.add(
                source=self.kind, code=code, message=reason, client=self.client_id, user=self.user
            )

    def beat(self) -> None:
        """One tick of the node's :class:`Heartbeat` (every ``ping_interval`` seconds)."""

    def reconfigure(self) -> None:
        """The node's settings changed (``Node.reload``): the new ``max_buffer`` from now on."""
        if not self._closing:
            self.transport.set_write_buffer_limits(high=self._high_water())

    def _high_water(self) -> int:
        return max(1, self.node.settings.max_buffer // 4)

    def offer(self, frame: bytes) -> bool:
        """Queue a frame without blocking; False when closed, or when the peer is too slow (closed 4008).

        Only bytes the kernel would not take count: when the queue reaches ``max_buffer`` it is handed to
        the transport at once, and the peer is cut off only if what the transport still holds after that
        is over the limit. So a burst to a fast reader passes, and a stalled reader holds at most about
        twice ``max_buffer``."""
        if self._closing:
            return False
        size = self._buffered + len(frame)
        if size + self._tbuf > self.node.settings.max_buffer:
            self.flush()
            if self._tbuf > self.node.settings.max_buffer:
                self.node.counters.slow_consumer_closes += 1
                self.close(CloseCode.SLOW_CONSUMER)
                return False
            size = len(frame)
        if not self._buffer:
            self._flusher.mark(self)
        self._buffer.append(frame)
        self._buffered = size
        return True

    def writable(self) -> Awaitable[None] | None:
        """None when more may be queued now; else a future that resolves once the transport drained
        (asyncio's ``resume_writing``) or the connection closed. Paces replays."""
        if self._closing:
            return None
        self.flush()
        if self._tbuf <= self._high_water():
            return None
        if self._drained is None:
            self._drained = asyncio.get_running_loop().create_future()
        return self._drained

    def pause_writing(self) -> None:
        pass  # writable() decides from the transport's buffer size itself

    def resume_writing(self) -> None:
        self._tbuf = self.transport.get_write_buffer_size()
        self._wake()

    def _wake(self) -> None:
        fut, self._drained = self._drained, None
        if fut is not None and not fut.done():
            fut.set_result(None)

    def flush(self) -> None:
        """Write what is queued. Nothing is counted here (the bytes sent are the kernel's:
        ``metrics.tcp_bytes_sent``), as nothing may be per delivery."""
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

    def note_out(self, n: int) -> None:
        """``n`` more data messages were queued (the hub's tally of a subscription that ended)."""
        self.msgs_out += n


class WsProtocol(BufferedConnection):
    """One WebSocket peer: frames in (:meth:`on_text`), frames out (:meth:`offer`), closing by the RFC.
    It is also the hub's sink: :meth:`push` renders a publication or event in this transport's wire
    format (``format``, through the item's per-format cache) and queues it.

    Subclasses implement :meth:`on_text`, and may extend :meth:`start`, :meth:`detach` and
    :meth:`allow_ping`."""

    __slots__ = (
        "_abort_handle",
        "_conn",
        "_refused",
        "client_id",
        "counted",
        "deflate",
        "format",
        "ip",
        "pinged",
        "rx",
        "session",
    )
    IN_BAND_AUTH = False  # True where the protocol has its own way to authenticate after the upgrade
    kind = "ws"

    def __init__(
        self, node: Node, transport: asyncio.Transport, ip: str, flusher: Flusher, deflate: bool = False
    ) -> None:
        self.node = node
        self.transport = transport
        self.ip = ip
        self._flusher = flusher
        self.deflate = deflate
        self.counted = False  # holds a place in the connection limits
        self.session = Session(node.policy, ip)
        self.client_id = self.session.client_id
        self.format: Format = ws_zframe if deflate else ws_frame
        self._drained: asyncio.Future[None] | None = None  # set while a replay waits for the drain
        self._refused = 0
        settings = node.settings
        self._conn = Connection(  # the WebSocket rules, sans I/O; this object only moves bytes
            settings.max_message_size,
            deflate=deflate,
            max_fragments=settings.max_fragments,
            frame_rate=settings.ws_frame_rate,
            inflate_rate=settings.ws_inflate_rate,
        )
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._tbuf = 0  # the transport's buffer after the last flush: an upper bound until the next one
        self._closing = False
        self.rx = True  # something arrived since the last heartbeat tick
        self.pinged = False
        self._abort_handle: asyncio.TimerHandle | None = None
        self._begin()

    # ------------------------------------------------------------------------------ hooks

    def on_text(self, payload: bytes) -> None:
        """A complete text message (valid UTF-8) arrived."""
        raise NotImplementedError

    @property
    def user(self) -> str:
        return self.session.user

    @property
    def closed(self) -> bool:
        return self._closing

    def start(self, tail: bytes, request: web.Request) -> None:
        """Called once the handshake response is written and this object owns the transport: the
        ``?token=`` of the upgrade request authenticates; without one, a server that refuses anonymous
        clients gives an in-band protocol ``auth_timeout`` seconds and closes the others (4001)."""
        self.register()
        token = request.query.get("token")
        if token is not None:
            try:
                self.authenticate(token)
            except TokenError as exc:
                self.close(token_close_code(exc))
                return
        elif not self.node.settings.allow_anonymous:
            if not self.IN_BAND_AUTH:
                self.close(CloseCode.UNAUTHORIZED, "this server needs a connection token (?token=)")
                return
            self.on_anonymous()
        if tail:
            self.data_received(tail)

    def authenticate(self, token: str) -> None:
        """Verify a connection token; a bad one counts against the address (TokenError)."""
        before = self.session.user
        try:
            self.session.authenticate(token)
        except TokenError:
            self.node.auth_failures.fail(self.ip)
            raise
        if not before and self.session.user and self in self.node.connections:
            self.node.push.connected(self.session.user)  # online here: "offline" Web Push skips them

    def spend(self) -> bool:
        """One command (message) from the session's budget. False when refused; a client refused
        MAX_REFUSED times in a row is closed (4030)."""
        if self.session.take():
            self._refused = 0
            return True
        self._refused += 1
        self.node.counters.rate_limited += 1
        if self._refused > MAX_REFUSED:
            self.close(CloseCode.RATE_LIMITED)
        return False

    def on_anonymous(self) -> None:
        """An anonymous connection on a server that needs tokens, with a protocol that can send one."""

    def reconfigure(self) -> None:
        """A reload: the command budget and the WebSocket limits follow the new settings from the next
        frame on; an anonymous connection on a server that now needs tokens is treated as at the
        upgrade (closed 4001 without an in-band way to authenticate, else given ``auth_timeout``)."""
        super().reconfigure()
        if self._closing:
            return
        s = self.node.settings
        self.session.reconfigure()
        self._conn.set_limits(
            s.max_message_size,
            max_fragments=s.max_fragments,
            frame_rate=s.ws_frame_rate,
            inflate_rate=s.ws_inflate_rate,
        )
        if self.session.identity.anonymous and not s.allow_anonymous:
            if not self.IN_BAND_AUTH:
                self.close(CloseCode.UNAUTHORIZED, "this server needs a connection token (?token=)")
            else:
                self.on_anonymous()

    def register(self) -> None:
        """Count this connection in the node and start reading."""
        self.node.connections.add(self)
        self.node.drained.clear()
        # writable() waits for resume_writing(), which asyncio calls only after pause_writing(): both
        # thresholds are set here so that they match.
        self.transport.set_write_buffer_limits(high=self._high_water())
        self.transport.resume_reading()

    def detach(self) -> None:
        """Leave every channel (runs on the loop soon after closing starts, never inside close())."""
        self.node.subscriptions.drop(self)

    def lost(self, channel: str) -> None:
        """A subscription the node could not keep gapless was ended (``Sink.lost``). A protocol without
        positions cannot resubscribe on its own: the connection is closed with 1012 (reconnect)."""
        self.close(CloseCode.SERVICE_RESTART)

    def on_binary(self, payload: bytes) -> None:
        """A complete binary message arrived; by default refused (1003)."""
        self.close(CloseCode.UNSUPPORTED_DATA)

    def allow_ping(self) -> bool:
        return True

    def after_frames(self) -> None:
        """Called after the messages of one read were handled (to act on them together)."""

    def last_words(self, code: CloseCode, reason: str) -> bytes | None:
        """A frame to send just before the close frame (the protocol's own "why"), or None."""
        return None

    # ------------------------------------------------------------------------------ sending

    def push(self, item: Publication | Event) -> None:
        """The fan-out's hot path, once per subscriber: :meth:`offer` with its common case inlined."""
        try:  # the bytes of this format are usually built already
            frame = item.cache[self.format]  # type: ignore[index]
        except (KeyError, TypeError):  # not yet (TypeError: no cache at all yet)
            frame = encoded(item, self.format)
        if frame is None or self._closing:
            return
        size = self._buffered + len(frame)
        if size + self._tbuf > self.node.settings.max_buffer:
            self.offer(frame)  # the limit's rule
            return
        if not self._buffer:
            self._flusher.mark(self)
        self._buffer.append(frame)
        self._buffered = size

    def close(self, code: CloseCode, reason: str | None = None) -> None:
        """Say why (a disconnect push), send the close frame, and drop the socket once the peer answered
        (or after CLOSE_GRACE seconds)."""
        if self._closing:
            return
        reason = reason or CLOSE_REASONS.get(code, "")
        self._shut(int(code), reason, self._conn.send_close(int(code), reason), ours=True)

    def _shut(self, code: int, reason: str, frame: bytes, *, ours: bool) -> None:
        """The one close path, whoever started closing: the last frames go out after what is queued,
        the rest of the server lets go of this connection, and the socket is closed once the close
        handshake is done (or the connection failed), and aborted CLOSE_GRACE seconds from now at the
        latest, whether or not the peer reads."""
        self._closing = True
        self.close_code = code
        if ours and code != CloseCode.NORMAL:
            log.info("closing %s (%s): %d %s", self.client_id, self.ip, code, reason)
            self.noted(code, reason)
        if ours and frame and code in _CLOSE_CODES:
            # The last frames go out even past the buffer limit: they are the last this peer gets.
            words = self.last_words(CloseCode(code), reason)
            if words is not None:
                self._buffer.append(words)
        if frame:
            self._buffer.append(frame)
        self.flush()
        self._detach_soon()
        self._abort_handle = asyncio.get_running_loop().call_later(CLOSE_GRACE, self.transport.abort)
        if self._conn.state is State.CLOSED:
            self.transport.close()

    def _detach_soon(self) -> None:
        """Closing never calls back into the hub from inside the call that closed (it may be the hub's
        own fan-out loop): leaving the channels runs on the loop, next."""
        self._wake()
        asyncio.get_running_loop().call_soon(self.detach)

    def beat(self) -> None:
        """Silent since the last tick: pinged; still silent at the next one: dropped (the peer is gone)."""
        if self.rx:
            self.rx = False
        elif self.pinged:
            log.info("dropping %s (%s): no pong", self.client_id, self.ip)
            self.transport.abort()
        else:
            self.ping()

    def ping(self) -> None:
        if not self._closing:
            self.pinged = True
            self.offer(self._conn.send_ping())

    # ------------------------------------------------------------------------------ asyncio.Protocol

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        self.rx = True
        self.pinged = False
        conn = self._conn
        events = conn.receive_data(data)
        for ev in events:
            if self._closing:
                break  # closing: only the peer's close still counts, and the connection has it
            if type(ev) is Message:
                self.msgs_in += 1
                if ev.opcode is Opcode.TEXT:
                    self.on_text(ev.data)
                else:
                    self.on_binary(ev.data)
            elif type(ev) is Ping and self.allow_ping():
                self.offer(conn.send_pong(ev.data))
            # Pong: being alive is all it says. CloseReceived, ConnectionFailed: below.
        if events:
            self.after_frames()
        if conn.state is State.OPEN:
            return
        # The peer closed, or broke a rule: answer after everything queued so far.
        frame = conn.data_to_send()
        if not self._closing and events:
            last = events[-1]
            if type(last) is ConnectionFailed:
                self._shut(last.code, last.reason, frame, ours=True)
            else:
                assert type(last) is CloseReceived
                self._shut(conn.close_sent or CloseCode.NORMAL, "", frame, ours=False)
        elif conn.state is State.CLOSED:
            if frame:  # the peer's close crossed ours (never: ours was sent), or a failure
                self.transport.write(frame)
            self.transport.close()

    def eof_received(self) -> bool | None:
        self._conn.receive_eof()
        return False  # asyncio closes the transport

    def connection_lost(self, exc: Exception | None) -> None:
        node = self.node
        node.forget(self)  # a user's connection: Web Push sees them go offline here
        if self.counted:
            self.counted = False
            node.conn_limits.release(self.ip)
        self._closing = True
        self._conn.receive_eof()
        self.detach()
        self._wake()
        if self._abort_handle is not None:
            self._abort_handle.cancel()
            self._abort_handle = None
        self._buffer.clear()
        if self.close_code is None:
            self.close_code = 1006  # no close handshake
        self._ended(exc, self.client_id, self.ip, self.session.user)


class Heartbeat:
    """One timer for every connection: each tick calls every connection's ``beat`` (a WebSocket that sent
    nothing since the last tick is pinged, and dropped when it then stays silent for another tick; an
    HTTP stream gets its keep-alive and its write timeout)."""

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

    def set_interval(self, interval: float) -> None:
        """A reload's ``ping_interval``: the next tick comes that long from now (0: no more ticks)."""
        if interval == self.interval:
            return
        self.interval = interval
        if self._handle is not None or interval > 0:
            self.stop()
            self.start()

    def _tick(self) -> None:
        for conn in list(self.node.connections):
            if isinstance(conn, BufferedConnection):
                conn.beat()
        self._handle = asyncio.get_running_loop().call_later(self.interval, self._tick)


HEARTBEAT = web.AppKey("tidings.heartbeat", Heartbeat)


def _handshake_error(text: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=text + "\n", headers={"Sec-WebSocket-Version": "13"})


def _tokens(request: web.Request, name: str) -> set[str]:
    """A header's comma-separated tokens (RFC 9110 §5.6.1), lower-cased, over all its lines."""
    return {t.strip().lower() for line in request.headers.getall(name, ()) for t in line.split(",")} - {""}


def _accept(request: web.Request) -> bytes:
    """Check the upgrade request (RFC 6455 §4.2.1) and return the Sec-WebSocket-Accept value."""
    h = request.headers
    if request.method != "GET":
        raise web.HTTPMethodNotAllowed(request.method, ["GET"])
    if "websocket" not in _tokens(request, "Upgrade"):
        raise _handshake_error("expected a WebSocket upgrade (Upgrade: websocket)")
    if "upgrade" not in _tokens(request, "Connection"):
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


_DEFLATE_PARAMS = frozenset(
    {
        "server_no_context_takeover",
        "client_no_context_takeover",
        "server_max_window_bits",
        "client_max_window_bits",
    }
)


def _deflate_offer_ok(params: list[str]) -> bool:
    """One permessage-deflate offer's parameters (RFC 7692 §7.1): each known, at most once, with a valid
    value; and acceptable to us (we compress with the full window, once for every receiver)."""
    seen: set[str] = set()
    for param in params:
        name, eq, value = param.partition("=")
        name = name.strip().lower()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        if name not in _DEFLATE_PARAMS or name in seen:
            return False  # unknown or duplicate: decline this offer
        seen.add(name)
        if name.endswith("_no_context_takeover"):
            if eq:
                return False
        elif name == "server_max_window_bits":
            if value != "15":  # 8-14 are valid, but we only compress with a 15-bit window
                return False
        elif eq and not (value.isdigit() and len(value) <= 2 and 8 <= int(value) <= 15):
            return False  # client_max_window_bits: absent value, or 8-15
    return True


def _wants_deflate(request: web.Request) -> bool:
    """A permessage-deflate offer we can accept (with no context takeover both ways) was made; offers
    with unknown, invalid or duplicate parameters are declined, and the next one is tried."""
    for line in request.headers.getall("Sec-WebSocket-Extensions", ()):
        for offer in line.split(","):
            name, *params = offer.split(";")
            if name.strip().lower() == "permessage-deflate" and _deflate_offer_ok(params):
                return True
    return False


P = TypeVar("P", bound=asyncio.Protocol)


def take_over(request: web.Request, head: bytes, make: Callable[[asyncio.Transport], P]) -> P:
    """Write ``head`` (a whole HTTP response head) ourselves and hand the socket over from aiohttp to
    the protocol object ``make`` builds: aiohttp's request handler lets go of the transport (so it neither
    writes a response nor closes it) and is released (its slot in the HTTP connection cap with it); the
    new object becomes the transport's protocol, with reading paused. The request handler must then
    return at once (any response: it is never sent). Used by the WebSocket upgrade and the HTTP streams
    (SSE, NDJSON)."""
    transport = request.transport
    handler = request.protocol
    if transport is None or transport.is_closing():
        raise web.HTTPBadRequest(text="connection closed\n")
    # (uvloop's transports are not registered asyncio.Transport subclasses: no isinstance check here)
    transport.pause_reading()
    sock = transport.get_extra_info("socket")
    if sock is not None:  # pushes are small and latency matters: no Nagle delay
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = make(transport)
    transport.write(head)
    transport.set_protocol(conn)
    handler.transport = None
    handler.connection_lost(None)
    return conn


async def upgrade(
    request: web.Request, make: Callable[[Node, asyncio.Transport, str, Flusher, bool], WsProtocol]
) -> web.StreamResponse:
    """Accept a WebSocket upgrade and hand the socket to the protocol object ``make`` builds."""
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
    tail = bytes(getattr(request.protocol, "_message_tail", b""))
    conn = take_over(request, head + b"\r\n", lambda t: make(node, t, ip, request.app[FLUSHER], deflate))
    transport = conn.transport
    conn.counted = node.conn_limits.acquire(ip)
    if not conn.counted:
        transport.resume_reading()  # to see the peer's answer to the close frame
        conn.close(CloseCode.TOO_MANY_CONNECTIONS)
    else:
        conn.start(tail, request)
    # Never sent: aiohttp's side of this connection has no transport any more.
    return web.Response(status=101)
