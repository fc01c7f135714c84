"""What one cache look-up costs on each backend, end to end through the async API.

- SqliteCacheStore.get (and .set) with 100,000 entries of 1 KiB;
- RedisCacheStore.get against a local redis-server it starts (tests/redis_server.py), with
  20,000 entries (a GET costs the same at any size);
- NumpyIndex.search at 100,000 x 384 in one scope, and spread over 1,000 scopes (plus the
  time ``open()`` takes to load them);
- PgVectorIndex.search at 100,000 x 384 in one scope (HNSW, pgvector 0.8) on the embedded
  PostgreSQL that tests/pg.py starts.

Bulk data goes in through each backend's file or server directly (the same layout the class
writes). The run takes about three minutes on 2 cores, two of them building pgvector's HNSW index
(``--only sqlite,redis,numpy`` skips it); ``--quick`` is a few-second smoke run at 5,000. NumpyIndex
runs with one OpenBLAS thread unless told otherwise: see spillway.cache.numpy_index.

Run: .venv/bin/python bench/cache_stores.py [--quick] [--only sqlite,redis,numpy,pgvector]
         [--blas-threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for tests/pg.py and tests/redis_server.py

from spillway.cache.numpy_index import NumpyIndex  # noqa: E402
from spillway.cache.pgvector_index import PgVectorIndex, from_text  # noqa: E402
from spillway.cache.redis_store import RedisCacheStore  # noqa: E402
from spillway.cache.sqlite_store import SqliteCacheStore  # noqa: E402
from spillway.cache.stores import Entry  # noqa: E402
from spillway.clock import SystemClock  # noqa: E402

DIM = 384
VALUE = os.urandom(1024)
DAY = 86_400.0


async def timed(call: Callable[[int], Awaitable[object]], n: int) -> list[float]:
    """Microseconds of each of ``n`` calls, after a few warm-up ones."""
    for i in range(min(n, 20)):
        await call(i)
    out = []
    for i in range(n):
        start = time.perf_counter()
        await call(i)
        out.append((time.perf_counter() - start) * 1e6)
    return out


def line(label: str, micros: list[float], unit: str = "µs") -> None:
    p50, p99 = np.percentile(micros, [50, 99])
    scale = 1e3 if unit == "ms" else 1.0
    print(f"  {label:<52} p50 {p50 / scale:9.2f} {unit}   p99 {p99 / scale:9.2f} {unit}")


def unit_rows(rng: np.random.Generator, n: int) -> np.ndarray[Any, np.dtype[np.float32]]:
    m = rng.standard_normal((n, DIM), dtype=np.float32)
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    return m


def near(rng: np.random.Generator, v: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """A paraphrase-like query: the stored vector, nudged (cosine about 0.95)."""
    q = v + rng.standard_normal(DIM).astype(np.float32) * 0.016
    out: np.ndarray[Any, Any] = (q / np.linalg.norm(q)).astype(np.float32)
    return out


async def bench_sqlite(n: int, queries: int, work: Path) -> None:
    clock = SystemClock()
    path = work / "cache.db"
    store = SqliteCacheStore(path, clock, max_entries=10 * n, max_bytes=1 << 40)
    await store.open()
    now = clock.wall()
    with closing(sqlite3.connect(path)) as db, db:
        db.executemany(
            "INSERT INTO cache_entries VALUES (?, 't', 'm', ?, ?, ?, ?, 0)",
            ((f"{i:064x}", VALUE, len(VALUE), now + DAY, now) for i in range(n)),
        )
    rng = np.random.default_rng(1)
    keys = [f"{k:064x}" for k in rng.integers(0, n, queries)]
    print(f"SqliteCacheStore, {n:,} entries of 1 KiB")
    line("get (hit)", await timed(lambda i: store.get(keys[i]), queries))
    line("get (miss)", await timed(lambda i: store.get(f"miss{i}"), queries))
    sets = min(queries, 2_000)
    new = [Entry(f"new{i}", "t", "m", VALUE, now + DAY) for i in range(sets + 20)]
    line("set (new key)", await timed(lambda i: store.set(new[i]), sets))
    await store.aclose()


async def bench_redis(n: int, queries: int) -> None:
    from tests.redis_server import redis_server

    clock = SystemClock()
    with redis_server() as server:
        store = RedisCacheStore(server.url, clock)
        await store.open()
        now = clock.wall()
        for start in range(0, n, 32):  # as many in flight as the store has connections
            batch = range(start, min(n, start + 32))
            await asyncio.gather(
                *(store.set(Entry(f"k{i}", "t", "m", VALUE, now + DAY)) for i in batch)
            )
        rng = np.random.default_rng(2)
        keys = [f"k{k}" for k in rng.integers(0, n, queries)]
        print(f"RedisCacheStore, {n:,} entries of 1 KiB, local redis-server")
        line("get (hit)", await timed(lambda i: store.get(keys[i]), queries))
        line("get (miss)", await timed(lambda i: store.get(f"miss{i}"), queries))
        entry = Entry("new", "t", "m", VALUE, now + DAY)
        line("set", await timed(lambda i: store.set(entry), min(queries, 2_000)))
        await store.aclose()


def fill_vectors(path: Path, matrix: np.ndarray[Any, Any], scopes: int, expires_at: float) -> None:
    with closing(sqlite3.connect(path)) as db, db:
        db.executemany(
            """INSERT INTO vectors (key, scope, tenant, model, text, vector, expires_at)
            VALUES (?, ?, 't', 'm', ?, ?, ?)""",
            (
                (f"k{i}", f"s{i % scopes}", f"prompt {i}", row.tobytes(), expires_at)
                for i, row in enumerate(matrix)
            ),
        )


async def bench_numpy(n: int, queries: int, work: Path) -> None:
    rng = np.random.default_rng(3)
    matrix = unit_rows(rng, n)
    for scopes in (1, 1_000):
        await numpy_case(matrix, scopes, queries, work / f"semantic-{scopes}.db", rng)


async def numpy_case(
    matrix: np.ndarray[Any, Any], scopes: int, queries: int, path: Path, rng: np.random.Generator
) -> None:
    clock, n = SystemClock(), len(matrix)
    index = NumpyIndex(path, clock, DIM, max_entries=n)
    await index.open()  # creates the schema
    await index.aclose()
    fill_vectors(path, matrix, scopes, clock.wall() + DAY)
    index = NumpyIndex(path, clock, DIM, max_entries=n)
    start = time.perf_counter()
    await index.open()
    loaded = time.perf_counter() - start
    picks = rng.integers(0, n, queries)
    qs = [near(rng, matrix[p]) for p in picks]
    print(f"NumpyIndex, {n:,} x {DIM} in {scopes:,} scope(s); open() took {loaded:.2f} s")
    found = await index.search(f"s{picks[0] % scopes}", qs[0], 5)
    assert found and found[0].key == f"k{picks[0]}", found[:1]
    label = "search k=5" + (" (one scope)" if scopes == 1 else f" (~{n // scopes} per scope)")
    micros = await timed(lambda i: index.search(f"s{picks[i] % scopes}", qs[i], 5), queries)
    line(label, micros, "ms")
    await index.aclose()


#: Random unit vectors made by the server itself: far faster than sending 100,000 in text form.
#: The WHERE ties the inner query to the row, so each row gets its own vector.
_PG_FILL = f"""INSERT INTO spillway_semantic_cache
    SELECT 'k' || i, 's', 't', 'm', 'prompt ' || i, l2_normalize(ARRAY(
        SELECT random() - 0.5 FROM generate_series(1, {DIM}) WHERE i >= 0)::vector), $2
    FROM generate_series(0, $1 - 1) AS i"""


async def bench_pgvector(n: int, queries: int) -> None:
    import asyncpg

    from tests.pg import postgres

    clock = SystemClock()
    rng = np.random.default_rng(4)
    with postgres() as server:
        index = PgVectorIndex(server.url(), clock, DIM, timeout_s=5.0)
        await index.open()
        conn = await asyncpg.connect(server.dsn())
        try:
            # Fill first and build the HNSW index once, as one would for a bulk load.
            await conn.execute("DROP INDEX spillway_semantic_cache_embedding")
            start = time.perf_counter()
            await conn.execute(_PG_FILL, n, clock.wall() + DAY)
            filled = time.perf_counter() - start
            await conn.execute("SET maintenance_work_mem = '1GB'")
            await conn.execute("SET max_parallel_maintenance_workers = 1")
            start = time.perf_counter()
            await conn.execute(
                """CREATE INDEX spillway_semantic_cache_embedding ON spillway_semantic_cache
                USING hnsw (embedding vector_cosine_ops)"""
            )
            built = time.perf_counter() - start
            await conn.execute("ANALYZE spillway_semantic_cache")
            picks = [f"k{i}" for i in rng.integers(0, n, queries)]
            rows = await conn.fetch(
                "SELECT key, embedding::text FROM spillway_semantic_cache WHERE key = ANY($1)",
                picks,
            )
        finally:
            await conn.close()
        stored = {key: from_text(text) for key, text in rows}
        qs = [near(rng, stored[p]) for p in picks]
        print(
            f"PgVectorIndex, {n:,} x {DIM} in one scope; filled in {filled:.1f} s, "
            f"HNSW (m=16, ef_construction=64) built in {built:.1f} s"
        )
        micros = await timed(lambda i: index.search("s", qs[i], 5), queries)
        line("search k=5 (one scope, ef_search=40)", micros, "ms")
        hits = 0
        for i in range(queries):
            hits += (await index.search("s", qs[i], 1))[0].key == picks[i]
        print(f"  {'recall@1 of the nudged vector':<52} {hits / queries:.3f}")
        await index.aclose()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5,000 entries: a smoke run")
    parser.add_argument("--only", default="sqlite,redis,numpy,pgvector")
    parser.add_argument(
        "--blas-threads",
        type=int,
        default=1,
        help="OpenBLAS threads for NumpyIndex (threadpoolctl); 0: OpenBLAS's own choice",
    )
    args = parser.parse_args()
    if args.blas_threads:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.blas_threads, user_api="blas")
    n, queries = (5_000, 200) if args.quick else (100_000, 2_000)
    which = args.only.split(",")
    sections: dict[str, Callable[[Path], Awaitable[None]]] = {
        "sqlite": lambda work: bench_sqlite(n, queries * 5, work),
        # A Redis look-up costs the same at any size; a fifth as many entries fill 5x faster.
        "redis": lambda work: bench_redis(n // 5, queries * 5),
        "numpy": lambda work: bench_numpy(n, queries // 4, work),
        "pgvector": lambda work: bench_pgvector(n, queries // 4),
    }
    with tempfile.TemporaryDirectory(prefix="spillway-bench-") as tmp:
        for name in which:
            start = time.perf_counter()
            await sections[name](Path(tmp))
            print(f"  ({name}: {time.perf_counter() - start:.0f} s in all)")


if __name__ == "__main__":
    asyncio.run(main())
