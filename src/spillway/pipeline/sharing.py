"""A cache miss's duty: store its answer if it is worth keeping and, as the leader of
identical requests in flight, hand that answer to them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from spillway.cache.answers import CachedAnswer
from spillway.cache.service import Probe, ResponseCache
from spillway.cache.vectors import Vector
from spillway.wire.streams import Usage

Build = Callable[[Usage], CachedAnswer | None]
Counting = asyncio.Task[tuple[Usage, bool]]


class Sharing:
    """``settle`` (always called) releases the followers with nothing when no answer was
    offered: then each goes upstream itself."""

    def __init__(
        self, cache: ResponseCache, probe: Probe, vector: Vector | None, leads: bool, now: float
    ):
        self._cache = cache
        self._probe = probe
        self._vector = vector
        self._leads = leads
        self.now = now
        self._offered = False
        self._finished = False
        self._tasks: set[asyncio.Task[None]] = set()

    def offer(self, build: Build, usage: Usage | None, counting: Counting | None) -> None:
        """An answer the client has in full; without ``usage``, once ``counting`` has it."""
        if usage is not None:
            self._offered = True
            self._publish(build(usage))
        elif counting is not None:
            self._offered = True
            task = asyncio.create_task(self._count_then_publish(build, counting))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def settle(self) -> None:
        if not self._offered:
            self._finish(None)

    async def _count_then_publish(self, build: Build, counting: Counting) -> None:
        try:
            usage, _estimated = await counting
            self._publish(build(usage))
        finally:
            self._finish(None)  # a no-op when _publish already finished

    def _publish(self, answer: CachedAnswer | None) -> None:
        if answer is None:
            self._finish(None)
            return
        self._finish(answer.to_bytes())
        self._cache.store_later(self._probe, answer, self._vector)

    def _finish(self, value: bytes | None) -> None:
        # Once only: a later request with the same key may lead a new round by then.
        if self._leads and not self._finished and self._probe.keys is not None:
            self._finished = True
            self._cache.merger.finish(self._probe.keys.exact, value)
