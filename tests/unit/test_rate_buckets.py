"""Token-bucket rate limits: the arithmetic and one process's buckets (state/buckets.py)."""

from __future__ import annotations

import math

import pytest

from spillway.server.responses import duration, quota_headers
from spillway.state.buckets import KeyLimits, LocalBuckets, decide, full_in_s, refill, wait_ms


def test_refill_is_continuous_and_capped() -> None:
    assert refill(0, 60, 1_000) == pytest.approx(1.0)  # 60 a minute: 1 a second
    assert refill(59.5, 60, 10_000) == 60.0
    assert refill(-5, 60, 2_000) == pytest.approx(-3.0)  # a debt is paid back by refilling
    assert refill(10, 60, -500) == 10  # a clock that stepped back refills nothing


def test_waits_and_resets() -> None:
    assert wait_ms(0.5, 1, 30) == pytest.approx(1_000)  # half a request at 30/min: 1 s
    assert wait_ms(3, 1, 30) == 0
    assert full_in_s(0, 30) == pytest.approx(60)
    assert full_in_s(30, 30) == 0


def test_rpm_admits_its_limit_at_once_then_one_per_refill() -> None:
    buckets, limits = LocalBuckets(), KeyLimits(rpm=3)
    now = 0.0
    admitted = [buckets.admit("k", limits, 0, now).admitted for _ in range(5)]
    assert admitted == [True, True, True, False, False]
    refused = buckets.admit("k", limits, 0, now)
    assert refused.limit == "requests" and refused.retry_ms == pytest.approx(20_000)
    assert not buckets.admit("k", limits, 0, now + 19_000).admitted
    assert buckets.admit("k", limits, 0, now + 20_000).admitted


def test_a_refusal_takes_nothing() -> None:
    """Only an admitted request counts: a client hammering a full key does not push its
    own wait further out."""
    buckets, limits = LocalBuckets(), KeyLimits(rpm=1)
    assert buckets.admit("k", limits, 0, 0).admitted
    for _ in range(100):
        buckets.admit("k", limits, 0, 30_000)
    assert buckets.admit("k", limits, 0, 60_000).admitted


def test_tpm_reserves_the_estimate_and_settles_on_real_usage() -> None:
    buckets, limits = LocalBuckets(), KeyLimits(tpm=1_000)
    first = buckets.admit("k", limits, 600, 0)
    assert first.admitted and first.quota.remaining_tokens == 400
    second = buckets.admit("k", limits, 600, 0)
    assert not second.admitted and second.limit == "tokens"
    assert second.retry_ms == pytest.approx(200 * 60)  # 200 tokens short, 1,000/min
    buckets.settle("k", limits, 600 - 50, 0)  # it used 50 of the 600 it was counted for
    assert buckets.admit("k", limits, 600, 0).admitted


def test_usage_over_the_estimate_is_a_debt_later_requests_wait_for() -> None:
    buckets, limits = LocalBuckets(), KeyLimits(tpm=1_000)
    assert buckets.admit("k", limits, 100, 0).admitted
    buckets.settle("k", limits, 100 - 1_500, 0)  # it used 1,500: the bucket is at -500
    refused = buckets.admit("k", limits, 100, 0)
    assert not refused.admitted and refused.retry_ms == pytest.approx(600 * 60)


def test_a_request_larger_than_the_whole_tpm_can_never_go() -> None:
    verdict = LocalBuckets().admit("k", KeyLimits(tpm=1_000), 1_001, 0)
    assert not verdict.admitted and verdict.limit == "tokens" and math.isinf(verdict.retry_ms)


def test_max_parallel_counts_requests_in_flight() -> None:
    buckets, limits = LocalBuckets(), KeyLimits(max_parallel=2)
    assert buckets.admit("k", limits, 0, 0).admitted
    assert buckets.admit("k", limits, 0, 0).admitted
    refused = buckets.admit("k", limits, 0, 0)
    assert not refused.admitted and refused.limit == "parallel"
    buckets.release("k")
    assert buckets.admit("k", limits, 0, 0).admitted
    assert buckets.in_flight("k") == 2
    assert buckets.admit("other", limits, 0, 0).admitted  # keys are counted apart


def test_the_longest_wait_names_the_limit() -> None:
    limits = KeyLimits(rpm=60, tpm=600)
    verdict = decide(limits, requests=0.5, tokens_level=0, tokens=300, in_flight=0)
    assert verdict.limit == "tokens" and verdict.retry_ms == pytest.approx(30_000)
    verdict = decide(limits, requests=0, tokens_level=600, tokens=300, in_flight=0)
    assert verdict.limit == "requests" and verdict.retry_ms == pytest.approx(1_000)


def test_quota_after_admission() -> None:
    verdict = LocalBuckets().admit("k", KeyLimits(rpm=30, tpm=1_000), 250, 0)
    quota = verdict.quota
    assert (quota.limit_requests, quota.remaining_requests) == (30, 29)
    assert quota.reset_requests_s == pytest.approx(2.0)
    assert (quota.limit_tokens, quota.remaining_tokens) == (1_000, 750)
    assert quota.reset_tokens_s == pytest.approx(15.0)


@pytest.mark.parametrize(
    ("parts", "expected"),
    [(1, KeyLimits(30, 1000, 4)), (3, KeyLimits(10, 333, 1)), (8, KeyLimits(3, 125, 1))],
)
def test_a_share_divides_each_limit_and_keeps_at_least_one(parts: int, expected: KeyLimits) -> None:
    assert KeyLimits(30, 1000, 4).share(parts) == expected
    assert KeyLimits(rpm=5).share(3) == KeyLimits(rpm=1)


def test_openai_header_rendering() -> None:
    quota = LocalBuckets().admit("k", KeyLimits(rpm=30, tpm=10_000), 400, 0).quota
    assert quota_headers(quota) == {
        "x-ratelimit-limit-requests": "30",
        "x-ratelimit-remaining-requests": "29",
        "x-ratelimit-reset-requests": "2s",
        "x-ratelimit-limit-tokens": "10000",
        "x-ratelimit-remaining-tokens": "9600",
        "x-ratelimit-reset-tokens": "2.4s",
    }
    only_tokens = LocalBuckets().admit("k", KeyLimits(tpm=100), 1, 0).quota
    assert set(quota_headers(only_tokens)) == {
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
    }
    assert [duration(s) for s in (0.0201, 1.5, 59.9984, 360, 61.25)] == [
        "21ms",
        "1.5s",
        "59.999s",
        "6m0s",
        "1m1.25s",
    ]
