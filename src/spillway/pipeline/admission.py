"""A key's rate limits at the door of the pipeline: count the request, or refuse it clearly.

What a request counts for ``tpm`` before its real usage is known: the prompt's estimate (the
body's size at about 4 bytes a token, as the estimating token counter reads it) plus, for a
chat, ``max_tokens`` per choice, or ``[limits] output_reserve_tokens`` when it sets none.
When the request ends the count is settled on what it really used (nothing, for an answer
from the cache: no node spent a token on it).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

from spillway.errors import RateLimitExceeded
from spillway.nodes.tokens import EstimatingCounter
from spillway.pipeline.principal import Principal
from spillway.state.limits import Permit, RateLimited, RateLimiter, RatePart, Refusal
from spillway.wire.requests import ChatRequest, EmbeddingsRequest

_ESTIMATE = EstimatingCounter()


class Admission:
    def __init__(self, limiter: RateLimiter, output_reserve_tokens: int):
        self._limiter = limiter
        self._reserve = output_reserve_tokens

    def check(
        self, principal: Principal, request: ChatRequest | EmbeddingsRequest, request_id: str
    ) -> tuple[Permit | None, RatePart | None]:
        """Without shared state, the request's permit, counted now in this process; with it,
        the check as the fleet's script takes it, for the first slot claim to carry (or
        ``admit_part`` for an answer from the cache). (None, None) for a key without limits;
        ``RateLimitExceeded`` when a limit says no."""
        limits = principal.limits
        if limits is None:
            return None, None
        tokens = self.tokens_asked(request) if limits.tpm else 0
        part = self._limiter.part(principal.key_id, limits, tokens, request_id)
        if part is not None:
            return None, part
        with _client_error():
            permit = self._limiter.admit_here(principal.key_id, limits, tokens, request_id)
        return permit, None

    async def admit_part(self, part: RatePart) -> Permit:
        """The check on its own (an answer from the cache, which claims no slot)."""
        with _client_error():
            return await self._limiter.admit(part.key, part.limits, part.tokens, part.permit_id)

    def permit_reply(self, part: RatePart, refused_by: str, reply: list[Any]) -> Permit | None:
        """What the claim's script said of the limits: a permit when the claim was granted,
        the client's 429 when the limits refused, nothing when another check refused."""
        if not reply or refused_by not in ("", "rate"):
            return None
        with _client_error():
            return self._limiter.permit_from(part, reply)

    def admit_here(self, part: RatePart) -> Permit:
        """Redis down at the claim: this replica's share of the limits."""
        with _client_error():
            return self._limiter.admit_here(part.key, part.limits, part.tokens, part.permit_id)

    def tokens_asked(self, request: ChatRequest | EmbeddingsRequest) -> int:
        prompt = _ESTIMATE.prompt_tokens(request.body)
        if isinstance(request, EmbeddingsRequest):
            return prompt
        choices = request.body.get("n") or 1
        return prompt + (request.max_tokens or self._reserve) * choices


@contextlib.contextmanager
def _client_error() -> Iterator[None]:
    """A refusal from the limiter, as the client's error."""
    try:
        yield
    except RateLimited as exc:
        raise refused(exc.refusal) from None


def refused(refusal: Refusal) -> RateLimitExceeded:
    """The client's error for a refusal: which limit, and what to do about it."""
    limits, quota = refusal.limits, refusal.quota
    if refusal.retry_after_s is None:
        return RateLimitExceeded(
            f"This request counts about {refusal.tokens} tokens (its prompt's estimate plus "
            f"max_tokens), more than this API key's tpm of {limits.tpm}, so it can never be "
            "admitted. Lower max_tokens or shorten the prompt.",
            kind="tokens",
            quota=quota,
            retry_after_s=None,
        )
    wait = max(1, math.ceil(refusal.retry_after_s))
    if refusal.limit == "tokens":
        message = (
            f"Rate limit reached for this API key on tokens per minute (tpm): limit "
            f"{limits.tpm}, and this request counts about {refusal.tokens} (its prompt's "
            f"estimate plus max_tokens). Try again in {wait} s, or set a lower max_tokens."
        )
    elif refusal.limit == "requests":
        message = (
            f"Rate limit reached for this API key on requests per minute (rpm): limit "
            f"{limits.rpm}. Try again in {wait} s."
        )
    else:
        message = (
            f"This API key already has {limits.max_parallel} requests in flight, its "
            "max_parallel. Try again when one of them has finished."
        )
    kind = "tokens" if refusal.limit == "tokens" else "requests"
    return RateLimitExceeded(message, kind=kind, quota=quota, retry_after_s=wait)
