"""Files and batches as the database keeps them and as the OpenAI API shows them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import Table

Status = Literal[
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
    "cancelled",
]  # fmt: skip
#: statuses a replica still has work to do for (under the batch's lease)
ACTIVE: tuple[Status, ...] = ("validating", "in_progress", "finalizing", "cancelling")
#: statuses a cancel request may move on to ``cancelling``
CANCELLABLE: tuple[Status, ...] = ("validating", "in_progress")
TIMES = (
    "created_at", "in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
    "cancelling_at", "cancelled_at", "expires_at",
)  # fmt: skip


def after_mark(table: Table, created: datetime, mark_id: str, newest_first: bool) -> Any:
    """The rows a page after the row (``created``, ``mark_id``) holds, in (created_at, id)
    order: the older ones when the newest come first, else the newer ones."""
    c = table.c
    if newest_first:
        return (c.created_at < created) | ((c.created_at == created) & (c.id < mark_id))
    return (c.created_at > created) | ((c.created_at == created) & (c.id > mark_id))


def unix(at: datetime | None) -> int | None:
    return None if at is None else int(at.timestamp())


@dataclass(frozen=True, slots=True)
class FileRecord:
    id: str
    tenant: str
    key_id: str
    purpose: str
    filename: str
    bytes: int
    object_key: str
    created_at: datetime

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": unix(self.created_at),
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
            "expires_at": None,
        }


@dataclass(frozen=True, slots=True)
class BatchRecord:
    id: str
    tenant: str
    key_id: str
    #: the submitting key's policy, as the lines run with it (``BatchPrincipal``)
    principal: dict[str, Any]
    endpoint: str
    input_file_id: str
    completion_window: str
    metadata: dict[str, str] | None
    status: Status
    errors: list[dict[str, Any]] | None
    output_file_id: str | None
    error_file_id: str | None
    times: dict[str, datetime | None]
    total: int = 0
    completed: int = 0
    failed: int = 0

    def public(self) -> dict[str, Any]:
        errors = None if self.errors is None else {"object": "list", "data": self.errors}
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": errors,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            **{name: unix(self.times.get(name)) for name in TIMES},
            "request_counts": {
                "total": self.total,
                "completed": self.completed,
                "failed": self.failed,
            },
            "metadata": self.metadata,
        }

    @property
    def expires_at(self) -> datetime:
        at = self.times["expires_at"]
        assert at is not None  # set at creation
        return at
