"""Who is in a channel: the local :class:`~tidings.backends.base.PresenceStore`.

Presence is kept apart from the hub's subscriber lists (a store shared by several nodes replaces this
one); the subscription lifecycle (``subscriptions.py``) adds a client when it goes live and removes it
when it leaves. A channel's list is built once per change and reused by every read in between.
"""

from __future__ import annotations

__all__ = ["LocalPresence"]


class LocalPresence:
    """This node's presence: channel -> {client: user}, in join order."""

    def __init__(self) -> None:
        self._channels: dict[str, dict[str, str]] = {}
        self._snapshots: dict[str, list[dict[str, str]]] = {}

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

    async def clients(self, channel: str) -> list[dict[str, str]]:
        snap = self._snapshots.get(channel)
        if snap is None:
            members = self._channels.get(channel, {})
            snap = [{"client": c, "user": u} for c, u in members.items()]
            if members:
                self._snapshots[channel] = snap
        return snap
