"""The aiohttp runner, with what aiohttp lacks: a deadline for the first request's headers.

A client that opens a TCP connection and then sends its request headers slowly (or never) is closed
after ``header_timeout`` seconds, so idle sockets cannot pile up before any handler runs.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

__all__ = ["AIOHTTP_RANGE", "check_aiohttp", "make_runner"]

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


class _HeaderDeadlineHandler(RequestHandler):
    __slots__ = ("_deadline",)
    header_timeout = 10.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        if self.header_timeout > 0:
            self._deadline = self._loop.call_later(self.header_timeout, self._too_slow)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._deadline is not None and (self._request_count or self._upgraded):
            self._deadline.cancel()
            self._deadline = None

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        super().connection_lost(exc)

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
        if not self._request_count and self.transport is not None:
            self.transport.close()


class _Server(web.Server):
    handler_class: type[RequestHandler] = _HeaderDeadlineHandler

    def __call__(self) -> RequestHandler:
        return self.handler_class(self, loop=self._loop, **self._kwargs)


class _Runner(web.AppRunner):
    header_timeout = 10.0

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        if not all(hasattr(server, a) for a in ("_loop", "_kwargs")):
            check_aiohttp(type("Missing", (), {}))  # raises the same clear message
        handler_class = type(
            "Handler", (_HeaderDeadlineHandler,), {"__slots__": (), "header_timeout": self.header_timeout}
        )
        server.__class__ = _Server
        server.handler_class = handler_class  # type: ignore[attr-defined]
        return server


def make_runner(app: web.Application, header_timeout: float, **kwargs: Any) -> web.AppRunner:
    runner = _Runner(app, **kwargs)
    runner.header_timeout = header_timeout
    return runner
