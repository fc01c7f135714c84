"""Ledger retention: records older than ``retention_days`` are deleted, once an hour."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

from spillway.clock import Clock
from spillway.ledger.records import LedgerStore

log = logging.getLogger("spillway.ledger")


async def prune(store: LedgerStore, retention_days: int, clock: Clock) -> int:
    cutoff = datetime.fromtimestamp(clock.wall(), UTC) - timedelta(days=retention_days)
    deleted = await store.delete_before(cutoff)
    if deleted:
        log.info("ledger retention: deleted %d records older than %s", deleted, cutoff.date())
    return deleted


async def retention_loop(
    store: LedgerStore, retention_days: int, clock: Clock, interval_s: float = 3600.0
) -> None:
    while True:
        try:
            await prune(store, retention_days, clock)
        except Exception:
            log.exception("ledger retention failed; will try again")
        await asyncio.sleep(interval_s)
