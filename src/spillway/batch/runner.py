"""Working one batch, under this replica's lease: validate, run its lines, finish.

Lines run as ordinary requests through the pipeline, as the key that submitted the batch,
marked ``Background``: each may take a private node only while that node has room under
``[batch] max_share`` of its ``max_concurrency``, so interactive requests always find the
rest, and batch lines yield as interactive load rises (they are not started, rather than
queued). A line goes to a cloud node only when the batch would otherwise miss its window
(``Pace``), and never for a ``private_only`` key.

Results are buffered and made durable in segments (``Checkpoint``): the objects first, under
names no other run can take, then the segment's row with its line numbers, fenced by the
lease. A line is done once a segment holds it; after a crash, or on another replica, the run
starts again from the input and skips the done lines. The output and error files are the
segments joined (``finish``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timedelta

import orjson

from spillway import ids
from spillway.batch.catalog import FileCatalog
from spillway.batch.finish import Finisher, expire_rest
from spillway.batch.jobs import BatchStore, LeaseLost, Segment
from spillway.batch.lines import BatchLine, output_line, read_line, split_lines, validate
from spillway.batch.pace import Pace
from spillway.batch.records import BatchRecord
from spillway.clock import Clock
from spillway.config.batch import BatchConfig
from spillway.errors import (
    DeadlineExceeded,
    NoEligibleNode,
    NoSpareCapacity,
    NotFound,
    QueueFull,
    SpillwayError,
    UpstreamError,
    UpstreamRejected,
)
from spillway.pipeline.calls import Answer, Background, Call, Stream
from spillway.pipeline.principal import Principal
from spillway.pipeline.service import Pipeline, background_slots
from spillway.resilience.breaker import BreakerState
from spillway.secrets import Redactor
from spillway.wire.errors import error_body
from spillway.wire.requests import ChatRequest, EmbeddingsRequest, check_chat, check_embeddings

log = logging.getLogger("spillway.batch")
#: how long to wait before looking again for spare capacity
IDLE_S = 0.02
#: lines read ahead of those running: a line whose model has no room does not hold up the
#: lines behind it that another model's nodes could take
LOOKAHEAD = 64
#: lines a batch runs at once on cloud nodes, when it spills (they have no share to keep to)
SPILL_PARALLEL = 16
#: a failed line waits this long times its attempt number before it is tried again
RETRY_DELAY_S = 1.0
#: at shutdown, the most time given to making finished lines durable
LAST_CHECKPOINT_S = 5.0
#: failures worth another try on another node later (the request itself was fine)
_RETRYABLE = (UpstreamError, DeadlineExceeded, QueueFull, NoEligibleNode)


class InputUnavailable(Exception):
    """The batch's input cannot be read here (not in this replica's storage): another
    replica may be able to; this one leaves it alone for a while."""


def principal_of(record: BatchRecord) -> Principal:
    """The submitting key's policy, as stored with the batch (rate limits do not apply to
    batch lines: they only ever use spare capacity)."""
    p = record.principal
    models = p.get("models")
    return Principal(
        tenant=record.tenant,
        private_only=bool(p.get("private_only")),
        key_id=record.key_id,
        pii=p.get("pii"),
        models=frozenset(models) if models is not None else None,
    )


@dataclass
class Checkpoint:
    """Results not yet durable: written out together once big or old enough."""

    output: bytearray = field(default_factory=bytearray)
    errors: bytearray = field(default_factory=bytearray)
    lines: list[int] = field(default_factory=list)
    completed: int = 0
    failed: int = 0
    #: when its first line was added (monotonic); None while empty
    started: float | None = None

    def add(self, number: int, line: bytes, ok: bool, now: float) -> None:
        if self.started is None:
            self.started = now
        (self.output if ok else self.errors).extend(line)
        self.lines.append(number)
        self.completed += ok
        self.failed += not ok

    @property
    def size(self) -> int:
        return len(self.output) + len(self.errors)


@dataclass
class _Outcome:
    line: BatchLine
    #: the output or error line; None: not done (run it again later)
    result: bytes | None = None
    ok: bool = False
    attempt: int = 0
    #: not to be started again before this (monotonic), after a failure
    ready_at: float = 0.0


@dataclass(frozen=True, slots=True)
class Workplace:
    """What every batch run of a replica works with."""

    jobs: BatchStore
    files: FileCatalog
    pipeline: Pipeline
    redactor: Redactor
    config: BatchConfig
    clock: Clock
    #: whether the key that submitted a batch still works: a revoked key's batch is cancelled
    key_valid: Callable[[str], bool] = lambda key_id: True


class BatchRunner:
    def __init__(self, record: BatchRecord, place: Workplace, owner: str):
        self.record = record
        self._owner = owner
        self._jobs, self._files, self._pipeline = place.jobs, place.files, place.pipeline
        self._redactor, self._config, self._clock = place.redactor, place.config, place.clock
        self._key_valid = place.key_valid
        self._principal = principal_of(record)
        self._pace = Pace(record, self._clock, self._principal.private_only)
        self._pending = Checkpoint()
        self._seq = 0
        #: the checkpoint being written in the background, if one is
        self._writer: asyncio.Task[None] | None = None
        #: names this run's segment objects: a stale run can never write over them
        self._token = secrets.token_hex(4)

    async def run(self) -> None:
        """Until the batch is finished here, or another replica holds it."""
        renewing = asyncio.create_task(self._renew())
        try:
            await self._work(renewing)
        except LeaseLost:
            log.warning("batch %s: another replica holds it now; stopping here", self.record.id)
        except NotFound:
            log.warning("batch %s failed: its input file was deleted", self.record.id)
        finally:
            renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError, LeaseLost):
                await renewing

    async def _work(self, renewing: asyncio.Task[None]) -> None:
        status: str = self.record.status
        if status == "validating":
            status = await self._validate()
        if status == "in_progress":
            status = await self._execute(renewing)
        finisher = Finisher(self.record, self._jobs, self._files, self._owner)
        await finisher.finish(status)

    async def _validate(self) -> str:
        """``in_progress`` when every line passed, ``failed`` when one did not (or the input
        is gone), ``cancelling`` when a cancel came meanwhile."""
        record = self.record
        router, principal = self._pipeline.router, self._principal

        def check_model(model: str) -> str | None:
            usable = router.knows(model) and principal.may_use(model)
            if usable and router.eligible(model, principal.private_only):
                return None
            if usable:  # one of the gateway's own model names: fit to quote
                return f"No private node serves '{model}', and this key is private_only."
            return "The model does not exist on this gateway; GET /v1/models lists them."

        lines = split_lines(await self._input())
        result = await validate(lines, record.endpoint, check_model, self._config.max_lines)
        now = self._jobs.now()
        if result.error_count:
            scrub = self._redactor.scrub
            errors = orjson.dumps([{**e.public(), "message": scrub(e.message)}
                                   for e in result.errors]).decode()  # fmt: skip
            verdict = {"status": "failed", "failed_at": now, "errors": errors}
        else:
            verdict = {"status": "in_progress", "in_progress_at": now}
        if not await self._jobs.update(
            record.id, self._owner, ("validating",), total=result.total, **verdict
        ):
            return await self._changed()
        if result.error_count:
            log.info("batch %s failed validation: %d errors", record.id, result.error_count)
        self._pace.total = result.total
        return str(verdict["status"])

    async def _input(self) -> AsyncIterator[bytes]:
        """The input's bytes; a file gone from the catalog fails the batch, an object not
        in this replica's storage leaves it to another replica."""
        try:
            source = await self._files.get(None, self.record.input_file_id)
        except NotFound:
            await self._fail("input_file_missing", "The input file was deleted.")
            raise
        chunks = self._files.content(source)
        try:
            first = await anext(chunks, b"")
        except FileNotFoundError:
            raise InputUnavailable(self.record.input_file_id) from None
        return _prefixed(first, chunks)

    async def _fail(self, code: str, message: str) -> None:
        error = orjson.dumps([{"code": code, "message": message, "param": None, "line": None}])
        await self._jobs.update(
            self.record.id, self._owner, ("validating", "in_progress"),
            status="failed", failed_at=self._jobs.now(), errors=error.decode(),
        )  # fmt: skip

    async def _changed(self) -> str:
        """A fenced write changed nothing: a cancel came meanwhile, or the lease went."""
        current = await self._jobs.get(None, self.record.id)
        if current.status == "cancelling":
            return "cancelling"
        raise LeaseLost(self.record.id)

    async def _execute(self, renewing: asyncio.Task[None]) -> str:
        """Run every line not yet done; returns the status to finish with. A finished line's
        place is filled before anything else is done, and checkpoints are written in the
        background: a single-slot node is never left idle while results are made durable."""
        done = await self._done_lines()
        self._pace.done = sum(bin(b).count("1") for b in done)
        self._seq = await self._jobs.next_seq(self.record.id)
        source = self._todo(done)
        waiting: list[_Outcome] = []
        running: set[asyncio.Task[_Outcome]] = set()
        next_look = self._clock.monotonic()
        exhausted = False
        try:
            while True:
                self._check(renewing)
                if self._clock.monotonic() >= next_look:
                    next_look = self._clock.monotonic() + self._config.poll_s
                    verdict = await self._interrupted()
                    if verdict is not None:
                        await self._written()
                        return await self._stop(verdict, running)
                exhausted = await self._fill(source, waiting, exhausted)
                self._launch(waiting, running)
                if exhausted and not running and not waiting:
                    break
                await self._collect(running, waiting)
                self._launch(waiting, running)
                if self._due() and (self._writer is None or self._writer.done()):
                    self._check(renewing)
                    self._writer = asyncio.create_task(self._checkpoint())
            await self._written()
            await self._checkpoint()
            return "completed"
        except asyncio.CancelledError:
            await self._keep_what_finished(running)
            raise
        finally:
            for task in running:
                task.cancel()

    def _check(self, renewing: asyncio.Task[None]) -> None:
        """Raise what the lease renewal or the last background checkpoint raised."""
        if renewing.done():
            renewing.result()  # raises LeaseLost
        if self._writer is not None and self._writer.done():
            writer, self._writer = self._writer, None
            writer.result()

    async def _written(self) -> None:
        """Wait for the checkpoint being written, if one is."""
        if self._writer is not None:
            writer, self._writer = self._writer, None
            await writer

    async def _fill(
        self, source: AsyncIterator[BatchLine], waiting: list[_Outcome], exhausted: bool
    ) -> bool:
        """Read lines ahead, up to ``LOOKAHEAD`` waiting; True once the input is read."""
        while not exhausted and len(waiting) < LOOKAHEAD:
            line = await anext(source, None)
            if line is None:
                return True
            waiting.append(_Outcome(line))
        return exhausted

    def _launch(self, waiting: list[_Outcome], running: set[asyncio.Task[_Outcome]]) -> None:
        """Start every waiting line whose model has room now, in input order."""
        now = self._clock.monotonic()
        kept = []
        for outcome in waiting:
            if outcome.ready_at <= now and self._has_room(outcome.line, running):
                task = asyncio.create_task(self._run_line(outcome.line, outcome.attempt))
                running.add(task)
            else:
                kept.append(outcome)
        waiting[:] = kept

    def _has_room(self, line: BatchLine, running: set[asyncio.Task[_Outcome]]) -> bool:
        """Whether to start ``line`` now: a private node serving its model has room under
        the batch share (and this batch runs no more lines than the share allows across
        them), or the batch may spill and has few enough running."""
        model = str(line.body.get("model", ""))
        router = self._pipeline.router
        share = self._config.max_share
        if not router.knows(model):
            return True  # it fails at once, in the pipeline, with the right error
        handles = [
            h
            for h in router.serving(model)
            if h.private and router.board.state(h.name) is not BreakerState.OPEN
        ]
        cap = sum(background_slots(h, share) for h in handles)
        room = any(h.in_flight < background_slots(h, share) for h in handles)
        if len(running) < cap and room:
            return True
        return self._pace.may_spill() and len(running) < max(cap, SPILL_PARALLEL)

    async def _collect(self, running: set[asyncio.Task[_Outcome]], waiting: list[_Outcome]) -> None:
        """Wait a little for lines to end; keep the finished ones' results."""
        if not running:
            await self._clock.sleep(IDLE_S)
            return
        finished, _ = await asyncio.wait(
            running, timeout=IDLE_S * 5, return_when=asyncio.FIRST_COMPLETED
        )
        for task in finished:
            running.discard(task)
            outcome = task.result()
            if outcome.result is not None:
                self._keep(outcome)
            else:
                waiting.insert(0, outcome)  # first in line when there is room again

    def _keep(self, outcome: _Outcome) -> None:
        assert outcome.result is not None
        self._pending.add(outcome.line.number, outcome.result, outcome.ok, self._clock.monotonic())
        self._pace.finished()

    async def _run_line(self, line: BatchLine, attempt: int) -> _Outcome:
        request_id = ids.request_id()
        background = Background(self.record.id, self._config.max_share, self._pace.may_spill())
        call = Call(self._principal, request_id, background=background)
        try:
            result = await self._ask(call, line)
        except NoSpareCapacity:
            return _Outcome(line, attempt=attempt, ready_at=self._clock.monotonic() + IDLE_S)
        except SpillwayError as exc:
            retry = isinstance(exc, _RETRYABLE) and not isinstance(exc, UpstreamRejected)
            if retry and attempt + 1 < self._config.line_attempts:
                later = self._clock.monotonic() + RETRY_DELAY_S * (attempt + 1)
                return _Outcome(line, attempt=attempt + 1, ready_at=later)
            body = orjson.dumps(error_body(exc, self._redactor))
            return _Outcome(line, output_line(line.custom_id, request_id, exc.status, body))
        except Exception:  # a bug, not the line's fault: one error line, not a dead batch
            log.exception("batch %s: line %s failed unexpectedly", self.record.id, line.number)
            failure = SpillwayError(f"Internal error; quote request id {request_id}.")
            body = orjson.dumps(error_body(failure, self._redactor))
            return _Outcome(line, output_line(line.custom_id, request_id, 500, body))
        if not isinstance(result, Answer):  # a stream: validation refuses them
            await result.aclose()
            failure = SpillwayError("A batch line may not stream.")
            body = orjson.dumps(error_body(failure, self._redactor))
            return _Outcome(line, output_line(line.custom_id, request_id, 400, body))
        return _Outcome(line, output_line(line.custom_id, request_id, 200, result.body), ok=True)

    async def _ask(self, call: Call, line: BatchLine) -> Answer | Stream:
        if self.record.endpoint == "/v1/embeddings":

            async def embedding() -> EmbeddingsRequest:
                return check_embeddings(line.body)

            return await self._pipeline.embeddings(call, embedding)

        async def chat() -> ChatRequest:
            return check_chat(line.body)

        return await self._pipeline.chat(call, chat)

    async def _todo(self, done: bytearray) -> AsyncIterator[BatchLine]:
        number = -1
        async for _, raw in split_lines(await self._input()):
            number += 1
            if not _has(done, number):
                yield read_line(number, raw, self.record.endpoint)

    async def _done_lines(self) -> bytearray:
        """A bit per input line: set when a committed segment holds it (25 KB for 200,000)."""
        done = bytearray((self.record.total + 7) // 8)
        for segment in await self._jobs.segments(self.record.id):
            for number in segment.lines:
                if number // 8 >= len(done):
                    done.extend(bytes(number // 8 + 1 - len(done)))
                done[number // 8] |= 1 << (number % 8)
        return done

    def _due(self) -> bool:
        pending = self._pending
        if pending.started is None:
            return False
        old = self._clock.monotonic() - pending.started >= self._config.checkpoint_s
        return old or pending.size >= self._config.checkpoint_bytes

    async def _checkpoint(self) -> None:
        """Write what is pending whole, then record it (fenced by the lease)."""
        pending, self._pending = self._pending, Checkpoint()
        if not pending.lines:
            return
        base = f"batches/{self.record.id}/{self._seq:08d}-{self._token}"
        output_key = f"{base}.out.jsonl" if pending.output else None
        error_key = f"{base}.err.jsonl" if pending.errors else None
        for key, data in ((output_key, pending.output), (error_key, pending.errors)):
            if key is not None:
                await self._files.store.write(key, _once(bytes(data)))
        segment = Segment(
            self._seq, output_key, error_key, pending.lines, pending.completed, pending.failed
        )
        if not await self._jobs.commit(self.record.id, self._owner, segment):
            raise LeaseLost(self.record.id)
        self._seq += 1

    async def _keep_what_finished(self, running: set[asyncio.Task[_Outcome]]) -> None:
        """Shutting down: make the lines that finished durable, so they do not run again."""
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.shield(asyncio.wait_for(self._written(), LAST_CHECKPOINT_S))
        self._keep_finished(running)
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.shield(asyncio.wait_for(self._checkpoint(), LAST_CHECKPOINT_S))

    async def _interrupted(self) -> str | None:
        """``cancelled`` when a cancel was asked for (or the key that submitted the batch
        was revoked), ``expired`` past the window."""
        current = await self._jobs.get(None, self.record.id)
        if current.status == "cancelling":
            return "cancelled"
        if not self._key_valid(self.record.key_id):
            log.warning("batch %s: its key was revoked; cancelling it", self.record.id)
            now = self._jobs.now()
            if await self._jobs.update(
                self.record.id, self._owner, ("in_progress",), status="cancelling",
                cancelling_at=now,
            ):  # fmt: skip
                return "cancelled"
        if self._jobs.now() >= self.record.expires_at:
            return "expired"
        return None

    def _keep_finished(self, tasks: set[asyncio.Task[_Outcome]]) -> None:
        """The results of the lines among ``tasks`` that finished (not cancelled, no error)."""
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is None:
                outcome = task.result()
                if outcome.result is not None:
                    self._keep(outcome)

    async def _stop(self, verdict: str, running: set[asyncio.Task[_Outcome]]) -> str:
        """Cancel what runs, keep what finished; past the window, the rest are error lines."""
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        self._keep_finished(running)
        running.clear()
        await self._checkpoint()
        if verdict == "expired":
            done = await self._done_lines()  # what every committed segment holds now
            async for number, line in expire_rest(self._todo(done)):
                self._pending.add(number, line, False, self._clock.monotonic())
                if self._due():
                    await self._checkpoint()
            await self._checkpoint()
        return verdict

    async def _renew(self) -> None:
        lease = timedelta(seconds=self._config.lease_s)
        while True:
            await self._clock.sleep(self._config.lease_s / 3)
            if not await self._jobs.renew(self.record.id, self._owner, lease):
                raise LeaseLost(self.record.id)


def _has(bits: bytearray, number: int) -> bool:
    return number // 8 < len(bits) and bool(bits[number // 8] & (1 << (number % 8)))


async def _prefixed(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if first:
        yield first
    async for chunk in rest:
        yield chunk


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data
