"""Channels and the local subscribers on this node; fan-out. The hub never touches sockets or wire formats.

Transports hand the hub a :class:`Sink`; the hub hands each sink *publications* (and join/leave
*events*), and each sink renders its own wire format through the item's per-format cache
(:func:`tidings.protocol.encoded`), so a publication's bytes are built once per format whatever the number
of subscribers. A subscriber that is still catching up (recovery, or just subscribing) gets live
publications into a pending list bounded in bytes, which is flushed after its replay with duplicates
dropped, so the stream it sees has no gap and no duplicate.

Nothing here calls back into a transport in a way that can call back into the hub: ``Sink.push`` never
closes synchronously and ``Sink.close`` schedules its own clean-up on the loop.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Protocol

from .metrics import Counters
from .protocol import CloseCode, Event, Publication

__all__ = ["Hub", "Sink"]


class Sink(Protocol):
    """What the hub needs of a subscriber: one per connection (any transport)."""

    @property
    def client_id(self) -> str: ...

    @property
    def user(self) -> str: ...

    def push(self, item: Publication | Event) -> None:
        """Queue ``item`` without blocking and without calling back into the hub."""
        ...

    def close(self, code: CloseCode, reason: str | None = None) -> None:
        """Close soon; the clean-up (leaving channels) runs later on the loop, never inside this call."""
        ...

    def lost(self, channel: str) -> None:
        """The node could not keep this subscription gapless and has ended it (``Subscriptions.lost``):
        tell the client, which may subscribe again from its last position."""
        ...


class _Sub:
    __slots__ = ("live_from", "pending", "pending_bytes", "sink")

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        # Live publications that arrived while the subscription was being set up.
        self.pending: list[Publication] | None = []
        self.pending_bytes = 0
        self.live_from = 0  # the channel's tally (Hub._tally) when it went live


def note_out(sink: Sink, n: int) -> None:
    """Tell a sink that counts what it was sent (its ``note_out``: the session's messages out) of ``n``
    more: the hub's tally of live publications and events, and a subscription's replay."""
    note = getattr(sink, "note_out", None)
    if note is not None and n:
        note(n)


InterestFn = Callable[[str, bool], None]


def _no_interest(channel: str, on: bool) -> None:
    return None


class Hub:
    """Maps channel -> subscribers (in subscription order) and fans publications out.

    ``on_interest(channel, True)`` is called when a channel gets its first local subscriber and
    ``on_interest(channel, False)`` when it loses its last one (a broker between nodes subscribes to the
    channel's live stream only while this node has an interest in it)."""

    def __init__(
        self,
        *,
        max_pending_bytes: int = 1 << 20,
        on_interest: InterestFn | None = None,
        counters: Counters | None = None,
    ) -> None:
        self._channels: dict[str, dict[Sink, _Sub]] = {}
        # Per channel, the publications and events fanned out to its live subscribers: a subscription's
        # share is the difference since it went live, told to its sink when it ends (no count per
        # delivery).
        self._tally: dict[str, int] = {}
        self.counters = counters or Counters()
        self.subscription_count = 0  # (sink, channel) pairs registered here
        self.max_pending = max_pending_bytes  # bytes a catching-up subscriber may fall behind
        self._on_interest = on_interest or _no_interest

    # ------------------------------------------------------------------------------ membership

    def add(self, channel: str, sink: Sink) -> bool:
        """Register ``sink`` on ``channel`` in catching-up mode. False if it is already there."""
        subs = self._channels.get(channel)
        if subs is None:
            subs = self._channels[channel] = {}
            self._on_interest(channel, True)
        elif sink in subs:
            return False
        subs[sink] = _Sub(sink)
        self.subscription_count += 1
        return True

    def go_live(self, channel: str, sink: Sink, after_offset: int) -> bool:
        """Push what arrived while catching up (offsets above ``after_offset`` only: the replay had the
        rest), then go live. False when the sink is no longer subscribed (cut off while catching up)."""
        sub = self._channels.get(channel, {}).get(sink)
        if sub is None or sub.pending is None:
            return sub is not None
        pending, sub.pending, sub.pending_bytes = sub.pending, None, 0
        sub.live_from = self._tally.get(channel, 0)
        n = 0
        for pub in pending:
            if pub.offset > after_offset:
                sink.push(pub)
                n += 1
        self.counters.deliveries += n
        note_out(sink, n)
        return True

    def remove(self, channel: str, sink: Sink) -> bool:
        subs = self._channels.get(channel)
        sub = subs.pop(sink, None) if subs is not None else None
        if sub is None:
            return False
        self.subscription_count -= 1
        if sub.pending is None:  # its share of the channel's live publications
            note_out(sink, self._tally.get(channel, 0) - sub.live_from)
        if not subs:
            del self._channels[channel]
            self._tally.pop(channel, None)
            self._on_interest(channel, False)
        return True

    def is_live(self, channel: str, sink: Sink) -> bool:
        sub = self._channels.get(channel, {}).get(sink)
        return sub is not None and sub.pending is None

    # ------------------------------------------------------------------------------ fan-out

    def deliver(self, pub: Publication) -> int:
        """Hand ``pub`` to every local subscriber of its channel; returns how many live ones got it."""
        subs = self._channels.get(pub.channel)
        if not subs:
            return 0
        n = 0
        for sub in tuple(subs.values()):
            pending = sub.pending
            if pending is None:
                sub.sink.push(pub)
                n += 1
            else:
                pending.append(pub)
                sub.pending_bytes += pub.size
                if sub.pending_bytes > self.max_pending:
                    # Too far behind while catching up: it cannot be made whole, so it is cut off.
                    self.remove(pub.channel, sub.sink)
                    sub.pending = []
                    self.counters.slow_consumer_closes += 1
                    sub.sink.close(CloseCode.SLOW_CONSUMER)
        if n:  # once per publication, never per subscriber
            self.counters.deliveries += n
            tally = self._tally
            tally[pub.channel] = tally.get(pub.channel, 0) + 1
        return n

    def deliver_event(self, event: Event) -> None:
        """Hand a join/leave event to the channel's live subscribers, except the client it is about."""
        subs = self._channels.get(event.channel)
        if not subs:
            return
        for sub in tuple(subs.values()):
            if sub.pending is None:
                if sub.sink.client_id != event.client:
                    sub.sink.push(event)
                else:  # the tally below counts the event for every live subscriber but this one
                    note_out(sub.sink, -1)
        tally = self._tally
        tally[event.channel] = tally.get(event.channel, 0) + 1

    # ------------------------------------------------------------------------------ introspection

    def channels(self) -> dict[str, int]:
        """Active channels on this node with their subscriber counts."""
        return {ch: len(subs) for ch, subs in self._channels.items()}

    def busiest(self, limit: int, query: str = "") -> tuple[int, list[tuple[str, int]]]:
        """The ``limit`` channels with the most subscribers (ties by name), among those whose name
        contains ``query``, with their counts; and how many channels match."""
        items = self._channels.items()
        pairs = (
            [(-len(s), ch) for ch, s in items if query in ch] if query else [(-len(s), ch) for ch, s in items]
        )
        return len(pairs), [(ch, -n) for n, ch in heapq.nsmallest(limit, pairs)]

    def subscribers(self, channel: str) -> list[Sink]:
        return list(self._channels.get(channel, {}))
