"""The ledger's tables, column types and migrations, the same on SQLite and PostgreSQL.

- ``at`` is a UTC instant, exact to the microsecond: ``timestamptz`` on PostgreSQL, integer
  microseconds since the Unix epoch on SQLite (sortable, indexable, no text parsing).
  Naive datetimes are refused, in records and in query bounds alike.
- Money is ``NUMERIC(20, 6)`` on PostgreSQL and exact decimal TEXT on SQLite; amounts are
  quantized to a millionth (``prices.AMOUNT_QUANTUM``, half-even) before either engine sees
  them, so both store and return the same ``Decimal`` (``Decimal("0.123400")``), never a float.
- Schema changes are the ordered ``MIGRATIONS`` below, recorded in ``schema_migrations`` and
  applied by ``migrate`` (``SqlLedgerStore.open`` holds the lock that makes that safe for any
  number of processes at once).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import fields
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    DateTime,
    Index,
    Integer,
    MetaData,
    Numeric,
    Table,
    Text,
    insert,
    select,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

from spillway.ledger.records import LedgerRecord
from spillway.prices import AMOUNT_QUANTUM

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
#: NUMERIC(20, 6) holds 14 digits before the point.
_MONEY_LIMIT = Decimal(10) ** 14


class UtcTimestamp(TypeDecorator[datetime]):
    """A timezone-aware UTC instant: ``timestamptz`` on PostgreSQL, epoch µs on SQLite."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(BigInteger())
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        return None if value is None else _bind_time(value, dialect.name == "sqlite")

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, int):
            return _EPOCH + value * _MICROSECOND
        assert isinstance(value, datetime)
        return value.astimezone(UTC)


class Money(TypeDecorator[Decimal]):
    """An exact amount to a millionth: ``NUMERIC(20, 6)`` on PostgreSQL, TEXT on SQLite."""

    impl = Numeric(20, 6, asdecimal=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(Text())
        return dialect.type_descriptor(Numeric(20, 6, asdecimal=True))

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> Any:
        return None if value is None else _bind_money(value, dialect.name == "sqlite")

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        if value is None:
            return None
        return value if isinstance(value, Decimal) else Decimal(value)


def _bind_time(value: datetime, as_int: bool) -> Any:
    if value.utcoffset() is None:
        raise ValueError(f"ledger times must be timezone-aware, got naive {value}")
    # An aware datetime minus the aware epoch counts its offset in: no astimezone() needed.
    return (value - _EPOCH) // _MICROSECOND if as_int else value.astimezone(UTC)


def _bind_money(value: Decimal, as_text: bool) -> Any:
    # One chained comparison checks both the range and finiteness (a NaN refuses to be
    # compared; infinities fall outside): this runs three times for every ledger row.
    try:
        valid = isinstance(value, Decimal) and -_MONEY_LIMIT < value < _MONEY_LIMIT
    except InvalidOperation:
        valid = False
    if not valid:
        raise ValueError(f"ledger amounts must be finite Decimals below 10^14, got {value!r}")
    exact = value.quantize(AMOUNT_QUANTUM, rounding=ROUND_HALF_EVEN)
    return str(exact) if as_text else exact


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


METADATA = MetaData()
LEDGER = _ledger_v2(METADATA)
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
)


def driver_row(rec: LedgerRecord, sqlite: bool) -> tuple[Any, ...]:
    """One record as the driver takes it, converted exactly as the column types do."""
    values = list(_VALUES(rec))
    values[_AT] = _bind_time(rec.at, sqlite)
    for i in _MONEY_FIELDS:
        values[i] = _bind_money(values[i], sqlite)
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
