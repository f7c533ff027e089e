"""memory:// — everything in this process. Fast, nothing on disk; a restart starts new epochs."""

from __future__ import annotations

import asyncio
import time

from ..protocol import Publication, new_publication_id
from .base import DeliverFn, HistoryOptions, HistoryResult, PublishDone, PublishRequest, new_epoch
from .stream import Stream, now_ms

__all__ = ["MemoryBroker"]

# A stream with no retained publications is forgotten after this long without a publish.
STREAM_IDLE_TTL = 3600.0


class MemoryBroker:
    def __init__(self) -> None:
        self._streams: dict[str, Stream] = {}
        self._deliver: DeliverFn | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self, deliver: DeliverFn) -> None:
        self._deliver = deliver
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def _stream(self, channel: str) -> Stream:
        s = self._streams.get(channel)
        if s is None:
            s = self._streams[channel] = Stream(new_epoch())
        return s

    def publish_many(self, reqs: list[PublishRequest], done: PublishDone) -> None:
        assert self._deliver is not None, "broker not started"
        pubs = []
        for r in reqs:
            s = self._stream(r.channel)
            pub = Publication(r.channel, s.top + 1, s.epoch, new_publication_id(), now_ms(), r.data, r.info)
            s.append(pub, r.opts)
            self._deliver(pub)
            pubs.append(pub)
        done(pubs)

    async def history(
        self, channel: str, opts: HistoryOptions, *, since: int | None = None, limit: int | None = None
    ) -> HistoryResult:
        return self._stream(channel).read(opts, since, limit)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(60)
            cutoff = time.monotonic() - STREAM_IDLE_TTL
            for s in self._streams.values():
                s.prune(s.ttl)
            for ch in [ch for ch, s in self._streams.items() if s.touched < cutoff and not s.pubs]:
                del self._streams[ch]
