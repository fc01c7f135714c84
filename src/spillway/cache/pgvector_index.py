"""The shared semantic index: PostgreSQL with pgvector, through ``asyncpg`` directly.

One table (default ``spillway_semantic_cache``): key (primary key), scope, tenant, model,
text, ``embedding vector(dim)`` and ``expires_at`` (epoch seconds, ``double precision``, so it
compares straight with ``Clock.wall()``), with an HNSW index on the embedding
(``vector_cosine_ops``), a btree on scope and one on expiry. ``open()`` creates what is missing
under a transaction-level advisory lock, so gateways may start together.

A search is ``WHERE scope = $1 AND expires_at > $now ORDER BY embedding <=> $vec LIMIT k``;
similarity is ``1 - distance``. Connections are opened with ``plan_cache_mode =
force_custom_plan`` (a generic plan of the prepared search sorts the whole scope) and, with
pgvector >= 0.8, ``hnsw.iterative_scan = relaxed_order`` (sent at connect, so the pool's
``RESET ALL`` keeps both): the HNSW scan goes on past ``ef_search`` until the scope filter
has let ``k`` rows through (up to ``hnsw.max_scan_tuples``), rather than returning too few.
Relaxed order may be slightly out of order, so rows are sorted again here. For a small scope
the planner takes the scope btree and sorts exactly instead. Vectors travel in pgvector's text
form (``[0.1,0.2,...]``, nine significant digits: exact for float32) with a ``::vector`` cast,
and come back the same way.

Failures: every driver error, refused connection or timeout surfaces as ``ConnectionError``,
its message naming the server with the password masked. ``search`` and ``add`` are bounded by
``timeout_s`` end to end (they are on the request path); ``open``, ``clear`` and ``count``,
whose cost grows with the table, by ``ADMIN_TIMEOUT_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import zlib
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import numpy as np

from spillway.cache.vectors import Neighbour, Vector, VectorEntry
from spillway.clock import Clock
from spillway.secrets import Redactor, redacted_url

ADMIN_TIMEOUT_S = 30.0
POOL_SIZE = 4
#: After a failed open (the server was down at start-up), try again at most this often,
#: in the background: calls meanwhile fail fast, and the cache counts them as misses.
REOPEN_EVERY_S = 5.0
_PURGE_EVERY_S = 60.0
_PURGE_BATCH = 1_000
_TABLE = re.compile(r"[a-z_][a-z0-9_]{0,40}")
_SCHEMES = ("postgresql+asyncpg://", "postgres+asyncpg://")
#: Advisory-lock key for the schema: any fixed bigint unique to this purpose.
_SCHEMA_LOCK = zlib.crc32(b"spillway.cache.pgvector_index.schema")
_DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


def to_text(vector: Vector) -> str:
    """pgvector's text form; nine significant digits round-trip any float32."""
    return "[" + ",".join([f"{x:.9g}" for x in vector.tolist()]) + "]"


def from_text(text: str) -> Vector:
    return np.array(text[1:-1].split(","), dtype=np.float32)


class PgVectorIndex:
    """``VectorIndex`` on PostgreSQL + pgvector, shared by any number of gateways. Accepts
    ``postgresql://`` and SQLAlchemy-style ``postgresql+asyncpg://`` DSNs. Call ``open()``
    first and ``aclose()`` last; see the module docstring for the schema and the timeouts."""

    def __init__(
        self,
        dsn: str,
        clock: Clock,
        dim: int = 384,
        *,
        timeout_s: float = 0.5,
        table: str = "spillway_semantic_cache",
    ):
        if not _TABLE.fullmatch(table):
            raise ValueError(f"table name {table!r}: use lower-case letters, digits and '_'")
        for scheme in _SCHEMES:
            if dsn.startswith(scheme):
                dsn = "postgresql://" + dsn.removeprefix(scheme)
        self._dsn = dsn
        self._where = redacted_url(dsn)
        query_password = re.search(r"(?:^|&)password=([^&]*)", urlsplit(dsn).query)
        secrets = [urlsplit(dsn).password, query_password and query_password.group(1)]
        self._redactor = Redactor([s for s in secrets if s])
        self._clock = clock
        self._dim = dim
        self._timeout_s = timeout_s
        self._table = table
        self._pool: Any = None  # asyncpg.Pool, untyped
        self._closed = False
        self._reopening: asyncio.Task[None] | None = None
        self._reopen_at = 0.0
        self._next_purge = 0.0
        t = table
        self._search_sql = f"""SELECT key, text, embedding::text, embedding <=> $2::vector
            FROM {t} WHERE scope = $1 AND expires_at > $3
            ORDER BY embedding <=> $2::vector LIMIT $4"""
        self._add_sql = f"""INSERT INTO {t}
            (key, scope, tenant, model, text, embedding, expires_at)
            VALUES ($1, $2, $3, $4, $5, $6::vector, $7)
            ON CONFLICT (key) DO UPDATE SET scope = excluded.scope, tenant = excluded.tenant,
                model = excluded.model, text = excluded.text, embedding = excluded.embedding,
                expires_at = excluded.expires_at"""
        self._purge_sql = f"""DELETE FROM {t} WHERE key IN (
            SELECT key FROM {t} WHERE expires_at <= $1 LIMIT {_PURGE_BATCH})"""

    async def open(self) -> None:
        with self._failures("open"):
            async with asyncio.timeout(ADMIN_TIMEOUT_S):
                conn = await asyncpg.connect(self._dsn, timeout=self._timeout_s)
                try:
                    version, dim = await self._create_schema(conn)
                finally:
                    await conn.close()
        if dim != self._dim:
            raise ValueError(f"{self._table}.embedding holds {dim} dimensions, not {self._dim}")
        # Custom plans always: after five runs a prepared statement may switch to a generic
        # plan, which knows neither the vector nor the LIMIT and picks a full sort (~100 ms
        # at 5,000 rows, against 0.6 ms through the HNSW index).
        settings = {"plan_cache_mode": "force_custom_plan"}
        if version >= (0, 8):
            settings["hnsw.iterative_scan"] = "relaxed_order"
        with self._failures("open"):
            async with asyncio.timeout(ADMIN_TIMEOUT_S):
                self._pool = await asyncpg.create_pool(
                    self._dsn,
                    min_size=1,
                    max_size=POOL_SIZE,
                    timeout=self._timeout_s,  # per connection attempt
                    command_timeout=ADMIN_TIMEOUT_S,
                    server_settings=settings,
                )

    async def search(self, scope: str, vector: Vector, k: int) -> list[Neighbour]:
        v = self._checked(vector)
        if k < 1:
            return []
        args = (scope, to_text(v), self._clock.wall(), k)
        rows = await self._fetch("search", self._timeout_s, self._search_sql, *args)
        found = [Neighbour(r[0], r[1], from_text(r[2]), 1.0 - float(r[3])) for r in rows]
        return sorted(found, key=lambda n: -n.similarity)  # relaxed order: nearly sorted

    async def add(self, entry: VectorEntry) -> None:
        e, now = entry, self._clock.wall()
        row = (e.key, e.scope, e.tenant, e.model, e.text, to_text(self._checked(e.vector)))
        await self._fetch("add", self._timeout_s, self._add_sql, *row, e.expires_at)
        if now >= self._next_purge:  # a bounded batch, so the add stays within its timeout
            self._next_purge = now + _PURGE_EVERY_S
            await self._fetch("purge", self._timeout_s, self._purge_sql, now)

    async def clear(self, tenant: str | None = None, model: str | None = None) -> int:
        sql = f"""WITH gone AS (DELETE FROM {self._table}
            WHERE ($1::text IS NULL OR tenant = $1) AND ($2::text IS NULL OR model = $2)
            RETURNING 1) SELECT count(*) FROM gone"""
        rows = await self._fetch("clear", ADMIN_TIMEOUT_S, sql, tenant, model)
        return int(rows[0][0])

    async def count(self) -> int:
        sql = f"SELECT count(*) FROM {self._table} WHERE expires_at > $1"
        rows = await self._fetch("count", ADMIN_TIMEOUT_S, sql, self._clock.wall())
        return int(rows[0][0])

    async def aclose(self) -> None:
        """Close the pool: politely within ``timeout_s``, else (an outage) abruptly."""
        self._closed = True
        if self._reopening is not None:
            self._reopening.cancel()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                async with asyncio.timeout(self._timeout_s):
                    await pool.close()
            except _DRIVER_ERRORS:
                pool.terminate()

    def _checked(self, vector: Vector) -> Vector:
        v = np.asarray(vector, dtype=np.float32)
        if v.shape != (self._dim,):
            raise ValueError(f"vector of shape {v.shape}; this index holds ({self._dim},)")
        return v

    async def _fetch(self, doing: str, timeout_s: float, sql: str, *args: object) -> list[Any]:
        if self._pool is None:
            self._reopen_later()
            raise ConnectionError(f"pgvector index at {self._where}: not connected (yet)")
        with self._failures(doing):
            async with asyncio.timeout(timeout_s):
                async with self._pool.acquire() as conn:
                    rows: list[Any] = await conn.fetch(sql, *args)
                    return rows

    def _reopen_later(self) -> None:
        """Start one background ``open()`` when none runs and the last one is long enough ago."""
        now = self._clock.monotonic()
        busy = self._reopening is not None and not self._reopening.done()
        if self._closed or busy or now < self._reopen_at:
            return
        self._reopen_at = now + REOPEN_EVERY_S
        self._reopening = asyncio.create_task(self._reopen())

    async def _reopen(self) -> None:
        with contextlib.suppress(Exception):  # logged by the cache as misses; retried later
            await self.open()

    async def _create_schema(self, conn: Any) -> tuple[tuple[int, ...], int]:
        """Create what is missing; returns pgvector's version and the table's dimension."""
        t = self._table
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
            await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            await conn.execute(
                f"""CREATE TABLE IF NOT EXISTS {t} (
                    key text PRIMARY KEY,
                    scope text NOT NULL,
                    tenant text NOT NULL,
                    model text NOT NULL,
                    text text NOT NULL,
                    embedding vector({self._dim}) NOT NULL,
                    expires_at double precision NOT NULL)"""
            )
            await conn.execute(
                f"""CREATE INDEX IF NOT EXISTS {t}_embedding ON {t}
                    USING hnsw (embedding vector_cosine_ops)"""
            )
            await conn.execute(f"CREATE INDEX IF NOT EXISTS {t}_scope ON {t} (scope)")
            await conn.execute(f"CREATE INDEX IF NOT EXISTS {t}_expiry ON {t} (expires_at)")
            version = await conn.fetchval(
                "SELECT extversion FROM pg_extension WHERE extname = 'vector'"
            )
            dim = await conn.fetchval(
                """SELECT atttypmod FROM pg_attribute
                WHERE attrelid = $1::regclass AND attname = 'embedding'""",
                t,
            )
        numbers = tuple(int(p) for p in re.findall(r"\d+", version)[:2])
        return numbers, int(dim)

    @contextlib.contextmanager
    def _failures(self, doing: str) -> Iterator[None]:
        """The one place the driver's exceptions become ours, without the password."""
        try:
            yield
        except _DRIVER_ERRORS as exc:
            detail = self._redactor.scrub(str(exc)) or "timed out"
            message = f"pgvector index at {self._where}: {doing} failed: "
            raise ConnectionError(message + f"{type(exc).__name__}: {detail}") from None
