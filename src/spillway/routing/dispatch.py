"""Sending one request through the fleet: attempts, fallback, retries, deadline, commit point.

Each attempt asks the router for the best node now. A failure that may fall back marks that
node as failed for this request and moves on; a node's own verdict on the request (400, 413,
422) goes straight back to the client. At most ``max_attempts`` attempts per request across
all nodes, each retry also paid for from the shared retry budget, all inside one deadline.
A fresh node is tried at once; a node that already failed this request is tried again only
after a full-jitter backoff (and its Retry-After, when that fits the deadline).

Streams go through the same loop, and a node counts as answering once its first SSE event
arrived: the commit point. After it a failure can only end the stream with an error.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from spillway import ids
from spillway.clock import Clock
from spillway.config.schema import Timeouts
from spillway.errors import (
    DeadlineExceeded,
    NoEligibleNode,
    NoSpareCapacity,
    SpillwayError,
    UpstreamBadAnswer,
    UpstreamConnectError,
    UpstreamError,
    UpstreamsExhausted,
    UpstreamStatusError,
    UpstreamTimeout,
)
from spillway.nodes.base import Reply
from spillway.resilience.queue import WaitQueue
from spillway.resilience.retry import RetryBudget, RetryPolicy, parse_retry_after
from spillway.routing.router import NodeHandle, Router, Slot
from spillway.state.redis import StateDown
from spillway.state.slots import FleetSlots, KeyPart
from spillway.wire.requests import ChatRequest, EmbeddingsRequest, body_for_node
from spillway.wire.sse import SseEvent
from spillway.wire.streams import is_error_chunk, parse_chunk

log = logging.getLogger("spillway.routing")
T = TypeVar("T")
Request = ChatRequest | EmbeddingsRequest
#: While every node this request may use is full fleet-wide (its slots are held by other
#: replicas, whose releases wake nobody here), the request looks again this often.
FLEET_POLL_S = 0.05


@dataclass(frozen=True, slots=True)
class RequestContext:
    """Per-request facts that travel with it through the router."""

    request_id: str
    tenant: str
    private_only: bool
    deadline: float  # clock.monotonic() value by which every attempt must be over
    #: the nodes this request may use, when the caller already worked them out (and so
    #: checked that there are some): ``Router.eligible``
    candidates: tuple[NodeHandle, ...] | None = None
    #: the key's checks (rate limits, budget) to make in the first fleet slot claim
    key: KeyPart | None = None
    #: what a cloud node gets instead of the request: its personal data masked (``[pii]``)
    cloud_request: ChatRequest | EmbeddingsRequest | None = None
    #: a batch line: it never waits for a busy node (``NoSpareCapacity`` instead)
    background: bool = False

    def request_for(self, handle: NodeHandle, request: Request) -> Request:
        """The request as ``handle`` may see it."""
        if self.cloud_request is None or handle.private:
            return request
        return self.cloud_request


@dataclass(frozen=True, slots=True)
class Answer:
    handle: NodeHandle
    reply: Reply


@dataclass(slots=True)
class OpenStream:
    """A committed stream: the node, its first event, and the rest still to come."""

    handle: NodeHandle
    first: SseEvent
    #: the first event's data, parsed once to judge it (None if it is not JSON)
    first_chunk: Any
    rest: AsyncIterator[SseEvent]
    slot: Slot
    #: tells the node's breaker that the stream broke after the commit point
    broke: Callable[[], None]

    async def aclose(self) -> None:
        try:
            await self.rest.aclose()  # type: ignore[attr-defined]
        finally:
            self.slot.release()


class Dispatcher:
    def __init__(
        self,
        router: Router,
        budget: RetryBudget,
        queues: Mapping[str, WaitQueue],
        retry: RetryPolicy,
        clock: Clock,
        ttft_smoothing: float = 0.2,
        rand: Callable[[], float] = random.random,
        slots: FleetSlots | None = None,
    ):
        self.router = router
        self.slots = slots
        self.board = router.board
        self.budget = budget
        self.queues = queues
        self.retry = retry
        self.clock = clock
        self.ttft_smoothing = ttft_smoothing
        self.rand = rand

    async def complete(self, request: Request, ctx: RequestContext) -> Answer:
        async def attempt(handle: NodeHandle, timeouts: Timeouts, slot: Slot) -> Answer:
            body = body_for_node(ctx.request_for(handle, request), handle.models[request.model])
            try:
                if isinstance(request, ChatRequest):
                    reply = await handle.node.chat(body, timeouts)
                else:
                    reply = await handle.node.embed(body, timeouts)
            finally:
                slot.release()
            return Answer(handle, reply)

        return await self._route(request, ctx, attempt)

    async def open_stream(self, request: ChatRequest, ctx: RequestContext) -> OpenStream:
        async def attempt(handle: NodeHandle, timeouts: Timeouts, slot: Slot) -> OpenStream:
            body = body_for_node(ctx.request_for(handle, request), handle.models[request.model])
            started = self.clock.monotonic()
            events = handle.node.stream(body, timeouts)
            try:
                first, chunk = await _first_event(handle, events)
            except BaseException:
                slot.release()
                await events.aclose()  # type: ignore[attr-defined]
                raise
            self.router.observe_ttft(handle, self.clock.monotonic() - started, self.ttft_smoothing)

            def broke() -> None:  # after the commit point: recorded in the background
                self._verdict(handle, False, slot)

            return OpenStream(handle, first, chunk, events, slot, broke)

        return await self._route(request, ctx, attempt)

    async def _route(
        self,
        request: Request,
        ctx: RequestContext,
        attempt: Callable[[NodeHandle, Timeouts, Slot], Awaitable[T]],
    ) -> T:
        if ctx.candidates is None:
            self.router.check_eligible(request.model, ctx.private_only)
        errors: list[UpstreamError] = []
        self.budget.request_started()
        try:
            for number in range(1, self.retry.max_attempts + 1):
                budgeted = number > 1 and _delivered(errors[-1])
                if budgeted and not self.budget.try_retry():
                    log.warning("request %s: retry budget spent; not retrying", ctx.request_id)
                    break
                try:
                    picked = await self._next_node(request.model, ctx, errors, number)
                    if picked is None:
                        break
                    handle, slot = picked
                    result = await self._try(handle, slot, attempt, ctx)
                except UpstreamError as exc:
                    if not exc.may_fall_back:
                        raise  # a bare raise: a helper holding ``exc`` would join its cycle
                    self._note_failure(exc, errors, ctx)
                    continue
                finally:
                    if budgeted:
                        self.budget.retry_finished()
                self.router.note_answer(request.model, handle)
                return result
        finally:
            self.budget.request_finished()
        raise self._exhausted(errors, request.model, ctx)

    async def _try(
        self,
        handle: NodeHandle,
        slot: Slot,
        attempt: Callable[[NodeHandle, Timeouts, Slot], Awaitable[T]],
        ctx: RequestContext,
    ) -> T:
        """One attempt on one node, with its breaker told the outcome. ``attempt`` owns the
        slot: it gives it back, or hands it on with a committed stream."""
        ok: bool | None = None
        timeouts: Timeouts | None = None
        try:
            try:
                timeouts = self._attempt_timeouts(handle, ctx)
            except BaseException:
                slot.release()
                raise
            result = await attempt(handle, timeouts, slot)
            ok = True
            return result
        except UpstreamError as exc:
            ok = False if exc.may_fall_back else None  # a bad request says nothing of the node
            if isinstance(exc, UpstreamTimeout) and timeouts is not handle.timeouts:
                ok = None  # the request's own deadline cut the attempt short, not the node
            raise
        finally:
            failure = self._verdict(handle, ok, slot, wait=True)
            if failure is not None:
                # Counted fleet-wide before the next attempt picks a node; Redis down: the
                # local breaker counted it, and the request goes on to its next node.
                with contextlib.suppress(StateDown):
                    await failure

    def _verdict(
        self, handle: NodeHandle, ok: bool | None, slot: Slot, wait: bool = False
    ) -> Awaitable[object] | None:
        """Tell the node's breakers (here, and fleet-wide) how the attempt went. With
        ``wait``, a failure's fleet-wide record is returned to be awaited."""
        claim = slot.fleet
        fleet = self.slots if claim is not None and not claim.local else None
        if ok is None:
            self.board.release(handle.name)
            if fleet is not None and claim is not None:
                fleet.no_verdict(claim)
            return None
        self.board.record(handle.name, ok)
        if ok:
            handle.stats.successes += 1
        else:
            handle.stats.failures += 1
        if fleet is None or claim is None:
            return None
        record = fleet.record(handle.name, claim, ok)
        if record is None:
            return None
        if wait and not ok:
            return record
        fleet.spawn(record)
        return None

    async def _next_node(
        self, model: str, ctx: RequestContext, errors: list[UpstreamError], number: int
    ) -> tuple[NodeHandle, Slot] | None:
        """The node for this attempt and a slot on it, waiting for capacity if every node
        is merely busy (here, or fleet-wide)."""
        failed = {e.node for e in errors}
        full: set[str] = set()  # nodes whose every slot another replica holds
        broken: dict[str, float] = {}  # nodes the fleet's breaker keeps out: seconds left
        while True:
            self._check_deadline(ctx)
            excluded = failed | full | broken.keys() if full or broken else failed
            pick = self.router.pick(model, ctx.private_only, excluded, ctx.candidates)
            if pick.handle is not None:
                slot = await self._claim(pick.handle, ctx, number, broken)
                if slot is not None:
                    return pick.handle, slot
                if pick.handle.name not in broken:
                    full.add(pick.handle.name)
                continue
            if pick.busy or full:
                if ctx.background:  # batch work never queues behind interactive requests
                    raise NoSpareCapacity(f"Every node for '{model}' is busy; the line runs later.")
                await self._wait_for_capacity(model, ctx, FLEET_POLL_S if full else None)
                full.clear()
                continue
            if not errors:
                raise self._unavailable(model, ctx, broken)
            handle = await self._retry_failed_node(model, ctx, errors, number, broken.keys())
            if handle is None:
                return None
            slot = await self._claim(handle, ctx, number, broken)
            if slot is None:  # full fleet-wide meanwhile: look again, from the top
                failed.discard(handle.name)
                continue
            return handle, slot

    async def _claim(
        self, handle: NodeHandle, ctx: RequestContext, number: int, broken: dict[str, float]
    ) -> Slot | None:
        """A slot on the picked node: here, and fleet-wide when replicas share state. None
        when the fleet refuses (no slot free, or its breaker open: then ``broken`` says for
        how long); the local breaker's admission is handed back then."""
        fleet = self.slots
        if fleet is None:
            return handle.acquire()
        # Our own id, never the client's x-request-id: requests sharing one would share a slot.
        member = ids.request_id()
        try:
            claim = await fleet.claim(
                handle.name, handle.max_concurrency, handle.in_flight, member, ctx.key
            )
        except BaseException:  # cancelled (client gone): give back the local admission
            self.board.release(handle.name)
            raise
        if not claim.granted:
            self.board.release(handle.name)
            if claim.open_s is not None:
                broken[handle.name] = claim.open_s
            return None
        return handle.acquire(claim, lambda: fleet.release(claim))

    async def _retry_failed_node(
        self,
        model: str,
        ctx: RequestContext,
        errors: list[UpstreamError],
        number: int,
        broken: Collection[str] = (),
    ) -> NodeHandle | None:
        """Every fresh node failed: back off, then give the failed nodes one more try."""
        remaining = ctx.deadline - self.clock.monotonic()
        delay = self.retry.delay_for(number - 1, self.rand)
        last = errors[-1]
        if isinstance(last, UpstreamStatusError) and last.retry_after is not None:
            wait = parse_retry_after(last.retry_after, self.clock.wall())
            if wait is not None:
                if not self.retry.retry_after_fits(wait, remaining):
                    return None  # the node asked for more time than the request has
                delay = max(delay, wait)
        if delay >= remaining:
            return None
        await self.clock.sleep(delay)
        # A node that may still be working on this request is not sent it again: that could
        # duplicate a generation (and its bill). Only a node that answered with its failure
        # (5xx, 429…) or was never reached is tried twice.
        unsure = {e.node for e in errors if _may_still_run(e)} | set(broken)
        pick = self.router.pick(model, ctx.private_only, unsure, ctx.candidates)
        return pick.handle

    async def _wait_for_capacity(
        self, model: str, ctx: RequestContext, poll_s: float | None = None
    ) -> None:
        """Wait for a slot freed here; with ``poll_s``, at most that long (a slot freed on
        another replica wakes nobody here)."""
        deadline = ctx.deadline
        if poll_s is not None:
            deadline = min(deadline, self.clock.monotonic() + poll_s)
        try:
            await self.queues[model].wait(deadline)
        except DeadlineExceeded:
            if deadline < ctx.deadline:
                return
            raise NoEligibleNode(
                f"Every node that may serve '{model}' stayed busy until the request's deadline."
                + (
                    " This key is private_only, so it cannot spill to a cloud node."
                    if ctx.private_only
                    else ""
                )
            ) from None

    def _check_deadline(self, ctx: RequestContext) -> float:
        """Seconds left before the deadline; DeadlineExceeded once there are none."""
        remaining = ctx.deadline - self.clock.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded("The request deadline passed before a node could answer.")
        return remaining

    def _attempt_timeouts(self, handle: NodeHandle, ctx: RequestContext) -> Timeouts:
        remaining = self._check_deadline(ctx)
        if remaining >= handle.timeouts.total_s:
            return handle.timeouts
        return handle.timeouts.model_copy(update={"total_s": remaining})

    def _note_failure(
        self, exc: UpstreamError, errors: list[UpstreamError], ctx: RequestContext
    ) -> None:
        log.warning("request %s: %s", ctx.request_id, exc.message)
        errors.append(_detached(exc))

    def _unavailable(
        self, model: str, ctx: RequestContext, broken: Mapping[str, float]
    ) -> SpillwayError:
        """No node may be tried: each is out of rotation; say why, and when to come back."""
        why, waits = [], []
        wall = self.clock.wall()
        for handle in self.router.eligible(model, ctx.private_only):
            if handle.name in broken:
                why.append(f"{handle.name}: failing, circuit open across the fleet")
                waits.append(broken[handle.name])
                continue
            down = handle.out_of_service()
            if down is None:
                why.append(f"{handle.name}: failing, circuit open")
                waits.append(self.board.stats(handle.name).open_remaining_s)
                continue
            why.append(f"{handle.name}: {down.summary or 'process ' + down.state}")
            waits.append(1.0 if down.retry_at is None else down.retry_at - wall)
        retry_after = max(1, int(min(waits, default=1.0) + 0.999))
        scope = "private node" if ctx.private_only else "node"
        return NoEligibleNode(
            f"Every {scope} that serves '{model}' is out of rotation ({'; '.join(why)}); "
            f"retry in about {retry_after} s.",
            retry_after_s=retry_after,
        )

    def _exhausted(
        self, errors: list[UpstreamError], model: str, ctx: RequestContext
    ) -> SpillwayError:
        if not errors:
            return self._unavailable(model, ctx, {})
        if ctx.private_only:
            detail = "; ".join(f"{e.node}: {e.detail}" for e in errors)
            return NoEligibleNode(
                f"No private node could serve '{model}' ({detail}). This API key is "
                "private_only, so the request was not sent to a cloud node."
            )
        return UpstreamsExhausted(errors)


async def _first_event(handle: NodeHandle, events: AsyncIterator[SseEvent]) -> tuple[SseEvent, Any]:
    """The first data event, which commits the stream, and its data parsed (the relay takes
    it from there); an in-band error counts as a failure."""
    first = await anext(events, None)
    if first is None or first.is_done:
        raise UpstreamConnectError(handle.name, "stream ended before its first chunk")
    chunk = parse_chunk(first.data)
    if first.event == "error" or is_error_chunk(chunk):
        raise UpstreamStatusError(handle.name, 200, "the stream began with an error event")
    if not isinstance(chunk, dict):  # text or a bare value: not a chunk, and not ours to show
        raise UpstreamBadAnswer(handle.name, "the stream began with an event that is not a chunk")
    return first, chunk


def _detached(error: UpstreamError) -> UpstreamError:
    """The error without its traceback and chained exceptions, fit to keep for the final
    message. Kept as it was raised, it would hold this request's frames (the prompt, the
    node's partial answer) in a reference cycle through ``errors`` itself, which only the
    cyclic collector frees: under a failing node and large prompts that grew the gateway
    by gigabytes (``serve`` collects rarely, see cli/serve.py)."""
    error.__traceback__ = None
    error.__context__ = None
    error.__cause__ = None
    return error


def _may_still_run(error: UpstreamError) -> bool:
    """The request reached the node and no answer came back: it may be generating still."""
    if isinstance(error, UpstreamTimeout):
        return error.phase != "connection"
    return isinstance(error, UpstreamConnectError) and error.delivered


def _delivered(error: UpstreamError) -> bool:
    """Did the failed attempt reach the node? Not if it could not connect (refused, DNS, TLS,
    or no connection within ``connect_s``): retrying elsewhere then adds no load anywhere."""
    if isinstance(error, UpstreamTimeout):
        return error.phase != "connection"
    return not isinstance(error, UpstreamConnectError) or error.delivered
