"""Per-key rate limits as token buckets: the arithmetic, and one process's own buckets.

A key's ``rpm`` and ``tpm`` are buckets that hold up to the limit and refill continuously at
the limit per minute (OpenAI's model: "replenished continuously", not reset each minute). A
request takes 1 from the requests bucket and its token estimate from the tokens bucket; when
it ends, the tokens bucket gets back what the estimate overstated (or gives up what it
understated: a bucket may go below zero, and then later requests wait). ``max_parallel``
counts requests in flight.

``refill`` and ``wait_ms`` are the arithmetic, shared with the Redis script in ``limits.py``
(which does the same on the server's clock). ``LocalBuckets`` keeps buckets in this process:
the limiter without Redis, and the fallback while Redis is unreachable. Pure state, with the
time passed in: no I/O, no clock of its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from spillway.quota import Quota

MINUTE_MS = 60_000.0
#: ``max_parallel`` frees a slot only when a request ends, at a time nobody knows: the
#: Retry-After it gives
PARALLEL_RETRY_MS = 1_000.0


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """A key's limits; None: no limit of that kind."""

    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None

    @property
    def any(self) -> bool:
        return self.rpm is not None or self.tpm is not None or self.max_parallel is not None

    def share(self, parts: int) -> KeyLimits:
        """This process's part when ``parts`` processes enforce the limits each on its own:
        the limit divided, at least 1 (so a limit below ``parts`` admits up to ``parts``)."""
        if parts <= 1:
            return self
        rpm, tpm, parallel = self.rpm, self.tpm, self.max_parallel
        return KeyLimits(_part(rpm, parts), _part(tpm, parts), _part(parallel, parts))


def _part(limit: int | None, parts: int) -> int | None:
    return None if limit is None else max(1, limit // parts)


def refill(level: float, capacity: int, elapsed_ms: float) -> float:
    """A bucket's level after ``elapsed_ms`` of refilling at ``capacity`` per minute."""
    return min(float(capacity), level + max(0.0, elapsed_ms) * capacity / MINUTE_MS)


def wait_ms(level: float, need: float, capacity: int) -> float:
    """How long until a bucket at ``level`` holds ``need`` (0: it does now)."""
    if level >= need:
        return 0.0
    return (need - level) * MINUTE_MS / capacity


def full_in_s(level: float, capacity: int) -> float:
    """Seconds until the bucket is full again (OpenAI's x-ratelimit-reset-*)."""
    return max(0.0, capacity - level) * 60.0 / capacity


def quota(limits: KeyLimits, requests: float, tokens: float) -> Quota:
    rpm, tpm = limits.rpm, limits.tpm
    return Quota(
        rpm,
        max(0, math.floor(requests)) if rpm else 0,
        full_in_s(requests, rpm) if rpm else 0.0,
        tpm,
        max(0, math.floor(tokens)) if tpm else 0,
        full_in_s(tokens, tpm) if tpm else 0.0,
    )


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether a request may go now, and if not, which limit stopped it and for how long."""

    admitted: bool
    quota: Quota
    #: "requests", "tokens" or "parallel"; "" when admitted
    limit: str = ""
    retry_ms: float = 0.0


@dataclass(slots=True)
class _Bucket:
    level: float
    at_ms: float


class LocalBuckets:
    """One process's buckets and in-flight counts, by key id."""

    def __init__(self) -> None:
        self._requests: dict[str, _Bucket] = {}
        self._tokens: dict[str, _Bucket] = {}
        self._in_flight: dict[str, int] = {}

    def admit(self, key: str, limits: KeyLimits, tokens: int, now_ms: float) -> Verdict:
        """Count a request of ``tokens`` (estimated) against ``limits``, if they allow it now."""
        requests = self._level(self._requests, key, limits.rpm, now_ms)
        held = self._level(self._tokens, key, limits.tpm, now_ms)
        verdict = decide(limits, requests, held, tokens, self._in_flight.get(key, 0))
        if verdict.admitted:
            if limits.rpm:
                self._requests[key] = _Bucket(requests - 1, now_ms)
            if limits.tpm:
                self._tokens[key] = _Bucket(held - tokens, now_ms)
            self._in_flight[key] = self._in_flight.get(key, 0) + 1
        return verdict

    def settle(self, key: str, limits: KeyLimits, refund: int, now_ms: float) -> None:
        """A request counted here ended: give back ``refund`` tokens (negative: take more)."""
        if limits.tpm:
            held = self._level(self._tokens, key, limits.tpm, now_ms)
            self._tokens[key] = _Bucket(min(float(limits.tpm), held + refund), now_ms)
        self.release(key)

    def release(self, key: str) -> None:
        """A request counted here ended (its tokens settled elsewhere, or not counted)."""
        left = self._in_flight.get(key, 0) - 1
        if left > 0:
            self._in_flight[key] = left
        else:
            self._in_flight.pop(key, None)

    def in_flight(self, key: str) -> int:
        return self._in_flight.get(key, 0)

    @staticmethod
    def _level(buckets: dict[str, _Bucket], key: str, capacity: int | None, now_ms: float) -> float:
        if not capacity:
            return 0.0
        bucket = buckets.get(key)
        if bucket is None:
            return float(capacity)
        return refill(bucket.level, capacity, now_ms - bucket.at_ms)


def decide(
    limits: KeyLimits, requests: float, tokens_level: float, tokens: int, in_flight: int
) -> Verdict:
    """The admission rule, given the buckets' levels now and the key's requests in flight.

    A request whose estimate exceeds the whole ``tpm`` can never go: it is refused with an
    infinite wait (the caller says so rather than naming a time)."""
    rpm, tpm, parallel = limits.rpm, limits.tpm, limits.max_parallel
    if tpm and tokens > tpm:
        return Verdict(False, quota(limits, requests, tokens_level), "tokens", math.inf)
    waits = (
        ("requests", wait_ms(requests, 1, rpm) if rpm else 0.0),
        ("tokens", wait_ms(tokens_level, tokens, tpm) if tpm else 0.0),
        ("parallel", PARALLEL_RETRY_MS if parallel and in_flight >= parallel else 0.0),
    )
    limit, longest = max(waits, key=lambda w: w[1])
    if longest > 0:
        return Verdict(False, quota(limits, requests, tokens_level), limit, longest)
    after = quota(limits, requests - 1 if rpm else 0.0, tokens_level - tokens if tpm else 0.0)
    return Verdict(True, after)
