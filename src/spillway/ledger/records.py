"""One ledger record per request, and the store contract every backend meets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Literal, Protocol

Source = Literal["private", "cloud", "cache"]
Status = Literal["ok", "error", "incomplete"]


@dataclass(slots=True)  # not frozen: one is made per request, and a frozen init is 2x dearer
class LedgerRecord:
    """What one request was, what it used, and what it cost.

    ``cost`` is what the answer cost on the node that served it; ``reference_cost`` is what the
    same tokens would have cost at the reference price (GPT-4.1 by default), so
    ``reference_cost - cost`` is what private serving or the cache saved against the
    reference; for a cache hit (``source`` "cache", ``cost`` 0) ``avoided_cost`` is what it
    saved against serving it again where it was first served. Amounts are in the
    ledger currency (``currency``). Tokens are ints; ``tokens_estimated`` says they were
    estimated rather than reported by the node or counted with its tokenizer.
    """

    request_id: str
    at: datetime  # timezone-aware, UTC
    tenant: str
    key_id: str  # a short digest of the API key ("" in open mode), never the key
    model: str  # the public model the client asked for
    node: str | None  # None when no node answered
    source: Source | None
    upstream_model: str | None
    prompt_tokens: int
    completion_tokens: int
    tokens_estimated: bool
    cost: Decimal
    reference_cost: Decimal
    currency: str
    latency_ms: int
    ttft_ms: int | None
    status: Status
    error_code: str | None = None
    #: the x-request-id the client sent, if any (``request_id`` is always spillway's own)
    client_request_id: str | None = None
    #: a cache hit: what answering it again on the node that first answered would have cost
    avoided_cost: Decimal = Decimal(0)
    #: what the personal-data step did ("private_only", "mask", "block") and found
    #: ("email=1,mobile=2": kinds and counts, never a value); None when it found nothing
    pii_action: str | None = None
    pii_kinds: str | None = None
    #: the batch this request was a line of (``/v1/batches``); None for others
    batch_id: str | None = None


class LedgerStore(Protocol):
    """A durable place for ledger records (SQLite embedded, PostgreSQL at scale)."""

    async def open(self) -> None:
        """Connect and bring the schema up to date (migrations are idempotent)."""
        ...

    async def write(self, records: Sequence[LedgerRecord]) -> None:
        """Store records in one transaction; a record already stored (same request_id) is kept."""
        ...

    async def query(
        self, since: datetime | None = None, until: datetime | None = None
    ) -> list[LedgerRecord]:
        """Records with since <= at < until, oldest first."""
        ...

    async def spend(self, key_id: str, since: datetime) -> Decimal:
        """Total ``cost`` of one key's records since ``since``."""
        ...

    async def delete_before(self, cutoff: datetime) -> int:
        """Retention: delete records older than ``cutoff``; returns how many."""
        ...

    async def aclose(self) -> None: ...
