"""The ledger database's column types, the same on SQLite and PostgreSQL.

- ``UtcTimestamp`` is a UTC instant, exact to the microsecond: ``timestamptz`` on PostgreSQL,
  integer microseconds since the Unix epoch on SQLite (sortable, indexable, no text parsing).
  Naive datetimes are refused.
- ``Money`` is ``NUMERIC(20, 6)`` on PostgreSQL and exact decimal TEXT on SQLite; amounts are
  quantized to a millionth (``prices.AMOUNT_QUANTUM``, half-even) before either engine sees
  them, so both store and return the same ``Decimal``, never a float.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any

from sqlalchemy import BigInteger, DateTime, Numeric, Text
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

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
        return None if value is None else bind_time(value, dialect.name == "sqlite")

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
        return None if value is None else bind_money(value, dialect.name == "sqlite")

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        if value is None:
            return None
        return value if isinstance(value, Decimal) else Decimal(value)


def bind_time(value: datetime, as_int: bool) -> Any:
    if value.utcoffset() is None:
        raise ValueError(f"ledger times must be timezone-aware, got naive {value}")
    # An aware datetime minus the aware epoch counts its offset in: no astimezone() needed.
    return (value - _EPOCH) // _MICROSECOND if as_int else value.astimezone(UTC)


def bind_money(value: Decimal, as_text: bool) -> Any:
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
