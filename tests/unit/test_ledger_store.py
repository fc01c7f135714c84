"""SqlLedgerStore against both real engines: SQLite in tmp_path and PostgreSQL 18 (tests/pg.py).

Every test that takes ``store`` or ``url`` runs twice, once per engine; each PostgreSQL test
gets a fresh database on one server shared by the module.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import fields, replace
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from spillway.ledger.records import LedgerRecord
from spillway.ledger.sql import SqlLedgerStore, sqlite_url
from spillway.ledger.sql_schema import LEDGER, MIGRATIONS
from tests.pg import PgServer, create_database

T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)


def make_record(n: int, at: datetime = T0, **changes: object) -> LedgerRecord:
    rec = LedgerRecord(
        request_id=f"req-{n:05d}",
        at=at,
        tenant="team-a",
        key_id="k1",
        model="glm-5",
        node="ascend-1",
        source="private",
        upstream_model="glm-5-32b-w8a8",
        prompt_tokens=1200,
        completion_tokens=345,
        tokens_estimated=False,
        cost=Decimal("0.001234"),
        reference_cost=Decimal("0.005160"),
        currency="USD",
        latency_ms=812,
        ttft_ms=95,
        status="ok",
    )
    return replace(rec, **changes)  # type: ignore[arg-type]


@pytest.fixture(params=["sqlite", "postgresql"])
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return sqlite_url(tmp_path / "data")
    server: PgServer = request.getfixturevalue("pg_server")
    return await create_database(server)


@pytest.fixture
async def store(url: str) -> AsyncIterator[SqlLedgerStore]:
    s = SqlLedgerStore(url)
    await s.open()
    yield s
    await s.aclose()


async def migration_rows(url: str) -> list[int]:
    s = SqlLedgerStore(url)
    try:
        async with s._engine.connect() as conn:
            result = await conn.exec_driver_sql("SELECT version FROM schema_migrations")
            return sorted(row[0] for row in result)
    finally:
        await s.aclose()


# --- round trips -------------------------------------------------------------------------


async def test_round_trip_is_exact(store: SqlLedgerStore) -> None:
    shanghai = timezone(timedelta(hours=8))
    records = [
        make_record(1),
        make_record(
            2,
            at=datetime(2026, 3, 1, 20, 0, 0, 999999, tzinfo=shanghai),  # 12:00 UTC
            node=None,
            source=None,
            upstream_model=None,
            ttft_ms=None,
            tokens_estimated=True,
            cost=Decimal("0.000001"),
            reference_cost=Decimal("12345678901234.123456"),  # all 20 digits
            currency="CNY",
            status="error",
            error_code="upstream_timeout",
        ),
        make_record(3, at=T0 + timedelta(days=400), tenant="团队-b", prompt_tokens=2**40),
        make_record(4, at=T0 + timedelta(seconds=1), cost=Decimal(0), source="cache"),
    ]
    await store.write(records)
    got = await store.query()
    assert got == sorted(records, key=lambda r: r.at)
    for rec in got:
        assert rec.at.tzinfo is UTC
        assert isinstance(rec.cost, Decimal)
        assert isinstance(rec.tokens_estimated, bool)
    by_id = {r.request_id: r for r in got}
    assert str(by_id["req-00002"].cost) == "0.000001"
    assert str(by_id["req-00002"].reference_cost) == "12345678901234.123456"
    assert by_id["req-00002"].at == datetime(2026, 3, 1, 12, 0, 0, 999999, tzinfo=UTC)
    assert str(by_id["req-00004"].cost) == "0.000000"


async def test_amounts_are_quantized_half_even_the_same_on_both_engines(
    store: SqlLedgerStore,
) -> None:
    amounts = {"a": "0.0000025", "b": "0.0000035", "c": "1.5", "d": "-0.0000015"}
    await store.write([make_record(i, cost=Decimal(v)) for i, v in enumerate(amounts.values())])
    got = [str(r.cost) for r in await store.query()]
    assert got == ["0.000002", "0.000004", "1.500000", "-0.000002"]


async def test_naive_datetimes_and_odd_amounts_are_refused(store: SqlLedgerStore) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        await store.write([make_record(1, at=datetime(2026, 1, 1))])
    with pytest.raises(ValueError, match="timezone-aware"):
        await store.query(since=datetime(2026, 1, 1))
    for bad in (Decimal("NaN"), Decimal("Infinity"), Decimal("1e14")):
        with pytest.raises(ValueError, match="amount"):
            await store.write([make_record(2, cost=bad)])
    assert await store.query() == []


async def test_duplicate_request_id_keeps_the_first(store: SqlLedgerStore) -> None:
    first = make_record(1)
    await store.write([first])
    await store.write([replace(first, cost=Decimal("9.99")), make_record(2)])
    await store.write([make_record(3), replace(make_record(3), tenant="other")])  # same batch
    got = await store.query()
    assert [r.request_id for r in got] == ["req-00001", "req-00002", "req-00003"]
    assert got[0] == first
    assert got[2].tenant == "team-a"


async def test_empty_write_is_a_no_op(store: SqlLedgerStore) -> None:
    await store.write([])
    assert await store.query() == []


# --- query, spend, retention -------------------------------------------------------------


async def test_query_window_since_inclusive_until_exclusive_oldest_first(
    store: SqlLedgerStore,
) -> None:
    records = [make_record(i, at=T0 + timedelta(minutes=i)) for i in range(10)]
    shuffled = records[:]
    random.Random(7).shuffle(shuffled)
    await store.write(shuffled)
    at = [r.at for r in records]
    assert await store.query() == records
    assert await store.query(since=at[3]) == records[3:]
    assert await store.query(until=at[3]) == records[:3]
    assert await store.query(since=at[2], until=at[5]) == records[2:5]
    assert await store.query(since=at[2] + timedelta(microseconds=1), until=at[5]) == records[3:5]
    assert await store.query(since=at[4], until=at[4]) == []
    # bounds in another zone mean the same instants
    tokyo = timezone(timedelta(hours=9))
    assert await store.query(since=at[8].astimezone(tokyo)) == records[8:]


async def test_spend_sums_exactly_per_key_since_a_time(store: SqlLedgerStore) -> None:
    mine = [make_record(i, at=T0 + timedelta(seconds=i), cost=Decimal("0.1")) for i in range(3)]
    tiny = [
        make_record(100 + i, at=T0 + timedelta(hours=1), cost=Decimal("0.000001"))
        for i in range(1000)
    ]
    older = make_record(5000, at=T0 - timedelta(microseconds=1), cost=Decimal("5"))
    other_key = make_record(5001, at=T0 + timedelta(seconds=5), key_id="k2", cost=Decimal("7"))
    await store.write([*mine, *tiny, older, other_key])
    total = await store.spend("k1", T0)
    assert total == Decimal("0.301000")  # floats would give 0.30100000000000005
    assert str(total) == "0.301000"
    assert await store.spend("k1", T0 - timedelta(microseconds=1)) == Decimal("5.301")
    assert await store.spend("k1", T0 + timedelta(seconds=1)) == Decimal("0.201")
    assert await store.spend("k2", T0) == Decimal(7)
    assert await store.spend("nobody", T0) == Decimal(0)
    assert isinstance(await store.spend("nobody", T0), Decimal)


async def test_delete_before_returns_the_count(store: SqlLedgerStore) -> None:
    records = [make_record(i, at=T0 + timedelta(days=i)) for i in range(5)]
    await store.write(records)
    assert await store.delete_before(T0 + timedelta(days=2)) == 2
    assert await store.query() == records[2:]
    assert await store.delete_before(T0 + timedelta(days=2)) == 0
    assert await store.delete_before(T0 + timedelta(days=99)) == 3
    assert await store.query() == []


# --- migrations and lifecycle -------------------------------------------------------------


async def test_migrations_are_idempotent(url: str) -> None:
    store = SqlLedgerStore(url)
    await store.open()
    await store.write([make_record(1)])
    await store.open()
    await store.aclose()
    again = SqlLedgerStore(url)
    await again.open()
    assert [r.request_id for r in await again.query()] == ["req-00001"]
    await again.aclose()
    assert await migration_rows(url) == [v for v, _ in MIGRATIONS]


async def test_concurrent_opens_migrate_once(url: str) -> None:
    stores = [SqlLedgerStore(url) for _ in range(4)]
    try:
        await asyncio.gather(*(s.open() for s in stores))
        await asyncio.gather(*(s.write([make_record(i)]) for i, s in enumerate(stores)))
        assert len(await stores[0].query()) == 4
    finally:
        await asyncio.gather(*(s.aclose() for s in stores))
    assert await migration_rows(url) == [v for v, _ in MIGRATIONS]


async def test_reopen_after_close_keeps_data(url: str) -> None:
    records = [make_record(i, at=T0 + timedelta(seconds=i)) for i in range(3)]
    first = SqlLedgerStore(url)
    await first.open()
    await first.write(records)
    await first.aclose()
    second = SqlLedgerStore(url)
    await second.open()
    try:
        assert await second.query() == records
        assert await second.spend("k1", T0) == Decimal("0.003702")
    finally:
        await second.aclose()


# --- engine-specific storage --------------------------------------------------------------


async def test_sqlite_storage_is_wal_exact_text_and_epoch_micros(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "nested" / "dir")
    assert url == f"sqlite+aiosqlite:///{(tmp_path / 'nested' / 'dir' / 'ledger.db').resolve()}"
    store = SqlLedgerStore(url)
    await store.open()
    try:
        await store.write([make_record(1)])
        async with store._engine.connect() as conn:
            sync = (await conn.exec_driver_sql("PRAGMA synchronous")).scalar()
            assert sync == 1  # NORMAL
    finally:
        await store.aclose()
    with sqlite3.connect(tmp_path / "nested" / "dir" / "ledger.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        row = db.execute("SELECT at, typeof(at), cost, typeof(cost) FROM ledger").fetchone()
        indexes = {r[1] for r in db.execute("PRAGMA index_list('ledger')")}
    micros = (T0 - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    assert row == (micros, "integer", "0.001234", "text")
    assert {"ledger_at", "ledger_key_at"} <= indexes


async def test_postgres_storage_types(pg_server: PgServer) -> None:
    url = await create_database(pg_server)
    store = SqlLedgerStore(url)
    await store.open()
    await store.aclose()
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    try:
        types = dict(
            await conn.fetch(
                "SELECT column_name, format_type(atttypid, atttypmod) FROM pg_attribute "
                "JOIN information_schema.columns ON column_name = attname "
                "WHERE attrelid = 'ledger'::regclass AND table_name = 'ledger'"
            )
        )
        indexes = {r[0] for r in await conn.fetch("SELECT indexname FROM pg_indexes")}
    finally:
        await conn.close()
    assert types["cost"] == types["reference_cost"] == "numeric(20,6)"
    assert types["at"] == "timestamp with time zone"
    assert types["tokens_estimated"] == "boolean"
    assert {"ledger_at", "ledger_key_at", "ledger_pkey"} <= indexes


def test_table_has_a_column_per_record_field() -> None:
    assert list(LEDGER.c.keys()) == [f.name for f in fields(LedgerRecord)]
    assert [c.name for c in LEDGER.primary_key] == ["request_id"]


@pytest.mark.parametrize(
    "bad", ["mysql+aiomysql://u@h/db", "sqlite+pysqlite:///x.db", "postgresql+psycopg://h/db"]
)
def test_unsupported_urls_are_refused_without_echoing_secrets(bad: str) -> None:
    with pytest.raises(ValueError, match="not supported") as info:
        SqlLedgerStore(bad.replace("u@", "u:hunter2@"))
    assert "hunter2" not in str(info.value)


async def test_plain_scheme_names_pick_the_async_drivers(tmp_path: Path) -> None:
    store = SqlLedgerStore(f"sqlite:///{tmp_path / 'l.db'}")
    await store.open()
    await store.write([make_record(1)])
    assert len(await store.query()) == 1
    await store.aclose()
    assert SqlLedgerStore("postgresql://u@h/db")._engine.dialect.driver == "asyncpg"


async def test_in_memory_sqlite_works_across_calls() -> None:
    store = SqlLedgerStore("sqlite+aiosqlite://")
    await store.open()
    await store.write([make_record(1)])
    assert len(await store.query()) == 1
    await store.aclose()


async def test_a_version_1_ledger_is_upgraded_and_keeps_its_rows(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ledger written before the cache (migration 1 only) gains ``avoided_cost`` = 0."""
    from spillway.ledger import sql_schema

    old = SqlLedgerStore(url)
    monkeypatch.setattr(sql_schema, "MIGRATIONS", MIGRATIONS[:1])
    await old.open()
    async with old._engine.begin() as conn:
        await conn.exec_driver_sql(
            "INSERT INTO ledger (request_id, at, tenant, key_id, model, prompt_tokens, "
            "completion_tokens, tokens_estimated, cost, reference_cost, currency, latency_ms, "
            "status) VALUES ('old-1', 0, 't', 'k', 'm', 1, 2, false, '0.5', '1', 'USD', 3, 'ok')"
            if url.startswith("sqlite")
            else "INSERT INTO ledger (request_id, at, tenant, key_id, model, prompt_tokens, "
            "completion_tokens, tokens_estimated, cost, reference_cost, currency, latency_ms, "
            "status) VALUES ('old-1', now(), 't', 'k', 'm', 1, 2, false, 0.5, 1, 'USD', 3, 'ok')"
        )
    await old.aclose()
    monkeypatch.undo()
    assert await migration_rows(url) == [1]
    new = SqlLedgerStore(url)
    await new.open()
    try:
        await new.write([make_record(2, avoided_cost=Decimal("0.25"))])
        rows = {r.request_id: r for r in await new.query()}
    finally:
        await new.aclose()
    assert rows["old-1"].avoided_cost == 0 and rows["old-1"].cost == Decimal("0.5")
    assert rows["req-00002"].avoided_cost == Decimal("0.25")
    assert await migration_rows(url) == [v for v, _ in MIGRATIONS]
