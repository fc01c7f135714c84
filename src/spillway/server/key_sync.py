"""Keeps a running gateway's managed keys in step with the database, on every replica.

Once a second (``POLL_S``) it reads ``key_revision``, one integer; when the integer moved,
it loads the usable keys and replaces the ring's managed set whole, and adds the budgets of
keys it has not seen. So a key issued or revoked anywhere (the CLI, another replica's
``/admin/keys``) takes effect here within about a second, without a restart. When the
database does not answer, the last set loaded stays in force and the poll goes on.

It also writes when managed keys were last used, every ``TOUCH_S``, from what the ring
noted; that never moves the revision.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from spillway.access.audit import AuditTrail
from spillway.access.store import KeyStore, SecretMismatch
from spillway.access.tokens import KeyHasher
from spillway.clock import Clock
from spillway.ledger.budgets import Budgets
from spillway.ledger.sql import SqlLedgerStore
from spillway.server.auth import KeyRing

log = logging.getLogger("spillway.keys")
POLL_S = 1.0
TOUCH_S = 10.0


class KeySync:
    def __init__(
        self,
        store: KeyStore,
        hasher: KeyHasher,
        ring: KeyRing,
        budgets: Budgets,
        ledger: SqlLedgerStore,
        clock: Clock,
        marker: Path | None = None,
    ):
        self._marker = marker
        self._store = store
        self._hasher = hasher
        self._ring = ring
        self._budgets = budgets
        self._ledger = ledger
        self._clock = clock
        self._revision: int | None = None
        self._failing = False
        self._last_touch = clock.monotonic()
        #: one refresh at a time: the admin API's and the poll's must not interleave, or the
        #: one that read first could install its older set last
        self._lock = asyncio.Lock()
        #: managed keys' budgets whose spend has not been read from the ledger yet
        self._unloaded: set[str] = set()

    async def refresh(self, force: bool = False) -> None:
        """Reload the keys if the revision moved (or ``force``). Raises what the database
        raised; ``SecretMismatch`` when its keys were hashed under another secret."""
        async with self._lock:
            await self._load_spend()
            revision = await self._store.revision()
            if revision == self._revision and not force:
                return
            if await self._store.has_keys():
                self._sealed()
            await self._store.check_secret(claim=False)
            keys = await self._store.for_gateway()
            self._ring.set_managed(self._hasher, keys)
            budgets = {k.key_id: k.policy.budget for k in keys if k.policy.budget}
            self._unloaded.update(self._budgets.add(budgets))
            await self._load_spend()
            if self._revision is not None:
                log.info("managed keys: revision %d, %d loaded", revision, len(keys))
            self._revision = revision

    def _sealed(self) -> None:
        """Keys are required from now on, here and after a restart that cannot read the
        database (``marker``, a file in the data directory)."""
        self._ring.seal()
        if self._marker is not None and not self._marker.exists():
            self._marker.parent.mkdir(parents=True, exist_ok=True)
            self._marker.touch()

    async def _load_spend(self) -> None:
        """What new keys already spent (a rotated key's successor shares its key id), until
        it has been read once for each: a failed read is tried again at the next poll."""
        if self._unloaded:
            await self._budgets.load(self._ledger, only=sorted(self._unloaded))
            self._unloaded.clear()

    async def run(self) -> None:
        while True:
            await self._clock.sleep(POLL_S)
            await self._poll_once()

    async def _poll_once(self) -> None:
        try:
            await self.refresh()
            if self._clock.monotonic() - self._last_touch >= TOUCH_S:
                await self.touch()
        except SecretMismatch as exc:
            self._sealed()
            self._ring.set_managed(self._hasher, ())
            self._complain(str(exc))
        except Exception as exc:  # the database is away: keep the last set and try again
            self._complain(
                f"cannot read the managed keys ({type(exc).__name__}); keeping the last set"
            )
        else:
            if self._failing:
                log.warning("managed keys: the database answers again")
            self._failing = False

    async def touch(self) -> None:
        used, self._ring.used = self._ring.used, {}
        self._last_touch = self._clock.monotonic()
        try:
            await self._store.touch(
                {prefix: datetime.fromtimestamp(at, UTC) for prefix, at in used.items()}
            )
        except Exception:
            # Not worth more than a retry: merge back what is not newer in the ring.
            for prefix, at in used.items():
                self._ring.used.setdefault(prefix, at)
            raise

    def _complain(self, problem: str) -> None:
        if not self._failing:
            log.error("managed keys: %s", problem)
        self._failing = True


@dataclass(frozen=True, slots=True)
class Access:
    """What the admin API needs: the key store, the audit trail, and the sync to nudge."""

    store: KeyStore
    audit: AuditTrail
    sync: KeySync


async def start_sync(sync: KeySync, timeout_s: float) -> asyncio.Task[None]:
    """Load the keys once before serving (so they work from the first request), then poll.
    A database that does not answer in ``timeout_s`` is an outage the gateway starts
    through; a secret that does not match is a mistake that stops the start."""
    try:
        async with asyncio.timeout(timeout_s):
            await sync.refresh(force=True)
    except SecretMismatch:
        raise
    except Exception as exc:
        log.warning(
            "managed keys: cannot read them at start (%s); serving configured keys until the "
            "database answers",
            type(exc).__name__,
        )
    return asyncio.create_task(sync.run())
