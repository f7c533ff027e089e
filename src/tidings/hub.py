"""Channels and the local subscribers on this node; fan-out. The hub never touches sockets.

Transports hand the hub a :class:`Sink`. A publication is encoded once and framed once; the same bytes are
offered to every subscriber. A subscriber that is still catching up (recovery, or just subscribing) gets
live publications into a bounded pending list, which is flushed after its replay with duplicates dropped,
so the stream it sees has no gap and no duplicate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import orjson

from .protocol import CloseCode, Publication, deflate_payload, text_frame

__all__ = ["Hub", "Sink", "frame_of", "zframe_of"]

COMPRESS_MIN = 256  # payloads smaller than this are sent uncompressed even to deflate peers


class Sink(Protocol):
    """What the hub needs of a connection."""

    @property
    def client_id(self) -> str: ...

    @property
    def user(self) -> str: ...

    @property
    def deflate(self) -> bool:
        """The peer accepts permessage-deflate frames (one compressed frame serves all such peers)."""
        ...

    def offer(self, frame: bytes) -> bool:
        """Queue ``frame`` without blocking; False when the sink is closed or was just cut off as slow."""
        ...

    def close(self, code: CloseCode, reason: str | None = None) -> None:
        """Close soon (never synchronously calls back into the hub)."""
        ...


def frame_of(pub: Publication) -> bytes:
    """The push frame of ``pub``, built once and cached on the publication."""
    frame = pub.frame_cache
    if frame is None:
        frame = pub.frame_cache = text_frame(pub.push_bytes())
    return frame


def zframe_of(pub: Publication) -> bytes:
    """The push frame of ``pub`` for permessage-deflate peers: compressed once (no context takeover)."""
    frame = pub.zframe_cache
    if frame is None:
        payload = pub.push_bytes()
        if len(payload) < COMPRESS_MIN:
            frame = frame_of(pub)
        else:
            frame = text_frame(deflate_payload(payload), compressed=True)
        pub.zframe_cache = frame
    return frame


class _Sub:
    __slots__ = ("pending", "pending_bytes", "sink")

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        # Live publications that arrived while the subscription was being set up: (offset, frame).
        self.pending: list[tuple[int, bytes]] | None = []
        self.pending_bytes = 0


class Hub:
    """Maps channel -> subscribers (in subscription order) and fans publications out."""

    def __init__(self, *, max_pending_bytes: int = 1 << 20) -> None:
        self._channels: dict[str, dict[Sink, _Sub]] = {}
        self._max_pending = max_pending_bytes
        self._listeners: dict[str, list[Callable[[Publication], None]]] = {}

    def add_listener(self, channel: str, fn: Callable[[Publication], None]) -> None:
        """Call ``fn(pub)`` for every publication of ``channel`` (bridges to other wire formats)."""
        self._listeners.setdefault(channel, []).append(fn)

    def remove_listener(self, channel: str, fn: Callable[[Publication], None]) -> None:
        fns = self._listeners.get(channel, [])
        if fn in fns:
            fns.remove(fn)
        if not fns:
            self._listeners.pop(channel, None)

    # ------------------------------------------------------------------------------ membership

    def add(self, channel: str, sink: Sink) -> bool:
        """Register ``sink`` on ``channel`` in catching-up mode. False if it is already there."""
        subs = self._channels.setdefault(channel, {})
        if sink in subs:
            return False
        subs[sink] = _Sub(sink)
        return True

    def go_live(self, channel: str, sink: Sink, after_offset: int) -> None:
        """Flush what arrived while catching up (offsets above ``after_offset`` only), then go live."""
        sub = self._channels.get(channel, {}).get(sink)
        if sub is None or sub.pending is None:
            return
        pending, sub.pending, sub.pending_bytes = sub.pending, None, 0
        for offset, frame in pending:
            if offset > after_offset and not sink.offer(frame):
                return

    def remove(self, channel: str, sink: Sink) -> bool:
        subs = self._channels.get(channel)
        if subs is None or subs.pop(sink, None) is None:
            return False
        if not subs:
            del self._channels[channel]
        return True

    # ------------------------------------------------------------------------------ fan-out

    def deliver(self, pub: Publication) -> int:
        """Offer ``pub`` to every local subscriber of its channel; returns how many took it."""
        if self._listeners:
            for fn in self._listeners.get(pub.channel, ()):
                fn(pub)
        subs = self._channels.get(pub.channel)
        if not subs:
            return 0
        frame = frame_of(pub)
        n = 0
        for sub in list(subs.values()):
            pending = sub.pending
            if pending is None:
                sink = sub.sink
                if sink.offer(zframe_of(pub) if sink.deflate else frame):
                    n += 1
            else:
                pending.append((pub.offset, zframe_of(pub) if sub.sink.deflate else frame))
                sub.pending_bytes += len(frame)
                if sub.pending_bytes > self._max_pending:
                    sub.sink.close(CloseCode.SLOW_CONSUMER)
        return n

    def broadcast_raw(self, channel: str, payload: dict[str, object], exclude: Sink | None = None) -> None:
        """Push a non-publication event (join/leave) to the channel's live subscribers."""
        subs = self._channels.get(channel)
        if not subs:
            return
        frame = text_frame(orjson.dumps(payload))
        for sub in list(subs.values()):
            if sub.sink is not exclude and sub.pending is None:
                sub.sink.offer(frame)

    # ------------------------------------------------------------------------------ introspection

    def channels(self) -> dict[str, int]:
        """Active channels on this node with their subscriber counts."""
        return {ch: len(subs) for ch, subs in self._channels.items()}

    def subscribers(self, channel: str) -> list[Sink]:
        return list(self._channels.get(channel, {}))
