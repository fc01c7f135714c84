"""Write-behind for the ledger: the request path appends, one background task writes.

``record()`` is synchronous and O(1): it appends to an in-memory queue and returns, so a
response never waits on the disk or the database. A background task writes what is pending
every ``flush_interval_s``, sooner once ``max_batch`` records wait, in batches of at most
``max_batch``, oldest first. A batch leaves the queue only after the store has taken it, so a
failed write loses nothing: the records stay, in order, and the task retries with doubling
backoff (capped at 5 s), logging the error once per failure streak and once on recovery. A
retried batch that the store had in fact committed is harmless: the store ignores a
``request_id`` it already holds.

With a ``Spool`` (``ledger/spool.py``), a store that fails a write does not make the records
wait in memory: the batch is moved to local disk, and so is each later one until the store
takes writes again; then the spooled segments are written, oldest first, each exactly once.

Graceful shutdown (``aclose()``) lets the task finish its current write, then writes
everything still pending. If the store is down that goes to the spool at once; without a
spool it retries for up to ``close_timeout_s`` (10 s), then the log says how many records
could not be written (they are still counted in ``pending``).

What a hard kill (SIGKILL, OOM, power cut) can lose: exactly what was pending, i.e. records
accepted since the last successful write or spill: about one flush interval's worth (0.5 s
by default). Without a spool, everything recorded during a store outage that has not ended
yet.

Waits use the event loop's own time, not the injected clock: a ``ManualClock`` shared with the
request path must not be moved by a background loop. The clock times failure streaks.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import orjson

from spillway.clock import Clock
from spillway.ledger.records import LedgerRecord, LedgerStore
from spillway.ledger.spool import Spool

log = logging.getLogger("spillway.ledger")

MAX_BACKOFF_S = 5.0
#: The longest one write may take before it counts as failed: a database that accepts
#: connections but never answers (frozen, or behind a black-holing network) must not hold
#: the records in memory for ever. A batch takes milliseconds when the store is well.
WRITE_TIMEOUT_S = 5.0
#: how often a writer with nothing of its own spooled still looks for spooled segments
SPOOL_LOOK_S = 10.0
CLOSE_TIMEOUT_S = 10.0
#: Records per write. Large, so that under load a write happens about once per flush interval,
#: not once per few hundred requests: each write has a fixed cost (a hand-off to the store's
#: thread or connection, a transaction), and records in memory are cheap.
MAX_BATCH = 2000
#: What a store raises for a record it can never take (a value out of its range), as opposed
#: to being unavailable: such a record is set aside, not retried for ever.
RECORD_ERRORS = (ValueError, OverflowError, TypeError)


@dataclass(frozen=True, slots=True)
class WriterStats:
    """Counters for metrics: records written, records waiting, failed write attempts."""

    written: int
    pending: int
    failures: int
    #: records set aside because no store could take them (each logged whole)
    rejected: int = 0
    #: records on local disk, waiting for the store
    spooled: int = 0


class LedgerWriter:
    """Buffers ledger records in memory and writes them to a ``LedgerStore`` in the
    background. ``start()`` once on the event loop, ``record()`` per request, ``aclose()``
    at shutdown."""

    def __init__(
        self,
        store: LedgerStore,
        clock: Clock,
        flush_interval_s: float = 0.5,
        max_batch: int = MAX_BATCH,
        close_timeout_s: float = CLOSE_TIMEOUT_S,
        spool: Spool | None = None,
    ):
        if flush_interval_s <= 0 or max_batch < 1:
            raise ValueError("flush_interval_s must be > 0 and max_batch >= 1")
        self._store = store
        self._spool = spool
        self._spooled = 0
        self._next_look = 0.0
        self._clock = clock
        self._interval = flush_interval_s
        self._max_batch = max_batch
        self._close_timeout = close_timeout_s
        self._pending: deque[LedgerRecord] = deque()
        self._wake = asyncio.Event()
        self._flushing = asyncio.Lock()  # one writer at a time keeps the queue's order exact
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._closed = False
        self._written = 0
        self._failures = 0
        self._rejected = 0
        self._streak_started: float | None = None  # clock.monotonic() of a streak's 1st failure

    @property
    def pending(self) -> int:
        return len(self._pending)

    def stats(self) -> WriterStats:
        pending, failures = len(self._pending), self._failures
        return WriterStats(self._written, pending, failures, self._rejected, self._spooled)

    def record(self, rec: LedgerRecord) -> None:
        """Queue one record; never waits. Raises only on a caller bug (see below)."""
        if self._closed:
            raise RuntimeError("ledger writer is closed: record() after aclose() would be lost")
        if rec.at.tzinfo is None:
            # Refuse here, where the bug is, rather than stall the queue behind a record
            # that no store would ever accept.
            raise ValueError(f"ledger record {rec.request_id}: `at` must be timezone-aware")
        self._pending.append(rec)
        if len(self._pending) >= self._max_batch:
            self._wake.set()

    def start(self) -> None:
        """Launch the background flush task (on the running event loop)."""
        if self._task is None and not self._closed:
            self._task = asyncio.create_task(self._run(), name="ledger-writer")

    async def flush(self) -> None:
        """Write the records pending when it is called; raises what the store raises (the
        records are kept). Records that arrive meanwhile wait for the next flush: chasing
        them under load made a write of a hundred records every few milliseconds, and each
        write costs the event loop its hand-offs (see ``sqlite_writes``) whatever its size."""
        async with self._flushing:
            left = len(self._pending)
            while left > 0 and self._pending:
                batch = list(itertools.islice(self._pending, min(left, self._max_batch)))
                left -= len(batch)
                try:
                    await self._write(batch)
                except RECORD_ERRORS:
                    await self._write_each(batch)
                    continue
                # Flushes never overlap and record() only appends, so the batch is still
                # the oldest ``len(batch)`` records.
                for _ in batch:
                    self._pending.popleft()
                self._written += len(batch)

    async def _write_each(self, batch: list[LedgerRecord]) -> None:
        """The store refused the batch for what is in it, not for being down: write its
        records one by one, and set aside (log whole, count) any it cannot take, so that one
        bad record never stops the ledger. A store that fails meanwhile raises as usual."""
        for record in batch:
            await self._write_one(record)
            self._pending.popleft()

    async def _write_one(self, record: LedgerRecord) -> None:
        """Write one record, or set it aside (logged whole, counted) if no store can take it."""
        try:
            await self._write([record])
        except RECORD_ERRORS as exc:
            self._rejected += 1
            log.error(
                "ledger: a record no store can take was set aside (%s): %s",
                _describe(exc),
                orjson.dumps(asdict(record), default=str).decode(),
            )
        else:
            self._written += 1

    async def aclose(self) -> None:
        """Stop the task and write everything still pending (retrying up to close_timeout_s)."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._close_timeout
        await self._stop_task(deadline)
        delay = min(self._interval, MAX_BACKOFF_S)
        while self._pending:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(remaining):
                    await self.flush()
            except TimeoutError:
                break
            except Exception as exc:
                self._failed(exc)
                if self._spool is not None:
                    break  # nothing is lost by spooling: no need to hold the shutdown up
                await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
                delay = min(delay * 2, MAX_BACKOFF_S)
        if self._pending and await self._spill():
            log.warning(
                "ledger: store unavailable at shutdown; %d records are in %s and will be "
                "written when it takes writes again",
                self._spooled,
                self._spool.directory if self._spool else "",
            )
        elif self._pending:
            log.error(
                "ledger: %d records could not be written before shutdown (store unavailable)",
                len(self._pending),
            )
        elif self._streak_started is not None:
            self._recovered()

    async def _stop_task(self, deadline: float) -> None:
        """Let the task finish its current write and exit; cancel it if it takes too long."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        self._wake.set()
        remaining = max(0.0, deadline - asyncio.get_running_loop().time())
        _, still_running = await asyncio.wait({task}, timeout=remaining)
        if still_running:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _run(self) -> None:
        if self._spool is not None:  # what an earlier run left on disk
            self._spooled = await asyncio.to_thread(self._spool.count)
        delay = self._interval
        while not self._stopping:
            # While failing, wait out the backoff even if a batch fills up meanwhile.
            await self._wait(delay, early_on_batch=self._streak_started is None)
            if self._stopping:
                return
            try:
                await self.flush()
                await self._drain()
            except Exception as exc:
                self._failed(exc)
                await self._spill()
                delay = min(delay * 2, MAX_BACKOFF_S)
            else:
                if self._streak_started is not None:
                    self._recovered()
                delay = self._interval

    async def _spill(self) -> bool:
        """Move every pending record to the spool (False: there is none, or the disk
        refused; the records then stay in memory)."""
        spool = self._spool
        if spool is None:
            return False
        async with self._flushing:
            while self._pending:
                batch = list(itertools.islice(self._pending, self._max_batch))
                try:
                    await asyncio.to_thread(spool.append, batch)
                except OSError as exc:
                    log.error("ledger: cannot spool to %s: %s", spool.directory, _describe(exc))
                    return False
                for _ in batch:
                    self._pending.popleft()
                self._spooled += len(batch)
        return True

    async def _drain(self) -> None:
        """Write the spooled segments to the store, oldest first; raises what it raises."""
        spool = self._spool
        if spool is None:
            return
        # Several processes may share a data directory (``--workers``): each looks at the
        # directory now and then even with nothing of its own spooled.
        now = self._clock.monotonic()
        if not self._spooled and now < self._next_look:
            return
        self._next_look = now + SPOOL_LOOK_S
        for segment in await asyncio.to_thread(spool.segments):
            try:
                records = await asyncio.to_thread(spool.read, segment)
            except (ValueError, TypeError, KeyError, OSError) as exc:
                bad = await asyncio.to_thread(spool.set_aside, segment)
                log.error("ledger: spool file %s cannot be read, set aside: %s", bad, exc)
                continue
            try:
                await self._write(records)  # a record written before is ignored
            except RECORD_ERRORS:
                for record in records:  # one bad record must not keep the segment for ever
                    await self._write_one(record)
            else:
                self._written += len(records)
            await asyncio.to_thread(spool.remove, segment)
            self._spooled = max(0, self._spooled - len(records))
            log.info("ledger: wrote %d spooled records from %s", len(records), segment.name)

    async def _write(self, records: Sequence[LedgerRecord]) -> None:
        async with asyncio.timeout(WRITE_TIMEOUT_S):
            await self._store.write(records)

    async def _wait(self, seconds: float, early_on_batch: bool) -> None:
        """Sleep ``seconds``; wake at once on stop, and on a full batch if ``early_on_batch``."""
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        while not self._stopping:
            if early_on_batch and len(self._pending) >= self._max_batch:
                return
            self._wake.clear()
            remaining = until - loop.time()
            if remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._wake.wait()

    def _failed(self, exc: Exception) -> None:
        self._failures += 1
        if self._streak_started is not None:
            log.debug("ledger: write failed again: %s", _describe(exc))
            return
        self._streak_started = self._clock.monotonic()
        where = f" on disk in {self._spool.directory}" if self._spool else ""
        log.error(
            "ledger: write failed, keeping %d records%s and retrying: %s",
            len(self._pending),
            where,
            _describe(exc),
        )

    def _recovered(self) -> None:
        assert self._streak_started is not None
        down_s = self._clock.monotonic() - self._streak_started
        self._streak_started = None
        log.warning("ledger: store writable again after %.1f s; nothing was lost", down_s)


def _describe(exc: BaseException) -> str:
    """The exception's kind and first line only: driver errors append the SQL and its
    parameters on later lines, and a log line has no use for either."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__
