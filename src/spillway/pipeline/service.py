"""``Pipeline``: a request's whole life, from whatever front door it came through.

For a chat request: open its tally → read and parse it (the door's ``inbound``) → the nodes
it may use, once → the cache's plan and keys → a hit, or an identical request's answer in
flight, or our own call: reserve against the budget, dispatch (fallback, retries, the commit
point), and offer the answer to the cache → exactly one ledger record, written when the
answer is complete or, for a stream, when the door closes it. Each reply is parsed once (by
the node client) and its usage counted at most once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, TypeVar

from spillway.cache.answers import CachedAnswer, from_reply, replay_body, replay_chunks
from spillway.cache.merging import wait_for_leader
from spillway.cache.service import Hit, Probe, ResponseCache
from spillway.clock import Clock
from spillway.errors import InvalidRequest, ModelNotFound, NoSpareCapacity, SpillwayError
from spillway.nodes.tokens import TokenCounter
from spillway.pii.policy import PiiPolicy
from spillway.pipeline.accounting import Accountant, Tally
from spillway.pipeline.admission import Admission
from spillway.pipeline.calls import Answer, Background, Call, Inbound, Route, Stream
from spillway.pipeline.privacy import Reach, screen
from spillway.pipeline.sharing import Sharing
from spillway.pipeline.streams import ReplayStream, UpstreamStream
from spillway.routing.dispatch import Dispatcher, RequestContext
from spillway.routing.router import NodeHandle, Router
from spillway.secrets import Redactor
from spillway.state.limits import RatePart
from spillway.state.slots import KeyPart
from spillway.wire.requests import ChatRequest, EmbeddingsRequest
from spillway.wire.streams import Usage, reply_text, reply_usage

log = logging.getLogger("spillway.pipeline")

#: A client may shorten the request's deadline (all attempts included) with this directive.
TIMEOUT_DIRECTIVE = "x-spillway-timeout"


@dataclass(frozen=True, slots=True)
class PipelineSettings:
    #: the deadline of every request, all attempts included (``timeouts.deadline_s``)
    deadline_s: float
    #: store answers that call tools (``cache.cache_tool_calls``)
    cache_tool_calls: bool
    #: the longest a client may take to read a chunk of a replayed stream (``timeouts.idle_s``)
    idle_s: float = 60.0


class Pipeline:
    def __init__(
        self,
        router: Router,
        dispatcher: Dispatcher,
        cache: ResponseCache,
        accountant: Accountant,
        admission: Admission,
        redactor: Redactor,
        clock: Clock,
        settings: PipelineSettings,
        pii: PiiPolicy,
    ):
        self.router = router
        self.dispatcher = dispatcher
        self.cache = cache
        self.accountant = accountant
        self.admission = admission
        self._redactor = redactor
        self._clock = clock
        self._settings = settings
        self._pii = pii

    async def chat(self, call: Call, inbound: Inbound[ChatRequest]) -> Answer | Stream:
        """A complete answer, or a committed stream the caller must close."""
        tally = self._open(call)
        try:
            result = await self._chat(call, await inbound(), tally)
        except BaseException as exc:
            self._end(tally, exc)
            raise
        if isinstance(result, Answer):
            self.accountant.close(tally)
            return _with_quota(result, tally)
        return _with_quota(result, tally)  # a stream owns the tally now: its aclose writes

    async def embeddings(self, call: Call, inbound: Inbound[EmbeddingsRequest]) -> Answer:
        tally = self._open(call)
        try:
            embed = await inbound()
            reach, candidates = self._admitted(call, embed, tally)
            rate = self._rate_now_or_later(call, embed, tally)
            ctx = self._context(call, candidates, reach)
            ctx = await self._key_checks(tally, embed, ctx, rate)
            answer = await self.dispatcher.complete(embed, ctx)
            self._note_reply(tally, answer.handle, embed, answer.reply.data)
            handle = answer.handle
            result = Answer(answer.reply.body, Route(handle.name, handle.kind))
        except BaseException as exc:
            self._end(tally, exc)
            raise
        self.accountant.close(tally)
        return _with_quota(result, tally)

    def _open(self, call: Call) -> Tally:
        tally = self.accountant.open(call.request_id, call.principal, call.client_request_id)
        if call.background is not None:
            tally.batch_id = call.background.batch_id
        return tally

    def _end(self, tally: Tally, exc: BaseException) -> None:
        """The request failed before its answer: record how, once."""
        if isinstance(exc, NoSpareCapacity):
            tally.recorded = False  # a batch line that did not run now: it runs later
        if isinstance(exc, SpillwayError):
            tally.ended("error", exc.code or exc.kind)
        elif isinstance(exc, asyncio.CancelledError):
            tally.ended("error", "client_disconnected")  # the client went away first
        else:
            tally.ended("error", "internal_error")
        self.accountant.close(tally)

    async def _chat(self, call: Call, chat: ChatRequest, tally: Tally) -> Answer | Stream:
        reach, candidates = self._admitted(call, chat, tally)
        rate = self._rate_now_or_later(call, chat, tally)
        probe = self.cache.probe(
            chat.body, call.directives, call.principal.tenant, chat.model, reach.private_for_cache
        )
        ctx = self._context(call, candidates, reach)
        if probe.keys is None:
            return await self._upstream(chat, ctx, tally, None, ("bypass", probe.note), rate)
        return await self._cached_or_upstream(chat, ctx, tally, probe, rate)

    async def _cached_or_upstream(
        self,
        chat: ChatRequest,
        ctx: RequestContext,
        tally: Tally,
        probe: Probe,
        rate: RatePart | None,
    ) -> Answer | Stream:
        """A hit; else the answer of an identical request in flight; else our own call."""
        assert probe.keys is not None
        cache = self.cache
        lookup = await cache.lookup(probe)
        if lookup.hit is not None:
            if rate is not None:  # no slot to claim: the limits are checked on their own
                tally.permit = await self.admission.admit_part(rate)
            hit_route = Route(None, "cache", f"hit-{lookup.hit.kind}", probe.note)
            return self._from_cache(chat, tally, lookup.hit, hit_route)
        leader = cache.merger.follow(probe.keys.exact)
        if leader is not None:
            shared = await wait_for_leader(leader, ctx.deadline - self._clock.monotonic())
            if shared is not None:
                if rate is not None:
                    tally.permit = await self.admission.admit_part(rate)
                cache.merger.count_merged()
                hit = Hit("exact", CachedAnswer.from_bytes(shared))
                return self._from_cache(
                    chat, tally, hit, Route(None, "cache", "hit-exact", "", True)
                )
        now = self._clock.wall()
        sharing = Sharing(cache, probe, lookup.vector, leads=leader is None, now=now)
        try:
            result = await self._upstream(chat, ctx, tally, sharing, ("miss", probe.note), rate)
        except BaseException:
            sharing.settle()
            raise
        if isinstance(result, Answer):
            sharing.settle()  # a stream settles when it closes
        return result

    def _from_cache(
        self, chat: ChatRequest, tally: Tally, hit: Hit, route: Route
    ) -> Answer | Stream:
        tally.replayed(hit.answer)
        now = self._clock.wall()
        if not chat.stream:
            return Answer(replay_body(hit.answer, now), route)
        chunks = replay_chunks(hit.answer, now, chat.include_usage)
        return ReplayStream(chunks, route, tally, self.accountant, self._settings.idle_s)

    async def _upstream(
        self,
        chat: ChatRequest,
        ctx: RequestContext,
        tally: Tally,
        sharing: Sharing | None,
        cache: tuple[str, str],
        rate: RatePart | None,
    ) -> Answer | Stream:
        """Dispatch to the fleet; ``cache`` is the cache's part (status, note) for the route."""
        ctx = await self._key_checks(tally, chat, ctx, rate)
        if not chat.stream:
            answer = await self.dispatcher.complete(chat, ctx)
            reply, handle = answer.reply, answer.handle
            self._note_reply(tally, handle, chat, reply.data)
            if sharing is not None:
                tools = self._settings.cache_tool_calls
                build = partial(
                    from_reply, reply.data, node=handle.name, now=sharing.now, tools=tools
                )
                sharing.offer(build, tally.usage, tally.counting)
            return Answer(reply.body, Route(handle.name, handle.kind, *cache))
        opened = await self.dispatcher.open_stream(chat, ctx)
        tally.answered_by(opened.handle, chat.model)
        tally.first_token_at(self._clock.monotonic())
        return UpstreamStream(
            opened,
            chat,
            Route(opened.handle.name, opened.handle.kind, *cache),
            tally,
            self.accountant,
            self._redactor,
            sharing,
        )

    def _rate_now_or_later(
        self, call: Call, request: ChatRequest | EmbeddingsRequest, tally: Tally
    ) -> RatePart | None:
        """The key's rate limits: counted now without shared state; with it, returned, to be
        carried by the first slot claim (or checked alone for an answer from the cache)."""
        tally.permit, rate = self.admission.check(call.principal, request, tally.request_id)
        return rate

    async def _key_checks(
        self,
        tally: Tally,
        request: ChatRequest | EmbeddingsRequest,
        ctx: RequestContext,
        rate: RatePart | None,
    ) -> RequestContext:
        """The budget (and, with shared state, the rate limits) before the node: with shared
        state carried by the first slot claim, so that a request makes one round trip to
        Redis; without it checked here."""
        assert ctx.candidates is not None
        budget = self.accountant.reserve(tally, request, ctx.candidates)
        if rate is None and budget is None:
            return ctx

        def on_reply(refused_by: str, rate_reply: list[Any], budget_reply: list[Any]) -> None:
            if rate is not None:
                permit = self.admission.permit_reply(rate, refused_by, rate_reply)
                if permit is not None:
                    tally.permit = permit
            if budget is not None:
                self.accountant.budget_reply(tally, budget, refused_by, budget_reply)

        def on_local() -> None:
            if rate is not None:
                tally.permit = self.admission.admit_here(rate)
            if budget is not None:
                self.accountant.reserve_here(tally, budget)

        key = KeyPart(
            rate.keys if rate else [],
            rate.args if rate else [],
            budget.keys if budget else [],
            budget.args if budget else [],
            on_reply,
            on_local,
        )
        return replace(ctx, key=key)

    def _note_reply(
        self,
        tally: Tally,
        handle: NodeHandle,
        request: ChatRequest | EmbeddingsRequest,
        data: dict[str, object],
    ) -> None:
        tally.answered_by(handle, request.model)
        tally.used(reply_usage(data))
        if tally.usage is not None:
            return

        def count(counter: TokenCounter) -> Usage:  # the node reported none
            if isinstance(request, EmbeddingsRequest):
                return Usage(counter.completion_tokens(request.text()), 0)
            prompt = counter.prompt_tokens(request.body)
            return Usage(prompt, counter.completion_tokens(reply_text(data)))

        self.accountant.count_later(tally, count)

    def _admitted(
        self, call: Call, request: ChatRequest | EmbeddingsRequest, tally: Tally
    ) -> tuple[Reach, list[NodeHandle]]:
        """The model noted, the personal-data step, and the nodes the request may use."""
        self._asked_for(tally, request.model)
        reach = screen(self._pii, call.principal, request, tally)
        return reach, self._candidates(request.model, call, reach)

    def _asked_for(self, tally: Tally, model: str) -> None:
        """The model as the ledger keeps it: one the gateway serves as it is, any other
        scrubbed of secrets first (a key pasted into the model field must not be stored)."""
        tally.asked_for(model if self.router.knows(model) else self._redactor.scrub(model))

    def _candidates(self, model: str, call: Call, reach: Reach) -> list[NodeHandle]:
        """The nodes this request may use, worked out once (404 for an unknown model or one
        the key may not use, 503 for a private_only request no private node serves)."""
        if not call.principal.may_use(model):
            raise ModelNotFound.named(model)
        handles = self.router.check_eligible(model, reach.private_only)
        if call.background is None:
            return handles
        spare = spare_nodes(handles, call.background)
        if not spare:
            raise NoSpareCapacity(
                "No private node has spare capacity for batch work now; the line runs later."
            )
        return spare

    def _context(self, call: Call, candidates: list[NodeHandle], reach: Reach) -> RequestContext:
        deadline = self._clock.monotonic() + self._budget_s(call)
        return RequestContext(
            call.request_id,
            call.principal.tenant,
            reach.private_only,
            deadline,
            tuple(candidates),
            cloud_request=reach.cloud_request,
            background=call.background is not None,
        )

    def _budget_s(self, call: Call) -> float:
        """The configured deadline, shortened (never lengthened) by the client's directive."""
        configured = self._settings.deadline_s
        asked = call.directives.get(TIMEOUT_DIRECTIVE)
        if asked is None:
            return configured
        try:
            seconds = float(asked)
        except ValueError:
            seconds = -1.0
        if not 0 < seconds < float("inf"):
            raise InvalidRequest(
                f"Header {TIMEOUT_DIRECTIVE} must be a positive number of seconds, e.g. 30 or 2.5.",
                param=TIMEOUT_DIRECTIVE,
            )
        return min(seconds, configured)


def spare_nodes(handles: Iterable[NodeHandle], background: Background) -> list[NodeHandle]:
    """The nodes with room for background work now: private ones under their share of
    ``max_concurrency`` (at least one slot), cloud ones only when the batch may spill."""
    return [
        h
        for h in handles
        if (h.private and h.in_flight < background_slots(h, background.max_share))
        or (not h.private and background.may_spill)
    ]


def background_slots(handle: NodeHandle, max_share: float) -> int:
    """How many of a node's slots background work may fill."""
    return max(1, int(handle.max_concurrency * max_share))


_Result = TypeVar("_Result", Answer, Stream)


def _with_quota(result: _Result, tally: Tally) -> _Result:
    """The answer, with what the key's rate limits looked like once it was counted."""
    if tally.permit is None:
        return result
    route = replace(result.route, quota=tally.permit.quota)
    if isinstance(result, Answer):
        return replace(result, route=route)
    result.route = route
    return result
