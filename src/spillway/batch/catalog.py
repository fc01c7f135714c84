"""``/v1/files``: the files a tenant uploaded, and the result files of its batches.

Rows in the ``files`` table name objects in the object store. An upload streams into the
store as it arrives (never held whole) and gets its row only once the object is whole, so
a failed upload leaves nothing listed. A tenant sees only its own files: another tenant's
id is answered as one that does not exist.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterable, AsyncIterator
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert, select, update

from spillway.batch.records import FileRecord, after_mark
from spillway.batch.storage import ObjectStore
from spillway.clock import Clock
from spillway.errors import NotFound, PayloadTooLarge
from spillway.ledger.batch_tables import FILES
from spillway.ledger.sql import SqlLedgerStore

UPLOAD_PURPOSES = ("batch",)
#: what spillway itself writes: a batch's output and error files
RESULT_PURPOSE = "batch_output"


def new_file_id() -> str:
    return f"file-{secrets.token_hex(12)}"


class FileCatalog:
    def __init__(self, database: SqlLedgerStore, store: ObjectStore, clock: Clock):
        self._db = database
        self.store = store
        self._clock = clock

    async def upload(
        self,
        tenant: str,
        key_id: str,
        purpose: str,
        filename: str,
        chunks: AsyncIterable[bytes],
        max_bytes: int,
    ) -> FileRecord:
        """Stream ``chunks`` into the store; 413 (and nothing kept) past ``max_bytes``."""
        file_id = new_file_id()
        object_key = f"files/{file_id}"
        size = await self.store.write(object_key, _at_most(chunks, max_bytes))
        try:
            return await self.add(tenant, key_id, purpose, filename, object_key, size, file_id)
        except BaseException:
            await self.store.delete(object_key)  # not listed: not kept either
            raise

    async def add(
        self,
        tenant: str,
        key_id: str,
        purpose: str,
        filename: str,
        object_key: str,
        size: int,
        file_id: str | None = None,
    ) -> FileRecord:
        """List an object already written whole."""
        record = FileRecord(
            id=file_id or new_file_id(),
            tenant=tenant,
            key_id=key_id,
            purpose=purpose,
            filename=filename,
            bytes=size,
            object_key=object_key,
            created_at=self._now(),
        )
        await self._db.open()
        async with self._db.engine.begin() as conn:
            await conn.execute(insert(FILES).values(**_row(record)))
        return record

    async def get(self, tenant: str | None, file_id: str) -> FileRecord:
        """The file, if it is ``tenant``'s (None: any tenant's, for spillway's own use)."""
        await self._db.open()
        stmt = select(FILES).where(FILES.c.id == file_id, FILES.c.deleted_at.is_(None))
        if tenant is not None:
            stmt = stmt.where(FILES.c.tenant == tenant)
        async with self._db.engine.connect() as conn:
            row = (await conn.execute(stmt)).first()
        if row is None:
            raise NotFound(f"No such File object: {file_id}", param="file_id")
        return _record(row._mapping)

    async def page(
        self,
        tenant: str,
        purpose: str | None,
        limit: int,
        after: str | None,
        newest_first: bool = True,
    ) -> tuple[list[FileRecord], bool]:
        """A page of the tenant's files, and whether there are more."""
        await self._db.open()
        c = FILES.c
        order = (c.created_at.desc(), c.id.desc()) if newest_first else (c.created_at, c.id)
        stmt = select(FILES).where(c.tenant == tenant, c.deleted_at.is_(None))
        if purpose is not None:
            stmt = stmt.where(c.purpose == purpose)
        if after is not None:
            mark = await self.get(tenant, after)
            stmt = stmt.where(after_mark(FILES, mark.created_at, mark.id, newest_first))
        stmt = stmt.order_by(*order).limit(limit + 1)
        async with self._db.engine.connect() as conn:
            rows = [_record(r._mapping) for r in await conn.execute(stmt)]
        return rows[:limit], len(rows) > limit

    async def delete(self, tenant: str, file_id: str) -> FileRecord:
        record = await self.get(tenant, file_id)
        async with self._db.engine.begin() as conn:
            await conn.execute(
                update(FILES).where(FILES.c.id == file_id).values(deleted_at=self._now())
            )
        await self.store.delete(record.object_key)
        return record

    def content(self, record: FileRecord) -> AsyncIterator[bytes]:
        return self.store.read(record.object_key)

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.wall(), UTC)


async def _at_most(chunks: AsyncIterable[bytes], limit: int) -> AsyncIterator[bytes]:
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(
                f"The file is larger than {limit} bytes ([batch] max_file_bytes). Split it."
            )
        yield chunk


def _row(record: FileRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "tenant": record.tenant,
        "key_id": record.key_id,
        "purpose": record.purpose,
        "filename": record.filename,
        "bytes": record.bytes,
        "object_key": record.object_key,
        "created_at": record.created_at,
    }


def _record(m: Any) -> FileRecord:
    return FileRecord(
        id=m["id"],
        tenant=m["tenant"],
        key_id=m["key_id"],
        purpose=m["purpose"],
        filename=m["filename"],
        bytes=m["bytes"],
        object_key=m["object_key"],
        created_at=m["created_at"],
    )
