"""What the Files and Batches doors share: the catalog, the batch store, the worker, and the
checks a new batch must pass before it is accepted."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from spillway.access.records import parse_duration
from spillway.batch.catalog import UPLOAD_PURPOSES, FileCatalog
from spillway.batch.jobs import BatchStore, new_batch_id
from spillway.batch.lines import ENDPOINTS
from spillway.batch.records import BatchRecord, FileRecord
from spillway.batch.worker import BatchWorker
from spillway.config.batch import BatchConfig
from spillway.errors import InvalidRequest, SpillwayError
from spillway.pipeline.principal import Principal

_MAX_METADATA = 16


@dataclass(frozen=True, slots=True)
class Batches:
    files: FileCatalog
    jobs: BatchStore
    config: BatchConfig
    #: None: this replica serves the API and runs no batch (``[batch] run = false``)
    worker: BatchWorker | None

    async def create(self, principal: Principal, body: dict[str, Any]) -> BatchRecord:
        """A new batch, ``validating``: its lines are checked by the replica that takes it."""
        endpoint = body.get("endpoint")
        if endpoint not in ENDPOINTS:
            raise InvalidRequest(
                f"endpoint must be one of {', '.join(ENDPOINTS)}", param="endpoint"
            )
        window = body.get("completion_window")
        seconds = _window_s(window, self.config.max_window_s)
        file_id = body.get("input_file_id")
        if not isinstance(file_id, str):
            raise InvalidRequest("input_file_id is required", param="input_file_id")
        source = await self.files.get(principal.tenant, file_id)
        if source.purpose not in UPLOAD_PURPOSES:
            raise InvalidRequest(
                f"{file_id} has purpose '{source.purpose}'; upload the input with purpose 'batch'",
                param="input_file_id",
            )
        if await self.jobs.active_count(principal.tenant) >= self.config.max_active_per_tenant:
            busy = SpillwayError(
                f"This tenant has {self.config.max_active_per_tenant} unfinished batches "
                "([batch] max_active_per_tenant); wait for some to finish."
            )
            busy.status, busy.code, busy.kind = 429, "too_many_batches", "rate_limit_error"
            raise busy
        now = self.jobs.now()
        record = BatchRecord(
            id=new_batch_id(),
            tenant=principal.tenant,
            key_id=principal.key_id,
            principal=_policy(principal),
            endpoint=str(endpoint),
            input_file_id=file_id,
            completion_window=str(window),
            metadata=_metadata(body.get("metadata")),
            status="validating",
            errors=None,
            output_file_id=None,
            error_file_id=None,
            times={"created_at": now, "expires_at": _after(now, seconds)},
        )
        await self.jobs.create(record)
        if self.worker is not None:
            self.worker.wake()
        return record


async def delete_unused(batches: Batches, tenant: str, file_id: str) -> FileRecord:
    """Delete a file, unless an unfinished batch still reads it."""
    user = await batches.jobs.using(tenant, file_id)
    if user is not None:
        raise InvalidRequest(
            f"{file_id} is the input of {user.id}, which is {user.status}; cancel it first.",
            param="file_id",
        )
    return await batches.files.delete(tenant, file_id)


def _window_s(window: Any, most_s: float) -> float:
    if not isinstance(window, str):
        raise InvalidRequest("completion_window is required, e.g. '24h'", param="completion_window")
    try:
        seconds = parse_duration(window).total_seconds()
    except ValueError as exc:
        raise InvalidRequest(f"completion_window: {exc}", param="completion_window") from None
    if not 60 <= seconds <= most_s:
        raise InvalidRequest(
            f"completion_window must be from 1m to {int(most_s // 3600)}h",
            param="completion_window",
        )
    return seconds


def _after(now: datetime, seconds: float) -> datetime:
    return now + timedelta(seconds=seconds)


def _metadata(value: Any) -> dict[str, str] | None:
    """OpenAI's rule: up to 16 pairs, keys up to 64 characters, values up to 512."""
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > _MAX_METADATA:
        raise InvalidRequest("metadata must be an object of at most 16 pairs", param="metadata")
    for key, item in value.items():
        if not isinstance(item, str) or len(key) > 64 or len(item) > 512:
            raise InvalidRequest(
                "metadata keys are at most 64 characters, values strings of at most 512",
                param="metadata",
            )
    return dict(value)


def _policy(principal: Principal) -> dict[str, Any]:
    """What of the key the lines run with."""
    models = sorted(principal.models) if principal.models is not None else None
    return {"private_only": principal.private_only, "pii": principal.pii, "models": models}
