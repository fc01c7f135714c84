"""``/v1/batches`` in the database: batches, their leases, and their durable progress.

A replica works a batch only under its lease (``claim``, ``renew``). Every write a worker
makes is fenced by that lease: it lands only while ``lease_owner`` is still this replica,
so a replica that stalled past its lease and woke up cannot add output another replica
already produced. Progress is a list of segments (``commit``): each names objects already
written whole and the input lines they answer, and is recorded together with the batch's
counts in one transaction, so a line is done exactly when a committed segment holds it.
"""

from __future__ import annotations

import itertools
import secrets
import zlib
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from spillway.batch.records import (
    ACTIVE,
    CANCELLABLE,
    TIMES,
    BatchRecord,
    Status,
    after_mark,
)
from spillway.clock import Clock
from spillway.errors import InvalidRequest, NotFound
from spillway.ledger.batch_tables import BATCH_SEGMENTS, BATCHES
from spillway.ledger.sql import SqlLedgerStore


class LeaseLost(Exception):
    """Another replica holds the batch now: stop without writing anything more."""


def new_batch_id() -> str:
    return f"batch_{secrets.token_hex(12)}"


@dataclass(frozen=True, slots=True)
class Segment:
    seq: int
    output_key: str | None
    error_key: str | None
    lines: list[int]
    completed: int
    failed: int


def pack_lines(lines: Iterable[int]) -> bytes:
    """Line numbers, sorted, as differences (mostly 1: lines end in about the order they
    start), zlib-compressed: a few bytes per thousand lines. The array is in this machine's
    byte order; every platform spillway runs on is little-endian."""
    ordered = sorted(lines)
    deltas = array("I", (b - a for a, b in zip([0, *ordered], ordered, strict=False)))
    return zlib.compress(deltas.tobytes())


def unpack_lines(blob: bytes) -> list[int]:
    deltas = array("I")
    deltas.frombytes(zlib.decompress(blob))
    return list(itertools.accumulate(deltas))


class BatchStore:
    def __init__(self, database: SqlLedgerStore, clock: Clock):
        self._db = database
        self._clock = clock

    def now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.wall(), UTC)

    async def create(self, record: BatchRecord) -> None:
        await self._db.open()
        async with self._db.engine.begin() as conn:
            await conn.execute(insert(BATCHES).values(**_row(record)))

    async def get(self, tenant: str | None, batch_id: str) -> BatchRecord:
        await self._db.open()
        stmt = select(BATCHES).where(BATCHES.c.id == batch_id)
        if tenant is not None:
            stmt = stmt.where(BATCHES.c.tenant == tenant)
        async with self._db.engine.connect() as conn:
            row = (await conn.execute(stmt)).first()
        if row is None:
            raise NotFound(f"No such Batch object: {batch_id}", param="batch_id")
        return _record(row._mapping)

    async def page(
        self, tenant: str, limit: int, after: str | None
    ) -> tuple[list[BatchRecord], bool]:
        """Newest first, a page after ``after``; and whether there are more."""
        await self._db.open()
        c = BATCHES.c
        stmt = select(BATCHES).where(c.tenant == tenant)
        if after is not None:
            mark = await self.get(tenant, after)
            created = mark.times["created_at"]
            assert created is not None  # set at creation
            stmt = stmt.where(after_mark(BATCHES, created, mark.id, newest_first=True))
        stmt = stmt.order_by(c.created_at.desc(), c.id.desc()).limit(limit + 1)
        async with self._db.engine.connect() as conn:
            rows = [_record(r._mapping) for r in await conn.execute(stmt)]
        return rows[:limit], len(rows) > limit

    async def cancel(self, tenant: str, batch_id: str) -> BatchRecord:
        """Ask for a cancel: ``cancelling`` now; the replica working it ends it."""
        record = await self.get(tenant, batch_id)
        if record.status in ("cancelling", "cancelled"):
            return record
        async with self._db.writing.begin() as conn:
            changed = await conn.execute(
                update(BATCHES)
                .where(BATCHES.c.id == batch_id, BATCHES.c.status.in_(CANCELLABLE))
                .values(status="cancelling", cancelling_at=self.now())
            )
        if changed.rowcount != 1:
            raise InvalidRequest(
                f"Cannot cancel a batch with status '{record.status}'.", param="batch_id"
            )
        return await self.get(tenant, batch_id)

    async def claimable(self, limit: int) -> list[tuple[str, Status, str]]:
        """Batches with work to do whose lease is free (never taken, or run out), those to
        cancel first, then the oldest: (id, status, tenant)."""
        await self._db.open()
        c = BATCHES.c
        async with self._db.engine.connect() as conn:
            now = await self._time(conn)
            stmt = (
                select(c.id, c.status, c.tenant)
                .where(c.status.in_(ACTIVE))
                .where(or_(c.lease_owner.is_(None), c.lease_until < now))
                .order_by((c.status != "cancelling"), c.created_at)
                .limit(limit)
            )
            return [(row.id, row.status, row.tenant) for row in await conn.execute(stmt)]

    async def _time(self, conn: AsyncConnection) -> datetime:
        """The database's clock on PostgreSQL, where replicas on several machines compare
        lease times (their own clocks may disagree); this machine's on SQLite."""
        if conn.dialect.name == "postgresql":
            value = await conn.scalar(select(func.now()))
            assert isinstance(value, datetime)
            return value.astimezone(UTC)
        return self.now()

    async def claim(self, batch_id: str, owner: str, lease: timedelta) -> bool:
        c = BATCHES.c
        async with self._db.writing.begin() as conn:
            now = await self._time(conn)
            changed = await conn.execute(
                update(BATCHES)
                .where(c.id == batch_id, c.status.in_(ACTIVE))
                .where(or_(c.lease_owner.is_(None), c.lease_until < now, c.lease_owner == owner))
                .values(lease_owner=owner, lease_until=now + lease)
            )
        return bool(changed.rowcount == 1)

    async def renew(self, batch_id: str, owner: str, lease: timedelta) -> bool:
        """Extend this replica's lease; False when another replica holds it now."""
        async with self._db.writing.begin() as conn:
            until = await self._time(conn) + lease
            return await _fenced(conn, batch_id, owner, {"lease_until": until})

    async def release(self, batch_id: str, owner: str) -> None:
        await self.update(batch_id, owner, lease_owner=None, lease_until=None)

    async def update(
        self,
        batch_id: str,
        owner: str,
        expect: tuple[Status, ...] | None = None,
        **values: Any,
    ) -> bool:
        """Change the batch while this replica holds its lease (and, with ``expect``, while
        its status is one of those: a cancel asked for meanwhile is not overwritten);
        False when it does not."""
        async with self._db.writing.begin() as conn:
            return await _fenced(conn, batch_id, owner, values, expect)

    async def commit(self, batch_id: str, owner: str, segment: Segment) -> bool:
        """Record a segment whose objects are written whole, with the batch's counts."""
        async with self._db.writing.begin() as conn:
            c = BATCHES.c
            counts = {
                "completed": c.completed + segment.completed,
                "failed": c.failed + segment.failed,
            }
            if not await _fenced(conn, batch_id, owner, counts):
                return False
            await conn.execute(
                insert(BATCH_SEGMENTS).values(
                    batch_id=batch_id,
                    seq=segment.seq,
                    output_key=segment.output_key,
                    error_key=segment.error_key,
                    lines=pack_lines(segment.lines),
                    completed=segment.completed,
                    failed=segment.failed,
                    written_at=self.now(),
                )
            )
        return True

    async def segments(self, batch_id: str) -> list[Segment]:
        await self._db.open()
        s = BATCH_SEGMENTS.c
        stmt = select(BATCH_SEGMENTS).where(s.batch_id == batch_id).order_by(s.seq)
        async with self._db.engine.connect() as conn:
            return [
                Segment(
                    r.seq, r.output_key, r.error_key, unpack_lines(r.lines), r.completed, r.failed
                )
                for r in await conn.execute(stmt)
            ]

    async def active_count(self, tenant: str) -> int:
        """The tenant's batches not yet finished."""
        await self._db.open()
        c = BATCHES.c
        stmt = select(func.count()).where(c.tenant == tenant, c.status.in_(ACTIVE))
        async with self._db.engine.connect() as conn:
            return int(await conn.scalar(stmt) or 0)

    async def using(self, tenant: str, file_id: str) -> BatchRecord | None:
        """An unfinished batch of the tenant's that reads ``file_id``, if any."""
        await self._db.open()
        c = BATCHES.c
        stmt = select(BATCHES).where(
            c.tenant == tenant, c.input_file_id == file_id, c.status.in_(ACTIVE)
        )
        async with self._db.engine.connect() as conn:
            row = (await conn.execute(stmt.limit(1))).first()
        return None if row is None else _record(row._mapping)

    async def next_seq(self, batch_id: str) -> int:
        s = BATCH_SEGMENTS.c
        async with self._db.engine.connect() as conn:
            last = await conn.scalar(select(func.max(s.seq)).where(s.batch_id == batch_id))
        return 0 if last is None else int(last) + 1


async def _fenced(
    conn: AsyncConnection,
    batch_id: str,
    owner: str,
    values: dict[str, Any],
    expect: tuple[Status, ...] | None = None,
) -> bool:
    stmt = update(BATCHES).where(BATCHES.c.id == batch_id, BATCHES.c.lease_owner == owner)
    if expect is not None:
        stmt = stmt.where(BATCHES.c.status.in_(expect))
    changed = await conn.execute(stmt.values(**values))
    if changed.rowcount != 1:
        await conn.rollback()
        return False
    return True


def _row(record: BatchRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "tenant": record.tenant,
        "key_id": record.key_id,
        "principal": orjson.dumps(record.principal).decode(),
        "endpoint": record.endpoint,
        "input_file_id": record.input_file_id,
        "completion_window": record.completion_window,
        "metadata": None if record.metadata is None else orjson.dumps(record.metadata).decode(),
        "status": record.status,
        "errors": None if record.errors is None else orjson.dumps(record.errors).decode(),
        "output_file_id": record.output_file_id,
        "error_file_id": record.error_file_id,
        **{name: record.times.get(name) for name in TIMES},
        "total": record.total,
        "completed": record.completed,
        "failed": record.failed,
    }


def _record(m: Any) -> BatchRecord:
    status: Status = m["status"]
    return BatchRecord(
        id=m["id"],
        tenant=m["tenant"],
        key_id=m["key_id"],
        principal=orjson.loads(m["principal"]),
        endpoint=m["endpoint"],
        input_file_id=m["input_file_id"],
        completion_window=m["completion_window"],
        metadata=None if m["metadata"] is None else orjson.loads(m["metadata"]),
        status=status,
        errors=None if m["errors"] is None else orjson.loads(m["errors"]),
        output_file_id=m["output_file_id"],
        error_file_id=m["error_file_id"],
        times={name: m[name] for name in TIMES},
        total=m["total"],
        completed=m["completed"],
        failed=m["failed"],
    )
