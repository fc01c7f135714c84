"""SQLite ledger writes with plain sqlite3 in a thread of their own (SqliteBatchWriter), alone
and under the write-behind LedgerWriter: SQL off the event loop, all or nothing per batch, and
nothing lost while the file is locked."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import pytest

from spillway.clock import SystemClock
from spillway.ledger.records import LedgerRecord
from spillway.ledger.sql import _FLAVOURS, SqlLedgerStore, sqlite_url
from spillway.ledger.sqlite_writes import (
    MAX_ROWS_PER_STATEMENT,
    ROWS_PER_CHUNK,
    Row,
    SqliteBatchWriter,
    _split,
)
from spillway.ledger.writer import LedgerWriter
from tests.unit.test_ledger_writer import eventually, ids, make_record

SQLITE = _FLAVOURS["sqlite"]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqlLedgerStore]:
    s = SqlLedgerStore(sqlite_url(tmp_path))
    await s.open()
    yield s
    await s.aclose()  # idempotent: most tests close it themselves


def quick_writer(path: Path, row_seen: list[str] | None = None) -> SqliteBatchWriter:
    """A writer that gives up on a locked file after 20 ms instead of the store's 10 s."""

    def row(rec: LedgerRecord) -> Row:
        if row_seen is not None:
            row_seen.append(threading.current_thread().name)
        return SQLITE.row(rec)

    return SqliteBatchWriter(str(path), SQLITE.insert_sql, row, ["PRAGMA busy_timeout = 20"])


async def test_sqlite_file_stores_write_with_their_own_thread(store: SqlLedgerStore) -> None:
    assert store._direct is not None
    await store.write([make_record(i) for i in range(3)])
    assert [r.request_id for r in await store.query()] == ids(3)
    await store.aclose()
    await store.aclose()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        await store.write([make_record(9)])


async def test_rows_are_made_on_the_loop_a_chunk_at_a_time_and_sql_runs_in_its_thread(
    store: SqlLedgerStore, tmp_path: Path
) -> None:
    """The loop turns records into rows and yields between chunks (a request waits behind
    one chunk, never a whole batch); the writer thread only binds and steps."""
    seen: list[str] = []
    ticks: list[int] = []
    writer = quick_writer(tmp_path / "ledger.db", seen)
    sql_threads: set[str] = set()
    real_write = writer._write

    def write(statements: list[tuple[str, list[object]]]) -> None:
        sql_threads.add(threading.current_thread().name)
        real_write(statements)

    writer._write = write  # type: ignore[method-assign]

    async def other_request() -> None:
        while len(seen) < 600:
            ticks.append(len(seen))
            await asyncio.sleep(0)

    ticker = asyncio.create_task(other_request())
    await writer.write([make_record(i) for i in range(600)])
    await ticker
    await writer.aclose()
    assert set(seen) == {threading.current_thread().name}
    chunks = {ROWS_PER_CHUNK * k for k in (1, 2, 3)}
    assert {t for t in ticks if 0 < t < 600} >= chunks  # it ran between chunks
    assert len(sql_threads) == 1 and sql_threads.pop().startswith("ledger-sqlite")
    assert [r.request_id for r in await store.query()] == ids(600)
    await store.aclose()


@pytest.mark.parametrize("rows", [1, 7, 256, 257, 600])
def test_a_batch_becomes_few_statements_of_at_most_256_rows(rows: int) -> None:
    sizes = _split(rows)
    assert sum(sizes) == rows
    assert max(sizes) <= MAX_ROWS_PER_STATEMENT
    assert len(sizes) <= rows // MAX_ROWS_PER_STATEMENT + MAX_ROWS_PER_STATEMENT.bit_length()


async def test_a_bad_record_fails_its_whole_batch_and_the_next_batch_still_goes_in(
    store: SqlLedgerStore,
) -> None:
    naive = replace(make_record(1), at=datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="timezone-aware"):
        await store.write([make_record(0), naive, make_record(2)])
    with pytest.raises(ValueError, match="amount"):
        await store.write([make_record(3), replace(make_record(4), cost=Decimal("NaN"))])
    assert await store.query() == []
    await store.write([make_record(5)])
    assert [r.request_id for r in await store.query()] == ["req-000005"]
    await store.aclose()


async def test_a_locked_file_fails_the_write_and_a_retry_succeeds(
    store: SqlLedgerStore, tmp_path: Path
) -> None:
    writer = quick_writer(tmp_path / "ledger.db")
    blocker = sqlite3.connect(tmp_path / "ledger.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # holds the write lock
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        await writer.write([make_record(0)])
    blocker.execute("ROLLBACK")
    blocker.close()
    await writer.write([make_record(0), make_record(1)])
    await writer.aclose()
    assert [r.request_id for r in await store.query()] == ids(2)
    await store.aclose()


async def test_write_behind_keeps_everything_while_the_file_is_locked(
    store: SqlLedgerStore, tmp_path: Path
) -> None:
    store._direct = quick_writer(tmp_path / "ledger.db")
    writer = LedgerWriter(store, SystemClock(), flush_interval_s=0.01, max_batch=50)
    writer.start()
    blocker = sqlite3.connect(tmp_path / "ledger.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    for i in range(120):
        writer.record(make_record(i))
    await eventually(lambda: writer.stats().failures >= 2)
    assert writer.pending == 120
    blocker.execute("ROLLBACK")
    blocker.close()
    await eventually(lambda: writer.pending == 0)
    for i in range(120, 130):
        writer.record(make_record(i))
    await writer.aclose()  # the last records go in on shutdown
    assert [r.request_id for r in await store.query()] == ids(130)
    await store.aclose()


async def test_writes_from_many_tasks_keep_every_record(store: SqlLedgerStore) -> None:
    async def batch(start: int) -> None:
        await store.write([make_record(i) for i in range(start, start + 100)])

    await asyncio.gather(*(batch(n * 100) for n in range(10)))
    assert len(await store.query()) == 1000
    await store.aclose()
