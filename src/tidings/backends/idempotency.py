"""Idempotency keys remembered in memory (the memory broker; the SQLite broker keeps them in a table).

A publish carrying an ``idempotency_key`` that was seen on the same channel within the window is answered
with the first publish's :class:`~tidings.backends.base.Repeat` instead of being stored again, so a client
that retries after a timeout or a dropped connection never duplicates a publication.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from .base import IdempotencyOptions, Repeat

__all__ = ["KeyCache"]


class KeyCache:
    """``(channel, key) -> Repeat`` for ``window`` seconds, at most ``max_keys`` entries (the oldest are
    forgotten first). Entries are kept in the order they were made, which is also their expiry order."""

    def __init__(self, opts: IdempotencyOptions) -> None:
        self.opts = opts
        self._keys: OrderedDict[tuple[str, str], tuple[float, Repeat]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def get(self, channel: str, key: str) -> Repeat | None:
        hit = self._keys.get((channel, key))
        if hit is None:
            return None
        if hit[0] <= time.monotonic():
            del self._keys[(channel, key)]
            return None
        return hit[1]

    def put(self, channel: str, key: str, repeat: Repeat) -> None:
        keys = self._keys
        keys[(channel, key)] = (time.monotonic() + self.opts.window, repeat)
        keys.move_to_end((channel, key))
        self.prune()
        while len(keys) > self.opts.max_keys:
            keys.popitem(last=False)

    def prune(self) -> None:
        """Forget expired keys (from the oldest; stops at the first live one)."""
        keys = self._keys
        now = time.monotonic()
        while keys:
            deadline, _ = next(iter(keys.values()))
            if deadline > now:
                break
            keys.popitem(last=False)
