"""Spending limits per API key: reserve before the call, settle after it.

A request is admitted only if what the key has spent this period, plus what is reserved by
requests still running, plus this request's largest possible cost, stays within the limit.
Reservation and check happen in one step on the event loop, so fifty concurrent requests
against a budget that allows one admit exactly one. The reservation is a worst case, not an
estimate (``Accountant.reserve``: every byte of the body the node gets counted as a token,
and the largest output the request allows), so a node priced per token that bills honestly
for that body cannot take a key past its budget. Settling replaces the reservation with the
actual cost. What the worst case cannot see is listed in docs/ledger.md#budgets: an answer
with no output limit running past ``[ledger] max_output_tokens``, what the body only points
at (an image URL), a template that re-renders the body at greater length, and a private
node's last hour emptying while the request runs. Budgets are per process: with several
workers each keeps its own view of the running reservations (spend is shared through the
ledger and reloaded at start).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from spillway.clock import Clock
from spillway.config.schema import BudgetConfig
from spillway.errors import InsufficientQuota
from spillway.ledger.records import LedgerStore
from spillway.prices import Currency, Exchange

_ADJECTIVE = {"day": "daily", "month": "monthly"}


def period_start(now: datetime, period: str) -> datetime:
    day = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return day if period == "day" else day.replace(day=1)


@dataclass
class _Account:
    limit: Decimal  # in the ledger currency
    period: str
    started: datetime
    spent: Decimal = Decimal(0)
    reserved: Decimal = Decimal(0)


@dataclass(slots=True)
class Reservation:
    key_id: str
    amount: Decimal
    started: datetime


class Budgets:
    def __init__(
        self,
        limits: Mapping[str, BudgetConfig],
        exchange: Exchange,
        currency: Currency,
        clock: Clock,
    ):
        self._clock = clock
        now = self._now()
        self._accounts = {
            key_id: _Account(
                exchange.convert(b.amount, b.currency, currency), b.period,
                period_start(now, b.period),
            )
            for key_id, b in limits.items()
        }  # fmt: skip

    async def load(self, store: LedgerStore) -> None:
        """What each key already spent this period, from the ledger."""
        for key_id, account in self._accounts.items():
            account.spent = await store.spend(key_id, account.started)

    def reserve(self, key_id: str, estimate: Decimal) -> Reservation | None:
        account = self._accounts.get(key_id)
        if account is None:
            return None
        self._roll_over(account)
        if account.spent + account.reserved + estimate > account.limit:
            left = max(account.limit - account.spent - account.reserved, Decimal(0))
            raise InsufficientQuota(
                f"This API key's {_ADJECTIVE[account.period]} budget is spent: {left} left of "
                f"{account.limit}, and this request may cost up to {estimate}. Lower max_tokens, "
                "send a shorter request, or wait for the next period."
            )
        account.reserved += estimate
        return Reservation(key_id, estimate, account.started)

    def settle(self, reservation: Reservation | None, actual: Decimal) -> None:
        if reservation is None:
            return
        account = self._accounts[reservation.key_id]
        account.reserved -= reservation.amount
        if reservation.started == account.started:
            account.spent += actual

    def remaining(self, key_id: str) -> Decimal | None:
        account = self._accounts.get(key_id)
        if account is None:
            return None
        self._roll_over(account)
        return account.limit - account.spent - account.reserved

    def _roll_over(self, account: _Account) -> None:
        start = period_start(self._now(), account.period)
        if start != account.started:
            account.started, account.spent = start, Decimal(0)

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.wall(), UTC)
