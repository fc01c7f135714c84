"""Ledger batches into a SQLite file with plain ``sqlite3``, in one dedicated thread.

Why not SQLAlchemy's async engine, which the rest of the SQLite store uses: a write there is
a chain of hand-offs between the event loop and aiosqlite's thread (begin, execute, commit,
each a future and a wake-up), and the rows were converted on the event loop. Under load that
work lands between requests. Here the event loop does one hand-off per batch; converting the
records to rows, binding them and SQLite's own work all happen in this thread.

The GIL decides the rest. Whenever this thread gives the GIL up (around each ``sqlite3_step``
and statement preparation) and wants it back while the busy event loop holds it, it waits up
to the switch interval (5 ms), and every time the loop lets go of the GIL meanwhile (uvloop
does so on each turn) the two threads trade futex calls and context switches. Measured under
load, that churn cost more CPU than the rows themselves: about two futex calls per request
when rows went in 64 at a time, in a hundred small writes a second. So:

- the event loop turns records into rows (``ROWS_PER_CHUNK`` at a time, yielding between
  chunks, so no request waits behind a whole batch), and this thread only binds and steps;
- rows go in as multi-row ``INSERT`` statements of up to ``MAX_ROWS_PER_STATEMENT`` rows
  (a batch of n rows is split by the binary digits of n, so only a handful of statement
  texts exist and each batch needs few of them);
- the writer flushes what was pending when the flush began, not whatever arrives meanwhile
  (``LedgerWriter.flush``), so writes are few and large.

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
Statement = tuple[str, list[Any]]
#: 256 rows x 21 columns of parameters, well under SQLite's limit of 32,766; binding one
#: statement holds the GIL for well under a millisecond.
MAX_ROWS_PER_STATEMENT = 256
#: records turned into rows on the event loop between two yields to it (about 50 µs: a
#: request that arrives meanwhile waits no longer than that)
ROWS_PER_CHUNK = 16


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
            n: f"{head} VALUES {', '.join([values] * n)} {tail}" for n in _statement_sizes()
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
        statements = await self._statements(records)
        await asyncio.get_running_loop().run_in_executor(self._thread, self._write, statements)

    async def _statements(self, records: Sequence[LedgerRecord]) -> list[Statement]:
        """The batch as ``INSERT`` statements with their parameters, made on the event loop a
        chunk at a time."""
        params: list[Any] = []
        for start in range(0, len(records), ROWS_PER_CHUNK):
            for record in records[start : start + ROWS_PER_CHUNK]:
                params.extend(self._row(record))
            if start + ROWS_PER_CHUNK < len(records):
                await asyncio.sleep(0)
        width = len(params) // len(records) if records else 0
        statements, done = [], 0
        for rows in _split(len(records)):
            statements.append((self._multi[rows], params[done * width : (done + rows) * width]))
            done += rows
        return statements

    async def aclose(self) -> None:
        """Wait for a write in progress, close the connection, end the thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._started:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._close)
        self._thread.shutdown(wait=False)

    def _write(self, statements: list[Statement]) -> None:
        db = self._db if self._db is not None else self._connect()
        try:
            # IMMEDIATE takes the write lock up front: another worker process writing the same
            # file makes this wait (busy_timeout), never fail half-way on a lock upgrade.
            db.execute("BEGIN IMMEDIATE")
            for sql, params in statements:
                db.execute(sql, params)
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


def _statement_sizes() -> list[int]:
    """1, 2, 4, … MAX_ROWS_PER_STATEMENT: every size ``_split`` uses."""
    return [1 << i for i in range(MAX_ROWS_PER_STATEMENT.bit_length())]


def _split(rows: int) -> list[int]:
    """``rows`` as statement sizes: full statements, then the binary digits of the rest."""
    full, rest = divmod(rows, MAX_ROWS_PER_STATEMENT)
    sizes = [MAX_ROWS_PER_STATEMENT] * full
    sizes += [1 << i for i in reversed(range(rest.bit_length())) if rest >> i & 1]
    return sizes
