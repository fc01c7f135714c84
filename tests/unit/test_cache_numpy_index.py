"""What only NumpyIndex does (its SQLite file in tmp_path; time is a ManualClock, nothing
sleeps): the entry cap, refreshes from other processes, off-loop searches, purging the file.
The ``VectorIndex`` contract itself is in test_cache_vector_contract.py."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from spillway.cache.numpy_index import FILENAME, OFFLOAD_FLOATS, NumpyIndex
from spillway.clock import ManualClock
from tests.cache_helpers import DIM, opening, unit
from tests.cache_helpers import nearest_keys as keys
from tests.cache_helpers import vector_entry as entry

Opener = Callable[..., Coroutine[Any, Any, NumpyIndex]]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def opener(tmp_path: Path, clock: ManualClock) -> AsyncIterator[Opener]:
    def make(dim: int = DIM, max_entries: int = 1000) -> NumpyIndex:
        return NumpyIndex(tmp_path / "data" / FILENAME, clock, dim, max_entries, refresh_s=1.0)

    async with opening(make) as open_index:
        yield open_index


@pytest.fixture
async def index(opener: Opener) -> NumpyIndex:
    return await opener()


async def test_oldest_insertions_are_evicted(opener: Opener, clock: ManualClock) -> None:
    index = await opener(max_entries=3)
    for k in "abc":
        await index.add(entry(k, unit(1.0), clock))
    await index.add(entry("a", unit(1.0), clock))  # replaced: now the newest
    await index.add(entry("d", unit(1.0), clock))
    assert sorted(await keys(index)) == ["a", "c", "d"]
    again = await opener(max_entries=3)  # evicted rows left the file too
    assert sorted(await keys(again)) == ["a", "c", "d"]


async def test_another_process_sees_adds_and_clears_after_refresh(
    opener: Opener, clock: ManualClock
) -> None:
    one, two = await asyncio.gather(opener(), opener())
    await one.add(entry("a", unit(1.0), clock))
    assert await keys(two) == []  # not yet: refreshes at most every refresh_s
    clock.advance(1.0)
    assert await keys(two) == ["a"]
    await one.add(entry("a", unit(0.0, 1.0), clock, scope="s2"))  # a replacement moves it
    await one.add(entry("b", unit(1.0), clock, tenant="t2"))
    clock.advance(1.0)
    assert await keys(two) == ["b"]
    assert await keys(two, "s2") == ["a"]
    assert await two.clear(tenant="t2") == 1
    await two.add(entry("c", unit(1.0), clock, tenant="t2"))  # after the clear: stays
    clock.advance(1.0)
    assert await keys(one) == ["c"]
    assert await one.count() == 2


async def test_large_scope_searched_off_loop_matches_brute_force(
    opener: Opener, clock: ManualClock
) -> None:
    dim = 512
    n = OFFLOAD_FLOATS // dim + 100
    index = await opener(dim=dim, max_entries=n)
    rng = np.random.default_rng(3)
    matrix = rng.standard_normal((n, dim)).astype(np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    for i in range(n):
        ttl = 5 if i % 3 == 0 else 3600  # a third will have expired
        await index.add(entry(f"k{i}", matrix[i], clock, ttl=ttl))
    clock.advance(10)
    query = matrix[7] * 0.6 + matrix[8] * 0.4
    query /= np.linalg.norm(query)
    sims = matrix @ query
    sims[::3] = -np.inf
    expected = [f"k{i}" for i in np.argsort(-sims)[:5]]
    searches = [index.search("s1", query, 5) for _ in range(3)]
    late = index.add(entry("k0", matrix[0], clock))  # changes the scope mid-search
    *found, _ = await asyncio.gather(*searches, late)
    for result in found:
        assert [nb.key for nb in result] == expected
        assert [nb.similarity for nb in result] == pytest.approx(sorted(sims, reverse=True)[:5])


async def test_expired_rows_are_purged_from_the_file(
    tmp_path: Path, index: NumpyIndex, clock: ManualClock
) -> None:
    await index.add(entry("old", unit(1.0), clock, ttl=5))
    clock.advance(61)  # past the purge interval
    await index.add(entry("new", unit(1.0), clock))
    with sqlite3.connect(tmp_path / "data" / FILENAME) as db:
        assert db.execute("SELECT key FROM vectors").fetchall() == [("new",)]
