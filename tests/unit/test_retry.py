"""Retry backoff, Retry-After handling and the retry budget."""

from __future__ import annotations

import random
from email.utils import formatdate

import pytest

from spillway.clock import ManualClock
from spillway.resilience.retry import RetryBudget, RetryPolicy, parse_retry_after

ALMOST_ONE = 1.0 - 1e-12
NOW_WALL = ManualClock().wall()


# --- backoff ----------------------------------------------------------------------------------


@pytest.mark.parametrize("retry", [1, 2, 5, 50])
def test_rand_zero_means_no_wait(retry: int) -> None:
    assert RetryPolicy().delay_for(retry, lambda: 0.0) == 0.0


@pytest.mark.parametrize(
    ("retry", "ceiling"),
    [(1, 0.05), (2, 0.1), (3, 0.2), (4, 0.4), (5, 0.8), (6, 1.0), (7, 1.0), (100, 1.0)],
)
def test_rand_near_one_reaches_the_capped_ceiling(retry: int, ceiling: float) -> None:
    delay = RetryPolicy().delay_for(retry, lambda: ALMOST_ONE)
    assert delay == pytest.approx(ceiling) and delay < ceiling


def test_huge_retry_numbers_do_not_overflow() -> None:
    assert RetryPolicy().delay_for(10_000, lambda: 0.5) == pytest.approx(0.5)


def test_jitter_is_uniform_under_the_ceiling() -> None:
    policy = RetryPolicy(base_s=0.1, cap_s=0.3)
    rng = random.Random(7)
    for retry in range(1, 6):
        ceiling = min(0.3, 0.1 * 2 ** (retry - 1))
        delays = [policy.delay_for(retry, rng.random) for _ in range(2000)]
        assert all(0.0 <= d < ceiling for d in delays)
        assert sum(delays) / len(delays) == pytest.approx(ceiling / 2, rel=0.1)


def test_half_of_the_ceiling_at_rand_one_half() -> None:
    assert RetryPolicy().delay_for(2, lambda: 0.5) == pytest.approx(0.05)


def test_retries_count_from_one() -> None:
    with pytest.raises(ValueError, match="from 1"):
        RetryPolicy().delay_for(0, lambda: 0.0)


def test_policy_defaults_and_validation() -> None:
    assert RetryPolicy() == RetryPolicy(max_attempts=3, base_s=0.05, cap_s=1.0)
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="negative"):
        RetryPolicy(base_s=-1.0)


# --- Retry-After ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retry_after", "remaining", "fits"),
    [(None, 5.0, True), (0.0, 0.1, True), (1.0, 5.0, True), (5.0, 5.0, False), (9.0, 5.0, False)],
)
def test_retry_after_must_fit_the_deadline(
    retry_after: float | None, remaining: float, fits: bool
) -> None:
    assert RetryPolicy().retry_after_fits(retry_after, remaining) is fits


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("120", 120.0), ("0", 0.0), (" 3 ", 3.0), ("1.5", 1.5), ("007", 7.0)],
)
def test_delta_seconds(header: str, seconds: float) -> None:
    assert parse_retry_after(header, NOW_WALL) == seconds


def test_http_date_in_the_future() -> None:
    header = formatdate(NOW_WALL + 30, usegmt=True)  # e.g. "Fri, 15 Jan 2027 08:00:30 GMT"
    assert parse_retry_after(header, NOW_WALL) == pytest.approx(30.0)


def test_a_known_http_date() -> None:
    # 2015-10-21T07:28:00Z is 1445412480 s after the epoch.
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 1445412480.0 - 12.0) == 12.0


def test_http_date_without_zone_is_gmt() -> None:
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 -0000", 1445412480.0) == 10.0


def test_http_date_in_the_past_means_now() -> None:
    assert parse_retry_after(formatdate(NOW_WALL - 60, usegmt=True), NOW_WALL) == 0.0


@pytest.mark.parametrize(
    "header",
    [None, "", "   ", "-1", "-0.5", "soon", "inf", "+inf", "nan", "1s", "Wed, 99 Foo 2015", "1,2"],
)
def test_garbage_or_negative_gives_none(header: str | None) -> None:
    assert parse_retry_after(header, NOW_WALL) is None


# --- the budget -------------------------------------------------------------------------------


def run_sequentially(budget: RetryBudget, requests: int, retries_each: int) -> int:
    """Requests one after another, each failing and wanting ``retries_each`` retries."""
    granted = 0
    for _ in range(requests):
        budget.request_started()
        for _ in range(retries_each):
            if not budget.try_retry():
                break
            granted += 1
            budget.retry_finished()
        budget.request_finished()
    return granted


def test_an_outage_gets_at_most_a_fifth_more_load() -> None:
    budget = RetryBudget(ratio=0.2, min_retries=3, burst=10)
    granted = run_sequentially(budget, 100, retries_each=2)
    assert granted <= 0.2 * 100 + 10
    assert granted == 29  # the full starting bucket (10) plus one token per five requests
    stats = budget.stats()
    # Each request stops asking at its first refusal.
    assert stats.retries_granted == 29 and stats.retries_refused == 95
    assert (stats.requests_in_flight, stats.retries_in_flight) == (0, 0)


@pytest.mark.parametrize("requests", [10, 100, 1000])
def test_the_bound_holds_at_any_volume(requests: int) -> None:
    budget = RetryBudget()
    granted = run_sequentially(budget, requests, retries_each=5)
    assert granted <= 0.2 * requests + 10


def test_a_new_budget_allows_its_reserve() -> None:
    budget = RetryBudget(ratio=0.2, min_retries=3, burst=10)
    budget.request_started()
    assert [budget.try_retry() for _ in range(4)] == [True, True, True, False]


def test_deposits_are_capped_at_burst() -> None:
    budget = RetryBudget(ratio=0.2, min_retries=3, burst=10)
    for _ in range(1000):  # a long quiet spell of healthy traffic
        budget.request_started()
        budget.request_finished()
    assert budget.stats().balance == 10.0
    granted = 0
    while budget.try_retry():
        granted += 1
        budget.retry_finished()
    assert granted == 10


def test_ten_deposits_of_a_tenth_make_one_whole_token() -> None:
    budget = RetryBudget(ratio=0.1, min_retries=0, burst=10)
    budget.request_started()
    while budget.try_retry():  # spend the starting bucket
        budget.retry_finished()
    budget.request_finished()
    for _ in range(9):
        budget.request_started()
    assert not budget.try_retry()
    budget.request_started()  # ten additions of 0.1 give 0.9999... in floats; still one retry
    assert budget.stats().balance < 1.0
    assert budget.try_retry() and not budget.try_retry()


def test_concurrency_gate_scales_with_requests_in_flight() -> None:
    budget = RetryBudget(ratio=0.2, min_retries=3, burst=1000)
    for _ in range(200):
        budget.request_started()
    assert budget.stats().balance == pytest.approx(1000.0)  # starts full at burst
    results = [budget.try_retry() for _ in range(45)]
    assert results.count(True) == 40 and results[40:] == [False] * 5  # 20 % of 200
    budget.retry_finished()
    assert budget.try_retry() and not budget.try_retry()


def test_concurrency_gate_never_below_min_retries() -> None:
    budget = RetryBudget(ratio=0.2, min_retries=3, burst=1000)
    for _ in range(50):
        budget.request_started()
    for _ in range(48):
        budget.request_finished()
    assert budget.stats().requests_in_flight == 2
    assert [budget.try_retry() for _ in range(4)] == [True, True, True, False]


def test_many_concurrent_requests_each_retrying() -> None:
    budget = RetryBudget()
    for _ in range(1000):
        budget.request_started()
    granted = sum(budget.try_retry() for _ in range(1000))
    assert granted == 10  # the balance (capped at burst) binds before the 200-retry gate
    assert budget.stats().retries_in_flight == 10


def test_counters_never_go_negative() -> None:
    budget = RetryBudget()
    budget.request_finished()
    budget.retry_finished()
    stats = budget.stats()
    assert (stats.requests_in_flight, stats.retries_in_flight) == (0, 0)


def test_budget_validation() -> None:
    with pytest.raises(ValueError, match="negative"):
        RetryBudget(ratio=-0.1)
    with pytest.raises(ValueError, match="negative"):
        RetryBudget(burst=-1)


def test_with_replicas_the_reserve_and_the_floor_are_shared_out() -> None:
    """The ratio holds fleet-wide by itself; the starting reserve and the floor are divided."""
    replicas = 5
    budget = RetryBudget(ratio=0.0, min_retries=10, burst=10, parts=lambda: replicas)
    granted = sum(budget.try_retry() for _ in range(10))
    assert granted == 2  # 10 / 5 of the reserve
    alone = RetryBudget(ratio=0.0, min_retries=10, burst=10)
    assert sum(alone.try_retry() for _ in range(10)) == 10
