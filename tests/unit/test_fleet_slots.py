"""A node's max_concurrency across replicas (state/slots.py) in a real Redis: claims up to
the limit from any replica, releases, leases that run out, and the local share while Redis
does not answer."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from spillway.clock import SystemClock
from spillway.state.leases import Leases
from spillway.state.redis import SharedState
from spillway.state.slots import FleetSlots
from tests.redis_server import RedisServer, redis_server


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with redis_server() as s:
        yield s


@pytest.fixture
async def three(server: RedisServer) -> AsyncIterator[list[tuple[FleetSlots, Leases]]]:
    namespace = f"t{uuid.uuid4().hex[:8]}"
    made = []
    for _ in range(3):
        shared = SharedState(server.url, SystemClock(), namespace=namespace)
        await shared.open()
        leases = Leases(shared, SystemClock(), lease_s=1.0)
        made.append((shared, leases, FleetSlots(shared, leases)))
    await made[0][0]._beat()  # the first to start counts all three now
    yield [(slots, leases) for _, leases, slots in made]
    for shared, leases, _ in made:
        await leases.aclose()
        await shared.aclose()


async def test_claims_up_to_the_limit_from_any_replica_and_release_frees_one(
    three: list[tuple[FleetSlots, Leases]],
) -> None:
    (a, _), (b, _), (c, leases_c) = three
    granted = [await s.claim("n1", 4, 0, f"r{i}") for i, s in enumerate([a, b, c, a, b])]
    assert granted == [True, True, True, True, False]
    assert await c.claim("n2", 4, 0, "other-node")  # each node has its own slots
    c.release("r2")
    await leases_c.aclose()  # the release has reached Redis
    assert await b.claim("n1", 4, 0, "r5")


async def test_unrenewed_slots_run_out_and_renewed_ones_do_not(
    three: list[tuple[FleetSlots, Leases]],
) -> None:
    (a, _), (b, leases_b), (c, _) = three
    leases_b.start()
    assert await a.claim("n", 2, 0, "dies")  # a never renews: as if killed
    assert await b.claim("n", 2, 0, "lives")
    assert not await c.claim("n", 2, 0, "x")
    await asyncio.sleep(1.3)
    assert await c.claim("n", 2, 0, "y")  # "dies" ran out; "lives" was renewed
    assert not await c.claim("n", 2, 0, "z")


async def test_while_redis_is_paused_each_replica_keeps_to_its_share(
    server: RedisServer, three: list[tuple[FleetSlots, Leases]]
) -> None:
    a, _ = three[0]
    server.pause()
    try:
        started = time.monotonic()
        assert await a.claim("n", 4, 0, "m1")  # 4 slots / 3 replicas: 1 here
        assert not await a.claim("n", 4, 1, "m2")
        assert time.monotonic() - started < 0.5
    finally:
        server.resume()
