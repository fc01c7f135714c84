"""Places held in Redis sorted sets (a key's requests in flight, a node's slots) as leases.

A lease is a member of a sorted set scored by when it expires, on Redis's clock; whoever
counts the set first drops the expired ones. This replica renews every lease it holds each
``lease_s / 3`` (one pipelined round trip for all of them), and removes one when its request
ends. So a replica that dies, is killed or loses the network stops renewing, and its places
come free within ``lease_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from spillway.clock import Clock
from spillway.state.redis import SharedState, StateDown
from spillway.state.resp import RespClient


class Leases:
    """The leases this replica holds, renewed in the background, released when done."""

    def __init__(self, shared: SharedState, clock: Clock, lease_s: float):
        self._shared = shared
        self._clock = clock
        self.lease_ms = int(lease_s * 1000)
        self._held: dict[str, str] = {}  # member -> the sorted set holding it
        self._tasks: set[asyncio.Task[None]] = set()
        self._renewer: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._renewer is None:
            self._renewer = asyncio.create_task(self._renew_forever(), name="state-leases")

    async def aclose(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def held(self, member: str, zset: str) -> None:
        """A lease taken in ``zset`` (by a script): renew it from now on."""
        self._held[member] = zset

    def release(self, member: str) -> None:
        """The request ended: drop the lease now (in the background; if Redis is down it
        simply runs out)."""
        zset = self._held.pop(member, None)
        if zset is not None:
            self.spawn(self._shared.call(lambda redis: redis.execute("ZREM", zset, member)))

    def spawn(self, call: Awaitable[object], on_down: Callable[[], None] | None = None) -> None:
        """Run a fire-and-forget state call; an outage only means it did not happen (and
        ``on_down`` is told)."""

        async def run() -> None:
            try:
                await call
            except StateDown:
                if on_down is not None:
                    on_down()

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def forget(self, member: str) -> None:
        """Stop renewing a lease something else removes (a script that settles it)."""
        self._held.pop(member, None)

    async def _renew_forever(self) -> None:
        while True:
            await self._clock.sleep(self.lease_ms / 3000)
            if self._held:
                with contextlib.suppress(StateDown):
                    await self._shared.call(self._renew)

    async def _renew(self, redis: RespClient) -> None:
        """Push back every held lease's expiry (XX: never revive one released meanwhile), and
        the expiry of each set holding one: a set is given one when a place is taken, and a
        node whose places are all held for long takes none, so without this its set (and the
        places in it) would vanish after ``2 * lease_s``."""
        seconds, micros = await redis.execute("TIME")
        expires = int(seconds) * 1000 + int(micros) // 1000 + self.lease_ms
        held = list(self._held.items())
        commands: list[tuple[str | int, ...]] = [
            ("ZADD", zset, "XX", expires, member) for member, zset in held
        ]
        commands += [("PEXPIRE", zset, 2 * self.lease_ms) for zset in {z for _, z in held}]
        await redis.execute_many(commands)
