"""The ledger on SQLite (embedded) or PostgreSQL (scale): one SQLAlchemy Core code path.

The tables, column types and migrations are ``sql_schema``'s; this module is the engines and
the store. Storage choices, the same on both engines as seen from Python:

- Values are stored exactly (``sql_schema``: UTC instants, ``Decimal`` money to a millionth).
  ``spend`` is ``SUM`` on PostgreSQL (exact on numeric) and a Python ``Decimal`` sum on SQLite.
- ``open()`` applies the migrations in one transaction that first takes a lock: a
  transaction-level advisory lock on PostgreSQL, ``BEGIN IMMEDIATE`` (the write lock) on
  SQLite, so any number of processes may open the same database at once.
- SQLite runs in WAL mode with ``synchronous=NORMAL``: a commit survives a process crash, and
  the last transactions (not the file) can be lost only to a power cut or OS crash.
- Writes to a SQLite file bypass SQLAlchemy: plain ``sqlite3`` in one thread of their own
  (``sqlite_writes.py``), so neither converting rows nor SQLite's work runs on the event loop.
  Reads, migrations and retention, and everything on PostgreSQL, use the async engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, delete, event, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import StatementError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool
from sqlalchemy.sql.expression import Executable

from spillway.clock import Clock, SystemClock
from spillway.ledger.records import LedgerRecord
from spillway.ledger.sql_schema import FIELDS, LEDGER, driver_row, migrate
from spillway.ledger.sqlite_writes import SqliteBatchWriter
from spillway.prices import AMOUNT_QUANTUM

#: Execution option read by the SQLite "begin" hook: "" (deferred) or "IMMEDIATE".
_BEGIN = "spillway_sqlite_begin"
_SQLITE_PRAGMAS = ("PRAGMA busy_timeout = 10000", "PRAGMA synchronous = NORMAL")
_WAL_SWITCH_TIMEOUT_S = 10.0
#: Advisory-lock key for migrations: any fixed bigint unique to this purpose.
_MIGRATION_LOCK = zlib.crc32(b"spillway.ledger.schema_migrations")


def _no_lock(conn: Connection) -> None:
    """SQLite: the migration transaction began with BEGIN IMMEDIATE, which is the lock."""


def _advisory_lock(conn: Connection) -> None:
    """PostgreSQL: serialise concurrent openers until this transaction ends."""
    conn.execute(select(func.pg_advisory_xact_lock(_MIGRATION_LOCK)))


def _in_memory(url: URL) -> bool:
    return url.database in (None, "", ":memory:")


def _enable_wal(url: URL) -> None:
    """Put the SQLite file in WAL mode (the mode is stored in the file, so once is enough).

    Two connections switching a new file at the same moment deadlock on the lock upgrade, and
    one would sit out its whole busy timeout; so switch without waiting and retry instead.
    """
    path = url.database
    if path is None or _in_memory(url):
        return
    deadline = time.monotonic() + _WAL_SWITCH_TIMEOUT_S
    while True:
        with contextlib.closing(sqlite3.connect(path, timeout=0, isolation_level=None)) as db:
            try:
                db.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
        time.sleep(0.01)


def _sqlite_engine(url: URL) -> AsyncEngine:
    # An in-memory database lives in one connection, so the pool must hand out only that one.
    options: dict[str, Any] = {"poolclass": StaticPool} if _in_memory(url) else {}
    # hide_parameters: a failed statement's error must not carry its values (a key's hash,
    # a ledger row) into a log line.
    engine = create_async_engine(url, hide_parameters=True, **options)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control from the sqlite3 module (it would BEGIN lazily and never
        # before DDL); the "begin" hook below issues BEGIN itself.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        for pragma in _SQLITE_PRAGMAS:
            cursor.execute(pragma)
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get(_BEGIN, "")
        conn.exec_driver_sql(f"BEGIN {mode}".rstrip())

    return engine


def _postgres_engine(url: URL) -> AsyncEngine:
    # pre-ping: a pooled connection that outlived a server restart is replaced quietly;
    # timeout: an unreachable server fails a write in 10 s rather than asyncpg's 60.
    return create_async_engine(
        url, pool_pre_ping=True, hide_parameters=True, connect_args={"timeout": 10}
    )


def _nothing_to_prepare(url: URL) -> None:
    """PostgreSQL needs no per-file setup."""


def _insert_sql(placeholder: Callable[[int], str]) -> str:
    values = ", ".join(placeholder(i) for i in range(1, len(FIELDS) + 1))
    return (
        f"INSERT INTO ledger ({', '.join(FIELDS)}) VALUES ({values}) "
        "ON CONFLICT (request_id) DO NOTHING"
    )


@dataclass(frozen=True, slots=True)
class _Flavour:
    """What differs between the two engines; everything else is one code path."""

    driver: str
    make_engine: Callable[[URL], AsyncEngine]
    prepare: Callable[[URL], None]  # blocking, run in a thread by open()
    insert_ignore: Executable  # INSERT ... ON CONFLICT (request_id) DO NOTHING
    #: the same insert as the driver's own SQL, for executemany over ready-made tuples
    insert_sql: str
    row: Callable[[LedgerRecord], tuple[Any, ...]]
    lock_migrations: Callable[[Connection], None]
    sums_in_sql: bool  # False on SQLite: SUM over TEXT would go through floats


_FLAVOURS = {
    "sqlite": _Flavour(
        driver="sqlite+aiosqlite",
        make_engine=_sqlite_engine,
        prepare=_enable_wal,
        insert_ignore=sqlite.insert(LEDGER).on_conflict_do_nothing(index_elements=["request_id"]),
        insert_sql=_insert_sql(lambda _: "?"),
        row=lambda rec: driver_row(rec, sqlite=True),
        lock_migrations=_no_lock,
        sums_in_sql=False,
    ),
    "postgresql": _Flavour(
        driver="postgresql+asyncpg",
        make_engine=_postgres_engine,
        prepare=_nothing_to_prepare,
        insert_ignore=postgresql.insert(LEDGER).on_conflict_do_nothing(
            index_elements=["request_id"]
        ),
        insert_sql=_insert_sql(lambda i: f"${i}"),
        row=lambda rec: driver_row(rec, sqlite=False),
        lock_migrations=_advisory_lock,
        sums_in_sql=True,
    ),
}
#: URL schemes accepted, by the dialect they name ("postgresql://" gets asyncpg).
_BACKENDS = {
    "sqlite": "sqlite",
    "sqlite+aiosqlite": "sqlite",
    "postgresql": "postgresql",
    "postgres": "postgresql",
    "postgresql+asyncpg": "postgresql",
}


def sqlite_url(data_dir: Path) -> str:
    """The embedded ledger's URL, ``sqlite+aiosqlite:////abs/DATA_DIR/ledger.db`` (creates
    ``data_dir``)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = (data_dir / "ledger.db").resolve()
    return URL.create("sqlite+aiosqlite", database=str(path)).render_as_string()


class SqlLedgerStore:
    """``LedgerStore`` on SQLite (``sqlite+aiosqlite:///PATH``) or PostgreSQL
    (``postgresql+asyncpg://USER:PASSWORD@HOST:PORT/DB``). Call ``open()`` first, ``aclose()``
    last; every method is one transaction."""

    def __init__(self, url: str, clock: Clock | None = None):
        parsed = make_url(url)
        backend = _BACKENDS.get(parsed.drivername)
        if backend is None:
            raise ValueError(
                f"ledger URL scheme {parsed.drivername!r} is not supported; "
                "use sqlite+aiosqlite:///PATH or postgresql+asyncpg://USER@HOST:PORT/DB"
            )
        self._flavour = _FLAVOURS[backend]
        self._clock = clock or SystemClock()
        self._url = parsed.set(drivername=self._flavour.driver)
        self._opened = False
        self._engine = self._flavour.make_engine(self._url)
        # A SQLite file is written with plain sqlite3 in a thread of its own (sqlite_writes.py);
        # an in-memory database exists only inside the engine's one connection, so it cannot.
        self._direct: SqliteBatchWriter | None = None
        if backend == "sqlite" and self._url.database and not _in_memory(self._url):
            self._direct = SqliteBatchWriter(
                self._url.database, self._flavour.insert_sql, self._flavour.row, _SQLITE_PRAGMAS
            )

    @property
    def engine(self) -> AsyncEngine:
        """The database's engine, for the other tables in it (keys, audit); ``open()`` first."""
        return self._engine

    @property
    def writing(self) -> AsyncEngine:
        """The engine for a transaction that reads and then writes. On SQLite it begins
        IMMEDIATE (takes the write lock first): a deferred one that read and then wants to
        write fails at once when another connection wrote meanwhile, busy timeout or not."""
        return self._engine.execution_options(**{_BEGIN: "IMMEDIATE"})

    async def open(self) -> None:
        """Connect and apply the migrations; again after a failure, or at once when done."""
        if self._opened:
            return
        now = datetime.fromtimestamp(self._clock.wall(), UTC)
        await asyncio.to_thread(self._flavour.prepare, self._url)
        locked = self._engine.execution_options(**{_BEGIN: "IMMEDIATE"})
        async with locked.begin() as conn:
            await conn.run_sync(self._flavour.lock_migrations)
            await conn.run_sync(migrate, now)
        self._opened = True

    async def write(self, records: Sequence[LedgerRecord]) -> None:
        if not records:
            return
        await self.open()  # a store that could not be opened at start opens here
        if self._direct is not None:
            await self._direct.write(records)
            return
        # The driver's executemany over plain tuples: per row this costs a few microseconds,
        # where SQLAlchemy's per-row parameter processing cost ~25 (and the GIL with it).
        rows = [self._flavour.row(rec) for rec in records]
        with _refusals():
            async with self._engine.begin() as conn:
                await conn.exec_driver_sql(self._flavour.insert_sql, rows)

    async def query(
        self, since: datetime | None = None, until: datetime | None = None
    ) -> list[LedgerRecord]:
        stmt = select(LEDGER).order_by(LEDGER.c.at, LEDGER.c.request_id)
        if since is not None:
            stmt = stmt.where(LEDGER.c.at >= since)
        if until is not None:
            stmt = stmt.where(LEDGER.c.at < until)
        with _refusals():
            async with self._engine.connect() as conn:
                result = await conn.execute(stmt)
                return [LedgerRecord(**{n: row._mapping[n] for n in FIELDS}) for row in result]

    async def spend(self, key_id: str, since: datetime) -> Decimal:
        mine = (LEDGER.c.key_id == key_id) & (LEDGER.c.at >= since)
        with _refusals():
            async with self._engine.connect() as conn:
                if self._flavour.sums_in_sql:
                    total = await conn.scalar(select(func.sum(LEDGER.c.cost)).where(mine))
                else:
                    costs = await conn.scalars(select(LEDGER.c.cost).where(mine))
                    total = sum(costs, Decimal(0))
        return Decimal(total or 0).quantize(AMOUNT_QUANTUM)

    async def delete_before(self, cutoff: datetime) -> int:
        with _refusals():
            async with self._engine.begin() as conn:
                result = await conn.execute(delete(LEDGER).where(LEDGER.c.at < cutoff))
                return result.rowcount

    async def aclose(self) -> None:
        if self._direct is not None:
            await self._direct.aclose()
        await self._engine.dispose()


@contextlib.contextmanager
def _refusals() -> Iterator[None]:
    """A value our column types refuse (naive time, NaN amount) surfaces as the plain
    ``ValueError``, not wrapped with the statement and every row's parameters."""
    try:
        yield
    except StatementError as exc:
        if isinstance(exc.orig, ValueError):
            raise exc.orig from None
        raise
