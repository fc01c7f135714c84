"""The ledger's tables and migrations, the same on SQLite and PostgreSQL.

- Column types are ``sql_types``'s: exact UTC instants and ``Decimal`` money on both engines.
- Schema changes are the ordered ``MIGRATIONS`` below, recorded in ``schema_migrations`` and
  applied by ``migrate`` (``SqlLedgerStore.open`` holds the lock that makes that safe for any
  number of processes at once). Migration 3 adds the key and audit tables
  (``access_tables``) and the ledger's personal-data columns.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import fields
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    insert,
    select,
)

from spillway.ledger.access_tables import create_access_v3
from spillway.ledger.batch_tables import create_batch_v4
from spillway.ledger.records import LedgerRecord
from spillway.ledger.sql_types import Money, UtcTimestamp, bind_money, bind_time


def _ledger_v1(metadata: MetaData) -> Table:
    """The ledger table as migration 1 creates it. Keep it frozen: a later schema change is a
    new migration (and a new shape for ``LEDGER``), never an edit here."""
    return Table(
        "ledger",
        metadata,
        # TEXT, not VARCHAR(n): a long name must never make a batch fail on PostgreSQL.
        Column("request_id", Text, primary_key=True),
        Column("at", UtcTimestamp, nullable=False),
        Column("tenant", Text, nullable=False),
        Column("key_id", Text, nullable=False),
        Column("model", Text, nullable=False),
        Column("node", Text),
        Column("source", Text),
        Column("upstream_model", Text),
        Column("prompt_tokens", BigInteger, nullable=False),
        Column("completion_tokens", BigInteger, nullable=False),
        Column("tokens_estimated", Boolean, nullable=False),
        Column("cost", Money, nullable=False),
        Column("reference_cost", Money, nullable=False),
        Column("currency", Text, nullable=False),
        Column("latency_ms", BigInteger, nullable=False),
        Column("ttft_ms", BigInteger),
        Column("status", Text, nullable=False),
        Column("error_code", Text),
        # The caller's own x-request-id: theirs to repeat, so it is not the key.
        Column("client_request_id", Text),
        Index("ledger_at", "at"),
        Index("ledger_key_at", "key_id", "at"),
    )


def _ledger_v2(metadata: MetaData) -> Table:
    """Migration 2 adds ``avoided_cost``: what a cache hit saved (0 for every other row)."""
    table = _ledger_v1(metadata)
    table.append_column(Column("avoided_cost", Money, nullable=False, server_default="0"))
    return table


def _ledger_v3(metadata: MetaData) -> Table:
    """Migration 3 adds what the personal-data step decided (``mask``, and the kinds and
    counts found, never a value); NULL when it found nothing."""
    table = _ledger_v2(metadata)
    table.append_column(Column("pii_action", Text))
    table.append_column(Column("pii_kinds", Text))
    return table


def _ledger_v4(metadata: MetaData) -> Table:
    """Migration 4 adds the batch a request ran for (``batch_tables``); NULL for others."""
    table = _ledger_v3(metadata)
    table.append_column(Column("batch_id", Text))
    return table


METADATA = MetaData()
LEDGER = _ledger_v4(METADATA)
SCHEMA_MIGRATIONS = Table(
    "schema_migrations",
    METADATA,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("applied_at", UtcTimestamp, nullable=False),
)
FIELDS = tuple(f.name for f in fields(LedgerRecord))
_VALUES = operator.attrgetter(*FIELDS)  # a record's fields as a tuple, in one C call
_AT, _ESTIMATED = (FIELDS.index(n) for n in ("at", "tokens_estimated"))
_MONEY_FIELDS = tuple(FIELDS.index(n) for n in ("cost", "reference_cost", "avoided_cost"))


def _create_ledger_v1(conn: Connection) -> None:
    _ledger_v1(MetaData()).create(conn)


def _add_avoided_cost(conn: Connection) -> None:
    money = (
        "TEXT NOT NULL DEFAULT '0'"
        if conn.dialect.name == "sqlite"
        else ("NUMERIC(20, 6) NOT NULL DEFAULT 0")
    )
    conn.exec_driver_sql(f"ALTER TABLE ledger ADD COLUMN avoided_cost {money}")


#: Ordered schema migrations: (version, step on a sync connection inside the open transaction).
MIGRATIONS: tuple[tuple[int, Callable[[Connection], None]], ...] = (
    (1, _create_ledger_v1),
    (2, _add_avoided_cost),
    (3, create_access_v3),
    (4, create_batch_v4),
)


def driver_row(rec: LedgerRecord, sqlite: bool) -> tuple[Any, ...]:
    """One record as the driver takes it, converted exactly as the column types do."""
    values = list(_VALUES(rec))
    values[_AT] = bind_time(rec.at, sqlite)
    for i in _MONEY_FIELDS:
        values[i] = bind_money(values[i], sqlite)
    if sqlite:
        values[_ESTIMATED] = int(rec.tokens_estimated)
    return tuple(values)


def migrate(conn: Connection, now: datetime) -> None:
    """Apply every migration not yet recorded (the caller holds the migration lock)."""
    SCHEMA_MIGRATIONS.create(conn, checkfirst=True)
    applied = set(conn.scalars(select(SCHEMA_MIGRATIONS.c.version)))
    for version, step in MIGRATIONS:
        if version not in applied:
            step(conn)
            conn.execute(insert(SCHEMA_MIGRATIONS).values(version=version, applied_at=now))
