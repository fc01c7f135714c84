"""Fleet-wide rate limits in a real Redis (state/limits.py, state/redis.py): several limiters,
as several replicas would hold them, share one key's limits; leases free the places of a
replica that stopped renewing them; an unreachable Redis costs one bounded call, then the
local share."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest

from spillway.clock import SystemClock
from spillway.state import redis as state_redis
from spillway.state.buckets import KeyLimits
from spillway.state.leases import Leases
from spillway.state.limits import Permit, RateLimited, RateLimiter
from spillway.state.redis import SharedState
from tests.redis_server import RedisServer, redis_server

PASSWORD = "state-secret-5f2c9a"


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with redis_server() as s:
        yield s


@pytest.fixture
def own_server() -> Iterator[RedisServer]:
    with redis_server(password=PASSWORD) as s:
        yield s


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


@dataclass
class Replica:
    """What one replica holds: its connection, its leases, its limiter."""

    shared: SharedState
    leases: Leases
    limiter: RateLimiter

    async def admit(self, key: str, limits: KeyLimits, tokens: int, permit_id: str) -> Permit:
        return await self.limiter.admit(key, limits, tokens, permit_id)


async def replica(url: str, namespace: str, lease_s: float = 15.0) -> Replica:
    shared = SharedState(url, SystemClock(), timeout_s=0.25, namespace=namespace)
    await shared.open()
    leases = Leases(shared, SystemClock(), lease_s)
    return Replica(shared, leases, RateLimiter(SystemClock(), shared, leases))


async def close(*replicas: Replica) -> None:
    for r in replicas:
        await r.leases.aclose()
        await r.shared.aclose()


@pytest.fixture
async def pair(server: RedisServer, namespace: str) -> AsyncIterator[list[Replica]]:
    limiters = [await replica(server.url, namespace) for _ in range(2)]
    yield limiters
    await close(*limiters)


async def admits(limiter: Replica, limits: KeyLimits, tokens: int = 0) -> Permit | None:
    try:
        return await limiter.admit("key", limits, tokens, uuid.uuid4().hex)
    except RateLimited:
        return None


async def test_replicas_share_one_requests_bucket(pair: list[Replica]) -> None:
    a, b = pair
    limits = KeyLimits(rpm=5)
    got = [await admits(a, limits) for _ in range(3)] + [await admits(b, limits) for _ in range(4)]
    assert [p is not None for p in got] == [True] * 5 + [False] * 2
    with pytest.raises(RateLimited) as refused:
        await a.admit("key", limits, 0, "x")
    assert refused.value.refusal.limit == "requests"
    assert refused.value.refusal.retry_after_s == pytest.approx(12, abs=0.5)  # 1 of 5/min
    assert got[4] is not None and got[4].quota.remaining_requests == 0


async def test_tokens_settle_across_replicas(pair: list[Replica]) -> None:
    a, b = pair
    limits = KeyLimits(tpm=1_000)
    first = await admits(a, limits, 800)
    assert first is not None and first.quota.remaining_tokens == 200
    assert await admits(b, limits, 300) is None
    first.settle(100)  # it used 100 of its 800: 700 back
    await a.leases.aclose()  # waits for the settle in flight
    second = await admits(b, limits, 300)
    assert second is not None and 590 <= second.quota.remaining_tokens <= 610


async def test_a_request_over_the_whole_tpm_is_refused_for_good(pair: list[Replica]) -> None:
    with pytest.raises(RateLimited) as refused:
        await pair[0].admit("key", KeyLimits(tpm=100), 101, "x")
    assert refused.value.refusal.retry_after_s is None


async def test_parallel_places_are_leases_that_end_unless_renewed(
    server: RedisServer, namespace: str
) -> None:
    """A replica that stops renewing (killed) frees its places within the lease."""
    a = await replica(server.url, namespace, lease_s=1.0)  # never started: never renews
    b = await replica(server.url, namespace, lease_s=1.0)
    limits = KeyLimits(max_parallel=2)
    try:
        assert await admits(a, limits) is not None and await admits(a, limits) is not None
        with pytest.raises(RateLimited) as refused:
            await b.admit("key", limits, 0, "x")
        assert refused.value.refusal.limit == "parallel"
        await asyncio.sleep(1.2)
        assert await admits(b, limits) is not None
    finally:
        await close(a, b)


async def test_a_live_replica_keeps_its_leases_and_settling_frees_them(
    server: RedisServer, namespace: str
) -> None:
    a = await replica(server.url, namespace, lease_s=1.0)
    b = await replica(server.url, namespace, lease_s=1.0)
    a.leases.start()
    limits = KeyLimits(max_parallel=1)
    try:
        held = await admits(a, limits)
        assert held is not None
        await asyncio.sleep(1.6)  # past the lease: renewed meanwhile
        assert await admits(b, limits) is None
        held.settle(0)
        await asyncio.sleep(0.2)
        assert await admits(b, limits) is not None
    finally:
        await close(a, b)


async def test_a_paused_redis_costs_one_bounded_call_then_the_local_share(
    own_server: RedisServer, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "spillway.state")
    a, b, c = [await replica(own_server.url, namespace) for _ in range(3)]
    shared = a.shared
    limits = KeyLimits(rpm=30)
    try:
        await shared._beat()
        assert shared.replicas == 3
        own_server.pause()
        started = time.monotonic()
        first = await admits(a, limits)
        assert time.monotonic() - started < 0.5  # the 250 ms timeout, then the fallback
        assert first is not None and shared.degraded
        started = time.monotonic()
        results = [await admits(a, limits) for _ in range(30)]
        assert time.monotonic() - started < 0.2  # no call waits on Redis any more
        assert sum(p is not None for p in results) == 10 - 1  # the share is 30 / 3
        assert results[-1] is None
        own_server.resume()
        await asyncio.sleep(state_redis.RETRY_S + 0.1)
        assert await admits(a, KeyLimits(rpm=1_000)) is not None
        assert not shared.degraded
    finally:
        own_server.resume()
        await close(a, b, c)
    messages = [r.getMessage() for r in caplog.records]
    outages = sum("unreachable" in m for m in messages)  # once per replica that saw it
    assert outages >= 1 and sum("answers again after" in m for m in messages) == outages
    assert not any(PASSWORD in m for m in messages)
