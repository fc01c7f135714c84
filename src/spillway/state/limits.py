"""Per-key rate limits (``rpm``, ``tpm``, ``max_parallel`` on ``[[keys]]``): admit or refuse.

Without ``[state] redis_url`` each process keeps its own buckets (``buckets.LocalBuckets``),
with each limit divided by the number of processes that share the port (``--workers N``): N
workers together admit what one would. With it, the buckets live in Redis and one Lua script
per request checks and takes all three atomically, on Redis's clock: a key with ``rpm = 30``
admits 30 a minute across every replica. That script is the one round trip rate limiting adds
to a request; a key without limits costs none. Settling (the real token count, the request's
end) is a second call made after the answer, off the request's path.

``max_parallel`` is counted in Redis as leases: a sorted set of the key's requests in flight,
each expiring ``lease_s`` after it was last renewed. Every replica renews its own every
``lease_s / 3``, so a replica killed with requests in flight frees their places within
``lease_s`` (default 15 s).

While Redis is down (``SharedState``), each replica enforces its share, the limits divided
by the replicas last counted: fleet-wide a key may then get up to its limits once more in
all (each replica's share from its own full buckets), and ``max_parallel`` at least one per
replica. Requests counted in Redis before the outage keep their leases there until they end
or the leases run out.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from spillway.clock import Clock
from spillway.quota import Quota
from spillway.state.buckets import KeyLimits, LocalBuckets, Verdict, quota
from spillway.state.leases import Leases
from spillway.state.redis import SharedState, StateDown
from spillway.state.resp import text

log = logging.getLogger("spillway.limits")

#: Redis keys of a key's limits expire this long after their last use (buckets refill fully
#: in a minute, so a key idle this long is at its limits anyway)
IDLE_EXPIRY_MS = 120_000
#: Lua: a key's limits. K: the buckets hash, the in-flight set. A: rpm, tpm, max_parallel,
#: tokens, permit id, lease ms, idle expiry ms. With ``apply`` false only checks. Returns
#: {admitted, limit, wait ms ('-1': never), requests left, tokens left} (levels as text).
RATE_LUA = """
local function rate(K, A, apply)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local rpm, tpm, par = tonumber(A[1]), tonumber(A[2]), tonumber(A[3])
  local cost, lease = tonumber(A[4]), tonumber(A[6])
  local function level(cap, lf, tf)
    if cap <= 0 then return 0 end
    local v = redis.call('HMGET', K[1], lf, tf)
    local l = tonumber(v[1])
    if not l then return cap end
    return math.min(cap, l + math.max(0, now - tonumber(v[2])) * cap / 60000)
  end
  local rl, tl, busy = level(rpm, 'rl', 'rt'), level(tpm, 'tl', 'tt'), 0
  if par > 0 then
    redis.call('ZREMRANGEBYSCORE', K[2], '-inf', now)
    busy = redis.call('ZCARD', K[2])
  end
  if tpm > 0 and cost > tpm then return {0, 'tokens', '-1', tostring(rl), tostring(tl)} end
  local limit, wait = '', 0
  if rpm > 0 and rl < 1 then limit, wait = 'requests', (1 - rl) * 60000 / rpm end
  if tpm > 0 and tl < cost and (cost - tl) * 60000 / tpm > wait then
    limit, wait = 'tokens', (cost - tl) * 60000 / tpm
  end
  if par > 0 and busy >= par and wait < 1000 then limit, wait = 'parallel', 1000 end
  if wait > 0 then return {0, limit, tostring(wait), tostring(rl), tostring(tl)} end
  if rpm > 0 then rl = rl - 1 end
  if tpm > 0 then tl = tl - cost end
  if apply then
    if rpm > 0 then redis.call('HSET', K[1], 'rl', tostring(rl), 'rt', now) end
    if tpm > 0 then redis.call('HSET', K[1], 'tl', tostring(tl), 'tt', now) end
    if rpm > 0 or tpm > 0 then redis.call('PEXPIRE', K[1], A[7]) end
    if par > 0 then
      redis.call('ZADD', K[2], now + lease, A[5])
      redis.call('PEXPIRE', K[2], lease * 2)
    end
  end
  return {1, '', '0', tostring(rl), tostring(tl)}
end
"""
_ADMIT = RATE_LUA + "return rate(KEYS, ARGV, true)\n"
_SETTLE = """
local tpm, refund = tonumber(ARGV[1]), tonumber(ARGV[2])
if tpm > 0 and refund ~= 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local v = redis.call('HMGET', KEYS[1], 'tl', 'tt')
  local l = tonumber(v[1])
  if l then
    l = math.min(tpm, l + math.max(0, now - tonumber(v[2])) * tpm / 60000)
    l = math.min(tpm, l + refund)
    redis.call('HSET', KEYS[1], 'tl', tostring(l), 'tt', now)
  end
end
redis.call('ZREM', KEYS[2], ARGV[3])
return 1
"""


@dataclass(frozen=True, slots=True)
class RatePart:
    """A request's rate check as the Redis script takes it."""

    keys: list[str]
    args: list[int | str]
    key: str
    limits: KeyLimits
    tokens: int
    permit_id: str


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request was not admitted: which limit, and when trying again can help."""

    limit: str  # "requests", "tokens" or "parallel"
    #: seconds until it can be admitted; None when it never can (its estimate exceeds tpm)
    retry_after_s: float | None
    quota: Quota
    limits: KeyLimits
    tokens: int


class RateLimited(Exception):
    """Carries a ``Refusal`` out of ``RateLimiter.admit``; the pipeline turns it into the
    client's error."""

    def __init__(self, refusal: Refusal):
        super().__init__(refusal.limit)
        self.refusal = refusal


class Permit:
    """One admitted request's place in its key's limits; ``settle`` exactly once at its end."""

    __slots__ = ("_id", "_key", "_limiter", "_limits", "_shared", "_tokens", "quota")

    def __init__(
        self,
        limiter: RateLimiter,
        key: str,
        limits: KeyLimits,
        permit_id: str,
        tokens: int,
        shared: bool,
        quota: Quota,
    ):
        self._limiter: RateLimiter | None = limiter
        self._key = key
        self._limits = limits
        self._id = permit_id
        self._tokens = tokens
        self._shared = shared
        self.quota = quota

    def settle(self, used_tokens: int) -> None:
        """The request ended having used ``used_tokens`` (prompt + completion; 0 for a cache
        hit): the tokens bucket gets back what the estimate overstated."""
        limiter, self._limiter = self._limiter, None
        if limiter is not None:
            limiter._settle(self, self._tokens - used_tokens)


class RateLimiter:
    """Admission by per-key limits: fleet-wide through ``shared`` (Redis), else per process
    with the limits divided by ``local_share``."""

    def __init__(
        self,
        clock: Clock,
        shared: SharedState | None = None,
        leases: Leases | None = None,
        *,
        local_share: int = 1,
    ):
        if (shared is None) != (leases is None):
            raise ValueError("shared state and its leases come together")
        self._clock = clock
        self._shared = shared
        self._leases = leases
        self._local = LocalBuckets()
        self._local_share = max(1, local_share)
        if shared is not None:
            self._admit = shared.redis.register_script(_ADMIT)
            self._settle_script = shared.redis.register_script(_SETTLE)

    async def admit(self, key: str, limits: KeyLimits, tokens: int, permit_id: str) -> Permit:
        """Count a request of about ``tokens`` against ``key``'s limits, or raise
        ``RateLimited``."""
        part = self.part(key, limits, tokens, permit_id)
        if part is None:
            return self.admit_here(key, limits, tokens, permit_id)
        shared = self._shared
        assert shared is not None
        try:
            reply = await shared.call(lambda _: self._admit(keys=part.keys, args=part.args))
        except StateDown:
            return self.admit_here(key, limits, tokens, permit_id)
        return self.permit_from(part, reply)

    def part(self, key: str, limits: KeyLimits, tokens: int, permit_id: str) -> RatePart | None:
        """The Redis script's keys and arguments for this request (None without shared
        state): for ``admit``, or for a slot claim that carries the check along."""
        if self._shared is None or self._leases is None:
            return None
        argv: list[int | str] = [limits.rpm or 0, limits.tpm or 0, limits.max_parallel or 0]
        argv += [tokens, permit_id, self._leases.lease_ms, IDLE_EXPIRY_MS]
        return RatePart(_keys(self._shared, key), argv, key, limits, tokens, permit_id)

    def permit_from(self, part: RatePart, reply: list[Any]) -> Permit:
        """The permit the script's reply grants, or ``RateLimited``."""
        admitted, limit, wait_ms, requests, held = reply
        limits, tokens = part.limits, part.tokens
        now = quota(limits, float(requests), float(held))
        if not int(admitted):
            wait = float(wait_ms)
            verdict = Verdict(False, now, text(limit), math.inf if wait < 0 else wait)
            raise RateLimited(_refusal(verdict, limits, tokens))
        if limits.max_parallel and self._leases is not None:
            self._leases.held(part.permit_id, part.keys[1])
        return Permit(self, part.key, limits, part.permit_id, tokens, True, now)

    def admit_here(self, key: str, limits: KeyLimits, tokens: int, permit_id: str) -> Permit:
        """This process's share of the limits (no shared state, or it is down)."""
        parts = self._shared.replicas if self._shared is not None else self._local_share
        share = limits.share(parts)
        now_ms = self._clock.monotonic() * 1000
        verdict = self._local.admit(key, share, tokens, now_ms)
        if not verdict.admitted:
            raise RateLimited(_refusal(verdict, share, tokens))
        return Permit(self, key, share, permit_id, tokens, False, verdict.quota)

    def _settle(self, permit: Permit, refund: int) -> None:
        if not permit._shared:
            self._local.settle(permit._key, permit._limits, refund, self._clock.monotonic() * 1000)
            return
        assert self._shared is not None and self._leases is not None
        self._leases.forget(permit._id)  # the settling script removes it
        if not permit._limits.tpm and not permit._limits.max_parallel:
            return
        keys = _keys(self._shared, permit._key)
        argv: list[int | str] = [permit._limits.tpm or 0, refund, permit._id]
        # Down: the refund is lost (the bucket stays fuller-charged: stricter, not looser) and
        # the lease runs out on its own.
        self._leases.spawn(self._shared.call(lambda _: self._settle_script(keys=keys, args=argv)))


def _keys(shared: SharedState, key: str) -> list[str]:
    base = shared.key("rl", key)
    return [base, base + ":p"]


def _refusal(verdict: Verdict, limits: KeyLimits, tokens: int) -> Refusal:
    wait = None if math.isinf(verdict.retry_ms) else verdict.retry_ms / 1000
    return Refusal(verdict.limit, wait, verdict.quota, limits, tokens)
