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

from spillway.batch.catalog import FileCatalog
from spillway.batch.jobs import BatchStore
from spillway.batch.runner import BatchRunner
from spillway.clock import Clock
from spillway.config.batch import BatchConfig
from spillway.pipeline.service import Pipeline
from spillway.secrets import Redactor

log = logging.getLogger("spillway.batch")
MAX_BATCHES = 4


def replica_name() -> str:
    """Who holds a lease: host, process, and a random part (a restarted process is new)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class BatchWorker:
    def __init__(
        self,
        jobs: BatchStore,
        files: FileCatalog,
        pipeline: Pipeline,
        redactor: Redactor,
        config: BatchConfig,
        clock: Clock,
    ):
        self._jobs = jobs
        self._files = files
        self._pipeline = pipeline
        self._redactor = redactor
        self._config = config
        self._clock = clock
        self.owner = replica_name()
        self._running: dict[str, asyncio.Task[None]] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._failing = False

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
        room = MAX_BATCHES - len(self._running)
        if room <= 0:
            return
        lease = timedelta(seconds=self._config.lease_s)
        for batch_id in await self._jobs.claimable(room + len(self._running)):
            if batch_id in self._running or len(self._running) >= MAX_BATCHES:
                continue
            if not await self._jobs.claim(batch_id, self.owner, lease):
                continue  # another replica was quicker
            record = await self._jobs.get(None, batch_id)
            runner = BatchRunner(
                record,
                self._jobs,
                self._files,
                self._pipeline,
                self._redactor,
                self._config,
                self._clock,
                self.owner,
            )
            task = asyncio.create_task(self._run(runner))
            self._running[batch_id] = task

    async def _run(self, runner: BatchRunner) -> None:
        batch_id = runner.record.id
        try:
            await runner.run()
        except asyncio.CancelledError:
            raise
        except Exception:
            # Kept under its lease until it runs out: then this or another replica tries
            # again from its last segment.
            log.exception("batch %s: its run failed; it is taken up again later", batch_id)
        finally:
            self._running.pop(batch_id, None)

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
