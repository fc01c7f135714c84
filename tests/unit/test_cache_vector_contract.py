"""The ``VectorIndex`` contract, run against every backend: NumpyIndex (its SQLite file in
tmp_path) and PgVectorIndex (a real PostgreSQL 18 with pgvector 0.8, tests/pg.py, one server
per module, a table per test). Time is a ManualClock. What only one backend does is tested in
test_cache_numpy_index.py and test_cache_pgvector.py."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from spillway.cache.numpy_index import FILENAME, NumpyIndex
from spillway.cache.pgvector_index import PgVectorIndex
from spillway.cache.vectors import VectorIndex
from spillway.clock import ManualClock
from tests.cache_helpers import DIM, opening, unit
from tests.cache_helpers import nearest_keys as keys
from tests.cache_helpers import vector_entry as entry
from tests.pg import PgServer

Opener = Callable[[], Coroutine[Any, Any, VectorIndex]]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture(params=["numpy", "pgvector"])
def make_index(
    request: pytest.FixtureRequest, tmp_path: Path, clock: ManualClock
) -> Callable[[], VectorIndex]:
    """A factory of indexes over one backing (file or table): each call is another instance."""
    if request.param == "numpy":
        path = tmp_path / "data" / FILENAME
        return lambda: NumpyIndex(path, clock, DIM, 1000, refresh_s=1.0)
    server: PgServer = request.getfixturevalue("pg_server")  # started only for pgvector
    table = f"t_{uuid.uuid4().hex[:10]}"
    return lambda: PgVectorIndex(server.url(), clock, DIM, table=table)


@pytest.fixture
async def opener(make_index: Callable[[], VectorIndex]) -> AsyncIterator[Opener]:
    async with opening(make_index) as open_index:
        yield open_index


@pytest.fixture
async def index(opener: Opener) -> VectorIndex:
    return await opener()


async def test_search_returns_nearest_first(index: VectorIndex, clock: ManualClock) -> None:
    await index.add(entry("far", unit(0.0, 1.0), clock))
    await index.add(entry("near", unit(1.0, 0.1), clock))
    await index.add(entry("mid", unit(1.0, 1.0), clock))
    found = await index.search("s1", unit(1.0), 2)
    assert [n.key for n in found] == ["near", "mid"]
    assert found[0].text == "text of near"
    assert found[0].similarity == pytest.approx(1 / np.sqrt(1.01), abs=1e-6)
    assert found[1].similarity == pytest.approx(np.sqrt(0.5), abs=1e-6)
    assert found[0].vector.dtype == np.float32 and found[0].vector.shape == (DIM,)
    np.testing.assert_array_equal(found[0].vector, unit(1.0, 0.1))  # exact, even through text


async def test_scopes_are_isolated(index: VectorIndex, clock: ManualClock) -> None:
    await index.add(entry("a", unit(1.0), clock, scope="s1"))
    await index.add(entry("b", unit(1.0), clock, scope="s2"))
    assert await keys(index, "s1") == ["a"]
    assert await keys(index, "s2") == ["b"]
    assert await keys(index, "nowhere") == []


async def test_expired_entries_are_skipped(index: VectorIndex, clock: ManualClock) -> None:
    await index.add(entry("short", unit(1.0), clock, ttl=10))
    await index.add(entry("long", unit(0.5, 1.0), clock, ttl=100))
    assert await keys(index) == ["short", "long"]
    assert await index.count() == 2
    clock.advance(10)
    assert await keys(index) == ["long"]
    assert await index.count() == 1
    clock.advance(100)
    assert await keys(index) == []
    assert await index.count() == 0


async def test_add_replaces_by_key(index: VectorIndex, clock: ManualClock) -> None:
    await index.add(entry("k", unit(0.0, 1.0), clock, scope="s1"))
    await index.add(entry("k", unit(1.0), clock, scope="s2"))
    assert await keys(index, "s1") == []
    [found] = await index.search("s2", unit(1.0), 5)
    assert found.similarity == pytest.approx(1.0)
    assert await index.count() == 1


async def test_clear_by_tenant_model_or_all(index: VectorIndex, clock: ManualClock) -> None:
    for tenant in ("t1", "t2"):
        for model in ("m1", "m2"):
            await index.add(
                entry(f"{tenant}/{model}", unit(1.0), clock, tenant=tenant, model=model)
            )
    assert await index.clear(tenant="t1", model="m2") == 1
    assert await index.clear(model="m1") == 2
    assert await keys(index) == ["t2/m2"]
    assert await index.clear() == 1
    assert await index.count() == 0


async def test_survives_reopen(opener: Opener, clock: ManualClock) -> None:
    first = await opener()
    v = unit(0.3, 0.7, 0.1)
    await first.add(entry("k", v, clock))
    await first.add(entry("old", unit(1.0), clock, ttl=5))
    await first.aclose()
    clock.advance(6)
    second = await opener()
    [found] = await second.search("s1", v, 5)
    assert found.key == "k" and found.text == "text of k"
    np.testing.assert_array_equal(found.vector, v)
    assert await second.count() == 1


async def test_wrong_dimension_is_refused(index: VectorIndex, clock: ManualClock) -> None:
    with pytest.raises(ValueError, match="shape"):
        await index.add(entry("k", unit(1.0, dim=DIM + 1), clock))
    with pytest.raises(ValueError, match="shape"):
        await index.search("s1", unit(1.0, dim=DIM - 1), 1)
