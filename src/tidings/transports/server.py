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

__all__ = ["make_runner"]


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
