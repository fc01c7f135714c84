"""The exact-answer store contract: SQLite embedded (``sqlite_store``), Redis shared
(``redis_store``). Keys are already tenant-scoped HMACs (``cache.keys``); ``tenant`` and
``model`` ride along only so operators can count and clear by them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored answer. ``value`` is opaque to the store; ``expires_at`` is wall-clock
    epoch seconds (``Clock.wall()``)."""

    key: str
    tenant: str
    model: str
    value: bytes
    expires_at: float


@dataclass(frozen=True, slots=True)
class ScopeStats:
    """What one (tenant, model) holds in a store."""

    tenant: str
    model: str
    entries: int
    bytes: int
    hits: int


class CacheStore(Protocol):
    """Where exact answers live. Every method may raise on an outage; the caller
    (``cache.service``) turns that into a miss, never into a failed request."""

    async def open(self) -> None:
        """Connect (and create what is missing). A failure here is logged, not fatal: later
        calls try again."""
        ...

    async def get(self, key: str) -> bytes | None:
        """The value, or None when absent or expired. A hit counts and refreshes recency."""
        ...

    async def set(self, entry: Entry) -> None:
        """Store (or replace) an entry, evicting the least recently used over the size cap."""
        ...

    async def clear(self, tenant: str | None = None, model: str | None = None) -> int:
        """Delete every entry of ``tenant`` and/or ``model`` (all when both are None)."""
        ...

    async def stats(self) -> list[ScopeStats]:
        """Live (unexpired) entries per (tenant, model)."""
        ...

    async def aclose(self) -> None: ...
