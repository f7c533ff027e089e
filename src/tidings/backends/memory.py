"""memory:// — everything in this process. Fast, nothing on disk; a restart starts new epochs."""

from __future__ import annotations

import asyncio
import time

from ..protocol import Publication, new_publication_id
from .base import (
    BrokerHandler,
    HistoryOptions,
    HistoryResult,
    IdempotencyOptions,
    OneNode,
    PublishDone,
    PublishRequest,
    PublishResult,
    Repeat,
    land,
    new_epoch,
)
from .idempotency import KeyCache
from .push_local import LocalPushStore
from .stream import Stream, StreamSet, empty_result, now_ms

__all__ = ["MemoryBroker"]

# A stream with no retained publications is forgotten after this long without a publish.
STREAM_IDLE_TTL = 3600.0


class MemoryBroker(OneNode):
    """History lives in :class:`Stream` objects, bounded in count per channel and in bytes over all
    channels (``max_history_bytes``: the channels published to least recently lose their history first).
    Publications are delivered on the loop after ``publish_many`` returns (never inside the caller)."""

    def push_store(self, *, online_ttl: float) -> LocalPushStore:
        """Web Push registrations in memory: not durable, a restart forgets them (docs/devices.md)."""
        return LocalPushStore(None)

    def __init__(
        self, *, max_history_bytes: int = 256 << 20, idempotency: IdempotencyOptions | None = None
    ) -> None:
        self._streams = StreamSet(max_history_bytes)
        self._keys = KeyCache(idempotency or IdempotencyOptions())
        self._handler: BrokerHandler | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.Task[None] | None = None
        # The epoch of channels nobody published to yet, and the one they start in when they are: so a
        # position read before the first publish stays valid after it.
        self._empty_epoch = new_epoch()

    async def start(self, handler: BrokerHandler) -> None:
        self._handler = handler
        self._loop = asyncio.get_running_loop()
        self._sweeper = self._loop.create_task(self._sweep())

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    async def retained(self) -> int:
        """Publications in history now (the ``tidings_history_publications`` metric)."""
        return self._streams.publications()

    async def ping(self) -> None:
        return None  # everything is in this process: it answers whenever the loop does

    def publish_many(self, reqs: list[PublishRequest], done: PublishDone) -> None:
        assert self._loop is not None, "broker not started"
        pubs: PublishResult = []
        t = now_ms()
        for r in reqs:
            if r.key is not None:
                repeat = self._keys.get(r.channel, r.key)
                if repeat is not None:
                    pubs.append(repeat)
                    continue
            s = self._streams.get(r.channel)
            if s is None:
                s = self._streams.put(r.channel, Stream(self._empty_epoch))
            pub = Publication(
                r.channel, s.top + 1, s.epoch, new_publication_id(), t, raw=r.raw, raw_info=r.raw_info
            )
            self._streams.append(s, pub, r.opts)
            pubs.append(pub)
            if r.key is not None:
                self._keys.put(r.channel, r.key, Repeat(r.channel, pub.offset, pub.epoch, pub.id))
        self._loop.call_soon(self._land, pubs, done)

    def _land(self, pubs: PublishResult, done: PublishDone) -> None:
        assert self._handler is not None
        land(self._handler, pubs, done)

    async def history(
        self, channel: str, opts: HistoryOptions, *, since: int | None = None, limit: int | None = None
    ) -> HistoryResult:
        s = self._streams.get(channel)
        if s is None:
            return empty_result(self._empty_epoch)
        return self._streams.read(s, opts, since, limit)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(60)
            self._streams.prune_all()
            self._keys.prune()
            if self._streams.forget_idle(time.monotonic() - STREAM_IDLE_TTL):
                # A forgotten channel that had publications starts again from offset 1: in a new epoch.
                self._empty_epoch = new_epoch()
