"""Who is in a channel: the local :class:`~tidings.backends.base.PresenceStore`, and how a node picks its
store (:func:`presence_for`).

Presence is kept apart from the hub's subscriber lists (a store shared by several nodes,
``backends/redis_presence.py``, replaces this one when the broker offers it); the subscription lifecycle
(``subscriptions.py``) adds a client when it goes live and removes it when it leaves. A channel's list is
built once per change and reused by every read in between.

Local presence lives and dies with its process: there is no TTL to expire (a node that stops takes its
members with it, and no other node ever saw them).
"""

from __future__ import annotations

from .backends.base import (
    MAX_LISTED_CHANNELS,
    Broker,
    LocalChannels,
    PresenceList,
    PresenceStore,
    SharesPresence,
)

__all__ = ["LocalPresence", "presence_for"]


class LocalPresence:
    """This node's presence: channel -> {client: user}, in join order. ``limit``: clients listed in one
    answer (the first ones to join; ``count`` is all of them)."""

    def __init__(self, limit: int = 1000) -> None:
        self.limit = limit
        self._channels: dict[str, dict[str, str]] = {}
        self._snapshots: dict[str, PresenceList] = {}
        self._local: LocalChannels | None = None

    async def start(self, local_channels: LocalChannels) -> None:
        self._local = local_channels

    async def close(self) -> None:
        return None

    def add(self, channel: str, client: str, user: str) -> None:
        self._channels.setdefault(channel, {})[client] = user
        self._snapshots.pop(channel, None)

    def remove(self, channel: str, client: str) -> None:
        members = self._channels.get(channel)
        if members is None or members.pop(client, None) is None:
            return
        if not members:
            del self._channels[channel]
        self._snapshots.pop(channel, None)

    async def read(self, channel: str) -> PresenceList:
        snap = self._snapshots.get(channel)
        if snap is None:
            members = self._channels.get(channel, {})
            listed = [{"client": c, "user": u} for c, u in members.items()][: self.limit]
            snap = PresenceList(listed, len(members))
            if members:
                self._snapshots[channel] = snap
        return snap

    async def clients(self, channel: str) -> list[dict[str, str]]:
        return (await self.read(channel)).clients

    async def channels(self) -> dict[str, int]:
        local = self._local() if self._local is not None else {}
        return dict(sorted(local.items())[:MAX_LISTED_CHANNELS])


def presence_for(broker: Broker, *, ttl: float, limit: int) -> PresenceStore:
    """The broker's shared presence when it keeps one (Redis: every node's members), else this node's."""
    if isinstance(broker, SharesPresence):
        return broker.presence_store(ttl=ttl, limit=limit)
    return LocalPresence(limit)
