"""sqlite:///path — the embedded default. Durable history in one SQLite file (WAL), one writer thread.

Publishes are queued to the writer thread, which takes everything waiting and commits it in one
transaction (group commit), then hands the committed publications back to the event loop in order: the
future of each publish resolves only after its commit, and fan-out happens in offset order.

Reads are served from an in-memory cache of recent publications per channel (the same ``Stream`` the
memory broker uses), loaded once per channel through the writer thread so that a load and later commits
arrive on the loop in the order they happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..protocol import Publication, new_publication_id
from .base import (
    BrokerError,
    BrokerHandler,
    HistoryOptions,
    HistoryResult,
    IdempotencyOptions,
    OneNode,
    PublishDone,
    PublishRequest,
    PublishResult,
    Repeat,
    land,
    new_epoch,
)
from .push_local import LocalPushStore
from .stream import Stream, StreamSet, now_ms

__all__ = ["SqliteBroker"]

log = logging.getLogger("tidings.sqlite")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS streams (
    channel TEXT PRIMARY KEY,
    epoch   TEXT NOT NULL,
    top     INTEGER NOT NULL,
    updated INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pubs (
    channel TEXT NOT NULL,
    offset  INTEGER NOT NULL,
    id      TEXT NOT NULL,
    time    INTEGER NOT NULL,
    expires INTEGER NOT NULL,
    data    BLOB NOT NULL,
    info    BLOB,
    PRIMARY KEY (channel, offset)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS pubs_expires ON pubs (expires);
CREATE TABLE IF NOT EXISTS idempotency (
    channel TEXT NOT NULL,
    key     TEXT NOT NULL,
    offset  INTEGER NOT NULL,
    epoch   TEXT NOT NULL,
    id      TEXT NOT NULL,
    expires INTEGER NOT NULL,
    PRIMARY KEY (channel, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idempotency_expires ON idempotency (expires);
CREATE TABLE IF NOT EXISTS health (
    id INTEGER PRIMARY KEY,
    at INTEGER NOT NULL
);
"""

MAX_BATCH = 4096
SWEEP_INTERVAL = 60.0


@dataclass(slots=True)
class _Load:
    channel: str
    opts: HistoryOptions
    future: asyncio.Future[Stream]


@dataclass(slots=True)
class _Pubs:
    """Several publications queued as one item, answered with one callback."""

    reqs: list[PublishRequest]
    done: PublishDone


@dataclass(slots=True)
class _Ping:
    """A readiness check: one row written in the writer's next transaction (``ping``)."""

    future: asyncio.Future[None]


class _Stop:
    pass


@dataclass(slots=True)
class _Trimmed:
    """Channels whose history the writer dropped to keep the disk bound (the cache forgets them)."""

    channels: list[str]


_Item = _Pubs | _Load | _Ping | _Stop | _Trimmed
# What one stored row costs, counted against max_history_bytes: the payloads and a fixed overhead.
_ROW_BYTES = "length(data) + COALESCE(length(info), 0) + length(channel) + 64"


class SqliteBroker(OneNode):
    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: str = "normal",
        cache_channels: int = 10_000,
        cache_bytes: int = 256 << 20,
        max_history_bytes: int = 0,
        idempotency: IdempotencyOptions | None = None,
    ) -> None:
        self.path = Path(path)
        self.synchronous = synchronous.upper()
        if self.synchronous not in ("NORMAL", "FULL", "EXTRA"):
            raise ValueError("sqlite synchronous must be normal, full or extra")
        # Recent publications of recently used channels, bounded in bytes and in channels.
        self._cache = StreamSet(cache_bytes, drop=True, max_streams=cache_channels)
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._handler: BrokerHandler | None = None
        # The epoch of channels nobody published to yet, and the one they start in when they are.
        self._empty_epoch = new_epoch()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._loading: dict[str, asyncio.Future[Stream]] = {}
        # Bytes of history on disk (payloads plus a fixed overhead per row); 0 = unbounded.
        self.max_history_bytes = max_history_bytes
        self.disk_bytes = 0
        # Idempotency keys in the database: durable across restarts, bounded in time and count.
        self.idempotency = idempotency or IdempotencyOptions()
        self.idempotency_keys = 0  # rows in the idempotency table (an upper bound between sweeps)

    def push_store(self, *, online_ttl: float) -> LocalPushStore:
        """Web Push registrations in a table of this broker's file (``backends/push_local.py``)."""
        return LocalPushStore(self.path)

    # ------------------------------------------------------------------------------ lifecycle

    async def start(self, handler: BrokerHandler) -> None:
        self._handler = handler
        self._loop = asyncio.get_running_loop()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        ready: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="tidings-sqlite", daemon=True)
        self._thread.start()
        await ready

    async def close(self) -> None:
        if self._thread is not None:
            self._queue.put(_Stop())
            await asyncio.to_thread(self._thread.join, 10)
            self._thread = None

    # ------------------------------------------------------------------------------ API

    def publish_many(self, reqs: list[PublishRequest], done: PublishDone) -> None:
        if self._thread is None:
            done(BrokerError("storage is closed"))
            return
        self._queue.put(_Pubs(reqs, done))

    async def ping(self) -> None:
        """A real write: one row of the ``health`` table committed by the writer thread in its next
        transaction, with the publications queued beside it (so it fails when their commit would)."""
        if self._thread is None or self._loop is None:
            raise BrokerError("storage is closed")
        fut: asyncio.Future[None] = self._loop.create_future()
        self._queue.put(_Ping(fut))
        await fut

    async def retained(self) -> int:
        """Publications in history now, not expired (the ``tidings_history_publications`` metric):
        counted by a reader connection of its own in a thread (WAL: it never waits for the writer)."""
        return await asyncio.to_thread(self._count_retained)

    def _count_retained(self) -> int:
        db = sqlite3.connect(self.path, check_same_thread=False)
        try:
            (n,) = db.execute("SELECT count(*) FROM pubs WHERE expires > ?", (now_ms(),)).fetchone()
            return int(n)
        finally:
            db.close()

    async def history(
        self, channel: str, opts: HistoryOptions, *, since: int | None = None, limit: int | None = None
    ) -> HistoryResult:
        stream = self._cache.get(channel)
        if stream is None:
            stream = await self._load(channel, opts)
        return self._cache.read(stream, opts, since, limit)

    async def _load(self, channel: str, opts: HistoryOptions) -> Stream:
        fut = self._loading.get(channel)
        if fut is None:
            assert self._loop is not None
            fut = self._loading[channel] = self._loop.create_future()
            self._queue.put(_Load(channel, opts, fut))
        return await asyncio.shield(fut)

    # ------------------------------------------------------------------------------ loop side

    def _on_batch(self, results: list[tuple[_Item, Any]]) -> None:
        """Runs on the loop, in commit order: install loads, cache and deliver publications."""
        for item, result in results:
            if isinstance(item, _Load):
                self._loading.pop(item.channel, None)
                if isinstance(result, BaseException):
                    if not item.future.done():
                        item.future.set_exception(result)
                    continue
                self._cache.put(item.channel, result)
                if not item.future.done():
                    item.future.set_result(result)
            elif isinstance(item, _Ping):
                if not item.future.done():
                    if isinstance(result, BaseException):
                        item.future.set_exception(result)
                    else:
                        item.future.set_result(None)
            elif isinstance(item, _Trimmed):
                for ch in item.channels:
                    self._cache.discard(ch)
            elif isinstance(item, _Pubs):
                assert self._handler is not None
                opts = {r.channel: r.opts for r in item.reqs}
                land(self._handler, result, item.done, functools.partial(self._cache_pub, opts))

    def _cache_pub(self, opts: dict[str, HistoryOptions], pub: Publication) -> None:
        """A committed publication into the read cache (if the channel is cached), before its fan-out."""
        cached = self._cache.get(pub.channel)
        if cached is not None:
            if cached.epoch == pub.epoch and cached.top == pub.offset - 1:
                self._cache.append(cached, pub, opts[pub.channel])
            else:  # cannot happen with one writer; never serve a stale cache
                self._cache.discard(pub.channel)

    # ------------------------------------------------------------------------------ writer thread

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self.synchronous}")
        db.execute("PRAGMA busy_timeout=5000")
        db.executescript(_SCHEMA)
        return db

    def _run(self, ready: asyncio.Future[None]) -> None:
        loop = self._loop
        assert loop is not None
        try:
            db = self._connect()
        except Exception as exc:  # reported to start()
            loop.call_soon_threadsafe(ready.set_exception, BrokerError(f"cannot open {self.path}: {exc}"))
            return
        try:
            self.disk_bytes = db.execute(f"SELECT COALESCE(SUM({_ROW_BYTES}), 0) FROM pubs").fetchone()[0]
            self.idempotency_keys = db.execute("SELECT COUNT(*) FROM idempotency").fetchone()[0]
        except sqlite3.Error as exc:
            loop.call_soon_threadsafe(ready.set_exception, BrokerError(f"cannot read {self.path}: {exc}"))
            db.close()
            return
        loop.call_soon_threadsafe(ready.set_result, None)
        meta: dict[str, tuple[str, int]] = {}  # channel -> (epoch, top), the writer's view
        last_sweep = time.monotonic()
        try:
            while True:
                try:
                    items = [self._queue.get(timeout=SWEEP_INTERVAL)]
                except queue.Empty:
                    items = []
                while len(items) < MAX_BATCH:
                    try:
                        items.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                stop = any(isinstance(i, _Stop) for i in items)
                work = [i for i in items if isinstance(i, _Pubs | _Load | _Ping)]
                if work:
                    results = self._process(db, meta, work)
                    if self.idempotency_keys > self.idempotency.max_keys:
                        self._trim_keys(db)
                    if self.max_history_bytes and self.disk_bytes > self.max_history_bytes:
                        trimmed = _Trimmed(self._trim_disk(db))
                        results.append((trimmed, None))
                    loop.call_soon_threadsafe(self._on_batch, results)
                if time.monotonic() - last_sweep > SWEEP_INTERVAL:
                    last_sweep = time.monotonic()
                    self._expire(db)
                if stop:
                    return
        finally:
            db.close()

    @staticmethod
    def _known_meta(
        db: sqlite3.Connection, meta: dict[str, tuple[str, int]], ch: str
    ) -> tuple[str, int] | None:
        """(epoch, top) of a channel that has a stream, from the writer's view or the database; None
        for a channel nobody published to. Reads only."""
        m = meta.get(ch)
        if m is None:
            row = db.execute("SELECT epoch, top FROM streams WHERE channel=?", (ch,)).fetchone()
            if row is not None:
                m = (row[0], row[1])
        return m

    def _stream_meta(
        self, db: sqlite3.Connection, meta: dict[str, tuple[str, int]], ch: str
    ) -> tuple[str, int]:
        m = meta.get(ch)
        if m is None:
            m = self._known_meta(db, meta, ch)
            if m is None:
                m = (self._empty_epoch, 0)  # the epoch it read as before its first publish
                db.execute(
                    "INSERT INTO streams(channel, epoch, top, updated) VALUES (?,?,?,?)",
                    (ch, m[0], 0, now_ms()),
                )
            if len(meta) > 100_000:
                meta.clear()
            meta[ch] = m
        return m

    def _process(
        self, db: sqlite3.Connection, meta: dict[str, tuple[str, int]], items: list[_Pubs | _Load | _Ping]
    ) -> list[tuple[_Item, Any]]:
        results: list[tuple[_Item, Any]] = []
        touched: dict[str, tuple[str, int] | None] = {}  # meta before this batch, to restore on failure
        rows: list[tuple[Any, ...]] = []

        def insert_rows() -> None:
            if rows:
                db.executemany(
                    "INSERT INTO pubs(channel, offset, id, time, expires, data, info) VALUES (?,?,?,?,?,?,?)",
                    rows,
                )
                rows.clear()

        trims: dict[str, tuple[int, int]] = {}
        t = now_ms()
        added = [0]  # bytes stored by this batch, net of what its trims deleted
        keys_added = [0]
        key_expires = t + int(self.idempotency.window * 1000)

        def touch(channel: str) -> None:
            if channel not in touched:
                touched[channel] = meta.get(channel)

        def add(r: PublishRequest) -> Publication | Repeat:
            channel, opts = r.channel, r.opts
            if r.key is not None:
                hit = db.execute(
                    "SELECT offset, epoch, id FROM idempotency WHERE channel=? AND key=? AND expires>?",
                    (channel, r.key, t),
                ).fetchone()
                if hit is not None:
                    return Repeat(channel, hit[0], hit[1], hit[2])
            touch(channel)
            epoch, top = self._stream_meta(db, meta, channel)
            top += 1
            pub = Publication(channel, top, epoch, new_publication_id(), t, raw=r.raw, raw_info=r.raw_info)
            if opts.size > 0:
                rows.append((channel, top, pub.id, t, t + int(opts.ttl * 1000), r.raw, r.raw_info))
                added[0] += len(r.raw) + len(r.raw_info or b"") + len(channel) + 64
            meta[channel] = (epoch, top)
            trims[channel] = (top, opts.size)
            if r.key is not None:
                db.execute(
                    "INSERT OR REPLACE INTO idempotency(channel, key, offset, epoch, id, expires) "
                    "VALUES (?,?,?,?,?,?)",
                    (channel, r.key, top, epoch, pub.id, key_expires),
                )
                keys_added[0] += 1
            return pub

        try:
            db.execute("BEGIN IMMEDIATE")
            for item in items:
                if isinstance(item, _Load):
                    insert_rows()  # the load must see everything queued before it
                    touch(item.channel)
                    results.append((item, self._load_stream(db, meta, item)))
                elif isinstance(item, _Ping):
                    db.execute("INSERT OR REPLACE INTO health(id, at) VALUES (1, ?)", (t,))
                    results.append((item, None))
                else:
                    pubs: PublishResult = [add(r) for r in item.reqs]
                    results.append((item, pubs))
            insert_rows()
            for ch, (top, size) in trims.items():
                db.execute("UPDATE streams SET top=?, updated=? WHERE channel=?", (top, t, ch))
                gone = db.execute(
                    f"DELETE FROM pubs WHERE channel=? AND offset<=? RETURNING {_ROW_BYTES}",
                    (ch, top - max(size, 0)),
                ).fetchall()
                added[0] -= sum(g[0] for g in gone)
            db.execute("COMMIT")
            self.disk_bytes += added[0]
            self.idempotency_keys += keys_added[0]
        except Exception as exc:
            log.exception("sqlite write failed")
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            for ch, old in touched.items():
                if old is None:
                    meta.pop(ch, None)
                else:
                    meta[ch] = old
            err = BrokerError(f"storage write failed: {exc}")
            return [(item, err) for item in items]
        return results

    def _load_stream(self, db: sqlite3.Connection, meta: dict[str, tuple[str, int]], item: _Load) -> Stream:
        """A channel's retained publications from the database, for the read cache. A channel nobody
        published to reads as empty in the broker's empty epoch, and nothing is written for it."""
        known = self._known_meta(db, meta, item.channel)
        if known is None:
            return Stream(self._empty_epoch, 0)
        epoch, top = known
        rows = db.execute(
            "SELECT offset, id, time, data, info FROM pubs WHERE channel=? AND expires>? "
            "ORDER BY offset DESC LIMIT ?",
            (item.channel, now_ms(), max(item.opts.size, 0)),
        ).fetchall()
        # Keep the offsets contiguous up to top: stop at the first hole from the newest down.
        keep: list[Publication] = []
        expect = top
        for o, i, t, d, nf in rows:
            if o != expect:
                break
            keep.append(Publication(item.channel, o, epoch, i, t, raw=d, raw_info=nf))
            expect -= 1
        keep.reverse()
        stream = Stream(epoch, top, keep)
        stream.ttl = item.opts.ttl
        return stream

    def _expire(self, db: sqlite3.Connection) -> None:
        try:
            gone = db.execute(f"DELETE FROM pubs WHERE expires<=? RETURNING {_ROW_BYTES}", (now_ms(),))
            self.disk_bytes -= sum(g[0] for g in gone.fetchall())
            db.execute("DELETE FROM idempotency WHERE expires<=?", (now_ms(),))
            self.idempotency_keys = db.execute("SELECT COUNT(*) FROM idempotency").fetchone()[0]
        except sqlite3.Error:
            log.exception("sqlite expiry sweep failed")

    def _trim_keys(self, db: sqlite3.Connection) -> None:
        """Over ``idempotency.max_keys``: forget expired keys, then the oldest, down to 90 % of it."""
        keep = self.idempotency.max_keys * 9 // 10
        try:
            gone = db.execute("DELETE FROM idempotency WHERE expires<=?", (now_ms(),)).rowcount
            self.idempotency_keys -= max(gone, 0)
            excess = self.idempotency_keys - keep
            if excess > 0:
                gone = db.execute(
                    "DELETE FROM idempotency WHERE (channel, key) IN "
                    "(SELECT channel, key FROM idempotency ORDER BY expires LIMIT ?)",
                    (excess,),
                ).rowcount
                self.idempotency_keys -= max(gone, 0)
        except sqlite3.Error:
            log.exception("sqlite idempotency trim failed")

    def _trim_disk(self, db: sqlite3.Connection) -> list[str]:
        """Over ``max_history_bytes``: drop the history of the channels published to least recently, one
        channel at a time, until 90 % of the bound is left. Their epoch and top stay, so a client that
        needed what was dropped is told ``recovered: false``."""
        target = self.max_history_bytes * 9 // 10
        trimmed: list[str] = []
        try:
            while self.disk_bytes > target:
                row = db.execute(
                    "SELECT s.channel FROM streams s WHERE EXISTS "
                    "(SELECT 1 FROM pubs p WHERE p.channel = s.channel) ORDER BY s.updated LIMIT 1"
                ).fetchone()
                if row is None:
                    break
                gone = db.execute(f"DELETE FROM pubs WHERE channel=? RETURNING {_ROW_BYTES}", (row[0],))
                self.disk_bytes -= sum(g[0] for g in gone.fetchall())
                trimmed.append(row[0])
        except sqlite3.Error:
            log.exception("sqlite history trim failed")
        if trimmed:
            log.warning(
                "history over max_history_bytes (%d): dropped the history of %d least recently used "
                "channel(s)",
                self.max_history_bytes,
                len(trimmed),
            )
        return trimmed
