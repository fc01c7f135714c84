"""In-flight merging: identical cacheable requests share one upstream call.

The first request for a key (the *leader*) goes upstream; identical requests that arrive
while it is in flight (the *followers*) wait for its answer instead of sending their own.
The leader publishes the stored form of its answer when it is cacheable; when it is not (an
error, a cut stream, tool calls), followers are released with None and each goes upstream on
its own, so one failure never becomes fifty, and no follower waits on a second leader.

Merging is per process and per exact key (already tenant-scoped): it needs no store, so it
works while Redis or PostgreSQL is down.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class MergeStats:
    in_flight: int
    merged: int  # followers answered by a leader since start


class InflightMerger:
    def __init__(self) -> None:
        self._leaders: dict[str, asyncio.Future[bytes | None]] = {}
        self._merged = 0

    def follow(self, key: str) -> asyncio.Future[bytes | None] | None:
        """The leader's future to wait on, or None: then the caller leads and must call
        ``finish`` exactly once, however it ends."""
        future = self._leaders.get(key)
        if future is not None:
            return future
        self._leaders[key] = asyncio.get_running_loop().create_future()
        return None

    def finish(self, key: str, value: bytes | None) -> None:
        """The leader is done: hand its answer (None: not shareable) to every follower."""
        future = self._leaders.pop(key, None)
        if future is not None and not future.done():
            future.set_result(value)

    def count_merged(self) -> None:
        self._merged += 1

    def statistics(self) -> MergeStats:
        return MergeStats(len(self._leaders), self._merged)


async def wait_for_leader(future: asyncio.Future[bytes | None], timeout_s: float) -> bytes | None:
    """The leader's answer, or None if it has none or takes longer than ``timeout_s``.
    Shielded: a follower that gives up (or whose client leaves) never cancels the leader."""
    try:
        return await asyncio.wait_for(asyncio.shield(future), max(timeout_s, 0.0))
    except TimeoutError:
        return None
