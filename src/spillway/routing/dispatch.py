"""Sending one request through its candidate nodes, with fallback up to the commit point.

Non-streaming: try each candidate in order until one answers; a failure that may fall back
moves on, a request error (the node says 400) goes straight back to the client.

Streaming: the same, but a node counts as answering only once its first SSE event arrived.
That event is the commit point: the caller sends headers after it, and from then on a failure
can only end the stream with an error, never move to another node.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import orjson

from spillway.clock import Clock
from spillway.config.schema import Timeouts
from spillway.errors import (
    DeadlineExceeded,
    NoEligibleNode,
    UpstreamConnectError,
    UpstreamError,
    UpstreamsExhausted,
    UpstreamStatusError,
)
from spillway.nodes.base import Reply
from spillway.routing.router import NodeHandle, Router, Slot
from spillway.wire.requests import ChatRequest, EmbeddingsRequest, body_for_node
from spillway.wire.sse import SseEvent

log = logging.getLogger("spillway.routing")


@dataclass(frozen=True, slots=True)
class RequestContext:
    """Per-request facts that travel with it through the router."""

    request_id: str
    tenant: str
    private_only: bool
    deadline: float  # clock.monotonic() value by which every attempt must be over


@dataclass(frozen=True, slots=True)
class Answer:
    handle: NodeHandle
    reply: Reply


@dataclass(slots=True)
class OpenStream:
    """A committed stream: the node, its first event, and the rest still to come."""

    handle: NodeHandle
    first: SseEvent
    rest: AsyncIterator[SseEvent]
    slot: Slot

    async def aclose(self) -> None:
        try:
            await self.rest.aclose()  # type: ignore[attr-defined]
        finally:
            self.slot.release()


class Dispatcher:
    def __init__(self, router: Router, clock: Clock):
        self.router = router
        self.clock = clock

    async def complete(
        self, request: ChatRequest | EmbeddingsRequest, ctx: RequestContext
    ) -> Answer:
        errors: list[UpstreamError] = []
        for handle in self.router.candidates(request.model, ctx.private_only):
            timeouts = self._attempt_timeouts(handle, ctx)
            body = body_for_node(request, handle.models[request.model])
            slot = handle.acquire()
            try:
                if isinstance(request, ChatRequest):
                    reply = await handle.node.chat(body, timeouts)
                else:
                    reply = await handle.node.embed(body, timeouts)
            except UpstreamError as exc:
                self._note_failure(exc, errors, ctx)
                continue
            finally:
                slot.release()
            return Answer(handle, reply)
        raise self._exhausted(errors, request.model, ctx)

    async def open_stream(self, request: ChatRequest, ctx: RequestContext) -> OpenStream:
        errors: list[UpstreamError] = []
        for handle in self.router.candidates(request.model, ctx.private_only):
            timeouts = self._attempt_timeouts(handle, ctx)
            body = body_for_node(request, handle.models[request.model])
            slot = handle.acquire()
            events = handle.node.stream(body, timeouts)
            try:
                first = await _first_event(handle, events)
            except BaseException as exc:
                slot.release()
                await events.aclose()  # type: ignore[attr-defined]
                if not isinstance(exc, UpstreamError):
                    raise
                self._note_failure(exc, errors, ctx)
                continue
            return OpenStream(handle, first, events, slot)
        raise self._exhausted(errors, request.model, ctx)

    def _attempt_timeouts(self, handle: NodeHandle, ctx: RequestContext) -> Timeouts:
        remaining = ctx.deadline - self.clock.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded(
                "The request deadline passed before a node could answer.", code="deadline_exceeded"
            )
        if remaining >= handle.timeouts.total_s:
            return handle.timeouts
        return handle.timeouts.model_copy(update={"total_s": remaining})

    def _note_failure(
        self, exc: UpstreamError, errors: list[UpstreamError], ctx: RequestContext
    ) -> None:
        if not exc.may_fall_back:
            raise exc
        log.warning("request %s: %s; trying the next node", ctx.request_id, exc.message)
        errors.append(exc)

    def _exhausted(
        self, errors: Sequence[UpstreamError], model: str, ctx: RequestContext
    ) -> Exception:
        if ctx.private_only:
            detail = "; ".join(f"{e.node}: {e.detail}" for e in errors)
            return NoEligibleNode(
                f"No private node could serve '{model}' ({detail}). This API key is "
                "private_only, so the request was not sent to a cloud node."
            )
        return UpstreamsExhausted(errors)


async def _first_event(handle: NodeHandle, events: AsyncIterator[SseEvent]) -> SseEvent:
    """The first data event, which commits the stream; an in-band error counts as a failure."""
    first = await anext(events, None)
    if first is None or first.is_done:
        raise UpstreamConnectError(handle.name, "stream ended before its first chunk")
    if first.event == "error" or _is_error_payload(first.data):
        raise UpstreamStatusError(handle.name, 200, "the stream began with an error event")
    return first


def _is_error_payload(data: bytes) -> bool:
    if b'"error"' not in data:
        return False
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    return isinstance(payload, dict) and bool(payload.get("error"))
