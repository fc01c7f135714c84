"""The embedded semantic index: numpy matrices in memory, one SQLite file on disk.

In memory, each scope holds its vectors as the *columns* of a float32 ``(dim, capacity)``
matrix (capacity doubles as it fills), with their keys and expiry times alongside. A search is
one ``vector @ matrix[:, :n]`` (OpenBLAS streams the matrix once, memory-bound: 7-9 ms for
100,000 x 384 on one core of the 2-core bench machine; rows-as-vectors took twice that, OpenBLAS's
transposed kernel being slower), expired columns masked out, ``argpartition`` for the top ``k``.
A search over a large scope runs in a thread so the event loop is not held; a change to the
scope made meanwhile is seen by a version number, and the search is then redone on the loop.
OpenBLAS's own threads help little here and hurt on a busy machine (a 5,000-row product: p90
0.2 ms on one thread, 8 ms on two), and beside the local embedder's threads they stall it
(measured when it ran on torch: embedding p90 84 ms against 15 ms), so ``one_blas_thread``
caps them at one.

On disk (``DATA_DIR/semantic.db``, WAL), written by one worker thread (``SqliteWorker``) and
loaded at ``open()``: one row per entry, the vector as a float32 blob in native byte order.
Row ids only grow (AUTOINCREMENT), and ``add`` writes a new row even for a known key, so another
process sharing the file catches up by reading the rows past the last id it saw: at most every
``refresh_s`` seconds, before a search or a count. A ``clear`` is also logged (in ``clears``,
with the last row id it covered) so other processes apply it on their next refresh. Evictions
and expiry purges are not propagated: each process evicts on its own count.

Eviction: over ``max_entries`` the oldest entries by insertion (a replacement counts as new)
are dropped, from memory and from the file. Expired entries are skipped by searches and purged
every minute or so.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from spillway.cache.sqlite_store import SqliteWorker, write_transaction
from spillway.cache.vectors import Neighbour, Vector, VectorEntry
from spillway.clock import Clock

FILENAME = "semantic.db"
#: Scopes larger than this many floats (about 0.5 ms of work) are searched off the event loop.
OFFLOAD_FLOATS = 1 << 20
_PURGE_EVERY_S = 60.0
_FIRST_CAPACITY = 16

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS vectors (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        key TEXT NOT NULL UNIQUE,
        scope TEXT NOT NULL,
        tenant TEXT NOT NULL,
        model TEXT NOT NULL,
        text TEXT NOT NULL,
        vector BLOB NOT NULL,
        expires_at REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS vectors_expiry ON vectors (expires_at)",
    """CREATE TABLE IF NOT EXISTS clears (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        tenant TEXT,
        model TEXT,
        upto INTEGER NOT NULL
    )""",
)
_ROWS_SINCE = """SELECT id, key, scope, tenant, model, text, vector, expires_at FROM vectors
    WHERE id > ? AND expires_at > ? ORDER BY id"""
_SCOPE = "(?1 IS NULL OR tenant = ?1) AND (?2 IS NULL OR model = ?2)"

_Row = tuple[int, str, str, str, str, str, bytes, float]
_Clear = tuple[int, str | None, str | None, int]


@dataclass(slots=True)
class _Slot:
    """Where one key lives and what it returns besides its vector."""

    rowid: int
    scope: str
    col: int
    tenant: str
    model: str
    text: str


class _Scope:
    """One scope's vectors as matrix columns, plus their keys and expiry times."""

    __slots__ = ("expires", "keys", "matrix", "version")

    def __init__(self, dim: int, capacity: int = _FIRST_CAPACITY):
        self.matrix: npt.NDArray[np.float32] = np.empty((dim, capacity), np.float32)
        self.expires: npt.NDArray[np.float64] = np.empty(capacity, np.float64)
        self.keys: list[str] = []
        self.version = 0  # bumped on every change, so an off-loop search can tell

    @classmethod
    def filled(cls, dim: int, keys: list[str], blob: bytes, expires: list[float]) -> _Scope:
        """A scope holding ``keys``, their vectors concatenated in ``blob``, all at once."""
        n = len(keys)
        s = cls(dim, max(_FIRST_CAPACITY, 1 << (n - 1).bit_length()))
        s.matrix[:, :n] = np.frombuffer(blob, np.float32).reshape(n, dim).T
        s.expires[:n] = expires
        s.keys = keys
        return s

    def append(self, key: str, vector: Vector, expires_at: float) -> int:
        col = len(self.keys)
        if col == self.matrix.shape[1]:
            grown = np.empty((self.matrix.shape[0], 2 * col), np.float32)
            grown[:, :col] = self.matrix
            self.matrix = grown
            self.expires = np.concatenate([self.expires, np.empty(col, np.float64)])
        self.matrix[:, col] = vector
        self.expires[col] = expires_at
        self.keys.append(key)
        self.version += 1
        return col

    def remove(self, col: int) -> str | None:
        """Drop column ``col`` by moving the last one into it; returns the moved key."""
        last = len(self.keys) - 1
        moved = None
        if col != last:
            self.matrix[:, col] = self.matrix[:, last]
            self.expires[col] = self.expires[last]
            moved = self.keys[col] = self.keys[last]
        self.keys.pop()
        self.version += 1
        return moved


def _top(
    matrix: npt.NDArray[np.float32],
    expires: npt.NDArray[np.float64],
    n: int,
    vector: Vector,
    k: int,
    now: float,
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.float32]]:
    """Columns of the ``k`` most similar unexpired vectors, best first, and their similarity."""
    sims = vector @ matrix[:, :n]
    sims[expires[:n] <= now] = -np.inf
    cols = np.argpartition(sims, n - k)[n - k :] if k < n else np.arange(n)
    cols = cols[np.argsort(-sims[cols], kind="stable")]
    cols = cols[np.isfinite(sims[cols])]
    return cols, sims[cols]


def one_blas_thread() -> bool:
    """Cap numpy's BLAS at one thread, process-wide (threadpoolctl, from the ``semantic``
    extra); False when threadpoolctl is missing and the cap could not be set."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return False
    threadpool_limits(1, user_api="blas")
    return True


class NumpyIndex:
    """``VectorIndex`` in process memory, persisted to one SQLite file that several processes
    may share (see the module docstring). Call ``open()`` first and ``aclose()`` last."""

    def __init__(
        self,
        path: Path,
        clock: Clock,
        dim: int = 384,
        max_entries: int = 100_000,
        *,
        refresh_s: float = 1.0,
    ):
        if dim < 1 or max_entries < 1:
            raise ValueError("dim and max_entries must be positive")
        self._clock = clock
        self._dim = dim
        self._max_entries = max_entries
        self._refresh_s = refresh_s
        self._worker = SqliteWorker(path, "spillway-cache-vectors")
        self._scopes: dict[str, _Scope] = {}
        self._slots: OrderedDict[str, _Slot] = OrderedDict()  # oldest insertion first
        self._seen_row = 0
        self._seen_clear = 0
        self._next_refresh = 0.0
        self._next_purge = 0.0

    async def open(self) -> None:
        self._next_refresh = self._clock.monotonic() + self._refresh_s
        self._next_purge = self._clock.wall() + _PURGE_EVERY_S
        await self._worker.run(_create_schema)
        rows, clears = await self._worker.run(
            functools.partial(_load, since=0, clears_since=-1, now=self._clock.wall())
        )
        # Rows already reflect every clear so far: note the clears, apply none.
        self._seen_clear = clears[-1][0] if clears else 0
        self._load_all(rows)

    async def search(self, scope: str, vector: Vector, k: int) -> list[Neighbour]:
        vector = self._checked(vector)
        await self._refresh()
        now = self._clock.wall()
        s = self._scopes.get(scope)
        if s is None or k < 1:
            return []
        if len(s.keys) * self._dim >= OFFLOAD_FLOATS:
            version = s.version
            args = (s.matrix, s.expires, len(s.keys), vector, k, now)
            cols, sims = await asyncio.get_running_loop().run_in_executor(None, _top, *args)
            if self._scopes.get(scope) is not s or s.version != version:
                # Changed while we searched, so a column may now hold another key: search
                # again, here on the loop where nothing can change under us.
                s = self._scopes.get(scope)
                if s is None:
                    return []
                cols, sims = _top(s.matrix, s.expires, len(s.keys), vector, k, now)
        else:
            cols, sims = _top(s.matrix, s.expires, len(s.keys), vector, k, now)
        result = []
        for col, sim in zip(cols.tolist(), sims.tolist(), strict=True):
            key = s.keys[col]
            vec = np.ascontiguousarray(s.matrix[:, col])
            result.append(Neighbour(key, self._slots[key].text, vec, float(sim)))
        return result

    async def add(self, entry: VectorEntry) -> None:
        vector = self._checked(entry.vector)
        now = self._clock.wall()
        purge = now >= self._next_purge
        if purge:
            self._next_purge = now + _PURGE_EVERY_S
            self._purge(now)
        gone = self._make_room(entry.key)
        rowid = await self._worker.run(
            functools.partial(
                _insert, entry=entry, blob=vector.tobytes(), gone=gone, purge=now if purge else None
            )
        )
        self._put(rowid, entry, vector)

    async def clear(self, tenant: str | None = None, model: str | None = None) -> int:
        self._drop_matching(tenant, model, upto=None)
        return await self._worker.run(functools.partial(_clear, tenant=tenant, model=model))

    async def count(self) -> int:
        await self._refresh()
        now = self._clock.wall()
        return sum(int((s.expires[: len(s.keys)] > now).sum()) for s in self._scopes.values())

    async def aclose(self) -> None:
        await self._worker.aclose()

    def _checked(self, vector: Vector) -> Vector:
        v = np.ascontiguousarray(vector, dtype=np.float32)
        if v.shape != (self._dim,):
            raise ValueError(f"vector of shape {v.shape}; this index holds ({self._dim},)")
        return v

    async def _refresh(self) -> None:
        """Catch up with rows and clears another process wrote, at most every ``refresh_s``."""
        if self._clock.monotonic() < self._next_refresh:
            return
        self._next_refresh = self._clock.monotonic() + self._refresh_s
        load = functools.partial(
            _load, since=self._seen_row, clears_since=self._seen_clear, now=self._clock.wall()
        )
        rows, clears = await self._worker.run(load)
        self._apply(rows, clears)

    def _apply(self, rows: list[_Row], clears: list[_Clear]) -> None:
        for clear_id, tenant, model, upto in clears:
            self._drop_matching(tenant, model, upto)
            self._seen_clear = max(self._seen_clear, clear_id)
        size = self._dim * 4
        for rowid, key, scope, tenant, model, text, blob, expires_at in rows:
            self._seen_row = max(self._seen_row, rowid)
            if len(blob) == size:  # a row of another dimension is not ours to search
                vector = np.frombuffer(blob, np.float32)
                entry = VectorEntry(key, scope, tenant, model, text, vector, expires_at)
                self._put(rowid, entry, vector)
        self._make_room(None)

    def _load_all(self, rows: list[_Row]) -> None:
        """The first load, in bulk: one matrix per scope rather than a column at a time
        (100,000 rows in about a second instead of three)."""
        size = self._dim * 4
        grouped: dict[str, tuple[list[str], list[bytes], list[float]]] = {}
        for rowid, key, scope, tenant, model, text, blob, expires_at in rows:
            if len(blob) == size:
                keys, blobs, expires = grouped.setdefault(scope, ([], [], []))
                self._slots[key] = _Slot(rowid, scope, len(keys), tenant, model, text)
                keys.append(key)
                blobs.append(blob)
                expires.append(expires_at)
        for scope, (keys, blobs, expires) in grouped.items():
            self._scopes[scope] = _Scope.filled(self._dim, keys, b"".join(blobs), expires)
        self._seen_row = rows[-1][0] if rows else 0
        self._make_room(None)

    def _put(self, rowid: int, e: VectorEntry, vector: Vector) -> None:
        """Hold this row (``vector`` is ``e.vector``, checked), unless a newer row of the same
        key is already held."""
        held = self._slots.get(e.key)
        if held is not None:
            if held.rowid >= rowid:
                return
            self._drop(e.key)
        s = self._scopes.get(e.scope)
        if s is None:
            s = self._scopes[e.scope] = _Scope(self._dim)
        col = s.append(e.key, vector, e.expires_at)
        self._slots[e.key] = _Slot(rowid, e.scope, col, e.tenant, e.model, e.text)

    def _drop(self, key: str) -> int:
        slot = self._slots.pop(key)
        s = self._scopes[slot.scope]
        moved = s.remove(slot.col)
        if moved is not None:
            self._slots[moved].col = slot.col
        if not s.keys:
            del self._scopes[slot.scope]
        return slot.rowid

    def _make_room(self, coming: str | None) -> list[int]:
        """Drop the oldest entries so that one more (``coming``, unless held) fits; their
        row ids, for the file."""
        room = 0 if coming is None or coming in self._slots else 1
        gone = []
        while self._slots and len(self._slots) + room > self._max_entries:
            gone.append(self._drop(next(iter(self._slots))))
        return gone

    def _drop_matching(self, tenant: str | None, model: str | None, upto: int | None) -> None:
        doomed = [
            key
            for key, slot in self._slots.items()
            if (tenant is None or slot.tenant == tenant)
            and (model is None or slot.model == model)
            and (upto is None or slot.rowid <= upto)
        ]
        for key in doomed:
            self._drop(key)

    def _purge(self, now: float) -> None:
        expired = [
            s.keys[col]
            for s in self._scopes.values()
            for col in np.flatnonzero(s.expires[: len(s.keys)] <= now).tolist()
        ]
        for key in expired:
            self._drop(key)


# Everything below runs in the worker thread.


def _create_schema(db: sqlite3.Connection) -> None:
    with write_transaction(db):
        for statement in _SCHEMA:
            db.execute(statement)


def _load(
    db: sqlite3.Connection, since: int, clears_since: int, now: float
) -> tuple[list[_Row], list[_Clear]]:
    """Unexpired rows past ``since`` and clears past ``clears_since``, from one snapshot."""
    db.execute("BEGIN")
    try:
        rows: list[_Row] = db.execute(_ROWS_SINCE, (since, now)).fetchall()
        clears: list[_Clear] = db.execute(
            "SELECT id, tenant, model, upto FROM clears WHERE id > ? ORDER BY id", (clears_since,)
        ).fetchall()
    finally:
        db.execute("COMMIT")
    return rows, clears


def _insert(
    db: sqlite3.Connection, entry: VectorEntry, blob: bytes, gone: list[int], purge: float | None
) -> int:
    with write_transaction(db):
        if gone:
            db.executemany("DELETE FROM vectors WHERE id = ?", [(i,) for i in gone])
        if purge is not None:
            db.execute("DELETE FROM vectors WHERE expires_at <= ?", (purge,))
        # Delete then insert, never update: the new id is how other processes see the change.
        db.execute("DELETE FROM vectors WHERE key = ?", (entry.key,))
        cursor = db.execute(
            """INSERT INTO vectors (key, scope, tenant, model, text, vector, expires_at)
            VALUES (?, ?, ?, ?, ?, ?, ?)""",
            (entry.key, entry.scope, entry.tenant, entry.model, entry.text, blob, entry.expires_at),
        )
        assert cursor.lastrowid is not None
        return cursor.lastrowid


def _clear(db: sqlite3.Connection, tenant: str | None, model: str | None) -> int:
    with write_transaction(db):
        seq = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'vectors'").fetchone()
        deleted = db.execute(f"DELETE FROM vectors WHERE {_SCOPE}", (tenant, model)).rowcount
        db.execute(
            "INSERT INTO clears (tenant, model, upto) VALUES (?, ?, ?)",
            (tenant, model, seq[0] if seq else 0),
        )
        return deleted
