"""The embedded exact-answer store: one SQLite file under the data directory.

Every touch of the file happens in one dedicated worker thread that owns the connection
(:class:`SqliteWorker`), so the event loop never waits on the disk, and calls run in the order
they were made. The file is in WAL mode with ``synchronous=NORMAL`` and a busy timeout, so two
gateway processes may share it: readers never block, writers queue for at most the timeout.

Costs, measured on a busy 2-core machine with 100,000 entries (``bench/cache_stores.py``): a
``get`` is one primary-key SELECT, about 10 µs in the thread and 70-110 µs end to end, most of
it the hand-off to the thread and back (~50 µs for a no-op). A hit's
``hits``/``last_used`` bump is *not* written by the get itself (an UPDATE costs ~130 µs, a WAL
page write); hits are kept in memory and flushed in one transaction every 256 hits or every
second of wall time, and always before a write, a clear or stats. So LRU order and hit counts
seen by another process lag by at most that much, and a crash loses at most that many bumps.

Size caps: a ``cache_totals`` row kept exact by triggers holds the entry count and the byte
total, so each ``set`` checks the caps in O(1) inside its own ``BEGIN IMMEDIATE`` transaction and
evicts least-recently-used rows (expired ones first) until both hold: the caps are exact after
every ``set``, across processes too. An entry larger than ``max_bytes`` is not stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from spillway.cache.stores import Entry, ScopeStats
from spillway.clock import Clock

T = TypeVar("T")

FILENAME = "cache.db"
#: Long enough to ride out another process's write, short enough that a stuck file is a miss.
BUSY_TIMEOUT_MS = 2_000
_WAL_SWITCH_TIMEOUT_S = 10.0
_FLUSH_HITS = 256
_FLUSH_EVERY_S = 1.0
_PURGE_EVERY_S = 60.0

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS cache_entries (
        key TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        model TEXT NOT NULL,
        value BLOB NOT NULL,
        size INTEGER NOT NULL,
        expires_at REAL NOT NULL,
        last_used REAL NOT NULL,
        hits INTEGER NOT NULL DEFAULT 0
    )""",
    "CREATE INDEX IF NOT EXISTS cache_entries_lru ON cache_entries (last_used)",
    "CREATE INDEX IF NOT EXISTS cache_entries_expiry ON cache_entries (expires_at)",
    "CREATE INDEX IF NOT EXISTS cache_entries_scope ON cache_entries (tenant, model)",
    """CREATE TABLE IF NOT EXISTS cache_totals (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        entries INTEGER NOT NULL,
        bytes INTEGER NOT NULL
    )""",
    """INSERT OR IGNORE INTO cache_totals
        SELECT 1, count(*), coalesce(sum(size), 0) FROM cache_entries""",
    # Upserts fire UPDATE triggers; INSERT OR REPLACE would delete without firing DELETE ones.
    """CREATE TRIGGER IF NOT EXISTS cache_entries_ins AFTER INSERT ON cache_entries BEGIN
        UPDATE cache_totals SET entries = entries + 1, bytes = bytes + NEW.size; END""",
    """CREATE TRIGGER IF NOT EXISTS cache_entries_del AFTER DELETE ON cache_entries BEGIN
        UPDATE cache_totals SET entries = entries - 1, bytes = bytes - OLD.size; END""",
    """CREATE TRIGGER IF NOT EXISTS cache_entries_upd AFTER UPDATE OF size ON cache_entries
        BEGIN UPDATE cache_totals SET bytes = bytes + NEW.size - OLD.size; END""",
)
_GET = "SELECT value FROM cache_entries WHERE key = ? AND expires_at > ?"
_UPSERT = """INSERT INTO cache_entries
    (key, tenant, model, value, size, expires_at, last_used, hits)
    VALUES (?, ?, ?, ?, ?, ?, ?, 0)
    ON CONFLICT (key) DO UPDATE SET tenant = excluded.tenant, model = excluded.model,
        value = excluded.value, size = excluded.size, expires_at = excluded.expires_at,
        last_used = excluded.last_used, hits = 0"""
_BUMP = """UPDATE cache_entries SET hits = hits + ?, last_used = max(last_used, ?)
    WHERE key = ?"""
_EVICT = """DELETE FROM cache_entries WHERE rowid IN (
    SELECT rowid FROM cache_entries WHERE key != ? ORDER BY last_used, rowid LIMIT ?)"""
_SCOPE = "(?1 IS NULL OR tenant = ?1) AND (?2 IS NULL OR model = ?2)"
_STATS = """SELECT tenant, model, count(*), sum(size), sum(hits) FROM cache_entries
    WHERE expires_at > ? GROUP BY tenant, model ORDER BY tenant, model"""


def connect(path: Path) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, synchronous=NORMAL.

    Two connections switching a new file to WAL at the same moment deadlock on the lock
    upgrade and one would sit out its whole busy timeout, so the switch retries without waiting.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=0, isolation_level=None)
    deadline = time.monotonic() + _WAL_SWITCH_TIMEOUT_S
    while True:
        try:
            db.execute("PRAGMA journal_mode = WAL")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                db.close()
                raise
        time.sleep(0.01)
    db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    db.execute("PRAGMA synchronous = NORMAL")
    return db


@contextlib.contextmanager
def write_transaction(db: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` (take the write lock up front: no deadlock on upgrade) ... COMMIT."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


class SqliteWorker:
    """One thread that owns one SQLite connection; ``run`` sends it a function of the
    connection and awaits the result. Calls run one at a time, in the order they were made."""

    def __init__(self, path: Path, name: str):
        self._path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._db: sqlite3.Connection | None = None
        self._closed = False

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._call, fn)

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._db is None:  # opened here, so the connection never leaves this thread
            self._db = connect(self._path)
        return fn(self._db)

    async def aclose(self, last: Callable[[sqlite3.Connection], None] | None = None) -> None:
        """Run ``last`` (if the connection was ever opened), close, and let the thread go.
        Closing twice is harmless."""
        if self._closed:
            return
        self._closed = True

        def close() -> None:
            if self._db is not None:
                try:
                    if last is not None:
                        last(self._db)
                finally:
                    self._db.close()
                    self._db = None

        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, close)
        finally:
            self._executor.shutdown(wait=False)


class SqliteCacheStore:
    """``CacheStore`` in one SQLite file (``DATA_DIR/cache.db``), safe to share between
    processes. Call ``open()`` first and ``aclose()`` last; see the module docstring for the
    cost of each call and how the caps hold."""

    def __init__(self, path: Path, clock: Clock, max_entries: int, max_bytes: int):
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("cache caps must be positive")
        self._clock = clock
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._worker = SqliteWorker(path, "spillway-cache-sqlite")
        # Touched only in the worker thread: hits not yet written, key -> [hits, last_used].
        self._pending: dict[str, list[float]] = {}
        self._pending_since = 0.0
        self._next_purge = 0.0

    async def open(self) -> None:
        await self._worker.run(_create_schema)

    async def get(self, key: str) -> bytes | None:
        return await self._worker.run(functools.partial(self._get, key=key, now=self._now()))

    async def set(self, entry: Entry) -> None:
        await self._worker.run(functools.partial(self._set, entry=entry, now=self._now()))

    async def clear(self, tenant: str | None = None, model: str | None = None) -> int:
        return await self._worker.run(functools.partial(self._clear, tenant=tenant, model=model))

    async def stats(self) -> list[ScopeStats]:
        return await self._worker.run(functools.partial(self._stats, now=self._now()))

    async def aclose(self) -> None:
        await self._worker.aclose(self._flush_now)

    def _now(self) -> float:
        # Read on the event loop: a Clock need not be thread-safe.
        return self._clock.wall()

    # Everything below runs in the worker thread.

    def _get(self, db: sqlite3.Connection, key: str, now: float) -> bytes | None:
        row = db.execute(_GET, (key, now)).fetchone()
        if row is None:
            return None
        if not self._pending:
            self._pending_since = now
        bump = self._pending.setdefault(key, [0, now])
        bump[0] += 1
        bump[1] = now
        if len(self._pending) >= _FLUSH_HITS or now - self._pending_since >= _FLUSH_EVERY_S:
            self._flush_now(db)
        value: bytes = row[0]
        return value

    def _flush(self, db: sqlite3.Connection) -> None:
        """Write the pending hit bumps (the caller holds a transaction, or none is needed)."""
        if self._pending:
            db.executemany(_BUMP, [(h, t, k) for k, (h, t) in self._pending.items()])
            self._pending.clear()

    def _flush_now(self, db: sqlite3.Connection) -> None:
        if self._pending:
            with write_transaction(db):
                self._flush(db)

    def _set(self, db: sqlite3.Connection, entry: Entry, now: float) -> None:
        size = len(entry.value)
        with write_transaction(db):
            self._flush(db)
            if size > self._max_bytes:  # could never fit: drop any older answer instead
                db.execute("DELETE FROM cache_entries WHERE key = ?", (entry.key,))
                return
            row = (entry.key, entry.tenant, entry.model, entry.value, size, entry.expires_at, now)
            db.execute(_UPSERT, row)
            if now >= self._next_purge:
                self._next_purge = now + _PURGE_EVERY_S
                db.execute("DELETE FROM cache_entries WHERE expires_at <= ?", (now,))
            self._evict(db, entry.key, now)

    def _evict(self, db: sqlite3.Connection, keep: str, now: float) -> None:
        """Delete least-recently-used rows (never ``keep``) until both caps hold."""
        purged = False
        while True:
            entries, size = db.execute("SELECT entries, bytes FROM cache_totals").fetchone()
            if entries <= self._max_entries and size <= self._max_bytes:
                return
            if not purged:  # expired rows go first, and cost nothing to lose
                purged = True
                db.execute("DELETE FROM cache_entries WHERE expires_at <= ?", (now,))
                continue
            # Over the count by n: drop n; over bytes only: drop one at a time.
            if db.execute(_EVICT, (keep, max(entries - self._max_entries, 1))).rowcount == 0:
                return  # only ``keep`` is left, and it fits on its own

    def _clear(self, db: sqlite3.Connection, tenant: str | None, model: str | None) -> int:
        with write_transaction(db):
            self._flush(db)
            cursor = db.execute(f"DELETE FROM cache_entries WHERE {_SCOPE}", (tenant, model))
            return cursor.rowcount

    def _stats(self, db: sqlite3.Connection, now: float) -> list[ScopeStats]:
        self._flush_now(db)
        return [
            ScopeStats(tenant=t, model=m, entries=n, bytes=b, hits=h)
            for t, m, n, b, h in db.execute(_STATS, (now,))
        ]


def _create_schema(db: sqlite3.Connection) -> None:
    with write_transaction(db):
        for statement in _SCHEMA:
            db.execute(statement)
