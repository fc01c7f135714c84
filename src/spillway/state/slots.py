"""A node's slots and its circuit breaker across every replica, in Redis.

**Slots.** A node's ``max_concurrency`` is fleet-wide: before an attempt the dispatcher claims
a slot on the node it picked (``_CLAIM``: drop expired leases, count the rest, take one if
fewer than ``max_concurrency`` are held). Refused, it picks again without that node (the next
private node, else a spill to the cloud, else a wait for capacity). The slot is given back
when the attempt ends; a replica that dies holding slots loses them within the lease.

**Breaker.** The same claim first asks the node's fleet-wide breaker, so admission costs no
second round trip: open (until its time is up) refuses; half-open admits at most
``half_open_probes`` probes across all replicas (themselves leases, so a probe whose replica
died does not block the node for ever). Each attempt's verdict is recorded with
``_RECORD``, the state machine of ``resilience.breaker.Breaker`` on Redis's clock: open after
``consecutive_failures`` failures in a row or a ``failure_rate`` over the last ``window``
outcomes (once ``min_calls`` are in), for ``open_base_s`` times the openings (at most
``open_max_s``), never ejecting more of a pool than ``max_ejected_share`` allows (at least one
node); closed again after ``half_open_probes`` successful probes. So a failing node is
ejected after 5 failures in all, not 5 per replica. A success is not sent when the claim
said the node had no failure to forget (no failure in a row, none in its window): then it
would change nothing but the window's length, so a request to a healthy node costs the claim
and the slot's release only. Each replica's own breakers keep working beside it (a node
failing here is left here even before the fleet agrees).

While Redis is unreachable each replica keeps to ``max_concurrency / replicas`` (at least
1) of every node, counted locally, and to its own breakers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from spillway.config.schema import BreakerConfig
from spillway.state.budgets import BUDGET_LUA
from spillway.state.leases import Leases
from spillway.state.limits import RATE_LUA
from spillway.state.redis import SharedState, StateDown
from spillway.state.resp import text

#: Lua: a slot on a node, its breaker asked first. K: breaker hash, slots zset, probes zset.
#: A: limit, member, lease ms, probes. With ``apply`` false only checks. Returns {granted,
#: open ms (>0 open or probing, -1 full), probe, clean}: clean when the breaker is closed
#: with no failure in a row or in its window (a success would change nothing).
NODE_LUA = """
local function node(K, A, apply)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local lease = tonumber(A[3])
  local v = redis.call('HMGET', K[1], 'st', 'ou', 'cf', 'ws')
  local st, ou = v[1] or 'c', tonumber(v[2] or '0')
  local clean = 0
  if st == 'c' and tonumber(v[3] or '0') == 0 and not string.find(v[4] or '', '0') then
    clean = 1
  end
  local probe = 0
  if st == 'o' then
    if now < ou then return {0, ou - now, 0, 0} end
    st = 'h'
    redis.call('HSET', K[1], 'st', 'h', 'ps', 0)
    redis.call('DEL', K[3])
  end
  if st == 'h' then
    redis.call('ZREMRANGEBYSCORE', K[3], '-inf', now)
    if redis.call('ZCARD', K[3]) >= tonumber(A[4]) then return {0, 1000, 0, 0} end
    probe = 1
  end
  redis.call('ZREMRANGEBYSCORE', K[2], '-inf', now)
  if redis.call('ZCARD', K[2]) >= tonumber(A[1]) then return {0, -1, 0, 0} end
  if apply then
    redis.call('ZADD', K[2], now + lease, A[2])
    redis.call('PEXPIRE', K[2], lease * 2)
    if probe == 1 then
      redis.call('ZADD', K[3], now + lease, A[2] .. ':probe')
      redis.call('PEXPIRE', K[3], lease * 2)
    end
  end
  return {1, 0, probe, clean}
end
"""
#: The first claim of a request whose key has rate limits and/or a budget: all three parts
#: checked, then all applied, or none; one round trip for the lot. KEYS: the node's 3, the
#: rate's 2, the budget's 3; ARGV: how many arguments each part has (3 numbers), then theirs.
#: Returns {part that refused ('' when granted), node reply, rate reply, budget reply}.
_CLAIM_ALL = (
    NODE_LUA
    + RATE_LUA
    + BUDGET_LUA
    + """
local n, r, b = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local function args(from, count)
  local out = {}
  for i = 1, count do out[i] = ARGV[from + i - 1] end
  return out
end
local nk, rk, bk = {KEYS[1], KEYS[2], KEYS[3]}, {KEYS[4], KEYS[5]}, {KEYS[6], KEYS[7], KEYS[8]}
local na, ra, ba = args(4, n), args(4 + n, r), args(4 + n + r, b)
local rr, br = {}, {}
if r > 0 then
  rr = rate(rk, ra, false)
  if rr[1] == 0 then return {'rate', {}, rr, {}} end
end
if b > 0 then
  br = budget(bk, ba, false)
  ba[7] = '0'  -- its spend to add went in with the check
  if br[1] == 0 then return {'budget', {}, rr, br} end
end
local nr = node(nk, na, false)
if nr[1] == 0 then return {'node', nr, rr, br} end
if r > 0 then rr = rate(rk, ra, true) end
if b > 0 then br = budget(bk, ba, true) end
return {'', node(nk, na, true), rr, br}
"""
)
_CLAIM = NODE_LUA + "return node(KEYS, ARGV, true)\n"
#: KEYS: breaker hash, probes zset, then the other members' breaker hashes of each pool.
#: ARGV: member, verdict ('1' ok, '0' failed), was a probe ('1'/'0'), consecutive, rate,
#: window, min calls, open base ms, open max ms, probes, number of pools, then per pool:
#: how many may be out, how many other members it has (their hashes follow in KEYS).
_RECORD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local verdict = ARGV[2]
local v = redis.call('HMGET', KEYS[1], 'st', 'cf', 'ws', 'op', 'ou', 'ps')
local st, cf, ws = v[1] or 'c', tonumber(v[2] or '0'), v[3] or ''
local op, ou, ps = tonumber(v[4] or '0'), tonumber(v[5] or '0'), tonumber(v[6] or '0')
if st == 'o' and now >= ou then st, ps = 'h', 0; redis.call('DEL', KEYS[2]) end
if ARGV[3] == '1' then redis.call('ZREM', KEYS[2], ARGV[1] .. ':probe') end
local function open_it()
  op = op + 1
  ou = now + math.min(tonumber(ARGV[8]) * op, tonumber(ARGV[9]))
  st, ps = 'o', 0
  redis.call('DEL', KEYS[2])
end
local function may_eject()
  local i, k = 12, 3
  for p = 1, tonumber(ARGV[11]) do
    local most, others, out = tonumber(ARGV[i]), tonumber(ARGV[i + 1]), 0
    i = i + 2
    for j = 1, others do
      local s = redis.call('HGET', KEYS[k], 'st')
      if s and s ~= 'c' then out = out + 1 end
      k = k + 1
    end
    if out + 1 > most then return false end
  end
  return true
end
if st == 'h' and ARGV[3] == '1' then
  if verdict == '1' then
    ps = ps + 1
    if ps >= tonumber(ARGV[10]) then st, cf, ws, op, ps = 'c', 0, '', 0, 0 end
  else
    open_it()
  end
elseif st == 'c' then
  if verdict == '1' then cf = 0 else cf = cf + 1 end
  ws = string.sub(ws .. verdict, -tonumber(ARGV[6]))
  local fails = select(2, string.gsub(ws, '0', ''))
  local wants = cf >= tonumber(ARGV[4])
    or (#ws >= tonumber(ARGV[7]) and fails / #ws >= tonumber(ARGV[5]))
  if verdict == '0' and wants and may_eject() then open_it() end
end
redis.call('HSET', KEYS[1], 'st', st, 'cf', cf, 'ws', ws, 'op', op, 'ou', ou, 'ps', ps)
return st
"""


@dataclass(frozen=True, slots=True)
class Claim:
    """What the fleet said to an attempt on a node."""

    granted: bool
    #: refused because the node's fleet-wide breaker is open (or its probes are all out):
    #: seconds until it may be tried; None when refused for want of a free slot
    open_s: float | None = None
    #: the lease's member, and whether this attempt is one of the half-open probes
    member: str = ""
    probe: bool = False
    #: granted by the local fallback (Redis down): nothing to give back or record there
    local: bool = False
    #: the node's fleet breaker had nothing to forget: a success need not be recorded
    clean: bool = False


@dataclass(slots=True)
class KeyPart:
    """A request's key checks (rate limits, budget) carried by its first slot claim, so that
    a request to a node makes one round trip to Redis, not one per check. The caller gives the
    scripts' keys and arguments, and what to do with the replies."""

    rate_keys: list[str]
    rate_args: list[int | str]
    budget_keys: list[str]
    budget_args: list[int | str]
    #: (the part that refused, "" when granted; the rate reply; the budget reply): takes the
    #: permit and the reservation when granted, raises the client's error for a refusal
    on_reply: Callable[[str, list[Any], list[Any]], None]
    #: Redis down: the same checks, this replica's share (raises for a refusal)
    on_local: Callable[[], None]
    #: checked and counted once: later claims of the request carry nothing
    done: bool = False


class FleetSlots:
    def __init__(
        self,
        shared: SharedState,
        leases: Leases,
        breaker: BreakerConfig,
        pools: Mapping[str, Sequence[str]],
    ):
        self._shared = shared
        self._leases = leases
        self._breaker = breaker
        self._pools_of: dict[str, list[tuple[str, ...]]] = {}
        for members in pools.values():
            pool = tuple(dict.fromkeys(members))
            for node in pool:
                self._pools_of.setdefault(node, []).append(pool)
        self._claim = shared.redis.register_script(_CLAIM)
        self._claim_all = shared.redis.register_script(_CLAIM_ALL)
        self._record = shared.redis.register_script(_RECORD)
        #: nodes with a failure recorded since their last clean claim here: a success on
        #: one of those is sent even if its own claim was clean (the claim saw the past)
        self._dirty: set[str] = set()

    async def claim(
        self,
        node: str,
        limit: int,
        in_flight_here: int,
        member: str,
        key: KeyPart | None = None,
    ) -> Claim:
        """A slot on ``node`` for ``member``, if its breaker and its ``limit`` allow (and
        ``key``'s checks, in the same call, when it has some left). ``in_flight_here``: this
        replica's requests on the node, for the fallback."""
        keys = [self._brk(node), self._key("slots", node), self._key("probes", node)]
        argv: list[int | str] = [limit, member, self._leases.lease_ms]
        argv.append(self._breaker.half_open_probes)
        try:
            if key is not None and not key.done:
                reply = await self._with_key(keys, argv, key)
            else:
                reply = await self._shared.call(lambda _: self._claim(keys=keys, args=argv))
        except StateDown:
            if key is not None and not key.done:
                key.on_local()  # raises for a refusal
                key.done = True
            allowed = in_flight_here < max(1, limit // self._shared.replicas)
            return Claim(allowed, local=True)
        return self._claimed(node, member, keys, reply)

    async def _with_key(self, keys: list[str], argv: list[int | str], key: KeyPart) -> list[Any]:
        """The claim with the key's checks: all pass and all count, or none counts."""
        rate_keys = key.rate_keys or keys[:2]  # unused when there are no arguments
        budget_keys = key.budget_keys or keys
        all_keys = [*keys, *rate_keys, *budget_keys]
        sizes = [len(argv), len(key.rate_args), len(key.budget_args)]
        all_args = [*sizes, *argv, *key.rate_args, *key.budget_args]
        refused_by, node_reply, rate_reply, budget_reply = await self._shared.call(
            lambda _: self._claim_all(keys=all_keys, args=all_args)
        )
        part = text(refused_by)
        key.on_reply(part, rate_reply, budget_reply)  # raises for the key's own refusals
        if not part:
            key.done = True
        return list(node_reply)

    def _claimed(self, node: str, member: str, keys: list[str], reply: list[Any]) -> Claim:
        granted, open_ms, probe, clean = reply
        if not int(granted):
            wait = int(open_ms)
            return Claim(False, None if wait < 0 else wait / 1000)
        self._leases.held(member, keys[1])
        if int(probe):
            self._leases.held(member + ":probe", keys[2])
        settled = bool(int(clean))
        if settled:
            self._dirty.discard(node)
        else:
            self._dirty.add(node)
        return Claim(True, member=member, probe=bool(int(probe)), clean=settled)

    def release(self, claim: Claim) -> None:
        """The attempt ended: give the slot back."""
        if not claim.local:
            self._leases.release(claim.member)

    def record(self, node: str, claim: Claim, ok: bool) -> Awaitable[object] | None:
        """The attempt's verdict on ``node``, for its fleet-wide breaker (await it, or hand
        it to ``spawn``); None when there is nothing to record: a success on a breaker with
        no failure to forget (the common case costs no second call)."""
        if ok and claim.clean and not claim.probe and node not in self._dirty:
            return None
        if not ok:
            self._dirty.add(node)
        if claim.probe:
            self._leases.forget(claim.member + ":probe")  # _RECORD removes the probe
        keys = [self._brk(node), self._key("probes", node)]
        b = self._breaker
        argv: list[int | str | float] = [claim.member, "1" if ok else "0", int(claim.probe)]
        argv += [b.consecutive_failures, b.failure_rate, b.window, b.min_calls]
        argv += [int(b.open_base_s * 1000), int(b.open_max_s * 1000), b.half_open_probes]
        pools = self._pools_of.get(node, [])
        argv.append(len(pools))
        for pool in pools:
            others = [n for n in pool if n != node]
            most = max(1, int(len(pool) * b.max_ejected_share))
            argv += [most, len(others)]
            keys += [self._brk(n) for n in others]
        return self._shared.call(lambda _: self._record(keys=keys, args=argv))

    def no_verdict(self, claim: Claim) -> None:
        """The attempt ended saying nothing of the node: free its probe, if it was one."""
        if claim.probe:
            self._leases.release(claim.member + ":probe")

    def spawn(self, call: Awaitable[object]) -> None:
        self._leases.spawn(call)

    def _brk(self, node: str) -> str:
        return self._key("breaker", node)

    def _key(self, kind: str, node: str) -> str:
        return self._shared.key(kind, node)
