"""Several replicas' hold on one real Redis, for the shared-state tests: each its own
connection and leases, in one namespace of its own, as `spillway serve` processes have."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from spillway.clock import SystemClock
from spillway.state.leases import Leases
from spillway.state.redis import SharedState


@asynccontextmanager
async def replica_states(
    url: str, count: int = 3, lease_s: float = 1.0
) -> AsyncIterator[list[tuple[SharedState, Leases]]]:
    """``count`` (SharedState, Leases) pairs; every one has counted all ``count`` replicas."""
    namespace = f"t{uuid.uuid4().hex[:8]}"
    made: list[tuple[SharedState, Leases]] = []
    try:
        for _ in range(count):
            shared = SharedState(url, SystemClock(), namespace=namespace)
            await shared.open()
            made.append((shared, Leases(shared, SystemClock(), lease_s)))
        for shared, _ in made:
            await shared._beat()
        yield made
    finally:
        for shared, leases in made:
            await leases.aclose()
            await shared.aclose()
