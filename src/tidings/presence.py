"""Who is in a channel on this node, and join/leave events."""

from __future__ import annotations

from typing import Any

from .hub import Hub, Sink

__all__ = ["join_leave_event", "presence"]


def presence(hub: Hub, channel: str) -> list[dict[str, Any]]:
    """The clients subscribed to ``channel`` here, in subscription order."""
    return [{"client": s.client_id, "user": s.user} for s in hub.subscribers(channel)]


def join_leave_event(kind: str, channel: str, sink: Sink) -> dict[str, object]:
    return {"type": kind, "channel": channel, "client": sink.client_id, "user": sink.user}
