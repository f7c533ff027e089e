"""The subscription lifecycle, for every transport: register -> read history -> decide recovery -> replay
-> go live -> join; and unsubscribe -> leave.

The subscriber is registered in the hub *before* history is read, so a publication is either in the
history read or caught in the subscriber's pending list (or both: duplicates are dropped by offset).
Recovery is all or nothing: if any publication after ``since`` is gone, nothing is replayed and the
outcome says ``recovered: false``. The replay is paced by the subscriber's drain, so a long replay to a
slow reader waits instead of overflowing its buffer.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from .backends.base import Broker, HistoryOptions, HistoryResult, PresenceStore
from .config import Namespace
from .hub import Hub, Sink, note_out
from .metrics import Counters
from .protocol import ErrorCode, Event, ProtocolError, Publication, StreamPosition

__all__ = ["SubscribeOutcome", "Subscriber", "Subscriptions", "can_recover"]


def can_recover(result: HistoryResult, since: StreamPosition) -> bool:
    """True when ``result`` (read with ``since=since.offset``) holds every publication after ``since``.

    Offset 0 means "nothing seen yet", which any epoch can complete from its first publication on."""
    top = result.position
    same = since.epoch == top.epoch or since.offset == 0
    return same and result.first_offset - 1 <= since.offset <= top.offset


@dataclass(slots=True)
class SubscribeOutcome:
    channel: str
    position: StreamPosition  # the stream's top when history was read
    recovered: bool | None  # None when no ``since`` was given
    replay: list[Publication]

    @property
    def live_after(self) -> int:
        """Offset after which pending live publications are new to this subscriber."""
        return max(self.position.offset, self.replay[-1].offset if self.replay else 0)


class Subscriber(Sink, Protocol):
    """A sink the lifecycle can pace and ask about."""

    @property
    def closed(self) -> bool: ...

    def writable(self) -> Awaitable[None] | None:
        """None when more may be pushed now; else something to wait on until the sink drained."""
        ...


class Subscriptions:
    """Every subscription on this node: channel membership (hub), presence and join/leave events.

    Also the node's :class:`~tidings.backends.base.BrokerHandler`: publications and events go straight
    to the hub; ``lost`` ends a channel's subscriptions here, where presence and events are known."""

    def __init__(
        self, hub: Hub, broker: Broker, presence: PresenceStore, counters: Counters | None = None
    ) -> None:
        self.hub = hub
        self.broker = broker
        self.counters = counters or hub.counters
        self.presence = presence
        self._of: dict[Sink, dict[str, Namespace]] = {}  # live and catching-up subscriptions per sink
        # Catching-up subscriptions whose channel was lost meanwhile: ended once their reply went out.
        self._lost: set[tuple[Sink, str]] = set()
        self.deliver = hub.deliver  # the fan-out's hot path: no extra call in between
        self.deliver_event = hub.deliver_event

    def lost(self, channel: str) -> None:
        """End every local subscription of ``channel`` and tell each client (``Sink.lost``). A
        subscription still catching up ends as soon as it is set up, so its client always has its
        subscribe reply before the ``unsubscribe`` push."""
        for sink in self.hub.subscribers(channel):
            if self.hub.is_live(channel, sink):
                self.unsubscribe(sink, channel)
                sink.lost(channel)
            else:
                self._lost.add((sink, channel))

    def channels_of(self, sink: Sink) -> dict[str, Namespace]:
        return self._of.get(sink, {})

    async def subscribe(
        self,
        sink: Subscriber,
        channel: str,
        ns: Namespace,
        since: StreamPosition | None,
        ready: Callable[[SubscribeOutcome], None],
    ) -> SubscribeOutcome | None:
        """Subscribe ``sink`` (permission is the caller's, through the policy gate). ``ready(outcome)``
        runs once history is read, before the replay (the transport's reply goes there). None when the
        sink closed meanwhile. ProtocolError already_subscribed; BrokerError if history cannot be read."""
        if not self.hub.add(channel, sink):
            raise ProtocolError(ErrorCode.ALREADY_SUBSCRIBED, f"already subscribed to {channel!r}")
        self._of.setdefault(sink, {})[channel] = ns
        try:
            outcome = await self._read(channel, ns, since)
        except BaseException:
            self._forget(sink, channel)
            raise
        if sink.closed or channel not in self._of.get(sink, {}):
            self._forget(sink, channel)
            return None
        ready(outcome)
        note_out(sink, len(outcome.replay))  # the session's messages out (live ones: the hub's tally)
        for pub in outcome.replay:
            sink.push(pub)
            wait = sink.writable()
            if wait is not None:
                await wait
            if sink.closed or channel not in self._of.get(sink, {}):
                self._forget(sink, channel)
                return None
        if not self.hub.go_live(channel, sink, outcome.live_after):
            self._forget(sink, channel)  # cut off while catching up
            return None
        if (sink, channel) in self._lost:
            self._forget(sink, channel)
            sink.lost(channel)
            return None
        if ns.presence:
            self.presence.add(channel, sink.client_id, sink.user)
        if ns.join_leave:
            self.broker.publish_event(Event("join", channel, sink.client_id, sink.user))
        return outcome

    async def read(
        self, channel: str, opts: HistoryOptions, *, since: int | None = None, limit: int | None = None
    ) -> HistoryResult:
        """The broker's history of ``channel``, timed (the ``history`` broker operation metric): every
        history read of the node goes through here."""
        t0 = time.perf_counter()
        res = await self.broker.history(channel, opts, since=since, limit=limit)
        self.counters.broker_op("history", time.perf_counter() - t0)
        return res

    async def _read(self, channel: str, ns: Namespace, since: StreamPosition | None) -> SubscribeOutcome:
        opts = ns.history
        if since is None:
            res = await self.read(channel, opts, limit=0)
            return SubscribeOutcome(channel, res.position, None, [])
        res = await self.read(channel, opts, since=since.offset)
        if can_recover(res, since):
            return SubscribeOutcome(channel, res.position, True, res.publications)
        return SubscribeOutcome(channel, res.position, False, [])

    def unsubscribe(self, sink: Sink, channel: str) -> bool:
        """End one subscription (and say ``leave`` if it was live). False if there was none."""
        subs = self._of.get(sink)
        if subs is None or channel not in subs:
            return False
        self._leave(sink, channel, subs[channel])
        return True

    def drop(self, sink: Sink) -> None:
        """End every subscription of a sink that goes away."""
        for channel, ns in list(self._of.get(sink, {}).items()):
            self._leave(sink, channel, ns)

    def _leave(self, sink: Sink, channel: str, ns: Namespace) -> None:
        live = self.hub.is_live(channel, sink)
        self._forget(sink, channel)
        if live:
            if ns.presence:
                self.presence.remove(channel, sink.client_id)
            if ns.join_leave:
                self.broker.publish_event(Event("leave", channel, sink.client_id, sink.user))

    def _forget(self, sink: Sink, channel: str) -> None:
        self._lost.discard((sink, channel))
        self.hub.remove(channel, sink)
        subs = self._of.get(sink)
        if subs is not None:
            subs.pop(channel, None)
            if not subs:
                del self._of[sink]

    async def history(
        self, channel: str, ns: Namespace, since: StreamPosition | None, limit: int | None
    ) -> tuple[HistoryResult, bool | None]:
        """History for a reader; with ``since`` also whether it was complete (the same recovery verdict
        as a subscription's)."""
        if ns.history_size <= 0:
            raise ProtocolError(ErrorCode.NOT_AVAILABLE, f"namespace {ns.name!r} keeps no history")
        if since is None:
            return await self.read(channel, ns.history, limit=limit), None
        res = await self.read(channel, ns.history, since=since.offset, limit=limit)
        ok = can_recover(res, since)
        if not ok:
            res.publications = []
        return res, ok
