"""Ledger batches into a SQLite file with plain ``sqlite3``, in one dedicated thread.

Why not SQLAlchemy's async engine, which the rest of the SQLite store uses: a write there is
a chain of hand-offs between the event loop and aiosqlite's thread (begin, execute, commit,
each a future and a wake-up), and the rows were converted on the event loop. Under load that
work lands between requests. Here the event loop does one hand-off per batch; converting the
records to rows, binding them and SQLite's own work all happen in this thread.

The GIL decides the rest. ``executemany`` releases and retakes it around every row's step, and
each retake from this thread, while the busy event loop holds it, waits for the loop to be
forced off the GIL (the 5 ms switch interval): under load that made the ledger cost the loop
more than all of spillway's own code, and put milliseconds on p99. So rows go in as multi-row
``INSERT`` statements of ``ROWS_PER_STATEMENT`` rows: converted and bound in one short hold
of the GIL (about 0.2 ms), then one ``sqlite3_step`` without it.

One thread, one connection, made in that thread and used only there (``sqlite3``'s rule).
A failed write rolls back (nothing of the batch is stored), and the connection is dropped
and made again on the next write, so a broken connection cannot fail every later batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from spillway.ledger.records import LedgerRecord

Row = tuple[Any, ...]
#: 64 rows x 21 columns of parameters, well under SQLite's limit of 32,766; small enough that
#: converting and binding one statement holds the GIL for a fraction of a millisecond.
ROWS_PER_STATEMENT = 64


class SqliteBatchWriter:
    """``write()`` a batch in one ``BEGIN IMMEDIATE`` transaction on a thread of its own;
    ``aclose()`` closes the connection and lets the thread end."""

    def __init__(
        self,
        path: str,
        insert_sql: str,
        row: Callable[[LedgerRecord], Row],
        pragmas: Sequence[str],
    ):
        self._path = path
        head, values, tail = _split_insert(insert_sql)
        self._multi = {
            n: f"{head} VALUES {', '.join([values] * n)} {tail}"
            for n in range(1, ROWS_PER_STATEMENT + 1)
        }
        self._row = row
        self._pragmas = tuple(pragmas)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-sqlite")
        self._db: sqlite3.Connection | None = None  # touched only in the writer thread
        self._started = False  # the thread starts with the first write
        self._closed = False

    async def write(self, records: Sequence[LedgerRecord]) -> None:
        """Store ``records`` in one transaction; raises what the conversion or SQLite raises."""
        if self._closed:
            raise RuntimeError("the ledger store is closed")
        self._started = True
        await asyncio.get_running_loop().run_in_executor(self._thread, self._write, records)

    async def aclose(self) -> None:
        """Wait for a write in progress, close the connection, end the thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._started:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._close)
        self._thread.shutdown(wait=False)

    def _write(self, records: Sequence[LedgerRecord]) -> None:
        db = self._db if self._db is not None else self._connect()
        try:
            # IMMEDIATE takes the write lock up front: another worker process writing the same
            # file makes this wait (busy_timeout), never fail half-way on a lock upgrade.
            db.execute("BEGIN IMMEDIATE")
            for start in range(0, len(records), ROWS_PER_STATEMENT):
                part = records[start : start + ROWS_PER_STATEMENT]
                params = [value for record in part for value in self._row(record)]
                db.execute(self._multi[len(part)], params)
            db.execute("COMMIT")
        except BaseException:
            self._close()  # rolls back what this batch wrote; the next write reconnects
            raise

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: the module never BEGINs on its own; _write does, explicitly.
        db = sqlite3.connect(self._path, isolation_level=None)
        try:
            for pragma in self._pragmas:
                db.execute(pragma)
        except BaseException:
            db.close()
            raise
        self._db = db
        return db

    def _close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                db.close()  # closing with a transaction open rolls it back


def _split_insert(sql: str) -> tuple[str, str, str]:
    """``INSERT INTO t (…) VALUES (?, …) ON CONFLICT …`` as (head, one row's values, tail)."""
    head, _, rest = sql.partition(" VALUES ")
    close = rest.index(")") + 1
    return head, rest[:close], rest[close:].strip()
