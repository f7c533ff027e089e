"""Coalesced writes: frames queued for a connection during one loop iteration go out in one write."""

from __future__ import annotations

import asyncio
from typing import Protocol

from aiohttp import web

__all__ = ["FLUSHER", "Flushable", "Flusher"]


class Flushable(Protocol):
    def flush(self) -> None: ...


class Flusher:
    """One ``call_soon`` per loop iteration flushes every connection that got frames in it."""

    __slots__ = ("_dirty", "_loop", "_scheduled")

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dirty: list[Flushable] = []
        self._scheduled = False

    def mark(self, conn: Flushable) -> None:
        self._dirty.append(conn)
        if not self._scheduled:
            self._scheduled = True
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._loop.call_soon(self._run)

    def _run(self) -> None:
        self._scheduled = False
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            conn.flush()


FLUSHER = web.AppKey("tidings.flusher", Flusher)
