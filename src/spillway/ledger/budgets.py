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
node's last hour emptying while the request runs.

With shared state (``[state] redis_url``) the check and the reservation happen in Redis for
the whole fleet (``state.budgets``), and this process keeps its own figures as the fallback:
while Redis does not answer, each replica may add at most its share (1 / replicas) of what
the fleet had left when it last heard from Redis, so together they stay within the limit.
Without shared state, budgets are per process: each keeps its own view of the running
reservations (spend is shared through the ledger and reloaded at start).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_CEILING, ROUND_HALF_EVEN, Decimal
from typing import Any

from spillway.clock import Clock
from spillway.config.keys import BudgetConfig
from spillway.errors import InsufficientQuota
from spillway.ledger.records import LedgerStore
from spillway.prices import Currency, Exchange
from spillway.state.budgets import FleetBudgets
from spillway.state.redis import StateDown

_ADJECTIVE = {"day": "daily", "month": "monthly"}


def period_start(now: datetime, period: str) -> datetime:
    day = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return day if period == "day" else day.replace(day=1)


_MICRO = Decimal(1_000_000)
#: where the script's arguments (``FleetBudgets.script_args``) carry the unsynced spend
_UNSYNCED_ARG = 6


@dataclass
class _Account:
    limit: Decimal  # in the ledger currency
    period: str
    started: datetime
    spent: Decimal = Decimal(0)
    reserved: Decimal = Decimal(0)
    #: what the fleet had spent and reserved when Redis last answered, and this process's
    #: own spent + reserved then: the fallback's baseline
    fleet_used: Decimal = Decimal(0)
    own_then: Decimal = Decimal(0)
    #: spend settled here that Redis has not been told of (settled while it was away): sent
    #: with the next reservation that gets through
    unsynced: Decimal = Decimal(0)

    @property
    def period_id(self) -> str:
        return f"{self.period}:{self.started.date().isoformat()}"


@dataclass(slots=True)
class BudgetPart:
    """A request's fleet reservation as the Redis script takes it (not frozen: the spend it
    carries to Redis is carried once, so a claim tried again on another node sends none)."""

    keys: list[str]
    args: list[int | str]
    key_id: str
    estimate: Decimal
    member: str
    #: spend settled here that this call tells Redis of
    unsynced: int


@dataclass(slots=True)
class Reservation:
    key_id: str
    amount: Decimal
    started: datetime
    #: its name in the fleet's reservations ("" when only this process holds it)
    member: str = ""


class Budgets:
    def __init__(
        self,
        limits: Mapping[str, BudgetConfig],
        exchange: Exchange,
        currency: Currency,
        clock: Clock,
        fleet: FleetBudgets | None = None,
        replicas: Callable[[], int] = lambda: 1,
    ):
        self._clock = clock
        self._fleet = fleet
        self._replicas = replicas
        self._ids = itertools.count()
        self._exchange, self._currency = exchange, currency
        self._accounts = {key_id: self._account(b) for key_id, b in limits.items()}

    def _account(self, budget: BudgetConfig) -> _Account:
        limit = self._exchange.convert(budget.amount, budget.currency, self._currency)
        return _Account(limit, budget.period, period_start(self._now(), budget.period))

    def add(self, limits: Mapping[str, BudgetConfig]) -> list[str]:
        """Budgets of keys issued while running (managed keys); returns the key ids that
        are new here, whose spend ``load`` should read. An account is never dropped: a
        revoked key's requests may still be settling, and its row costs a few bytes."""
        new = [key_id for key_id in limits if key_id not in self._accounts]
        for key_id in new:
            self._accounts[key_id] = self._account(limits[key_id])
        return new

    async def load(self, store: LedgerStore, only: Iterable[str] | None = None) -> None:
        """What each key (or each of ``only``) already spent this period, from the ledger."""
        wanted = self._accounts if only is None else {k: self._accounts[k] for k in only}
        for key_id, account in wanted.items():
            # Never below what this process counted itself: records still spooled or pending
            # are not in the store yet, and a settle may land while this waits.
            account.spent = max(account.spent, await store.spend(key_id, account.started))

    async def reserve(self, key_id: str, estimate: Decimal, request_id: str) -> Reservation | None:
        """Hold ``estimate`` (the request's worst case) against the key's budget, or raise
        ``InsufficientQuota``; None for a key without a budget."""
        account = self._accounts.get(key_id)
        if account is None:
            return None
        self._roll_over(account)
        part = self.part(key_id, estimate, request_id)
        if part is None:
            return self.reserve_here(key_id, estimate)
        assert self._fleet is not None
        try:
            reply = await self._fleet.call(part.keys, part.args)
        except StateDown:
            return self.reserve_here(key_id, estimate)
        return self.reservation_from(part, reply)

    def part(self, key_id: str, estimate: Decimal, request_id: str) -> BudgetPart | None:
        """The fleet reservation as the Redis script takes it (None for a key without a
        budget, or without shared state): for ``reserve``, or carried by a slot claim."""
        account = self._accounts.get(key_id)
        if account is None or self._fleet is None:
            return None
        self._roll_over(account)
        member = f"{request_id}:{next(self._ids)}"
        cost = int((estimate * _MICRO).to_integral_value(rounding=ROUND_CEILING))
        unsynced = _micro(account.unsynced)
        keys, args = self._fleet.script_args(
            key_id,
            account.period_id,
            _micro(account.limit),
            cost,
            _micro(account.spent),
            member,
            unsynced,
        )
        return BudgetPart(keys, args, key_id, estimate, member, unsynced)

    def reserve_here(self, key_id: str, estimate: Decimal) -> Reservation | None:
        """This process's own check: without shared state, against the whole limit; with it
        (Redis down), against its share of what the fleet had left, on top of what it added
        since it last heard from Redis."""
        account = self._accounts.get(key_id)
        if account is None:
            return None
        self._roll_over(account)
        if self._fleet is not None:
            share = (account.limit - account.fleet_used) / max(1, self._replicas())
            since = account.spent + account.reserved - account.own_then
            self._check(account, account.fleet_used + since, estimate, account.fleet_used + share)
        else:
            self._check(account, account.spent + account.reserved, estimate, account.limit)
        account.reserved += estimate
        return Reservation(key_id, estimate, account.started)

    def heard(self, part: BudgetPart, reply: list[Any]) -> None:
        """The script checked the budget but reserved nothing (another check refused): keep
        what it says of the fleet, and that Redis has the spend this call carried."""
        account = self._accounts[part.key_id]
        self._carried(account, part)
        _, spent, reserved = reply
        account.fleet_used = (Decimal(int(spent)) + Decimal(int(reserved))) / _MICRO
        account.own_then = account.spent + account.reserved + part.estimate

    def reservation_from(self, part: BudgetPart, reply: list[Any]) -> Reservation:
        """The reservation the script's reply grants, or ``InsufficientQuota``."""
        assert self._fleet is not None
        account = self._accounts[part.key_id]
        estimate, member = part.estimate, part.member
        verdict = self._fleet.verdict(reply, member, part.keys)
        self._carried(account, part)
        spent, reserved = Decimal(verdict.spent) / _MICRO, Decimal(verdict.reserved) / _MICRO
        own = account.spent + account.reserved + (estimate if verdict.admitted else 0)
        account.fleet_used, account.own_then = spent + reserved, own
        if not verdict.admitted:  # Redis's word, even where decimals here would squeeze it in
            self._refuse(account, spent + reserved, estimate)
        account.reserved += estimate
        return Reservation(part.key_id, estimate, account.started, member)

    @staticmethod
    def _carried(account: _Account, part: BudgetPart) -> None:
        """Redis has the unsynced spend this call carried: not ours to send again."""
        account.unsynced -= Decimal(part.unsynced) / _MICRO
        part.unsynced = 0
        part.args[_UNSYNCED_ARG] = 0

    def _check(self, account: _Account, used: Decimal, estimate: Decimal, limit: Decimal) -> None:
        if used + estimate > limit:
            self._refuse(account, used, estimate)

    def _refuse(self, account: _Account, used: Decimal, estimate: Decimal) -> None:
        left = max(account.limit - used, Decimal(0))
        raise InsufficientQuota(
            f"This API key's {_ADJECTIVE[account.period]} budget is spent: {left} left of "
            f"{account.limit}, and this request may cost up to {estimate}. Lower max_tokens, "
            "send a shorter request, or wait for the next period."
        )

    def settle(self, reservation: Reservation | None, actual: Decimal) -> None:
        if reservation is None:
            return
        account = self._accounts[reservation.key_id]
        account.reserved -= reservation.amount
        if reservation.started != account.started:
            return  # a reservation of a period that has ended: nothing counts any more
        account.spent += actual
        if self._fleet is None:
            return
        if not reservation.member:  # reserved while Redis was away: tell it later
            account.unsynced += actual
            return

        def keep() -> None:  # Redis went away before the settle reached it
            if reservation.started == account.started:
                account.unsynced += actual

        period = account.period_id
        self._fleet.settle(reservation.key_id, period, reservation.member, _micro(actual), keep)

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
            account.fleet_used = account.own_then = account.unsynced = Decimal(0)

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.wall(), UTC)


def _micro(amount: Decimal) -> int:
    """An amount in integer millionths of the currency (the ledger's quantum)."""
    return int((amount * _MICRO).to_integral_value(rounding=ROUND_HALF_EVEN))
