"""What only RedisCacheStore does, against a real redis-server (tests/redis_server.py); no
mocks: TTLs, namespaces, names with colons, outages and pauses, never showing a password. The
``CacheStore`` contract itself is in test_cache_store_contract.py.

Tests share one server per module, each in its own namespace; the outage tests get their own.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis

from spillway.cache.keys import tag
from spillway.cache.redis_store import RedisCacheStore
from spillway.cache.stores import Entry, ScopeStats
from spillway.clock import ManualClock
from spillway.secrets import redacted_url
from tests.cache_helpers import answer_entry as entry
from tests.redis_server import RedisServer, redis_server

PASSWORD = "hunter2-very-secret"


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with redis_server() as s:
        yield s


@pytest.fixture
def own_server() -> Iterator[RedisServer]:
    with redis_server() as s:
        yield s


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def store(
    server: RedisServer, clock: ManualClock, namespace: str
) -> AsyncIterator[RedisCacheStore]:
    s = RedisCacheStore(server.url, clock, namespace=namespace)
    await s.open()
    yield s
    await s.aclose()


@pytest.fixture
async def raw(server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(server.url)
    yield client
    await client.aclose()


async def test_ttl_follows_expires_at(
    store: RedisCacheStore, clock: ManualClock, raw: Redis, namespace: str
) -> None:
    await store.set(Entry("k", "t1", "m1", b"v", expires_at=clock.wall() + 90.5))
    pttl = await raw.pttl(f"{namespace}:cache:e:k")
    assert 89_000 < pttl <= 90_500


async def test_clear_never_touches_another_namespace(
    store: RedisCacheStore, clock: ManualClock, server: RedisServer
) -> None:
    neighbour = RedisCacheStore(server.url, clock, namespace="other")
    await neighbour.set(entry("theirs", clock))
    for tenant in ("t1", "t2"):
        await store.set(entry(f"{tenant}/m1", clock, tenant=tenant))
    assert await store.clear(tenant="t1") == 1
    assert await store.clear() == 1
    assert await store.stats() == []
    assert await neighbour.get("theirs") == b"v"
    await neighbour.clear()
    await neighbour.aclose()


async def test_stats_by_name_even_with_colons(store: RedisCacheStore, clock: ManualClock) -> None:
    for i in range(1_200):  # more than one SCAN batch
        await store.set(entry(f"k{i}", clock, b"12345", model="org/model:7b-q4"))
    await store.set(entry("x", clock, b"123", tenant="t:2"))
    for _ in range(3):
        await store.get("k1")
    await store.get("x")
    assert await store.stats() == [
        ScopeStats("t1", "org/model:7b-q4", entries=1_200, bytes=6_000, hits=3),
        ScopeStats("t:2", "m1", entries=1, bytes=3, hits=1),
    ]


async def test_an_outage_fails_fast_and_recovery_needs_nothing(
    own_server: RedisServer, clock: ManualClock
) -> None:
    store = RedisCacheStore(own_server.url, clock, timeout_s=0.25)
    await store.open()
    await store.set(entry("k", clock))
    own_server.stop()
    for call in (store.get("k"), store.set(entry("k", clock)), store.stats()):
        started = time.monotonic()
        with pytest.raises(ConnectionError, match=r"redis cache at redis://127\.0\.0\.1"):
            await call
        assert time.monotonic() - started < 1.0
    own_server.start()  # empty again: no persistence
    await store.set(entry("k", clock, b"back"))
    assert await store.get("k") == b"back"
    await store.aclose()


async def test_a_hung_server_times_out(own_server: RedisServer, clock: ManualClock) -> None:
    store = RedisCacheStore(own_server.url, clock, timeout_s=0.2)
    await store.open()
    own_server.pause()
    try:
        for call in (store.get("k"), store.set(entry("k", clock)), store.open()):
            started = time.monotonic()
            with pytest.raises(ConnectionError, match=r"timed out|Timeout"):
                await call
            assert time.monotonic() - started < 1.0
    finally:
        own_server.resume()
    assert await store.get("k") is None
    await store.aclose()


async def test_a_server_that_is_down_at_start_fails_fast(clock: ManualClock) -> None:
    with redis_server() as gone:
        url = gone.url
    store = RedisCacheStore(url, clock)
    started = time.monotonic()
    with pytest.raises(ConnectionError):
        await store.open()
    assert time.monotonic() - started < 1.0
    await store.aclose()


async def test_the_password_never_shows(clock: ManualClock) -> None:
    with redis_server(password=PASSWORD) as secured:
        good = RedisCacheStore(secured.url, clock)
        await good.open()
        await good.aclose()
        wrong = f"redis://:{PASSWORD}x@{secured.host}:{secured.port}/0"
        for url in (wrong, f"redis://:{PASSWORD}@127.0.0.1:1/0"):
            store = RedisCacheStore(url, clock)
            with pytest.raises(ConnectionError) as caught:
                await store.open()
            assert PASSWORD not in str(caught.value)
            assert caught.value.__cause__ is None and caught.value.__suppress_context__
            assert ":***@" in str(caught.value)
            await store.aclose()


def test_redacted_url_and_tags() -> None:
    assert redacted_url("redis://user:pw@h:1/0") == "redis://user:***@h:1/0"
    assert redacted_url("redis://h:1/0") == "redis://h:1/0"
    assert len(tag("org/model:7b")) == 16 and tag("a") != tag("b")


def test_a_namespace_with_glob_characters_is_refused(clock: ManualClock) -> None:
    with pytest.raises(ValueError, match="namespace"):
        RedisCacheStore("redis://127.0.0.1:1/0", clock, namespace="a*")
