"""Ending a batch: its segments joined into the output and error files, its final status.

Idempotent, so a replica that takes over a batch half-finished simply finishes it again:
the result files have ids made from the batch's (the same on every try), their objects are
written whole before they are listed, and the segment objects are deleted only after the
final status is recorded.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from spillway.batch.catalog import RESULT_PURPOSE, FileCatalog
from spillway.batch.jobs import BatchStore, LeaseLost
from spillway.batch.lines import BatchLine, unrun_line
from spillway.batch.records import BatchRecord, Status
from spillway.errors import NotFound

log = logging.getLogger("spillway.batch")
EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."
#: the status a batch ends with, by the status it was in when its work stopped
_FINAL = {"completed": "completed", "expired": "expired", "cancelled": "cancelled",
          "cancelling": "cancelled"}  # fmt: skip


class Finisher:
    def __init__(self, record: BatchRecord, jobs: BatchStore, files: FileCatalog, owner: str):
        self._record = record
        self._jobs = jobs
        self._files = files
        self._owner = owner

    async def finish(self, status: str) -> None:
        """``status``: how the work ended (``completed``, ``expired``, ``cancelled``), or the
        batch's status when another replica left it (``finalizing``, ``cancelling``)."""
        if status == "failed":
            await self._jobs.release(self._record.id, self._owner)
            return
        if status == "finalizing":
            current = await self._jobs.get(None, self._record.id)
            status = "expired" if current.times.get("expired_at") else "completed"
        final = _FINAL[status]
        now = self._jobs.now()
        if final != "cancelled":
            stamp = {"expired_at": now} if final == "expired" else {}
            finalizing = {"status": "finalizing", "finalizing_at": now, **stamp}
            if not await self._jobs.update(
                self._record.id, self._owner, ("in_progress", "finalizing"), **finalizing
            ):
                final = await self._cancelled_meanwhile()
        segments = await self._jobs.segments(self._record.id)
        output = await self._join("output", [s.output_key for s in segments])
        errors = await self._join("error", [s.error_key for s in segments])
        ended = {"completed": "completed_at", "expired": "expired_at", "cancelled": "cancelled_at"}
        values: dict[str, Any] = {
            "status": final,
            ended[final]: self._jobs.now(),
            "output_file_id": output,
            "error_file_id": errors,
            "lease_owner": None,
            "lease_until": None,
        }
        expect: tuple[Status, ...] = ("cancelling",) if final == "cancelled" else ("finalizing",)
        if not await self._jobs.update(self._record.id, self._owner, expect, **values):
            raise LeaseLost(self._record.id)
        log.info("batch %s %s", self._record.id, final)
        for key in (k for s in segments for k in (s.output_key, s.error_key) if k):
            with contextlib.suppress(Exception):  # best effort: nothing refers to them now
                await self._files.store.delete(key)

    async def _cancelled_meanwhile(self) -> str:
        """Finalizing was refused: a cancel came after the last lines ran, or the lease went."""
        current = await self._jobs.get(None, self._record.id)
        if current.status == "cancelling":
            return "cancelled"
        raise LeaseLost(self._record.id)

    async def _join(self, kind: str, keys: list[str | None]) -> str | None:
        parts = [k for k in keys if k]
        if not parts:
            return None
        record = self._record
        digest = hashlib.sha256(f"{record.id}:{kind}".encode()).hexdigest()[:24]
        file_id = f"file-{digest}"
        object_key = f"files/{file_id}"
        size = await self._files.store.write(object_key, self._chunks(parts))
        try:
            await self._files.get(None, file_id)
        except NotFound:
            filename = f"{record.id}_{kind}.jsonl"
            await self._files.add(
                record.tenant, record.key_id, RESULT_PURPOSE, filename, object_key, size, file_id
            )
        return file_id

    async def _chunks(self, keys: list[str]) -> AsyncIterator[bytes]:
        for key in keys:
            async for chunk in self._files.store.read(key):
                yield chunk


async def expire_rest(lines: AsyncIterator[BatchLine]) -> AsyncIterator[tuple[int, bytes]]:
    """An error line for each line not run before the window closed."""
    async for line in lines:
        yield line.number, unrun_line(line.custom_id, "batch_expired", EXPIRED_MESSAGE)
