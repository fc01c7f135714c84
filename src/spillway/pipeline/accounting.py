"""Per-request accounting: reserve against the key's budget, then one ledger record per request.

Every request that reaches a model endpoint gets exactly one record, whatever happens to it:
answered, refused, failed, cut mid-stream, or abandoned by its client. Writing is
write-behind (``LedgerWriter``): the response never waits on the disk. Counting tokens for
a node that reported none runs in a worker thread after the client has its answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from spillway import ids
from spillway.cache.answers import CachedAnswer
from spillway.clock import Clock
from spillway.ledger.budgets import BudgetPart, Budgets, Reservation
from spillway.ledger.costing import Charge, Costing
from spillway.ledger.records import LedgerRecord, Status
from spillway.ledger.writer import LedgerWriter
from spillway.nodes.tokens import EstimatingCounter, TokenCounter, most_prompt_tokens
from spillway.pii.policy import ledger_kinds
from spillway.pipeline.principal import Principal
from spillway.routing.router import NodeHandle
from spillway.state.limits import Permit
from spillway.wire.requests import ChatRequest, EmbeddingsRequest, body_for_node
from spillway.wire.streams import Usage

log = logging.getLogger("spillway.ledger")


@dataclass(slots=True)
class Tally:
    """What accounting learns about one request as it goes. The pipeline tells it through
    these methods; only this module sets its fields."""

    request_id: str
    principal: Principal
    started: float  # clock.monotonic()
    at: datetime
    model: str = ""
    handle: NodeHandle | None = None
    upstream_model: str | None = None
    ttft_ms: int | None = None
    usage: Usage | None = None
    usage_estimated: bool = False
    #: the one count of an answer's tokens when the node reported none (``count_later``):
    #: the ledger record and the cache both wait for it
    counting: asyncio.Task[tuple[Usage, bool]] | None = None
    status: Status = "ok"
    error_code: str | None = None
    reservation: Reservation | None = None
    latency_ms: int = 0
    client_request_id: str | None = None
    #: set when the answer came from the cache (a hit, or an identical request's answer)
    from_cache: CachedAnswer | None = None
    #: the request's place in its key's rate limits, settled with the record
    permit: Permit | None = None
    #: what the personal-data step decided and found (kinds and counts, never values)
    pii_action: str | None = None
    pii_kinds: str | None = None
    #: the batch this request is a line of (its price may carry the batch discount)
    batch_id: str | None = None
    #: False: settle the request but keep no record of it (a batch line that found no
    #: spare capacity: it never ran, and runs later under its own record)
    recorded: bool = True

    def asked_for(self, model: str) -> None:
        self.model = model

    def answered_by(self, handle: NodeHandle, model: str) -> None:
        self.handle = handle
        self.upstream_model = handle.models.get(model)

    def replayed(self, answer: CachedAnswer) -> None:
        """The answer came from the cache (a hit, or an identical request's answer)."""
        self.from_cache = answer

    def found_pii(self, action: str, counts: Mapping[str, int]) -> None:
        self.pii_action, self.pii_kinds = action, ledger_kinds(counts)

    def first_token_at(self, now: float) -> None:
        self.ttft_ms = int(1000 * (now - self.started))

    def used(self, usage: Usage | None, estimated: bool = False) -> None:
        self.usage, self.usage_estimated = usage, estimated

    def ended(self, status: Status, error_code: str | None = None) -> None:
        """How the request ended, as far as is known now (a stream is ``incomplete`` until
        it ends well)."""
        self.status, self.error_code = status, error_code


class Accountant:
    def __init__(
        self,
        costing: Costing,
        budgets: Budgets,
        writer: LedgerWriter | None,
        clock: Clock,
        max_output_tokens: int,
    ):
        self._costing = costing
        self._budgets = budgets
        self._writer = writer
        self._clock = clock
        self._max_output_tokens = max_output_tokens
        self._later: set[asyncio.Task[None]] = set()

    @property
    def budgets(self) -> Budgets:
        return self._budgets

    def open(self, request_id: str, principal: Principal, client_id: bool = False) -> Tally:
        """A tally keyed by a fresh id when the client chose ``request_id`` (it may repeat)."""
        now = self._clock.monotonic()
        at = datetime.fromtimestamp(self._clock.wall(), UTC)
        if not client_id:
            return Tally(request_id, principal, now, at)
        return Tally(ids.request_id(), principal, now, at, client_request_id=request_id)

    def reserve(
        self,
        tally: Tally,
        request: ChatRequest | EmbeddingsRequest,
        handles: Sequence[NodeHandle],
    ) -> BudgetPart | None:
        """Hold the most this request can cost against its key's budget (429 if it can't).

        The most, not a guess: a worst case any node that bills honestly for the body it is
        sent stays within (docs/ledger.md#budgets). Settling replaces it with the actual cost.
        Without shared state it is held here, now. With it, it is returned as the fleet's
        script takes it, for the request's first slot claim to carry. None: nothing to carry
        (no budget, or held already)."""
        worst = self._worst_case(tally, request, handles)
        if worst is None:
            return None
        key_id = tally.principal.key_id
        part = self._budgets.part(key_id, worst, tally.request_id)
        if part is None:
            tally.reservation = self._budgets.reserve_here(key_id, worst)
        return part

    def budget_reply(
        self, tally: Tally, part: BudgetPart, refused_by: str, reply: list[Any]
    ) -> None:
        """What the claim's script said of the budget: a reservation when the claim was
        granted; ``InsufficientQuota`` when the budget refused; otherwise (another part
        refused) only what it learnt."""
        if not reply:
            return  # the script did not get to the budget (the rate limits refused first)
        if refused_by in ("", "budget"):
            tally.reservation = self._budgets.reservation_from(part, reply)
        else:
            self._budgets.heard(part, reply)

    def reserve_here(self, tally: Tally, part: BudgetPart) -> None:
        """Redis down at the claim: this replica's share."""
        tally.reservation = self._budgets.reserve_here(part.key_id, part.estimate)

    def _worst_case(
        self,
        tally: Tally,
        request: ChatRequest | EmbeddingsRequest,
        handles: Sequence[NodeHandle],
    ) -> Decimal | None:
        model = request.model
        if self._budgets.remaining(tally.principal.key_id) is None:
            return None
        prompts = _most_prompt_tokens(request, {h.models[model] for h in handles})
        output = self._most_output_tokens(request)
        return max(
            (self._costing.estimate(h.name, prompts[h.models[model]], output) for h in handles),
            default=Decimal(0),
        )

    def _most_output_tokens(self, request: ChatRequest | EmbeddingsRequest) -> int:
        if isinstance(request, EmbeddingsRequest):
            return 0
        # parse_chat checked n; each choice may write up to the limit.
        choices: int = request.body.get("n") or 1
        return (request.max_tokens or self._max_output_tokens) * choices

    def count_later(
        self, tally: Tally, count: Callable[[TokenCounter], Usage]
    ) -> asyncio.Task[tuple[Usage, bool]]:
        """Count the tokens of an answer whose node reported none, in a worker thread, once:
        the ledger record and the cache wait for the same count."""
        if tally.counting is None:
            assert tally.handle is not None
            tally.counting = asyncio.create_task(count_tokens(tally.handle, count))
        return tally.counting

    def close(self, tally: Tally) -> None:
        """The request is over: write its record now, or once its tokens are counted."""
        tally.latency_ms = int(1000 * (self._clock.monotonic() - tally.started))
        if tally.usage is not None or tally.counting is None:
            self._write(tally)
            return
        task = asyncio.create_task(self._count_then_write(tally, tally.counting))
        self._later.add(task)
        task.add_done_callback(self._later.discard)

    async def aclose(self) -> None:
        """Shutdown: finish every record still being counted."""
        if self._later:
            await asyncio.gather(*self._later, return_exceptions=True)

    async def _count_then_write(
        self, tally: Tally, counting: asyncio.Task[tuple[Usage, bool]]
    ) -> None:
        tally.used(*await counting)
        self._write(tally)

    def _write(self, tally: Tally) -> None:
        cached = tally.from_cache
        usage = cached.usage if cached else tally.usage or Usage(0, 0)
        node = tally.handle.name if tally.handle else None
        charge = self._costing.charge(
            node, usage.prompt_tokens, usage.completion_tokens, batch=tally.batch_id is not None
        )
        self._budgets.settle(tally.reservation, charge.cost)
        if tally.permit is not None:  # a node's tokens: none for an answer from the cache
            tally.permit.settle(0 if cached else usage.prompt_tokens + usage.completion_tokens)
        if self._writer is None or not tally.recorded:
            return
        avoided = Decimal(0)
        if cached is not None and cached.node is not None:
            avoided = self._costing.estimate(
                cached.node, usage.prompt_tokens, usage.completion_tokens
            )
        try:
            self._writer.record(self._record(tally, usage, node, charge, avoided))
        except (RuntimeError, ValueError):
            # Only after shutdown began, or for a record the store could never take.
            log.exception("ledger record for request %s was not accepted", tally.request_id)

    def _record(
        self, tally: Tally, usage: Usage, node: str | None, charge: Charge, avoided: Decimal
    ) -> LedgerRecord:
        source = "cache" if tally.from_cache else tally.handle.kind if tally.handle else None
        return LedgerRecord(
            request_id=tally.request_id,
            at=tally.at,
            tenant=tally.principal.tenant,
            key_id=tally.principal.key_id,
            model=tally.model,
            node=node,
            source=source,
            upstream_model=tally.upstream_model,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            tokens_estimated=tally.usage_estimated,
            cost=charge.cost,
            reference_cost=charge.reference_cost,
            currency=self._costing.currency,
            latency_ms=tally.latency_ms,
            ttft_ms=tally.ttft_ms,
            status=tally.status,
            error_code=tally.error_code,
            client_request_id=tally.client_request_id,
            avoided_cost=avoided,
            pii_action=tally.pii_action,
            pii_kinds=tally.pii_kinds,
            batch_id=tally.batch_id,
        )


async def count_tokens(
    handle: NodeHandle, count: Callable[[TokenCounter], Usage]
) -> tuple[Usage, bool]:
    """(usage, estimated): ``count`` with the node's tokenizer in a worker thread, or, if
    that tokenizer fails, with the estimate, so a broken tokenizer never costs a usage figure."""
    counter = handle.counter
    try:
        return await asyncio.to_thread(count, counter), not counter.exact
    except Exception:
        log.exception("token counting failed for node %s; estimating", handle.name)
        return count(EstimatingCounter()), True


def _most_prompt_tokens(
    request: ChatRequest | EmbeddingsRequest, node_models: set[str]
) -> dict[str, int]:
    """Per node model name, the bound on the prompt of the very bytes that node is sent.

    From the whole body rather than from the fields we know: every field a node may read as
    prompt (tools, schemas, content parts, names, token arrays, ones added to the API later)
    is in it. Only the model name differs between nodes, hence one body per name.
    """
    key = "messages" if isinstance(request, ChatRequest) else "input"
    parts = _parts(request.body.get(key))
    return {
        model: most_prompt_tokens(len(body_for_node(request, model)), parts)
        for model in node_models
    }


def _parts(items: object) -> int:
    """Messages a template frames one by one, or embedding inputs; a flat token array or a
    single string is one input."""
    if not isinstance(items, list):
        return 1
    return sum(not isinstance(item, int) for item in items) or 1
