"""Budgets across replicas (ledger/budgets.py over state/budgets.py) in a real Redis: one
reservation step for the fleet, settling, a dead replica's reservations running out, a new
period, a Redis that lost its figures, and the share each replica keeps to while Redis does
not answer."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal as D

import pytest

from spillway.clock import ManualClock, SystemClock
from spillway.config.keys import BudgetConfig
from spillway.errors import InsufficientQuota
from spillway.ledger.budgets import Budgets, Reservation
from spillway.prices import Exchange
from spillway.state.budgets import FleetBudgets
from tests.redis_server import RedisServer
from tests.state_helpers import replica_states

USD = Exchange(D("7.1"))
WORST = D("0.010000")  # each request's worst case: the budget is worth 10 of them


@pytest.fixture
async def books(fresh_redis: RedisServer) -> AsyncIterator[list[Budgets]]:
    limits = {"k": BudgetConfig(amount=D("0.105"), period="day")}
    async with replica_states(fresh_redis.url) as states:
        yield [
            Budgets(limits, USD, "USD", SystemClock(), FleetBudgets(shared, leases), lambda: 3)
            for shared, leases in states
        ]


async def attempt(book: Budgets) -> Reservation | None:
    try:
        return await book.reserve("k", WORST, uuid.uuid4().hex)
    except InsufficientQuota:
        return None


async def test_forty_concurrent_requests_over_three_replicas_admit_ten(
    books: list[Budgets],
) -> None:
    held = await asyncio.gather(*(attempt(books[i % 3]) for i in range(40)))
    assert sum(r is not None for r in held) == 10


async def test_settling_frees_what_the_request_did_not_spend(books: list[Budgets]) -> None:
    a, b, _ = books
    held = [await attempt(a) for _ in range(10)]
    assert all(held) and await attempt(b) is None
    for reservation in held[:4]:
        a.settle(reservation, D("0.001"))  # 4 requests cost 0.004 in all, not 0.04
    await asyncio.sleep(0.2)
    admitted = [await attempt(b) for _ in range(4)]
    assert sum(r is not None for r in admitted) == 4  # 0.105 - 0.004 - 6 x 0.01 = 0.041 left


async def test_a_dead_replicas_reservations_run_out_with_their_lease(
    books: list[Budgets],
) -> None:
    a, b, _ = books  # a never renews its leases: as if killed
    assert all([await attempt(a) for _ in range(10)])
    assert await attempt(b) is None
    await asyncio.sleep(1.3)
    assert await attempt(b) is not None


async def test_a_redis_that_lost_the_spend_is_raised_to_what_a_replica_knows(
    fresh_redis: RedisServer, books: list[Budgets]
) -> None:
    a, b, _ = books
    for reservation in [await attempt(a) for _ in range(9)]:
        a.settle(reservation, WORST)  # spent 0.09 of 0.105
    await asyncio.sleep(0.2)
    fresh_redis.stop()
    fresh_redis.start()  # an empty Redis: no figures, no reservations
    await asyncio.sleep(1.1)  # the outage is noticed and retried after a second
    await attempt(b)  # b knows nothing of a's spend: Redis starts from b's 0...
    assert await attempt(a) is None  # ...until a says it spent 0.09: 0.09 + 0.01 + 0.01 > 0.105


async def test_while_redis_is_down_each_replica_adds_at_most_its_share(
    fresh_redis: RedisServer, books: list[Budgets]
) -> None:
    a, b, c = books
    assert await attempt(a) is not None  # the fleet: 0.01 reserved of 0.105
    await attempt(b)
    await attempt(c)  # each has heard from Redis: 0.03 used
    fresh_redis.pause()
    try:
        admitted = [sum([await attempt(book) is not None for _ in range(10)]) for book in books]
    finally:
        fresh_redis.resume()
    # each may add a third of what was left when it last heard: 0.095 / 3, 0.085 / 3, 0.075 / 3
    assert admitted == [3, 2, 2]
    assert 3 + sum(admitted) <= 10


def test_periods_are_named_by_their_start() -> None:
    clock = ManualClock(wall_start=datetime(2026, 12, 6, 23, 59, tzinfo=UTC).timestamp())
    book = Budgets({"k": BudgetConfig(amount=D(1), period="day")}, USD, "USD", clock)
    assert book._accounts["k"].period_id == "day:2026-12-06"


async def test_spend_settled_while_redis_was_away_reaches_its_figure_later(
    fresh_redis: RedisServer, books: list[Budgets]
) -> None:
    a, _, _ = books
    held = await attempt(a)  # reserved in Redis, settled there
    assert held is not None
    a.settle(held, D("0.020000"))
    await asyncio.sleep(0.2)
    fresh_redis.pause()
    try:
        during = await attempt(a)  # reserved here only (the fallback)
        assert during is not None
        a.settle(during, D("0.030000"))  # Redis has not heard of this one
    finally:
        fresh_redis.resume()
    await asyncio.sleep(1.1)  # the next call tries Redis again
    assert await attempt(a) is not None  # carries the 0.03 settled meanwhile
    shared = a._fleet._shared  # type: ignore[union-attr]
    figure = await shared.redis.execute("HGET", shared.key("budget", "k"), "s")
    assert int(figure) == 50_000  # 0.05 in millionths, each settle counted once


async def test_spend_carried_to_redis_is_carried_once_when_the_claim_is_tried_again(
    books: list[Budgets],
) -> None:
    """A claim that carries unsynced spend but finds its node full is tried on another node:
    the second try must not send (or subtract) that spend again."""
    a = books[0]
    a._accounts["k"].unsynced = D("0.010000")
    part = a.part("k", WORST, "r1")
    assert part is not None and part.unsynced == 10_000
    a.heard(part, [1, 0, 0])  # checked, the node refused: nothing reserved
    assert a._accounts["k"].unsynced == 0 and part.unsynced == 0 and part.args[6] == 0
    a.heard(part, [1, 0, 0])
    assert a._accounts["k"].unsynced == 0
