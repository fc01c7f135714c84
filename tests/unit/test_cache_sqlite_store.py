"""What only SqliteCacheStore does, on a real file in tmp_path (time is a ManualClock, nothing
sleeps): expiry by the clock, LRU and size caps, sharing and reopening a file, batched hits,
purging. The ``CacheStore`` contract itself is in test_cache_store_contract.py."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from spillway.cache.sqlite_store import FILENAME, SqliteCacheStore
from spillway.cache.stores import Entry, ScopeStats
from spillway.clock import ManualClock
from tests.cache_helpers import answer_entry as entry
from tests.cache_helpers import opening

Opener = Callable[..., Coroutine[Any, Any, SqliteCacheStore]]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def opener(tmp_path: Path, clock: ManualClock) -> AsyncIterator[Opener]:
    def make(max_entries: int = 1000, max_bytes: int = 1 << 20) -> SqliteCacheStore:
        return SqliteCacheStore(tmp_path / "data" / FILENAME, clock, max_entries, max_bytes)

    async with opening(make) as open_store:
        yield open_store


@pytest.fixture
async def store(opener: Opener) -> SqliteCacheStore:
    return await opener()


async def keys(store: SqliteCacheStore, names: str) -> str:
    """Which of the one-letter keys in ``names`` are still there."""
    return "".join([k for k in names if await store.get(k) is not None])


async def test_expired_entries_are_misses(store: SqliteCacheStore, clock: ManualClock) -> None:
    await store.set(Entry("k", "t1", "m1", b"v", expires_at=clock.wall() + 10))
    clock.advance(9.9)
    assert await store.get("k") == b"v"
    clock.advance(0.1)
    assert await store.get("k") is None
    assert await store.stats() == []


async def test_stats_count_only_live_entries(store: SqliteCacheStore, clock: ManualClock) -> None:
    await store.set(entry("a", clock, b"12345"))
    await store.set(Entry("c", "t1", "m1", b"gone", expires_at=clock.wall() + 1))
    await store.get("a")
    clock.advance(2)
    assert await store.stats() == [ScopeStats("t1", "m1", entries=1, bytes=5, hits=1)]


async def test_count_cap_evicts_least_recently_used(opener: Opener, clock: ManualClock) -> None:
    store = await opener(max_entries=3)
    for k in "abc":
        await store.set(entry(k, clock))
        clock.advance(1)
    assert await store.get("a") == b"v"  # a is now the most recently used
    clock.advance(1)
    await store.set(entry("d", clock))
    assert await keys(store, "abcd") == "acd"


async def test_byte_cap_evicts_until_it_holds(opener: Opener, clock: ManualClock) -> None:
    store = await opener(max_bytes=100)
    for k in "abc":
        await store.set(entry(k, clock, b"x" * 30))
        clock.advance(1)
    await store.set(entry("d", clock, b"x" * 70))  # 160 bytes: a and b must go
    assert await keys(store, "abcd") == "cd"
    assert sum(s.bytes for s in await store.stats()) == 100


async def test_entry_larger_than_the_cap_is_not_stored(opener: Opener, clock: ManualClock) -> None:
    store = await opener(max_bytes=10)
    await store.set(entry("k", clock, b"small"))
    await store.set(entry("k", clock, b"x" * 11))
    assert await store.get("k") is None


async def test_expired_rows_go_before_live_ones(opener: Opener, clock: ManualClock) -> None:
    store = await opener(max_entries=2)
    await store.set(entry("a", clock))
    clock.advance(1)
    await store.set(Entry("b", "t1", "m1", b"v", expires_at=clock.wall() + 5))
    clock.advance(10)
    await store.set(entry("c", clock))  # b has expired: it goes, not the older a
    assert await keys(store, "abc") == "ac"


async def test_caps_hold_after_every_set(opener: Opener, clock: ManualClock) -> None:
    rng = random.Random(7)
    store = await opener(max_entries=20, max_bytes=2_000)
    for i in range(300):
        await store.set(entry(f"k{rng.randrange(60)}", clock, b"x" * rng.randrange(1, 400)))
        if rng.random() < 0.3:
            await store.get(f"k{rng.randrange(60)}")
        clock.advance(rng.random())
        stats = await store.stats()
        assert sum(s.entries for s in stats) <= 20, i
        assert sum(s.bytes for s in stats) <= 2_000, i


async def test_survives_reopen_with_hits(
    tmp_path: Path, opener: Opener, clock: ManualClock
) -> None:
    store = await opener()
    await store.set(entry("k", clock, b"kept"))
    await store.get("k")
    await store.aclose()  # flushes the pending hit
    again = await opener()
    assert await again.get("k") == b"kept"
    assert (await again.stats())[0].hits == 2


async def test_two_instances_share_one_file(opener: Opener, clock: ManualClock) -> None:
    one, two = await asyncio.gather(opener(max_entries=3), opener(max_entries=3))
    for k in "abc":
        await one.set(entry(k, clock))
        clock.advance(1)
    assert await two.get("a") == b"v"
    await two.aclose()  # its hit on a reaches the file, so a is recent for `one` too
    clock.advance(1)
    await one.set(entry("d", clock))
    assert await keys(one, "abcd") == "acd"


async def test_file_is_in_wal_mode(tmp_path: Path, store: SqliteCacheStore) -> None:
    with sqlite3.connect(tmp_path / "data" / FILENAME) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_hits_are_flushed_in_batches(store: SqliteCacheStore, clock: ManualClock) -> None:
    await store.set(entry("k", clock))
    for _ in range(300):  # past the batch size: some were written without a stats call
        await store.get("k")
    assert (await store.stats())[0].hits == 300


async def test_expired_rows_are_purged_from_the_file(
    tmp_path: Path, store: SqliteCacheStore, clock: ManualClock
) -> None:
    await store.set(Entry("old", "t1", "m1", b"v", expires_at=clock.wall() + 5))
    clock.advance(61)  # past the purge interval
    await store.set(entry("new", clock))
    with sqlite3.connect(tmp_path / "data" / FILENAME) as db:
        assert db.execute("SELECT key FROM cache_entries").fetchall() == [("new",)]
        assert db.execute("SELECT entries, bytes FROM cache_totals").fetchone() == (1, 1)
