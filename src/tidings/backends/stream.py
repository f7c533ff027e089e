"""An in-memory channel stream: epoch, top offset and a bounded, expiring list of recent publications.

The memory broker keeps all its state in these; the SQLite broker uses them as its read cache.
"""

from __future__ import annotations

import time
from collections import deque

from ..protocol import Publication, StreamPosition
from .base import HistoryOptions, HistoryResult

__all__ = ["Stream", "now_ms"]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Stream:
    __slots__ = ("epoch", "pubs", "top", "touched", "ttl")

    def __init__(self, epoch: str, top: int = 0, pubs: list[Publication] | None = None) -> None:
        self.epoch = epoch
        self.top = top
        self.pubs: deque[Publication] = deque(pubs or ())
        self.touched = time.monotonic()
        self.ttl = 86400.0

    def append(self, pub: Publication, opts: HistoryOptions) -> None:
        self.top = pub.offset
        self.touched = time.monotonic()
        self.ttl = opts.ttl
        size = opts.size
        if size <= 0:
            self.pubs.clear()
            return
        self.pubs.append(pub)
        while len(self.pubs) > size:
            self.pubs.popleft()

    def prune(self, ttl: float, now: int | None = None) -> None:
        """Drop publications older than ``ttl`` seconds."""
        cutoff = (now_ms() if now is None else now) - int(ttl * 1000)
        pubs = self.pubs
        while pubs and pubs[0].time < cutoff:
            pubs.popleft()

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
