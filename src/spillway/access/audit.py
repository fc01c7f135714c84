"""The audit trail: admin actions from the ``audit`` table, and personal-data decisions from
the ledger rows of the requests they were made for, read as one list, newest first.

Nothing in it is a secret or a personal value: a key appears by prefix, a decision by the
kinds and counts it found.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from spillway.clock import Clock
from spillway.ledger.access_tables import AUDIT
from spillway.ledger.sql import SqlLedgerStore
from spillway.ledger.sql_schema import LEDGER

EventKind = Literal["admin", "pii"]


@dataclass(frozen=True, slots=True)
class AuditEvent:
    at: datetime
    kind: EventKind
    actor: str  # who: "cli:USER", "key:KEY_ID" (an admin key), "local" (open gateway)
    action: str  # key.create, key.revoke, key.rotate, cache.clear; pii.mask, pii.block, …
    tenant: str | None
    target: str | None  # a key prefix, a request id
    detail: dict[str, Any]

    def public(self) -> dict[str, Any]:
        return {
            "at": self.at.isoformat().replace("+00:00", "Z"),
            "kind": self.kind,
            "actor": self.actor,
            "action": self.action,
            "tenant": self.tenant,
            "target": self.target,
            "detail": self.detail,
        }


async def record_action(
    conn: AsyncConnection,
    at: datetime,
    actor: str,
    action: str,
    tenant: str | None,
    target: str | None,
    detail: dict[str, Any],
) -> None:
    """One admin action, inside the caller's transaction (so it lands with the change)."""
    await conn.execute(
        insert(AUDIT).values(
            at=at,
            actor=actor,
            action=action,
            tenant=tenant,
            target=target,
            detail=orjson.dumps(detail).decode(),
        )
    )


class AuditTrail:
    def __init__(self, database: SqlLedgerStore, clock: Clock):
        self._db = database
        self._clock = clock

    async def record(
        self,
        actor: str,
        action: str,
        tenant: str | None,
        target: str | None,
        detail: dict[str, Any],
    ) -> None:
        await self._db.open()
        now = datetime.fromtimestamp(self._clock.wall(), UTC)
        async with self._db.writing.begin() as conn:
            await record_action(conn, now, actor, action, tenant, target, detail)

    async def events(
        self,
        since: datetime | None = None,
        kinds: frozenset[EventKind] = frozenset({"admin", "pii"}),
        tenant: str | None = None,
        limit: int = 1000,
    ) -> list[AuditEvent]:
        """Newest first, at most ``limit``."""
        await self._db.open()
        found: list[AuditEvent] = []
        async with self._db.engine.connect() as conn:
            if "admin" in kinds:
                found += await _admin_events(conn, since, tenant, limit)
            if "pii" in kinds:
                found += await _pii_events(conn, since, tenant, limit)
        found.sort(key=lambda e: e.at, reverse=True)
        return found[:limit]


async def _admin_events(
    conn: AsyncConnection, since: datetime | None, tenant: str | None, limit: int
) -> list[AuditEvent]:
    stmt = select(AUDIT).order_by(AUDIT.c.at.desc(), AUDIT.c.id.desc()).limit(limit)
    if since is not None:
        stmt = stmt.where(AUDIT.c.at >= since)
    if tenant is not None:
        stmt = stmt.where(AUDIT.c.tenant == tenant)
    return [
        AuditEvent(r.at, "admin", r.actor, r.action, r.tenant, r.target, orjson.loads(r.detail))
        for r in await conn.execute(stmt)
    ]


async def _pii_events(
    conn: AsyncConnection, since: datetime | None, tenant: str | None, limit: int
) -> list[AuditEvent]:
    c = LEDGER.c
    stmt = (
        select(c.at, c.tenant, c.key_id, c.request_id, c.model, c.pii_action, c.pii_kinds, c.status)
        .where(c.pii_action.is_not(None))
        .order_by(c.at.desc())
        .limit(limit)
    )
    if since is not None:
        stmt = stmt.where(c.at >= since)
    if tenant is not None:
        stmt = stmt.where(c.tenant == tenant)
    return [
        AuditEvent(
            r.at,
            "pii",
            f"key:{r.key_id}" if r.key_id else "open",
            f"pii.{r.pii_action}",
            r.tenant,
            r.request_id,
            {"kinds": parse_kinds(r.pii_kinds), "model": r.model, "status": r.status},
        )
        for r in await conn.execute(stmt)
    ]


def parse_kinds(text: str | None) -> dict[str, int]:
    """``pii.policy.ledger_kinds``'s text back as counts."""
    if not text:
        return {}
    pairs = (item.partition("=") for item in text.split(","))
    return {kind: int(n) for kind, _, n in pairs if n.isdigit()}
