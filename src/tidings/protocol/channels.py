"""Channel-name rules: ``namespace:rest``; letters, digits and ``_-:.@/=``; at most 255 bytes."""

from __future__ import annotations

import re

__all__ = ["MAX_CHANNEL_BYTES", "is_valid_channel", "namespace_of"]

MAX_CHANNEL_BYTES = 255
_CHANNEL_RE = re.compile(r"[A-Za-z0-9_\-:.@/=]{1,255}")


def is_valid_channel(name: object) -> bool:
    """True when ``name`` is a string that is a legal channel name."""
    return isinstance(name, str) and _CHANNEL_RE.fullmatch(name) is not None


def namespace_of(channel: str) -> str:
    """The namespace of a channel: the part before the first ``:``, or ``""`` when there is none."""
    head, sep, _ = channel.partition(":")
    return head if sep else ""
