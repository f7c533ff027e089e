"""Positions, recovery and subscribe-then-replay.

The subscriber is registered in the hub *before* history is read, so a publication is either in the
history read or caught in the subscriber's pending list (or both: duplicates are dropped by offset).
Recovery is all or nothing: if any publication after ``since`` is gone, nothing is replayed and the reply
says ``recovered: false``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .backends.base import Broker, HistoryOptions, HistoryResult
from .hub import Hub, Sink
from .protocol import Publication, StreamPosition

__all__ = ["SubscribeOutcome", "can_recover", "subscribe_with_replay"]


def can_recover(result: HistoryResult, since: StreamPosition) -> bool:
    """True when ``result`` (read with ``since=since.offset``) holds every publication after ``since``."""
    top = result.position
    return since.epoch == top.epoch and result.first_offset - 1 <= since.offset <= top.offset


@dataclass(slots=True)
class SubscribeOutcome:
    position: StreamPosition  # the stream's top when history was read
    recovered: bool | None  # None when no ``since`` was given
    replay: list[Publication]

    @property
    def live_after(self) -> int:
        """Offset after which pending live publications are new to this subscriber."""
        return max(self.position.offset, self.replay[-1].offset if self.replay else 0)


async def subscribe_with_replay(
    hub: Hub, broker: Broker, channel: str, sink: Sink, opts: HistoryOptions, since: StreamPosition | None
) -> SubscribeOutcome | None:
    """Register ``sink`` (catching up) and read what it must replay. None if it was already subscribed.

    The caller sends the reply, offers ``replay``, then calls
    ``hub.go_live(channel, sink, outcome.live_after)``.
    """
    if not hub.add(channel, sink):
        return None
    try:
        if since is None:
            res = await broker.history(channel, opts, limit=0)
            return SubscribeOutcome(res.position, None, [])
        res = await broker.history(channel, opts, since=since.offset)
        if can_recover(res, since):
            return SubscribeOutcome(res.position, True, res.publications)
        return SubscribeOutcome(res.position, False, [])
    except BaseException:
        hub.remove(channel, sink)
        raise
