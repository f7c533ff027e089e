"""What ``GET /api/stats`` (and the admin page ``/admin`` behind it) reports about this process: the
recent errors and slow-consumer closes (:class:`EventRing`, bounded in entries and in bytes) and the
snapshot itself (:func:`snapshot`).

The counters it reads are plain ints kept where the code already counts, never touched per recipient:
``Node.connections.by_kind`` (open connections per transport, in ``Connections.add``/``discard``),
``Hub.subscription_count`` (in ``Hub.add``/``remove``) and the same :class:`~tidings.metrics.Counters`
that ``/metrics`` reads (``Node.counters``: publications acknowledged, counted in ``Node.submit``; live
deliveries, one addition per publication in ``Hub.deliver``).
"""

from __future__ import annotations

import asyncio
import collections
import os
import resource
import time
from typing import TYPE_CHECKING, Any

import orjson

from .backends.base import BrokerError
from .protocol import ProtocolError

if TYPE_CHECKING:
    from .node import Node

__all__ = [
    "DEFAULT_CHANNELS",
    "MAX_CHANNELS",
    "MAX_QUERY",
    "RING_BYTES",
    "RING_ENTRIES",
    "TRANSPORTS",
    "EventRing",
    "snapshot",
]

TRANSPORTS = ("ws", "chatsocket", "echo", "sse", "stream", "poll")  # Connection.kind, every one listed
DEFAULT_CHANNELS = 50  # channels listed by default (the busiest first)
MAX_CHANNELS = 1000  # the most ?limit= may ask for
MAX_QUERY = 255  # ?q= is a channel-name fragment: at most a channel name long
RING_ENTRIES = 100  # recent errors (and, separately, slow-consumer closes) kept
RING_BYTES = 16 * 1024  # ... and at most this many bytes of them (their JSON)
MAX_TEXT = 200  # characters of one entry's message (channel names and reasons come from clients)


class EventRing:
    """The last events of one kind: at most ``entries`` of them and ``max_bytes`` of their JSON, the
    oldest dropped first; ``total`` counts every one ever added. Each entry is a small dict of short
    strings and numbers; its message is cut to MAX_TEXT characters."""

    __slots__ = ("_items", "bytes", "entries", "max_bytes", "total")

    def __init__(self, entries: int = RING_ENTRIES, max_bytes: int = RING_BYTES) -> None:
        self.entries = entries
        self.max_bytes = max_bytes
        self.total = 0
        self.bytes = 0
        self._items: collections.deque[tuple[dict[str, Any], int]] = collections.deque()

    def add(self, **fields: Any) -> None:
        msg = fields.get("message")
        if isinstance(msg, str) and len(msg) > MAX_TEXT:
            fields["message"] = msg[: MAX_TEXT - 1] + "…"
        entry = {"time": round(time.time(), 3), **fields}
        size = len(orjson.dumps(entry))
        self.total += 1
        items = self._items
        items.append((entry, size))
        self.bytes += size
        while len(items) > self.entries or (self.bytes > self.max_bytes and len(items) > 1):
            _, dropped = items.popleft()
            self.bytes -= dropped

    def recent(self) -> list[dict[str, Any]]:
        """Newest first."""
        return [entry for entry, _ in reversed(self._items)]

    def to_json(self) -> dict[str, Any]:
        return {"total": self.total, "recent": self.recent()}


def _rss() -> int:
    """This process's resident set size in bytes (Linux: /proc; elsewhere the peak, from getrusage)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if os.uname().sysname == "Darwin" else peak * 1024


async def _history_size(node: Node, channel: str) -> int | None:
    """How many publications ``channel`` retains; None when its namespace is gone or the broker fails."""
    try:
        ns = node.policy.namespace(channel)
        res = await node.broker.history(channel, ns.history, limit=0)
    except (ProtocolError, BrokerError):
        return None
    return max(0, res.position.offset - res.first_offset + 1)


async def snapshot(node: Node, limit: int = DEFAULT_CHANNELS, query: str = "") -> dict[str, Any]:
    """The body of ``GET /api/stats``: this process's counters, its busiest ``limit`` local channels
    (those whose name contains ``query``) with their history sizes, and the recent events. Everything
    but the history sizes is read at one instant (before the broker is asked), so the numbers agree."""
    now = time.time()
    by_kind = node.connections.by_kind
    total, top = node.hub.busiest(limit, query)
    cpu = os.times()
    body: dict[str, Any] = {
        "time": round(now, 3),
        "process": {
            "pid": os.getpid(),
            "started": round(node.started, 3),
            "uptime": round(now - node.started, 3),
            "rss_bytes": _rss(),
            "cpu_seconds": round(cpu.user + cpu.system, 3),
        },
        "connections": {
            "total": len(node.connections),
            "by_transport": {kind: by_kind.get(kind, 0) for kind in TRANSPORTS},
        },
        "messages": {
            "published": sum(node.counters.publications.values()),
            "delivered": node.counters.deliveries,
        },
        "subscriptions": node.hub.subscription_count,
        "channels": {"total": total, "limit": limit, "listed": []},
        "errors": node.errors.to_json(),
        "slow_consumers": node.slow_consumers.to_json(),
    }
    sizes = await asyncio.gather(*(_history_size(node, ch) for ch, _ in top))
    body["channels"]["listed"] = [
        {"channel": ch, "subscribers": n, "history": size} for (ch, n), size in zip(top, sizes, strict=True)
    ]
    return body
