"""LedgerWriter: write-behind that never blocks the caller and never loses a record.

A scripted in-memory store stands in for the database (it can fail, hang or recover on
command); one test runs the writer on the real SQLite store. Intervals are short and real
(0.01-0.05 s); every wait is bounded by ``eventually``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import FrozenInstanceError, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from spillway.clock import SystemClock
from spillway.ledger.records import LedgerRecord
from spillway.ledger.spool import Spool
from spillway.ledger.sql import SqlLedgerStore, sqlite_url
from spillway.ledger.writer import LedgerWriter, WriterStats

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def make_record(n: int) -> LedgerRecord:
    return LedgerRecord(
        request_id=f"req-{n:06d}",
        at=T0 + timedelta(milliseconds=n),
        tenant="team-a",
        key_id="k1",
        model="glm-5",
        node="ascend-1",
        source="private",
        upstream_model=None,
        prompt_tokens=10,
        completion_tokens=20,
        tokens_estimated=False,
        cost=Decimal("0.000123"),
        reference_cost=Decimal("0.000180"),
        currency="USD",
        latency_ms=50,
        ttft_ms=None,
        status="ok",
    )


class FakeStore:
    """Keeps what it is given, in order; ``down`` makes writes fail, ``gate`` makes them hang."""

    def __init__(self) -> None:
        self.rows: list[LedgerRecord] = []
        self.batches: list[int] = []
        self.calls = 0
        self.down = False
        self.fail_calls: set[int] = set()  # 1-based write() calls that fail
        self.gate: asyncio.Event | None = None

    async def write(self, records: Sequence[LedgerRecord]) -> None:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.down or self.calls in self.fail_calls:
            raise ConnectionError("server closed\n[SQL: INSERT ...]\n[parameters: secret-row]")
        seen = {r.request_id for r in self.rows}
        self.rows += [r for r in records if r.request_id not in seen]
        self.batches.append(len(records))

    @property
    def ids(self) -> list[str]:
        return [r.request_id for r in self.rows]


async def eventually(condition: Callable[[], bool], within_s: float = 3.0) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def ids(n: int, start: int = 0) -> list[str]:
    return [f"req-{i:06d}" for i in range(start, start + n)]


def writer_for(store: FakeStore, **kwargs: float) -> LedgerWriter:
    return LedgerWriter(store, SystemClock(), **kwargs)  # type: ignore[arg-type]


async def test_record_is_synchronous_and_never_waits_on_the_store() -> None:
    store = FakeStore()
    store.gate = asyncio.Event()  # every write hangs until released
    writer = writer_for(store, flush_interval_s=0.01, max_batch=100)
    assert not inspect.iscoroutinefunction(writer.record)
    writer.start()
    writer.record(make_record(0))
    await eventually(lambda: store.calls == 1)  # a write is now stuck in the store
    started = time.perf_counter()
    for i in range(1, 10_001):
        assert writer.record(make_record(i)) is None  # type: ignore[func-returns-value]
    assert time.perf_counter() - started < 0.5  # 10k appends, no waiting on the hung write
    assert writer.pending == 10_001
    store.gate.set()
    await writer.aclose()
    assert store.ids == ids(10_001)


async def test_flushes_on_the_interval() -> None:
    store = FakeStore()
    writer = writer_for(store, flush_interval_s=0.05, max_batch=1000)
    writer.start()
    for i in range(3):
        writer.record(make_record(i))
    assert store.rows == []  # nothing was written on the caller's turn
    await eventually(lambda: len(store.rows) == 3)
    assert writer.stats() == WriterStats(written=3, pending=0, failures=0)
    writer.record(make_record(3))
    await eventually(lambda: len(store.rows) == 4)
    await writer.aclose()
    assert store.batches == [3, 1]


async def test_flushes_early_once_a_batch_is_full() -> None:
    store = FakeStore()
    writer = writer_for(store, flush_interval_s=60.0, max_batch=10)
    writer.start()
    for i in range(9):
        writer.record(make_record(i))
    await asyncio.sleep(0.1)
    assert store.rows == []  # under a batch and long before the interval
    writer.record(make_record(9))
    await eventually(lambda: len(store.rows) == 10)
    assert store.batches == [10]
    await writer.aclose()


async def test_flush_writes_in_batches_of_at_most_max_batch_in_order() -> None:
    store = FakeStore()
    writer = writer_for(store, max_batch=10)
    for i in range(25):
        writer.record(make_record(i))
    await writer.flush()
    assert store.batches == [10, 10, 5]
    assert store.ids == ids(25)
    assert writer.pending == 0


async def test_a_failed_batch_stays_queued_in_order() -> None:
    store = FakeStore()
    store.fail_calls = {2}
    writer = writer_for(store, max_batch=3)
    for i in range(7):
        writer.record(make_record(i))
    with pytest.raises(ConnectionError):
        await writer.flush()
    assert store.ids == ids(3)
    assert writer.pending == 4
    writer.record(make_record(7))
    await writer.flush()
    assert store.ids == ids(8)
    assert writer.pending == 0


async def test_failing_store_keeps_everything_retries_with_backoff_and_logs_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="spillway.ledger")
    store = FakeStore()
    store.down = True
    writer = writer_for(store, flush_interval_s=0.01, max_batch=4)
    writer.start()
    for i in range(10):
        writer.record(make_record(i))
    await asyncio.sleep(0.4)
    # backoff 0.02, 0.04, 0.08, 0.16...: a handful of attempts, not one per 10 ms tick
    assert 2 <= store.calls <= 7
    assert writer.pending == 10
    assert writer.stats().failures == store.calls
    for i in range(10, 20):  # batches fill up while failing: still no retry storm
        writer.record(make_record(i))
    store.down = False
    await eventually(lambda: writer.pending == 0)
    assert store.ids == ids(20)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "keeping 10 records" in errors[0].getMessage()
    assert "secret-row" not in caplog.text and "[SQL" not in caplog.text
    assert any("writable again" in r.getMessage() for r in caplog.records)
    await writer.aclose()


async def test_aclose_flushes_everything() -> None:
    store = FakeStore()
    writer = writer_for(store, flush_interval_s=60.0, max_batch=500)
    writer.start()
    for i in range(1234):
        writer.record(make_record(i))
    await writer.aclose()
    assert store.ids == ids(1234)
    assert writer.stats() == WriterStats(written=1234, pending=0, failures=0)
    await writer.aclose()  # idempotent


async def test_aclose_without_start_still_flushes() -> None:
    store = FakeStore()
    writer = writer_for(store)
    writer.record(make_record(0))
    await writer.aclose()
    assert store.ids == ids(1)


async def test_aclose_retries_while_the_store_comes_back() -> None:
    store = FakeStore()
    store.down = True
    writer = writer_for(store, flush_interval_s=0.01, close_timeout_s=5.0)
    writer.start()
    for i in range(50):
        writer.record(make_record(i))
    asyncio.get_running_loop().call_later(0.15, setattr, store, "down", False)
    await writer.aclose()
    assert store.ids == ids(50)
    assert writer.pending == 0


async def test_aclose_gives_up_after_its_timeout_and_says_how_many(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = FakeStore()
    store.down = True
    writer = writer_for(store, flush_interval_s=0.01, close_timeout_s=0.2)
    writer.start()
    for i in range(7):
        writer.record(make_record(i))
    started = time.monotonic()
    await writer.aclose()
    assert time.monotonic() - started < 1.0
    assert writer.pending == 7
    assert "7 records could not be written" in caplog.text


async def test_aclose_does_not_hang_on_a_hung_store(caplog: pytest.LogCaptureFixture) -> None:
    store = FakeStore()
    store.gate = asyncio.Event()  # never set: every write hangs
    writer = writer_for(store, flush_interval_s=0.01, close_timeout_s=0.2)
    writer.start()
    writer.record(make_record(0))
    await eventually(lambda: store.calls == 1)
    started = time.monotonic()
    await writer.aclose()
    assert time.monotonic() - started < 1.0
    assert writer.pending == 1
    assert "1 records could not be written" in caplog.text


async def test_order_is_kept_under_concurrent_recording_and_flushing() -> None:
    store = FakeStore()
    store.fail_calls = {3, 4, 9}
    writer = writer_for(store, flush_interval_s=0.002, max_batch=7)
    writer.start()

    async def producer(start: int) -> None:
        for i in range(start, start + 500):
            writer.record(make_record(i))
            if i % 13 == 0:
                await asyncio.sleep(0.001)

    await producer(0)
    await producer(500)
    await writer.aclose()
    assert store.ids == ids(1000)
    assert writer.stats().written >= 1000


async def test_record_refuses_misuse() -> None:
    writer = writer_for(FakeStore())
    with pytest.raises(ValueError, match="timezone-aware"):
        writer.record(replace(make_record(0), at=datetime(2026, 1, 1)))
    await writer.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        writer.record(make_record(1))
    with pytest.raises(FrozenInstanceError):
        writer.stats().written = 5  # type: ignore[misc]


async def test_with_the_real_sqlite_store(tmp_path: Path) -> None:
    store = SqlLedgerStore(sqlite_url(tmp_path))
    await store.open()
    writer = LedgerWriter(store, SystemClock(), flush_interval_s=0.02, max_batch=100)
    writer.start()
    records = [make_record(i) for i in range(1000)]
    for rec in records[:500]:
        writer.record(rec)
    await eventually(lambda: writer.stats().written == 500)
    for rec in records[500:]:
        writer.record(rec)
    await writer.aclose()
    try:
        assert await store.query() == records
        assert await store.spend("k1", T0) == Decimal("0.123000")
    finally:
        await store.aclose()


async def test_a_record_no_store_can_take_is_set_aside_not_retried_for_ever(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLite cannot hold 2**63: the whole batch used to fail and be retried for ever, with
    every later record piling up behind it (and lost at shutdown)."""
    store = SqlLedgerStore(sqlite_url(tmp_path))
    await store.open()
    writer = LedgerWriter(store, SystemClock(), flush_interval_s=60)
    poison = replace(make_record(1), prompt_tokens=2**63)
    for record in (make_record(0), poison, make_record(2)):
        writer.record(record)
    await writer.flush()
    stored = sorted(r.request_id for r in await store.query())
    await writer.aclose()
    await store.aclose()
    assert stored == [make_record(0).request_id, make_record(2).request_id]
    assert writer.stats() == WriterStats(written=2, pending=0, failures=0, rejected=1)
    assert "set aside (OverflowError" in caplog.text and poison.request_id in caplog.text


def spooled_writer(store: FakeStore, directory: Path, **kwargs: float) -> LedgerWriter:
    return LedgerWriter(store, SystemClock(), spool=Spool(directory), **kwargs)  # type: ignore[arg-type]


async def test_a_store_outage_moves_the_records_to_disk_not_memory(tmp_path: Path) -> None:
    store = FakeStore()
    store.down = True
    writer = spooled_writer(store, tmp_path / "spool", flush_interval_s=0.01, max_batch=4)
    writer.start()
    for i in range(10):
        writer.record(make_record(i))
    await eventually(lambda: writer.pending == 0)  # none held in memory
    assert writer.stats().spooled == 10 and Spool(tmp_path / "spool").count() == 10
    for i in range(10, 13):
        writer.record(make_record(i))
    await eventually(lambda: writer.stats().spooled == 13)
    store.down = False
    await eventually(lambda: writer.stats().spooled == 0 and writer.pending == 0)
    assert sorted(store.ids) == ids(13)  # each exactly once
    assert Spool(tmp_path / "spool").segments() == []
    await writer.aclose()


async def test_spooled_records_come_back_exactly_as_they_were(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    records = [replace(make_record(1), client_request_id="c-1", ttft_ms=7), make_record(2)]
    spool.append(records)
    (segment,) = spool.segments()
    assert spool.read(segment) == records


async def test_a_restart_during_the_outage_loses_nothing_and_writes_each_once(
    tmp_path: Path,
) -> None:
    """Stopped while the store is down: what is pending goes to disk; the next process (or
    the same one later) writes it when the store is back, and a segment written twice (a
    crash between the write and the removal) is ignored by the store."""
    directory = tmp_path / "spool"
    store = FakeStore()
    store.down = True
    first = spooled_writer(store, directory, flush_interval_s=5, close_timeout_s=0.05)
    first.start()
    for i in range(6):
        first.record(make_record(i))
    await first.aclose()
    assert Spool(directory).count() == 6
    store.down = False
    store.rows.append(make_record(2))  # as if a crash had left the segment after writing
    second = spooled_writer(store, directory, flush_interval_s=0.01)
    second.start()
    await eventually(lambda: Spool(directory).count() == 0)
    await second.aclose()
    assert sorted(store.ids) == ids(6)


async def test_a_spooled_record_no_store_can_take_is_set_aside(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    Spool(directory).append([make_record(1), replace(make_record(2), request_id="bad")])

    class Picky(FakeStore):
        async def write(self, records: Sequence[LedgerRecord]) -> None:
            if any(r.request_id == "bad" for r in records):
                raise ValueError("ledger amount out of range")
            await super().write(records)

    store = Picky()
    writer = spooled_writer(store, directory, flush_interval_s=0.01)
    writer.start()
    await eventually(lambda: Spool(directory).count() == 0)
    await writer.aclose()
    assert store.ids == ["req-000001"] and writer.stats().rejected == 1


async def test_a_damaged_spool_file_is_set_aside_and_holds_nothing_up(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    spool = Spool(directory)
    spool.append([make_record(1)])
    damaged = spool.append([make_record(2)])
    spool.append([make_record(3)])
    damaged.write_bytes(b'{"request_id": "req-000002", "at": trunc')  # a torn, damaged file
    (directory / "notes-from-an-operator.jsonl").write_text("not a segment\n")
    store = FakeStore()
    writer = spooled_writer(store, directory, flush_interval_s=0.01)
    writer.start()
    await eventually(lambda: sorted(store.ids) == ["req-000001", "req-000003"])
    await writer.aclose()
    assert (directory / (damaged.name + ".bad")).exists()
    assert sorted(p.name for p in directory.iterdir() if p.suffix == ".bad") == [
        damaged.name + ".bad",
        "notes-from-an-operator.jsonl.bad",
    ]


async def test_a_flush_writes_what_was_pending_when_it_began_not_what_arrives_meanwhile() -> None:
    """Under load, chasing the queue made a small write every few milliseconds; each write
    costs the loop its thread hand-offs whatever its size, so later records wait a turn."""
    store = FakeStore()
    store.gate = asyncio.Event()
    writer = LedgerWriter(store, SystemClock(), flush_interval_s=60)
    for i in range(3):
        writer.record(make_record(i))
    flushing = asyncio.create_task(writer.flush())
    await eventually(lambda: store.calls == 1)
    for i in range(3, 5):
        writer.record(make_record(i))  # arrive while the first write is under way
    store.gate.set()
    await flushing
    assert store.batches == [3] and writer.pending == 2
    await writer.flush()
    assert store.batches == [3, 2] and store.ids == ids(5)
