"""The aiohttp runner, with what aiohttp lacks at the edge.

* A **header deadline for every request**: a connection that sends the headers of a request (the first,
  or any later one on a keep-alive connection) slower than ``header_timeout`` seconds, counted from its
  first byte (from the accept for the first request), is closed.
* A **body deadline**: a request body must arrive within ``body_timeout`` seconds after its headers.
* ``keepalive_timeout``: an idle keep-alive connection is closed after this many seconds (aiohttp's own
  default is an hour).
* A **connection cap** on plain HTTP connections, from the accept to the close, per address
  (``max_connections_per_ip``) and in total (``max_connections``); a trusted proxy's connections count in
  the total only (its clients are counted by their forwarded address once they upgrade). A WebSocket
  upgrade hands its slot back exactly once (``wsbase.upgrade`` calls the handler's ``connection_lost``) and
  the WebSocket takes its own slot in the node's limiter. A connection over the cap gets ``503`` at once,
  before its request is read, and is closed after at most ``REFUSAL_LINGER`` seconds.
* Open files: :func:`fit_open_files` raises the soft ``RLIMIT_NOFILE`` to the hard limit and lowers
  ``max_connections`` to what fits, so the caps refuse connections before ``accept()`` fails;
  :func:`log_accept_errors` turns asyncio's traceback per failed ``accept()`` (EMFILE/ENFILE) into one
  line per 10 seconds.
* No version in the ``Server`` header, and the security headers on the errors aiohttp answers itself.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from ..config import Settings
from ..limits import ConnectionLimiter, in_networks, parse_networks
from ..node import NODE
from .pages import add_security_headers

__all__ = ["AIOHTTP_RANGE", "check_aiohttp", "fit_open_files", "log_accept_errors", "make_runner"]

log = logging.getLogger("tidings.http")
LOG_EVERY = 10.0  # seconds between two log lines of the same kind
REFUSAL_LINGER = 1.0  # seconds a refused connection may take to read its 503
MAX_REFUSALS = 64  # refused connections lingering at once; beyond, they are reset without an answer
_REFUSAL_TEXT = b"too many connections (max_connections_per_ip or max_connections): retry later\n"
_REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\nServer: tidings\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Connection: close\r\nRetry-After: 5\r\nContent-Length: %d\r\n\r\n%s"
    % (len(_REFUSAL_TEXT), _REFUSAL_TEXT)
)
_last_logged: dict[str, float] = {}


# The aiohttp versions whose private attributes below were checked (pyproject.toml pins the same range):
# 3.14.5 runs the test suite; 3.9-3.13 have all but `_upgraded` (BaseProtocol gained it in 3.14).
AIOHTTP_RANGE = ">=3.14,<3.15"
# What transports/wsbase.upgrade() and this module use of aiohttp's request handler, beyond its API:
_HANDLER_ATTRS = (
    "_message_tail",  # bytes after the upgrade request in the same read: the first WebSocket frames
    "transport",  # set to None so that aiohttp lets go of the socket it no longer owns
    "connection_lost",  # called to release the handler once the socket is handed over
    "_request_count",  # header deadline: a request was read
    "_upgraded",  # header deadline: the connection was upgraded
    "_loop",
    "_manager",  # /poll: the server that makes a fresh handler for the socket after a held answer
    "_messages",  # /poll: requests pipelined behind a held one (then it answers "Connection: close")
)


def _attributes(cls: type) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        slots = getattr(klass, "__slots__", ())
        names.update((slots,) if isinstance(slots, str) else slots)
        names.update(vars(klass))
    return names


def check_aiohttp(handler_class: type = RequestHandler, version: str | None = None) -> None:
    """Fail loudly, at start-up, when aiohttp lacks what the WebSocket take-over relies on."""
    missing = [a for a in _HANDLER_ATTRS if a not in _attributes(handler_class)]
    if not hasattr(web.AppRunner, "_make_server"):
        missing.append("AppRunner._make_server")
    if missing:
        import aiohttp

        raise RuntimeError(
            f"tidings needs aiohttp {AIOHTTP_RANGE}: aiohttp {version or aiohttp.__version__} has no "
            f"{', '.join(missing)} (used to take WebSocket connections over from its request handler); "
            "install a supported aiohttp"
        )


def _log_limited(key: str, msg: str, *args: Any, level: int = logging.WARNING) -> None:
    now = time.monotonic()
    if now - _last_logged.get(key, -LOG_EVERY) >= LOG_EVERY:
        _last_logged[key] = now
        log.log(level, msg + " (the next %.0f s of these are not logged)", *args, LOG_EVERY)


class _Refusal(asyncio.Protocol):
    """A connection over the cap: answer 503, read and drop what the peer sends, close soon."""

    live = 0

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        _Refusal.live += 1
        transport.write(_REFUSAL)
        try:
            transport.write_eof()  # the peer reads the answer, then sees EOF
        except (OSError, NotImplementedError, RuntimeError):
            transport.close()
        self._timer = asyncio.get_running_loop().call_later(REFUSAL_LINGER, transport.abort)

    def data_received(self, data: bytes) -> None:
        pass  # read and dropped, so that the close is a FIN and not a reset that loses the 503

    def eof_received(self) -> bool:
        return False  # close

    def connection_lost(self, exc: Exception | None) -> None:
        _Refusal.live -= 1
        self._timer.cancel()


class _EdgeHandler(RequestHandler):
    __slots__ = ("_body", "_deadline", "_slot")
    header_timeout = 10.0
    body_timeout = 30.0
    limiter: ConnectionLimiter | None = None
    ws_limits: ConnectionLimiter | None = None  # the node's WebSocket connections
    room = 0  # file descriptors for connections of both kinds (0: no limit known)
    trusted: list[Any] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._deadline: asyncio.TimerHandle | None = None
        self._body: Any = None  # the payload of the request whose body is still arriving
        self._slot: tuple[str, bool] | None = None  # (address, counted per address) while counted
        if self.limiter is not None:
            peer = transport.get_extra_info("peername")
            ip = peer[0] if isinstance(peer, tuple) and peer else ""
            per_ip = not in_networks(ip, self.trusted)
            ws = self.ws_limits.total - self.ws_limits.http if self.ws_limits is not None else 0
            if self.room and self.limiter.total + ws >= self.room:
                self._refuse(transport, ip, per_ip, "the open-files limit")  # type: ignore[arg-type]
                return
            if not self.limiter.acquire(ip, per_ip):
                self._refuse(transport, ip, per_ip)  # type: ignore[arg-type]
                return
            self._slot = (ip, per_ip)
        super().connection_made(transport)
        self._arm(self.header_timeout)

    def _refuse(self, transport: asyncio.Transport, ip: str, per_ip: bool, which: str = "") -> None:
        assert self.limiter is not None
        if not which:
            at_ip = per_ip and self.limiter.per_ip_max and self.limiter.count(ip) >= self.limiter.per_ip_max
            which = "max_connections_per_ip" if at_ip else "max_http_connections"
        _log_limited(
            f"refuse:{which}",
            "refusing HTTP connections from %s: %s (%d) reached; %d open in all",
            ip,
            which,
            {
                "max_connections_per_ip": self.limiter.per_ip_max,
                "max_http_connections": self.limiter.total_max,
            }.get(which, self.room),
            self.limiter.total,
        )
        if _Refusal.live >= MAX_REFUSALS:
            transport.abort()
            return
        refusal = _Refusal(transport)
        transport.set_protocol(refusal)

    def _arm(self, delay: float) -> None:
        self._cancel()
        if delay > 0:
            self._deadline = self._loop.call_later(delay, self._too_slow)

    def _cancel(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def data_received(self, data: bytes) -> None:
        before = self._request_count
        super().data_received(data)
        if self._upgraded:  # a WebSocket handshake: wsbase and the WebSocket's own timers take over
            self._cancel()
            self._body = None
            return
        if self._request_count != before:  # the headers of a request are complete
            self._cancel()
            payload = self._messages[-1][1] if self._messages else None
            if payload is not None and not payload.is_eof():
                self._body = payload
                self._arm(self.body_timeout)
            else:
                self._body = None
        elif self._body is not None:
            if self._body.is_eof():
                self._body = None
                self._cancel()
        elif self._deadline is None and data:  # the first bytes of the next request's headers
            self._arm(self.header_timeout)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel()
        self._body = None
        slot, self._slot = self._slot, None
        if slot is not None and self.limiter is not None:  # exactly once: here or at the upgrade
            self.limiter.release(*slot)
        super().connection_lost(exc)

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        resp = super().handle_error(request, status, exc, message)
        add_security_headers(resp.headers)
        return resp

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """aiohttp logs a request it cannot parse with the raw line, which may hold a token or a key.
        Malformed requests get their 400; the log gets one line at DEBUG, without the request."""
        exc = kw.get("exc_info")
        if isinstance(exc, HttpProcessingError):
            self.logger.debug("malformed request refused (%s)", type(exc).__name__)
            return
        super().log_exception(*args, **kw)

    def _too_slow(self) -> None:
        self._deadline = None
        what = "body" if self._body is not None else "headers"
        _log_limited(
            f"slow:{what}",
            "closed a connection from %s: request %s too slow (%s)",
            self.peername[0] if isinstance(self.peername, tuple) else self.peername,
            what,
            "body_timeout" if what == "body" else "header_timeout",
            level=logging.INFO,
        )
        if self.transport is not None:
            self.transport.close()


class _Server(web.Server):
    handler_class: type[RequestHandler] = _EdgeHandler

    def __call__(self) -> RequestHandler:
        return self.handler_class(self, loop=self._loop, **self._kwargs)


class _Runner(web.AppRunner):
    header_timeout = 10.0

    async def _make_server(self) -> web.Server:
        node = self.app.get(NODE)
        attrs: dict[str, Any] = {"__slots__": (), "header_timeout": self.header_timeout}
        if node is not None:
            settings = node.settings
            self._kwargs.setdefault("keepalive_timeout", settings.keepalive_timeout)
            attrs["body_timeout"] = settings.body_timeout
            attrs["limiter"] = ConnectionLimiter(
                settings.max_http_connections, settings.max_connections_per_ip
            )
            attrs["ws_limits"] = node.conn_limits
            attrs["room"] = fd_room()
            attrs["trusted"] = parse_networks(settings.trusted_proxies)
        server = await super()._make_server()
        if not all(hasattr(server, a) for a in ("_loop", "_kwargs")):
            check_aiohttp(type("Missing", (), {}))  # raises the same clear message
        server.__class__ = _Server
        handler = type("Handler", (_EdgeHandler,), attrs)
        server.handler_class = handler  # type: ignore[attr-defined]
        if node is not None:
            node.reload_hooks.append(lambda new: _reload_edge(handler, new))
        return server


def _reload_edge(handler: type[_EdgeHandler], settings: Settings) -> None:
    """A reload: the edge's deadlines, caps and trusted proxies, for the connections accepted from now
    on (and the caps for every connection's next accept/release)."""
    handler.header_timeout = settings.header_timeout
    handler.body_timeout = settings.body_timeout
    handler.trusted = parse_networks(settings.trusted_proxies)
    if handler.limiter is not None:
        handler.limiter.total_max = settings.max_http_connections
        handler.limiter.per_ip_max = settings.max_connections_per_ip


def make_runner(app: web.Application, header_timeout: float, **kwargs: Any) -> web.AppRunner:
    runner = _Runner(app, **kwargs)
    runner.header_timeout = header_timeout
    return runner


# ---------------------------------------------------------------------------------------------- open files


def fd_reserve(limit: int) -> int:
    """File descriptors kept for everything but client connections (storage, logs, refusals): 256 at
    most (20,000 open files leave 19,744 for connections)."""
    return max(MAX_REFUSALS + 64, min(256, limit // 10))


def fd_room() -> int:
    """File descriptors this process has for client connections (HTTP and WebSocket together): the
    open-files limit less :func:`fd_reserve`; 0 when unknown."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return 0
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 0
    return max(4, soft - fd_reserve(soft))


def fit_open_files(settings: Settings) -> str:
    """Raise the soft RLIMIT_NOFILE to the hard limit, and lower ``max_connections`` so that WebSocket
    connections leave room for HTTP ones (a twentieth of the room, at least 64). HTTP connections are
    refused (503) whenever both kinds together would not fit (:func:`fd_room`), and beyond
    ``max_http_connections`` when that is set. ``max_connections = 0`` (unlimited) is the operator's
    choice and is kept, with a warning in the line. Returns the line to log."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return "open files: limit unknown on this platform"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    raised = ""
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            raised = f" (raised from {soft})"
            soft = target
        except (ValueError, OSError) as exc:
            raised = f" (could not raise it to {hard}: {exc})"
    room = fd_room()
    line = f"open files: limit {soft}{raised}"
    budget = max(2, room - max(64, room // 20))
    if not settings.max_connections:
        line += f"; max_connections unlimited: more than {budget} WebSocket connections may not fit"
    elif settings.max_connections > budget:
        line += (
            f"; max_connections {settings.max_connections} lowered to {budget} so that WebSocket and HTTP "
            f"connections fit (raise the hard limit, e.g. LimitNOFILE= in systemd)"
        )
        settings.max_connections = budget
    else:
        line += f"; max_connections {settings.max_connections} fits"
    return line


_ACCEPT_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def log_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """asyncio logs a traceback for every failed ``accept()`` when the process is out of file descriptors
    (and retries every 0.1 s): make that one line per 10 seconds, passing every other error on."""
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in _ACCEPT_ERRORS:
            _log_limited(
                "accept",
                "cannot accept connections: %s; raise the open-files limit (ulimit -n, LimitNOFILE=) "
                "or lower max_connections",
                exc.strerror or exc,
                level=logging.ERROR,
            )
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
