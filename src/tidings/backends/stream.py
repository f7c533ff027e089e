"""In-memory channel streams: epoch, top offset and a bounded, expiring list of recent publications.

The memory broker keeps all its state in these; the SQLite broker uses them as its read cache. A
:class:`StreamSet` bounds the publications held by all its streams in bytes (each publication holds its
data as encoded bytes, so the bound is what memory really holds, not a count).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque

from ..protocol import Publication, StreamPosition
from .base import HistoryOptions, HistoryResult

__all__ = ["Stream", "StreamSet", "empty_result", "now_ms"]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def empty_result(epoch: str) -> HistoryResult:
    """What a channel nobody published to reads as."""
    return HistoryResult([], StreamPosition(0, epoch), 1)


class Stream:
    __slots__ = ("bytes", "channel", "epoch", "pubs", "top", "touched", "ttl")

    def __init__(self, epoch: str, top: int = 0, pubs: list[Publication] | None = None) -> None:
        self.channel = ""
        self.epoch = epoch
        self.top = top
        self.pubs: deque[Publication] = deque(pubs or ())
        self.bytes = sum(p.size for p in self.pubs)
        self.touched = time.monotonic()
        self.ttl = 86400.0

    def append(self, pub: Publication, opts: HistoryOptions) -> None:
        self.top = pub.offset
        self.touched = time.monotonic()
        self.ttl = opts.ttl
        size = opts.size
        if size <= 0:
            self.clear()
            return
        self.pubs.append(pub)
        self.bytes += pub.size
        while len(self.pubs) > size:
            self.bytes -= self.pubs.popleft().size

    def pop_oldest(self) -> None:
        self.bytes -= self.pubs.popleft().size

    def clear(self) -> None:
        self.pubs.clear()
        self.bytes = 0

    def prune(self, ttl: float, now: int | None = None) -> None:
        """Drop publications older than ``ttl`` seconds."""
        cutoff = (now_ms() if now is None else now) - int(ttl * 1000)
        pubs = self.pubs
        while pubs and pubs[0].time < cutoff:
            self.bytes -= pubs.popleft().size

    def read(self, opts: HistoryOptions, since: int | None, limit: int | None) -> HistoryResult:
        self.prune(opts.ttl)
        pubs = self.pubs
        first = pubs[0].offset if pubs else self.top + 1
        if since is not None:
            start = max(0, since + 1 - first)  # offsets are contiguous inside the deque
            out = [pubs[i] for i in range(start, len(pubs))] if start < len(pubs) else []
            if limit is not None:
                out = out[:limit]
        else:
            out = list(pubs)
            if limit is not None:
                out = out[-limit:] if limit else []
        return HistoryResult(out, StreamPosition(self.top, self.epoch), first)


class StreamSet:
    """Streams by channel, the publications of all of them bounded by ``max_bytes``.

    ``drop=False`` (the memory broker, where a stream is the channel's state): over the bound, the
    publications of the channel published to least recently are dropped first, oldest first; the
    stream's epoch and top stay, so a reader who needed them is told ``recovered: false``.
    ``drop=True`` (a read cache): the least recently used streams are dropped whole (they can be loaded
    again), and at most ``max_streams`` are kept.
    """

    def __init__(self, max_bytes: int, *, drop: bool = False, max_streams: int = 0) -> None:
        self.max_bytes = max_bytes
        self.max_streams = max_streams
        self.drop = drop
        self.bytes = 0
        self._streams: OrderedDict[str, Stream] = OrderedDict()

    def __len__(self) -> int:
        return len(self._streams)

    def publications(self) -> int:
        """Publications held over all streams."""
        return sum(len(s.pubs) for s in self._streams.values())

    def get(self, channel: str) -> Stream | None:
        return self._streams.get(channel)

    def put(self, channel: str, stream: Stream) -> Stream:
        old = self._streams.pop(channel, None)
        if old is not None:
            self.bytes -= old.bytes
        stream.channel = channel
        self._streams[channel] = stream
        self.bytes += stream.bytes
        self._bound()
        return stream

    def discard(self, channel: str) -> None:
        old = self._streams.pop(channel, None)
        if old is not None:
            self.bytes -= old.bytes

    def append(self, stream: Stream, pub: Publication, opts: HistoryOptions) -> None:
        before = stream.bytes
        stream.append(pub, opts)
        self.bytes += stream.bytes - before
        self._streams.move_to_end(stream.channel)
        self._bound()

    def read(
        self, stream: Stream, opts: HistoryOptions, since: int | None, limit: int | None
    ) -> HistoryResult:
        before = stream.bytes
        res = stream.read(opts, since, limit)
        # A stream loaded for a read may not be (or no longer be) in the set: too big for the bound, or
        # dropped before the reader resumed. It is still served, but counts for nothing here.
        if self._streams.get(stream.channel) is stream:
            self.bytes += stream.bytes - before
            if self.drop:
                self._streams.move_to_end(stream.channel)
        return res

    def prune_all(self) -> None:
        for s in self._streams.values():
            before = s.bytes
            s.prune(s.ttl)
            self.bytes += s.bytes - before

    def forget_idle(self, cutoff: float) -> bool:
        """Forget streams that hold nothing and were not published to since ``cutoff`` (monotonic);
        True if one of them had been published to."""
        idle = [ch for ch, s in self._streams.items() if s.touched < cutoff and not s.pubs]
        published = any(self._streams[ch].top for ch in idle)
        for ch in idle:
            del self._streams[ch]
        return published

    def _bound(self) -> None:
        streams = self._streams
        if self.drop:
            while streams and (
                self.bytes > self.max_bytes or (self.max_streams and len(streams) > self.max_streams)
            ):
                _, s = streams.popitem(last=False)
                self.bytes -= s.bytes
            return
        if self.bytes <= self.max_bytes:
            return
        emptied: list[str] = []
        for ch, s in streams.items():
            while s.pubs and self.bytes > self.max_bytes:
                before = s.bytes
                s.pop_oldest()
                self.bytes += s.bytes - before
            if not s.pubs:
                emptied.append(ch)
            if self.bytes <= self.max_bytes:
                break
        for ch in emptied:  # they hold nothing now: keep them out of the way of the next trim
            streams.move_to_end(ch)
