"""What only PgVectorIndex does, against a real PostgreSQL 18 with pgvector 0.8 (tests/pg.py);
no mocks: HNSW iterative scans and custom plans, DSNs, outages, and never showing a password.
The ``VectorIndex`` contract itself is in test_cache_vector_contract.py.

One server per module; each test gets its own table in the ``postgres`` database.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import numpy as np
import pytest

from spillway.cache.pgvector_index import PgVectorIndex, from_text, to_text
from spillway.clock import ManualClock
from spillway.secrets import redacted_url as redacted_dsn
from tests.cache_helpers import DIM, needs_postgres, opening, unit
from tests.cache_helpers import nearest_keys as keys
from tests.cache_helpers import vector_entry as entry
from tests.pg import PgServer, postgres

PASSWORD = "hunter2-very-secret"
Opener = Callable[..., Coroutine[Any, Any, PgVectorIndex]]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def table() -> str:
    return f"t_{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def opener(pg_server: PgServer, clock: ManualClock, table: str) -> AsyncIterator[Opener]:
    def make(dim: int = DIM, dsn: str | None = None) -> PgVectorIndex:
        return PgVectorIndex(dsn or pg_server.url(), clock, dim, table=table)

    async with opening(make) as open_index:
        yield open_index


@pytest.fixture
async def index(opener: Opener) -> PgVectorIndex:
    return await opener()


async def test_a_small_scope_still_yields_k_rows(index: PgVectorIndex, clock: ManualClock) -> None:
    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((1_000, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    adds = [
        entry(f"k{i}", v, clock, "small" if i % 50 == 0 else "big") for i, v in enumerate(vectors)
    ]
    for start in range(0, len(adds), 4):  # as many at once as the pool has connections
        await asyncio.gather(*(index.add(e) for e in adds[start : start + 4]))
    found = await index.search("small", vectors[1], 10)
    assert len(found) == 10 and all(int(n.key[1:]) % 50 == 0 for n in found)
    sims = [n.similarity for n in found]
    assert sims == sorted(sims, reverse=True)


async def test_connections_use_iterative_scans_and_custom_plans(index: PgVectorIndex) -> None:
    for _ in range(2):  # survives the pool's RESET ALL on release
        async with index._pool.acquire() as conn:
            assert await conn.fetchval("SHOW hnsw.iterative_scan") == "relaxed_order"
            assert await conn.fetchval("SHOW plan_cache_mode") == "force_custom_plan"


async def test_repeated_searches_keep_custom_plans(
    index: PgVectorIndex, clock: ManualClock
) -> None:
    rng = np.random.default_rng(9)
    for i in range(100):
        await index.add(entry(f"k{i}", unit(*rng.standard_normal(DIM)), clock))
    sql = index._search_sql.replace("$2::vector", "$2")
    args = f"'s1', '{to_text(unit(1.0))}', {clock.wall()}, 5"
    async with index._pool.acquire() as conn:
        await conn.execute(f"PREPARE q (text, vector, float8, int) AS {sql}")
        for _ in range(8):  # past the five runs after which a generic plan may take over
            await conn.execute(f"EXECUTE q ({args})")
        plan = "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN EXECUTE q ({args})"))
        await conn.execute("DEALLOCATE q")
    # A generic plan knows neither the vector ($2) nor the limit ($4), and sorts everything.
    assert "$2" not in plan and "$4" not in plan, plan


async def test_concurrent_opens_and_a_plain_dsn(
    opener: Opener, pg_server: PgServer, clock: ManualClock
) -> None:
    one, two = await asyncio.gather(opener(), opener(dsn=pg_server.dsn()))
    await one.add(entry("k", unit(1.0), clock))
    assert await keys(two) == ["k"]


async def test_a_table_of_another_dimension_is_refused(opener: Opener) -> None:
    await opener()
    with pytest.raises(ValueError, match="8 dimensions, not 4"):
        await opener(dim=4)


async def test_an_outage_fails_fast(clock: ManualClock) -> None:
    needs_postgres()
    with postgres() as doomed:
        index = PgVectorIndex(doomed.url(), clock, DIM, timeout_s=0.5)
        await index.open()
        await index.add(entry("k", unit(1.0), clock))
        os.kill(doomed.pid, signal.SIGINT)  # fast shutdown
        _wait_closed(doomed.port)
        for call in (index.search("s1", unit(1.0), 3), index.add(entry("k", unit(1.0), clock))):
            started = time.monotonic()
            with pytest.raises(ConnectionError, match="pgvector index at postgresql://"):
                await call
            assert time.monotonic() - started < 1.0
        await index.aclose()


async def test_a_server_that_never_answers_times_out(clock: ManualClock) -> None:
    with socket.socket() as silent:  # accepts connections (backlog), never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        dsn = f"postgresql+asyncpg://u:{PASSWORD}@127.0.0.1:{port}/db"
        index = PgVectorIndex(dsn, clock, DIM, timeout_s=0.3)
        started = time.monotonic()
        with pytest.raises(ConnectionError) as caught:
            await index.open()
        assert time.monotonic() - started < 1.0
        assert PASSWORD not in str(caught.value) and ":***@" in str(caught.value)


async def test_the_password_never_shows(clock: ManualClock) -> None:
    for dsn in (
        f"postgresql://u:{PASSWORD}@127.0.0.1:1/db",
        f"postgresql://u@127.0.0.1:1/db?password={PASSWORD}",
    ):
        index = PgVectorIndex(dsn, clock, DIM)
        with pytest.raises(ConnectionError) as caught:
            await index.open()
        assert PASSWORD not in str(caught.value)
        assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_text_form_round_trips_float32() -> None:
    v = np.random.default_rng(1).standard_normal(384).astype(np.float32)
    np.testing.assert_array_equal(from_text(to_text(v)), v)
    assert redacted_dsn("postgresql://u:pw@h:5/db?password=x&a=1") == (
        "postgresql://u:***@h:5/db?password=***&a=1"
    )


def _wait_closed(port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        except OSError:
            return
        time.sleep(0.01)
    raise AssertionError(f"postgres still listening on {port}")
