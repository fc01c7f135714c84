"""The batch work of one replica: find batches with work to do, take their leases, run them.

Every ``[batch] poll_s`` it looks for batches that are active and not leased (new ones, and
those whose replica stopped renewing: crashed, killed, cut off) and runs up to
``MAX_BATCHES`` at once, each under its lease. At shutdown it stops its runners and gives
their leases back, so another replica takes them over at its next poll rather than after
the lease runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from datetime import timedelta

from spillway.batch.records import Status
from spillway.batch.runner import BatchRunner, InputUnavailable, Workplace

log = logging.getLogger("spillway.batch")
MAX_BATCHES = 4
Claimable = tuple[str, Status, str]  # id, status, tenant
#: how many waiting batches a look considers (to find other tenants' behind one's flood)
LOOK_AT = 200
#: how long a replica leaves alone a batch whose input it cannot read
SKIP_S = 60.0


def replica_name() -> str:
    """Who holds a lease: host, process, and a random part (a restarted process is new)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class BatchWorker:
    def __init__(self, place: Workplace):
        self._place = place
        self._jobs, self._config, self._clock = place.jobs, place.config, place.clock
        self.owner = replica_name()
        self._running: dict[str, asyncio.Task[None]] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._failing = False
        #: batches this replica cannot work (their input is not in its storage), until then
        self._skip_until: dict[str, float] = {}
        #: the tenant of each batch running here
        self._tenants: dict[str, str] = {}

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    def wake(self) -> None:
        """Look for work now (a batch was just created)."""
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            try:
                await self._take_work()
                self._failing = False
            except Exception as exc:  # the database is away: try again at the next poll
                if not self._failing:
                    log.warning("batch: cannot look for work (%s)", type(exc).__name__)
                self._failing = True
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._config.poll_s):
                    await self._wake.wait()
            self._wake.clear()

    async def _take_work(self) -> None:
        """Claim what this replica has room for; a batch to cancel whatever the room (it
        only needs its results joined)."""
        lease = timedelta(seconds=self._config.lease_s)
        now = self._clock.monotonic()
        for batch_id, status, tenant in _fair(await self._jobs.claimable(LOOK_AT), self._tenants):
            full = len(self._running) >= MAX_BATCHES and status != "cancelling"
            skipped = self._skip_until.get(batch_id, 0.0) > now
            if batch_id in self._running or full or skipped:
                continue
            if not await self._jobs.claim(batch_id, self.owner, lease):
                continue  # another replica was quicker
            record = await self._jobs.get(None, batch_id)
            runner = BatchRunner(record, self._place, self.owner)
            self._running[batch_id] = asyncio.create_task(self._run(runner))
            self._tenants[batch_id] = tenant

    async def _run(self, runner: BatchRunner) -> None:
        batch_id = runner.record.id
        try:
            await runner.run()
        except asyncio.CancelledError:
            raise
        except InputUnavailable:
            # Its input is in another replica's storage ([storage] url unset with a shared
            # database): leave it to them, and say why once.
            log.warning(
                "batch %s: its input is not in this replica's storage; set [storage] url to "
                "storage every replica shares",
                batch_id,
            )
            self._skip_until[batch_id] = self._clock.monotonic() + SKIP_S
            with contextlib.suppress(Exception):
                await self._jobs.release(batch_id, self.owner)
        except Exception:
            # Kept under its lease until it runs out: then this or another replica tries
            # again from its last segment.
            log.exception("batch %s: its run failed; it is taken up again later", batch_id)
        finally:
            self._running.pop(batch_id, None)
            self._tenants.pop(batch_id, None)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        running = list(self._running.items())
        for _, task in running:
            task.cancel()
        await asyncio.gather(*(t for _, t in running), return_exceptions=True)
        for batch_id, _ in running:
            with contextlib.suppress(Exception):
                await self._jobs.release(batch_id, self.owner)


def _fair(waiting: list[Claimable], running: dict[str, str]) -> list[Claimable]:
    """Batches to cancel first; then, oldest first, one tenant's batches behind those of
    tenants with fewer running here: a tenant that submits a thousand batches does not keep
    another's one waiting."""
    busy: dict[str, int] = {}
    for tenant in running.values():
        busy[tenant] = busy.get(tenant, 0) + 1
    order: list[tuple[int, int, int]] = []
    seen: dict[str, int] = {}
    for place, (_, status, tenant) in enumerate(waiting):
        rank = busy.get(tenant, 0) + seen.get(tenant, 0)
        seen[tenant] = seen.get(tenant, 0) + 1
        order.append((0 if status == "cancelling" else 1, rank, place))
    return [waiting[place] for _, _, place in sorted(order)]
