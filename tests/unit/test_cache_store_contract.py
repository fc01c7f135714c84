"""The ``CacheStore`` contract, run against every backend: SqliteCacheStore (a real file in
tmp_path) and RedisCacheStore (a real redis-server, tests/redis_server.py, one per module, a
namespace per test). Time is a ManualClock; Redis expires by its own clock, so expiry with a
ManualClock is tested only for SQLite. What only one backend does is tested in
test_cache_sqlite_store.py and test_cache_redis_store.py."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from spillway.cache.redis_store import RedisCacheStore
from spillway.cache.sqlite_store import FILENAME, SqliteCacheStore
from spillway.cache.stores import CacheStore, Entry, ScopeStats
from spillway.clock import ManualClock
from tests.cache_helpers import answer_entry as entry
from tests.cache_helpers import opening
from tests.redis_server import RedisServer, redis_server

Opener = Callable[[], Coroutine[Any, Any, CacheStore]]


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as s:
        yield s


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture(params=["sqlite", "redis"])
def make_store(
    request: pytest.FixtureRequest, tmp_path: Path, clock: ManualClock
) -> Callable[[], CacheStore]:
    """A factory of stores over one backing (file or namespace): each call is another one."""
    if request.param == "sqlite":
        path = tmp_path / "data" / FILENAME
        return lambda: SqliteCacheStore(path, clock, 1000, 1 << 20)
    server: RedisServer = request.getfixturevalue("redis")  # started only for redis
    namespace = f"t{uuid.uuid4().hex[:8]}"
    return lambda: RedisCacheStore(server.url, clock, namespace=namespace)


@pytest.fixture
async def opener(make_store: Callable[[], CacheStore]) -> AsyncIterator[Opener]:
    async with opening(make_store) as open_store:
        yield open_store


@pytest.fixture
async def store(opener: Opener) -> CacheStore:
    return await opener()


async def test_set_then_get_round_trips_bytes(store: CacheStore, clock: ManualClock) -> None:
    await store.set(entry("k", clock, b"\x00answer\xff"))
    assert await store.get("k") == b"\x00answer\xff"
    assert await store.get("other") is None


async def test_set_replaces_and_restarts_hits(store: CacheStore, clock: ManualClock) -> None:
    await store.set(entry("k", clock, b"old"))
    await store.get("k")
    await store.set(entry("k", clock, b"new!", model="m2"))
    assert await store.get("k") == b"new!"
    assert await store.stats() == [ScopeStats("t1", "m2", 1, 4, 1)]


async def test_an_entry_born_expired_is_not_stored(store: CacheStore, clock: ManualClock) -> None:
    await store.set(entry("k", clock, b"old"))
    await store.set(Entry("k", "t1", "m1", b"new", expires_at=clock.wall() - 1))
    assert await store.get("k") is None


async def test_clear_by_tenant_model_or_all(store: CacheStore, clock: ManualClock) -> None:
    for tenant in ("t1", "t2"):
        for model in ("m1", "m2"):
            await store.set(entry(f"{tenant}/{model}", clock, tenant=tenant, model=model))
    assert await store.clear(tenant="t1", model="m2") == 1
    assert await store.clear(model="m1") == 2
    assert [(s.tenant, s.model) for s in await store.stats()] == [("t2", "m2")]
    assert await store.clear(tenant="nobody") == 0
    assert await store.clear() == 1
    assert await store.stats() == []


async def test_stats_count_entries_bytes_and_hits(store: CacheStore, clock: ManualClock) -> None:
    await store.set(entry("a", clock, b"12345"))
    await store.set(entry("b", clock, b"123", model="m2"))
    for _ in range(3):
        await store.get("a")
    await store.get("b")
    await store.get("missing")
    assert await store.stats() == [
        ScopeStats("t1", "m1", entries=1, bytes=5, hits=3),
        ScopeStats("t1", "m2", entries=1, bytes=3, hits=1),
    ]


async def test_two_instances_share_entries(opener: Opener, clock: ManualClock) -> None:
    one, two = await opener(), await opener()
    await one.set(entry("k", clock, b"shared"))
    assert await two.get("k") == b"shared"
    await two.clear()
    assert await one.get("k") is None
