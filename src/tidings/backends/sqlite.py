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
import logging
import queue
import sqlite3
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from ..protocol import Publication, new_publication_id
from .base import (
    BrokerError,
    DeliverFn,
    HistoryOptions,
    HistoryResult,
    PublishDone,
    PublishRequest,
    new_epoch,
)
from .stream import Stream, now_ms

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


class _Stop:
    pass


_Item = _Pubs | _Load | _Stop


class SqliteBroker:
    def __init__(
        self, path: str | Path, *, synchronous: str = "normal", cache_channels: int = 10_000
    ) -> None:
        self.path = Path(path)
        self.synchronous = synchronous.upper()
        if self.synchronous not in ("NORMAL", "FULL", "EXTRA"):
            raise ValueError("sqlite synchronous must be normal, full or extra")
        self._cache: OrderedDict[str, Stream] = OrderedDict()
        self._cache_max = cache_channels
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._deliver: DeliverFn | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._loading: dict[str, asyncio.Future[Stream]] = {}

    # ------------------------------------------------------------------------------ lifecycle

    async def start(self, deliver: DeliverFn) -> None:
        self._deliver = deliver
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

    async def history(
        self, channel: str, opts: HistoryOptions, *, since: int | None = None, limit: int | None = None
    ) -> HistoryResult:
        stream = self._cache.get(channel)
        if stream is None:
            stream = await self._load(channel, opts)
        else:
            self._cache.move_to_end(channel)
        return stream.read(opts, since, limit)

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
                self._cache[item.channel] = result
                self._cache.move_to_end(item.channel)
                while len(self._cache) > self._cache_max:
                    self._cache.popitem(last=False)
                if not item.future.done():
                    item.future.set_result(result)
            elif isinstance(item, _Pubs):
                if not isinstance(result, BaseException):
                    for pub, req in zip(result, item.reqs, strict=True):
                        self._land(pub, req.opts)
                item.done(result)

    def _land(self, pub: Publication, opts: HistoryOptions) -> None:
        """A committed publication: into the read cache (if the channel is cached), then fan-out."""
        cached = self._cache.get(pub.channel)
        if cached is not None:
            if cached.epoch == pub.epoch and cached.top == pub.offset - 1:
                cached.append(pub, opts)
            else:  # cannot happen with one writer; never serve a stale cache
                del self._cache[pub.channel]
        assert self._deliver is not None
        self._deliver(pub)

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
                work: list[_Pubs | _Load] = [i for i in items if not isinstance(i, _Stop)]
                if work:
                    results = self._process(db, meta, work)
                    loop.call_soon_threadsafe(self._on_batch, results)
                if time.monotonic() - last_sweep > SWEEP_INTERVAL:
                    last_sweep = time.monotonic()
                    self._expire(db)
                if stop:
                    return
        finally:
            db.close()

    def _stream_meta(
        self, db: sqlite3.Connection, meta: dict[str, tuple[str, int]], ch: str
    ) -> tuple[str, int]:
        m = meta.get(ch)
        if m is None:
            row = db.execute("SELECT epoch, top FROM streams WHERE channel=?", (ch,)).fetchone()
            if row is None:
                m = (new_epoch(), 0)
                db.execute(
                    "INSERT INTO streams(channel, epoch, top, updated) VALUES (?,?,?,?)",
                    (ch, m[0], 0, now_ms()),
                )
            else:
                m = (row[0], row[1])
            if len(meta) > 100_000:
                meta.clear()
            meta[ch] = m
        return m

    def _process(
        self, db: sqlite3.Connection, meta: dict[str, tuple[str, int]], items: list[_Pubs | _Load]
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

        def touch(channel: str) -> None:
            if channel not in touched:
                touched[channel] = meta.get(channel)

        def add(
            channel: str, data: Any, info: dict[str, Any] | None, opts: HistoryOptions, blob: bytes
        ) -> Publication:
            touch(channel)
            epoch, top = self._stream_meta(db, meta, channel)
            top += 1
            pub = Publication(channel, top, epoch, new_publication_id(), t, data, info)
            if opts.size > 0:
                row_info = orjson.dumps(info) if info is not None else None
                rows.append((channel, top, pub.id, t, t + int(opts.ttl * 1000), blob, row_info))
            meta[channel] = (epoch, top)
            trims[channel] = (top, opts.size)
            return pub

        try:
            db.execute("BEGIN IMMEDIATE")
            for item in items:
                if isinstance(item, _Load):
                    insert_rows()  # the load must see everything queued before it
                    touch(item.channel)
                    results.append((item, self._load_stream(db, meta, item)))
                else:
                    pubs = [add(r.channel, r.data, r.info, r.opts, r.encoded) for r in item.reqs]
                    results.append((item, pubs))
            insert_rows()
            for ch, (top, size) in trims.items():
                db.execute("UPDATE streams SET top=?, updated=? WHERE channel=?", (top, t, ch))
                db.execute("DELETE FROM pubs WHERE channel=? AND offset<=?", (ch, top - max(size, 0)))
            db.execute("COMMIT")
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
        """A channel's retained publications from the database, for the read cache."""
        epoch, top = self._stream_meta(db, meta, item.channel)
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
            keep.append(
                Publication(item.channel, o, epoch, i, t, orjson.loads(d), orjson.loads(nf) if nf else None)
            )
            expect -= 1
        keep.reverse()
        stream = Stream(epoch, top, keep)
        stream.ttl = item.opts.ttl
        return stream

    def _expire(self, db: sqlite3.Connection) -> None:
        try:
            db.execute("DELETE FROM pubs WHERE expires<=?", (now_ms(),))
        except sqlite3.Error:
            log.exception("sqlite expiry sweep failed")
