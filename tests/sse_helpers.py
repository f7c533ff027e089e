"""A Server-Sent Events reader for the tests (over a real aiohttp client), parsing the stream the way
the HTML standard's EventSource does: ``id``, ``event``, ``data``, ``retry`` fields, comments, blank line
ends an event. Every read is bounded in time."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson


@dataclass
class SseEvent:
    event: str = "message"
    data: str = ""
    id: str | None = None  # the last event ID after this event (it sticks from earlier events)

    def json(self) -> Any:
        return orjson.loads(self.data)


@dataclass
class SseReader:
    resp: aiohttp.ClientResponse
    last_id: str | None = None
    retry: int | None = None
    comments: int = 0
    _pending: list[SseEvent] = field(default_factory=list)

    async def next(self, timeout: float = 5.0) -> SseEvent:
        """The next event (comments and retry-only blocks are counted, not returned)."""
        async with asyncio.timeout(timeout):
            ev_type, data, saw_data = "", [], False
            while True:
                raw = await self.resp.content.readline()
                if not raw:
                    raise EOFError("the stream ended")
                line = raw.decode().rstrip("\r\n")
                if line == "":
                    if saw_data:
                        return SseEvent(ev_type or "message", "\n".join(data), self.last_id)
                    ev_type, data = "", []
                    continue
                if line.startswith(":"):
                    self.comments += 1
                    continue
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "data":
                    data.append(value)
                    saw_data = True
                elif name == "event":
                    ev_type = value
                elif name == "id":
                    self.last_id = value
                elif name == "retry" and value.isdigit():
                    self.retry = int(value)

    async def until(self, kind: str, timeout: float = 5.0) -> SseEvent:
        async with asyncio.timeout(timeout):
            while True:
                ev = await self.next(timeout)
                if ev.event == kind:
                    return ev

    async def messages(self, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        async with asyncio.timeout(timeout):
            while len(out) < n:
                ev = await self.next(timeout)
                if ev.event == "message":
                    out.append(ev.json())
        return out

    def close(self) -> None:
        self.resp.close()


@contextlib.asynccontextmanager
async def sse(session: aiohttp.ClientSession, url: str, **kw: Any) -> Any:
    """``async with sse(session, url) as reader``: a 200 text/event-stream response, read as events."""
    resp = await session.get(url, timeout=aiohttp.ClientTimeout(total=None, sock_connect=5), **kw)
    try:
        assert resp.status == 200, (resp.status, await resp.text())
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        yield SseReader(resp)
    finally:
        resp.close()
