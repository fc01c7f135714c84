"""A node's ``max_concurrency`` across every replica: its slots are leases in Redis.

Before an attempt is sent, the dispatcher claims a slot on the node it picked: one Lua call
(``leases.CLAIM``) that drops expired leases, counts the rest and takes one if fewer than
``max_concurrency`` are held. Refused, the dispatcher picks again without that node (the
next private node, else a spill to the cloud, else a wait for capacity). The slot is given
back when the attempt ends; a replica that dies holding slots loses them within the lease.

While Redis is unreachable each replica keeps to ``max_concurrency / replicas`` (at least
1) of every node, counted locally: no node is overloaded meanwhile, at the price of some
idle capacity when the load is uneven between replicas.
"""

from __future__ import annotations

from spillway.state.leases import CLAIM, Leases
from spillway.state.redis import SharedState, StateDown


class FleetSlots:
    def __init__(self, shared: SharedState, leases: Leases):
        self._shared = shared
        self._leases = leases
        self._claim = shared.redis.register_script(CLAIM)

    async def claim(self, node: str, limit: int, in_flight_here: int, member: str) -> bool:
        """Take one of ``node``'s ``limit`` slots for ``member``. ``in_flight_here``: this
        replica's requests on the node now, for the fallback while Redis is down."""
        zset = self._shared.key("slots", "{" + node + "}")
        argv: list[int | str] = [limit, member, self._leases.lease_ms]
        try:
            granted = await self._shared.call(lambda _: self._claim(keys=[zset], args=argv))
        except StateDown:
            return in_flight_here < max(1, limit // self._shared.replicas)
        if int(granted):
            self._leases.held(member, zset)
            return True
        return False

    def release(self, member: str) -> None:
        self._leases.release(member)
