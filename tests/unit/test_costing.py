"""Money: prices, currency, private cost per token at measured utilisation, budgets, reports."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from spillway.clock import ManualClock
from spillway.config.keys import BudgetConfig
from spillway.config.schema import HardwareCost
from spillway.errors import InsufficientQuota
from spillway.ledger.budgets import Budgets, period_start
from spillway.ledger.costing import Costing, UtilisationWindow, hourly_cost
from spillway.ledger.records import LedgerRecord
from spillway.ledger.report import percentile, summarize
from spillway.prices import LIST_PRICES, Exchange, Price

USD = Exchange(Decimal("7.10"))
D = Decimal


def test_list_price_cost_is_exact() -> None:
    # 10M output tokens on GPT-4.1 at $8/M
    assert LIST_PRICES["gpt-4.1"].cost(0, 10_000_000) == D("80.000000")
    assert LIST_PRICES["deepseek-v3.2"].cost(0, 10_000_000) == D("4.200000")
    assert LIST_PRICES["holysheep"].cost(0, 3_000_000) == D("1.050000")


def test_cost_rounds_half_even_to_a_millionth() -> None:
    price = Price(D("0.5"), D("0"))
    assert price.cost(1, 0) == D("0.000000")  # 0.0000005 rounds to even
    assert price.cost(3, 0) == D("0.000002")  # 0.0000015 rounds to even


def test_currency_conversion_both_ways() -> None:
    assert USD.convert(D("10"), "USD", "CNY") == D("71.000000")
    assert USD.convert(D("71"), "CNY", "USD") == D("10.000000")
    assert USD.convert(D("3.5"), "USD", "USD") == D("3.5")


def test_hourly_cost_of_private_hardware() -> None:
    hardware = HardwareCost(
        price=D("200000"), currency="CNY", amortisation_months=36, power_kw=D("2.2"),
        electricity_per_kwh=D("0.8"), ops_per_month=D("8000"),
    )  # fmt: skip
    # (200000/36 + 8000)/730 + 2.2*0.8 = 18.5693 + 1.76 CNY per hour, in USD at 7.10
    expected = (D(200000) / 36 + 8000) / 730 + D("1.76")
    assert hourly_cost(hardware, USD, "CNY") == USD.convert(expected, "CNY", "CNY")
    assert hourly_cost(hardware, USD, "USD") == USD.convert(expected, "CNY", "USD")


def test_private_cost_spreads_the_hour_over_served_tokens() -> None:
    clock = ManualClock()
    costing = Costing({}, {"gpu": D("10")}, LIST_PRICES["gpt-4.1"], USD, "USD", clock)
    first = costing.charge("gpu", 500, 500)  # the only 1000 tokens this hour: the whole $10
    assert first.cost == D("10.000000")
    second = costing.charge("gpu", 500, 500)  # 2000 tokens this hour: half of $10 each
    assert second.cost == D("5.000000")
    clock.advance(3601)
    assert costing.charge("gpu", 1000, 0).cost == D("10.000000")  # the window moved on


def test_reference_cost_and_free_nodes() -> None:
    costing = Costing({}, {}, LIST_PRICES["gpt-4.1"], USD, "USD", ManualClock())
    charge = costing.charge("unpriced", 1_000_000, 1_000_000)
    assert charge.cost == D(0)
    assert charge.reference_cost == D("10.000000")
    assert costing.charge(None, 10, 10).cost == D(0)


def test_cloud_price_in_cny_is_converted_to_the_ledger_currency() -> None:
    prices = {"glm": Price(D("7.10"), D("14.20"), "CNY")}
    costing = Costing(prices, {}, LIST_PRICES["gpt-4.1"], USD, "USD", ManualClock())
    assert costing.charge("glm", 1_000_000, 1_000_000).cost == D("3.000000")


def test_utilisation_window_expires_old_minutes() -> None:
    clock = ManualClock(start=0.0)
    window = UtilisationWindow(clock)
    window.add(100)
    clock.advance(1800)
    assert window.add(50) == 150
    clock.advance(1801)
    assert window.tokens() == 50


def budgets(amount: str = "1.00", period: str = "month") -> Budgets:
    clock = ManualClock(wall_start=datetime(2026, 11, 27, 12, tzinfo=UTC).timestamp())
    limits = {"k": BudgetConfig(amount=D(amount), period=period)}  # type: ignore[arg-type]
    return Budgets(limits, USD, "USD", clock)


async def test_budget_admits_until_the_reservations_would_pass_the_limit() -> None:
    book = budgets("1.00")
    first = await book.reserve("k", D("0.60"), "r1")
    with pytest.raises(InsufficientQuota) as caught:
        await book.reserve("k", D("0.60"), "r2")
    assert caught.value.status == 429 and caught.value.kind == "insufficient_quota"
    book.settle(first, D("0.10"))
    assert book.remaining("k") == D("0.90")
    assert await book.reserve("k", D("0.60"), "r3") is not None


async def test_keys_without_budget_are_not_limited() -> None:
    assert await budgets().reserve("other", D("1000"), "r1") is None


def test_budget_in_cny_is_converted() -> None:
    clock = ManualClock()
    limits = {"k": BudgetConfig(amount=D("71"), currency="CNY")}
    book = Budgets(limits, USD, "USD", clock)
    assert book.remaining("k") == D("10.000000")


def test_period_start_for_month_and_day() -> None:
    now = datetime(2026, 11, 27, 15, 30, tzinfo=UTC)
    assert period_start(now, "month") == datetime(2026, 11, 1, tzinfo=UTC)
    assert period_start(now, "day") == datetime(2026, 11, 27, tzinfo=UTC)


def record(at: datetime, source: str | None, cost: str, ref: str, latency: int) -> LedgerRecord:
    return LedgerRecord(
        request_id=f"r{at.timestamp()}{source}{latency}", at=at, tenant="t", key_id="", model="m",
        node=source, source=source, upstream_model=None, prompt_tokens=10, completion_tokens=5,
        tokens_estimated=False, cost=D(cost), reference_cost=D(ref), currency="USD",
        latency_ms=latency, ttft_ms=latency // 2 if source else None,
        status="ok" if source else "error",
    )  # type: ignore[arg-type]  # fmt: skip


def test_report_sums_exactly_and_computes_shares() -> None:
    day = datetime(2026, 11, 1, tzinfo=UTC)
    records = [
        record(day, "private", "0.000000", "0.000046", 100),
        record(day, "cloud", "0.000015", "0.000046", 300),
        record(day + timedelta(days=1), "cache", "0", "0.000046", 2),
        record(day + timedelta(days=1), None, "0", "0", 5),
    ]
    by_day = summarize(records, "day")
    assert [r.group for r in by_day] == ["2026-11-01", "2026-11-02", "total"]
    total = by_day[-1]
    assert total.requests == 4 and total.errors == 1
    assert total.cost == D("0.000015")
    assert total.reference_cost == D("0.000138")
    assert total.savings == D("0.000123")
    assert (total.private_share, total.cloud_share, total.cache_hit_rate) == (
        0.3333,
        0.3333,
        0.3333,
    )
    assert total.latency_p50_ms == 100 and total.latency_p95_ms == 300


def test_percentile_nearest_rank() -> None:
    assert percentile([], 0.5) is None
    assert percentile([5], 0.95) == 5
    assert percentile(list(range(1, 101)), 0.95) == 95
    assert percentile(list(range(1, 101)), 0.50) == 50
