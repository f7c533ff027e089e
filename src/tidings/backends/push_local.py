"""Web Push registrations of one node: in memory (``memory://``, not durable: a restart forgets every
device) or in memory backed by a table of the SQLite broker's file (``sqlite://``, durable: loaded at
start, every change committed before it is answered).

The SQLite table is written through its own connection on its own thread (registrations are rare; the
broker's writer thread stays the publications' alone); WAL and ``busy_timeout`` let the two share the
file. Reads (one per publication in a push namespace) come from memory.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import orjson

from .base import BrokerError, PushDevice, PushLimitError

__all__ = ["LocalPushStore"]

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS push_devices (
    endpoint TEXT PRIMARY KEY,
    device   BLOB NOT NULL
) WITHOUT ROWID;
"""


class LocalPushStore:
    """The :class:`~tidings.backends.base.PushStore` of a one-node broker; ``path``: the SQLite file to
    keep registrations in (None: memory only)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._devices: dict[str, PushDevice] = {}
        self._by_channel: dict[str, dict[str, PushDevice]] = {}
        self._by_owner: dict[str, set[str]] = {}
        self._db: sqlite3.Connection | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = asyncio.Lock()  # one change at a time: a cap check and its write are one step

    # ------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self.path is None or self._pool is not None:
            return
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="tidings-push-db")
        rows = await self._run(self._open)
        for raw in rows:
            self._index(PushDevice.from_json(orjson.loads(raw)))

    async def close(self) -> None:
        if self._pool is not None:
            if self._db is not None:
                await self._run(self._db.close)
                self._db = None
            self._pool.shutdown(wait=True)
            self._pool = None

    def _open(self) -> list[bytes]:
        assert self.path is not None
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA busy_timeout=5000")
        db.executescript(_SCHEMA)
        self._db = db
        return [row[0] for row in db.execute("SELECT device FROM push_devices")]

    async def _run(self, fn: Callable[[], T]) -> T:
        assert self._pool is not None
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn)
        except sqlite3.Error as exc:
            raise BrokerError(f"push subscriptions: {exc}") from exc

    # ------------------------------------------------------------------------------ index

    def _index(self, dev: PushDevice) -> None:
        self._devices[dev.endpoint] = dev
        self._by_owner.setdefault(dev.owner, set()).add(dev.endpoint)
        for ch in dev.channels:
            self._by_channel.setdefault(ch, {})[dev.endpoint] = dev

    def _unindex(self, dev: PushDevice) -> None:
        self._devices.pop(dev.endpoint, None)
        owned = self._by_owner.get(dev.owner)
        if owned is not None:
            owned.discard(dev.endpoint)
            if not owned:
                del self._by_owner[dev.owner]
        for ch in dev.channels:
            devs = self._by_channel.get(ch)
            if devs is not None:
                devs.pop(dev.endpoint, None)
                if not devs:
                    del self._by_channel[ch]

    # ------------------------------------------------------------------------------ PushStore

    async def add(self, device: PushDevice, *, max_per_owner: int, max_total: int) -> None:
        async with self._lock:
            old = self._devices.get(device.endpoint)
            moves = old is None or old.owner != device.owner  # one more device for this owner
            if moves and len(self._by_owner.get(device.owner, ())) >= max_per_owner:
                raise PushLimitError("owner", max_per_owner)
            if old is None and len(self._devices) >= max_total:
                raise PushLimitError("server", max_total)
            if self._pool is not None:
                raw = orjson.dumps(device.to_json())
                await self._run(lambda: self._write(device.endpoint, raw))
            if old is not None:
                self._unindex(old)
            self._index(device)

    def _write(self, endpoint: str, raw: bytes | None) -> None:
        assert self._db is not None
        if raw is None:
            self._db.execute("DELETE FROM push_devices WHERE endpoint=?", (endpoint,))
        else:
            self._db.execute(
                "INSERT INTO push_devices(endpoint, device) VALUES (?, ?) "
                "ON CONFLICT(endpoint) DO UPDATE SET device=excluded.device",
                (endpoint, raw),
            )

    async def remove(self, endpoint: str) -> PushDevice | None:
        async with self._lock:
            old = self._devices.get(endpoint)
            if old is None:
                return None
            if self._pool is not None:
                await self._run(lambda: self._write(endpoint, None))
            self._unindex(old)
            return old

    async def get(self, endpoint: str) -> PushDevice | None:
        return self._devices.get(endpoint)

    async def devices(self, channel: str) -> list[PushDevice]:
        return list(self._by_channel.get(channel, {}).values())

    def set_online(self, user: str, online: bool) -> None:
        return None  # one node: the node's own connections are the whole answer

    async def online_elsewhere(self, users: Iterable[str]) -> set[str]:
        return set()
