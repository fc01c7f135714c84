"""Working one batch, under this replica's lease: validate, run its lines, finish.

Lines run as ordinary requests through the pipeline, as the key that submitted the batch,
marked ``Background``: each may take a private node only while that node has room under
``[batch] max_share`` of its ``max_concurrency``, so interactive requests always find the
rest, and batch lines yield as interactive load rises (they are not started, rather than
queued). A line goes to a cloud node only when the batch would otherwise miss its window
(``Pace``), and never for a ``private_only`` key.

Results are buffered and made durable in segments (``Checkpoint``): the objects first, then
the segment's row with its line numbers, fenced by the lease. A line is done once a segment
holds it; after a crash, or on another replica, the run starts again from the input and
skips the done lines. The output and error files are the segments joined (``finish``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator
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
#: lines a batch runs at once on cloud nodes, when it spills (they have no share to keep to)
SPILL_PARALLEL = 16
#: failures worth another try on another node later (the request itself was fine)
_RETRYABLE = (UpstreamError, DeadlineExceeded, QueueFull, NoEligibleNode)


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
    started: float = 0.0

    def add(self, number: int, line: bytes, ok: bool) -> None:
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
    #: it failed and may be tried again (False: only waited for capacity)
    failed: bool = False


class BatchRunner:
    def __init__(
        self,
        record: BatchRecord,
        jobs: BatchStore,
        files: FileCatalog,
        pipeline: Pipeline,
        redactor: Redactor,
        config: BatchConfig,
        clock: Clock,
        owner: str,
    ):
        self.record = record
        self._jobs = jobs
        self._files = files
        self._pipeline = pipeline
        self._redactor = redactor
        self._config = config
        self._clock = clock
        self._owner = owner
        self._principal = principal_of(record)
        self._pace = Pace(record, clock, self._principal.private_only)
        self._pending = Checkpoint(started=clock.monotonic())
        self._seq = 0

    async def run(self) -> None:
        """Until the batch is finished here, or another replica holds it."""
        renewing = asyncio.create_task(self._renew())
        try:
            await self._work(renewing)
        except LeaseLost:
            log.warning("batch %s: another replica holds it now; stopping here", self.record.id)
        finally:
            renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError, LeaseLost):
                await renewing

    async def _work(self, renewing: asyncio.Task[None]) -> None:
        status: str = self.record.status
        if status == "validating":
            if not await self._validate():
                return
            status = "in_progress"
        if status == "in_progress":
            status = await self._execute(renewing)
        finisher = Finisher(self.record, self._jobs, self._files, self._owner)
        await finisher.finish(status)

    async def _validate(self) -> bool:
        record = self.record
        source = await self._files.get(None, record.input_file_id)

        def check_model(model: str) -> str | None:
            known = self._pipeline.router.knows(model) and self._principal.may_use(model)
            return None if known else f"The model '{model}' does not exist on this gateway."

        lines = split_lines(self._files.content(source))
        result = await validate(lines, record.endpoint, check_model, self._config.max_lines)
        now = self._jobs.now()
        if result.error_count:
            errors = orjson.dumps([e.public() for e in result.errors]).decode()
            await self._fenced(status="failed", failed_at=now, errors=errors, total=result.total)
            log.info("batch %s failed validation: %d errors", record.id, result.error_count)
            return False
        await self._fenced(status="in_progress", in_progress_at=now, total=result.total)
        self._pace.total = result.total
        return True

    async def _execute(self, renewing: asyncio.Task[None]) -> str:
        """Run every line not yet done; returns the status to finish with."""
        done = await self._done_lines()
        self._pace.done = len(done)
        self._seq = await self._jobs.next_seq(self.record.id)
        source = self._todo(done)
        retries: deque[_Outcome] = deque()
        running: set[asyncio.Task[_Outcome]] = set()
        next_look = self._clock.monotonic()
        exhausted = False
        try:
            while True:
                if renewing.done():
                    renewing.result()  # raises LeaseLost
                if self._clock.monotonic() >= next_look:
                    next_look = self._clock.monotonic() + self._config.poll_s
                    verdict = await self._interrupted()
                    if verdict is not None:
                        return await self._stop(verdict, running, done)
                exhausted = await self._launch(source, retries, running, exhausted)
                if exhausted and not running and not retries:
                    break
                await self._collect(running, retries)
                if self._due():
                    await self._checkpoint()
            await self._checkpoint()
            return "completed"
        finally:
            for task in running:
                task.cancel()

    async def _launch(
        self,
        source: AsyncIterator[BatchLine],
        retries: deque[_Outcome],
        running: set[asyncio.Task[_Outcome]],
        exhausted: bool,
    ) -> bool:
        """Start lines while their model has spare capacity; True once the input is read."""
        while True:
            if retries:
                outcome = retries[0]
                if not self._has_room(outcome.line, running):
                    return exhausted
                retries.popleft()
                running.add(asyncio.create_task(self._run_line(outcome.line, outcome.attempt)))
                continue
            if exhausted:
                return True
            line = await anext(source, None)
            if line is None:
                return True
            retries.append(_Outcome(line))  # runs next, when there is room

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

    async def _collect(
        self, running: set[asyncio.Task[_Outcome]], retries: deque[_Outcome]
    ) -> None:
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
                self._pending.add(outcome.line.number, outcome.result, outcome.ok)
                self._pace.finished()
            else:
                retries.append(outcome)

    async def _run_line(self, line: BatchLine, attempt: int) -> _Outcome:
        request_id = ids.request_id()
        background = Background(self.record.id, self._config.max_share, self._pace.may_spill())
        call = Call(self._principal, request_id, background=background)
        try:
            result = await self._ask(call, line)
        except NoSpareCapacity:
            await self._clock.sleep(IDLE_S)
            return _Outcome(line, attempt=attempt)
        except SpillwayError as exc:
            retry = isinstance(exc, _RETRYABLE) and not isinstance(exc, UpstreamRejected)
            if retry and attempt + 1 < self._config.line_attempts:
                return _Outcome(line, attempt=attempt + 1, failed=True)
            body = orjson.dumps(error_body(exc, self._redactor))
            return _Outcome(line, output_line(line.custom_id, request_id, exc.status, body))
        if not isinstance(result, Answer):  # a stream: validation refuses them
            await result.aclose()
            return _Outcome(line, attempt=attempt + 1, failed=True)
        return _Outcome(line, output_line(line.custom_id, request_id, 200, result.body), ok=True)

    async def _ask(self, call: Call, line: BatchLine) -> Answer | Stream:
        if self.record.endpoint == "/v1/embeddings":

            async def embedding() -> EmbeddingsRequest:
                return check_embeddings(line.body)

            return await self._pipeline.embeddings(call, embedding)

        async def chat() -> ChatRequest:
            return check_chat(line.body)

        return await self._pipeline.chat(call, chat)

    async def _todo(self, done: set[int]) -> AsyncIterator[BatchLine]:
        source = await self._files.get(None, self.record.input_file_id)
        number = -1
        async for raw in split_lines(self._files.content(source)):
            number += 1
            if number not in done:
                yield read_line(number, raw, self.record.endpoint)

    async def _done_lines(self) -> set[int]:
        done: set[int] = set()
        for segment in await self._jobs.segments(self.record.id):
            done.update(segment.lines)
        return done

    def _due(self) -> bool:
        pending = self._pending
        if not pending.lines:
            return False
        old = self._clock.monotonic() - pending.started >= self._config.checkpoint_s
        return old or pending.size >= self._config.checkpoint_bytes

    async def _checkpoint(self) -> None:
        """Write what is pending whole, then record it (fenced by the lease)."""
        pending, self._pending = self._pending, Checkpoint(started=self._clock.monotonic())
        if not pending.lines:
            return
        base = f"batches/{self.record.id}/{self._seq:08d}"
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

    async def _interrupted(self) -> str | None:
        """``cancelled`` when a cancel was asked for, ``expired`` past the window."""
        current = await self._jobs.get(None, self.record.id)
        if current.status == "cancelling":
            return "cancelled"
        if self._jobs.now() >= self.record.expires_at:
            return "expired"
        return None

    async def _stop(
        self, verdict: str, running: set[asyncio.Task[_Outcome]], done: set[int]
    ) -> str:
        """Cancel what runs, keep what finished; past the window, the rest are error lines."""
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        for task in running:
            if not task.cancelled() and task.exception() is None:
                outcome = task.result()
                if outcome.result is not None:
                    self._pending.add(outcome.line.number, outcome.result, outcome.ok)
        running.clear()
        await self._checkpoint()
        if verdict == "expired":
            done.update(*(s.lines for s in await self._jobs.segments(self.record.id)))
            async for number, line in expire_rest(self._todo(done)):
                self._pending.add(number, line, ok=False)
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

    async def _fenced(self, **values: object) -> None:
        if not await self._jobs.update(self.record.id, self._owner, **values):
            raise LeaseLost(self.record.id)


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data
