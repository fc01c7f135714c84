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

from spillway.state.leases import Leases
from spillway.state.redis import SharedState

#: KEYS: figures hash, reservations zset, amounts hash. ARGV: period, limit, worst case,
#: spend known here, member, lease ms, spend to add (settled here while Redis was away).
#: Returns {admitted, spent, reserved (incl. this one)}. A period only moves forward: a
#: replica whose clock is behind at midnight uses the new period's figures, never resets them.
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local period, limit, cost, known = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local current = redis.call('HGET', KEYS[1], 'p')
if not current or current < period then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
  redis.call('HSET', KEYS[1], 'p', period, 's', 0)
end
if tonumber(ARGV[7]) > 0 then redis.call('HINCRBY', KEYS[1], 's', ARGV[7]) end
local spent = tonumber(redis.call('HGET', KEYS[1], 's'))
if known > spent then
  spent = known
  redis.call('HSET', KEYS[1], 's', spent)
end
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for i = 1, #gone, 500 do
  redis.call('HDEL', KEYS[3], unpack(gone, i, math.min(i + 499, #gone)))
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local reserved = 0
for _, amount in ipairs(redis.call('HVALS', KEYS[3])) do reserved = reserved + tonumber(amount) end
if spent + reserved + cost > limit then return {0, spent, reserved} end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[6]), ARGV[5])
redis.call('HSET', KEYS[3], ARGV[5], cost)
return {1, spent, reserved + cost}
"""
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

    async def reserve(
        self,
        key_id: str,
        period: str,
        limit: int,
        cost: int,
        known: int,
        member: str,
        unsynced: int = 0,
    ) -> Verdict:
        """Reserve ``cost`` against ``limit`` for ``member`` if it fits (raises ``StateDown``
        when Redis does not answer). ``known``: the spend this replica knows of; ``unsynced``:
        spend settled here that Redis has not been told of (added to its figure)."""
        keys = self._keys(key_id)
        argv: list[int | str] = [period, limit, cost, known, member, self._leases.lease_ms]
        argv.append(unsynced)
        admitted, spent, reserved = await self._shared.call(
            lambda _: self._reserve(keys=keys, args=argv)
        )
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
        base = self._shared.key("budget", "{" + key_id + "}")
        return [base, base + ":r", base + ":a"]
