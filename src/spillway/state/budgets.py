"""Per-key budgets across every replica: spend and reservations in Redis, checked atomically.

Amounts are integer micro-units of the ledger currency (the ledger's own quantum, 0.000001),
so Redis adds them exactly. Per key, under ``{ns}:budget:{key id}``:

- a hash with the period the figures are for (``p``) and what was spent in it (``s``);
- a sorted set of the reservations of requests still running (member: the request; score:
  when its lease expires) and a hash of their amounts.

``_RESERVE`` drops reservations whose lease ran out (a replica died mid-request), then admits
the request only if spent + every live reservation + its worst case stays within the limit,
and reserves it: one step, so 40 concurrent requests over 3 replicas against a budget worth
10 admit 10. A new period starts spent at 0. Redis's figure is seeded from the ledger: a
replica that knows more spend than Redis does (Redis restarted and lost it) raises it to
what it knows. ``_SETTLE`` replaces a reservation with the actual cost.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from spillway.state.leases import Leases
from spillway.state.redis import SharedState

#: Lua: a key's budget. K: figures hash, reservations zset, amounts hash. A: period, limit,
#: worst case, spend known here, member, lease ms, spend to add (settled here while Redis was
#: away; a caller that checks and then applies passes it to the first call only). With
#: ``apply`` false only checks. Returns {admitted, spent, reserved (incl. this one)}. A period
#: only moves forward: a replica whose clock is behind at midnight uses the new period's
#: figures, never resets them.
BUDGET_LUA = """
local function budget(K, A, apply)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local period, limit, cost, known = A[1], tonumber(A[2]), tonumber(A[3]), tonumber(A[4])
  local current = redis.call('HGET', K[1], 'p')
  if not current or current < period then
    redis.call('DEL', K[1], K[2], K[3])
    redis.call('HSET', K[1], 'p', period, 's', 0)
  end
  if tonumber(A[7]) > 0 then redis.call('HINCRBY', K[1], 's', A[7]) end
  local spent = tonumber(redis.call('HGET', K[1], 's'))
  if known > spent then
    spent = known
    redis.call('HSET', K[1], 's', spent)
  end
  local gone = redis.call('ZRANGEBYSCORE', K[2], '-inf', now)
  for i = 1, #gone, 500 do
    redis.call('HDEL', K[3], unpack(gone, i, math.min(i + 499, #gone)))
  end
  redis.call('ZREMRANGEBYSCORE', K[2], '-inf', now)
  local reserved = 0
  for _, amount in ipairs(redis.call('HVALS', K[3])) do reserved = reserved + tonumber(amount) end
  if spent + reserved + cost > limit then return {0, spent, reserved} end
  if apply then
    redis.call('ZADD', K[2], now + tonumber(A[6]), A[5])
    redis.call('HSET', K[3], A[5], cost)
  end
  return {1, spent, reserved + cost}
end
"""
_RESERVE = BUDGET_LUA + "return budget(KEYS, ARGV, true)\n"
#: KEYS: as _RESERVE. ARGV: period, member, actual cost.
_SETTLE = """
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('HDEL', KEYS[3], ARGV[2])
if redis.call('HGET', KEYS[1], 'p') == ARGV[1] then
  redis.call('HINCRBY', KEYS[1], 's', ARGV[3])
end
return 1
"""


@dataclass(frozen=True, slots=True)
class Verdict:
    admitted: bool
    #: the key's spend this period and its running reservations, fleet-wide (micro-units)
    spent: int
    reserved: int


class FleetBudgets:
    def __init__(self, shared: SharedState, leases: Leases):
        self._shared = shared
        self._leases = leases
        self._reserve = shared.redis.register_script(_RESERVE)
        self._settle = shared.redis.register_script(_SETTLE)

    async def call(self, keys: list[str], argv: list[int | str]) -> list[Any]:
        """The reservation script alone (raises ``StateDown``)."""
        reply: list[Any] = await self._shared.call(lambda _: self._reserve(keys=keys, args=argv))
        return reply

    def script_args(
        self,
        key_id: str,
        period: str,
        limit: int,
        cost: int,
        known: int,
        member: str,
        unsynced: int,
    ) -> tuple[list[str], list[int | str]]:
        """The reservation as the script takes it (alone, or carried by a slot claim)."""
        argv: list[int | str] = [period, limit, cost, known, member, self._leases.lease_ms]
        argv.append(unsynced)
        return self._keys(key_id), argv

    def verdict(self, reply: list[Any], member: str, keys: list[str]) -> Verdict:
        admitted, spent, reserved = reply
        if int(admitted):
            self._leases.held(member, keys[1])
        return Verdict(bool(int(admitted)), int(spent), int(reserved))

    def settle(
        self, key_id: str, period: str, member: str, actual: int, on_down: Callable[[], None]
    ) -> None:
        """The request ended costing ``actual``: in the background. Redis down: the
        reservation's lease runs out, and ``on_down`` keeps the cost to send with a later
        reservation."""
        self._leases.forget(member)
        keys = self._keys(key_id)
        argv: list[int | str] = [period, member, actual]
        call = self._shared.call(lambda _: self._settle(keys=keys, args=argv))
        self._leases.spawn(call, on_down)

    def _keys(self, key_id: str) -> list[str]:
        base = self._shared.key("budget", key_id)
        return [base, base + ":r", base + ":a"]
