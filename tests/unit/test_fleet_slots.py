"""A node's slots and breaker across replicas (state/slots.py) in a real Redis: claims up to
the limit from any replica, releases, leases that run out, the fleet-wide breaker (5 failures
in all, probes counted across the fleet, the pool rule), and the local share while Redis
does not answer."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from spillway.config.schema import BreakerConfig
from spillway.state.leases import Leases
from spillway.state.redis import SharedState
from spillway.state.slots import Claim, FleetSlots
from tests.redis_server import RedisServer
from tests.state_helpers import replica_states

BREAKER = BreakerConfig(open_base_s=1.0, open_max_s=4.0, half_open_probes=2)
POOLS = {"m": ["n", "other"]}


@dataclass
class Replica:
    shared: SharedState
    leases: Leases
    slots: FleetSlots

    async def claim(self, node: str, limit: int = 4, here: int = 0) -> Claim:
        return await self.slots.claim(node, limit, here, uuid.uuid4().hex)

    async def fail(self, node: str) -> None:
        claim = await self.claim(node)
        assert claim.granted
        await self.slots.record(node, claim, ok=False)
        self.slots.release(claim)


@pytest.fixture
async def three(fresh_redis: RedisServer) -> AsyncIterator[list[Replica]]:
    async with replica_states(fresh_redis.url) as states:
        yield [
            Replica(shared, leases, FleetSlots(shared, leases, BREAKER, POOLS))
            for shared, leases in states
        ]


async def test_claims_up_to_the_limit_from_any_replica_and_release_frees_one(
    three: list[Replica],
) -> None:
    a, b, c = three
    claims = [await r.claim("n") for r in (a, b, c, a, b)]
    assert [cl.granted for cl in claims] == [True, True, True, True, False]
    assert claims[4].open_s is None  # refused for want of a slot, not by the breaker
    assert (await c.claim("other")).granted  # each node has its own slots
    c.slots.release(claims[2])
    await c.leases.aclose()  # the release has reached Redis
    assert (await b.claim("n")).granted


async def test_unrenewed_slots_run_out_and_renewed_ones_do_not(three: list[Replica]) -> None:
    a, b, c = three
    b.leases.start()
    assert (await a.claim("n", limit=2)).granted  # a never renews: as if killed
    assert (await b.claim("n", limit=2)).granted
    assert not (await c.claim("n", limit=2)).granted
    await asyncio.sleep(1.3)
    assert (await c.claim("n", limit=2)).granted  # a's ran out; b's was renewed
    assert not (await c.claim("n", limit=2)).granted


async def test_five_failures_across_replicas_open_the_breaker_for_all(
    three: list[Replica],
) -> None:
    a, b, c = three
    for replica in (a, b, c, a):
        await replica.fail("n")
    assert (await b.claim("n")).granted  # 4 failures in a row: still closed
    await b.fail("n")
    refused = [await r.claim("n") for r in three]
    assert not any(cl.granted for cl in refused)
    assert all(cl.open_s is not None and 0.5 < cl.open_s <= 1.0 for cl in refused)


async def test_half_open_admits_the_probes_once_across_the_fleet_then_closes(
    three: list[Replica],
) -> None:
    a, b, c = three
    for _ in range(5):
        await a.fail("n")
    await asyncio.sleep(1.05)  # open_base_s: the next claims are probes
    probes = [await r.claim("n") for r in (a, b, c)]
    assert [p.granted for p in probes] == [True, True, False]  # half_open_probes = 2
    assert all(p.probe for p in probes[:2])
    for replica, probe in zip((a, b), probes, strict=False):
        await replica.slots.record("n", probe, ok=True)
    closed = await c.claim("n")
    assert closed.granted and not closed.probe


async def test_a_failed_probe_reopens_for_longer(three: list[Replica]) -> None:
    a, b, _ = three
    for _ in range(5):
        await a.fail("n")
    await asyncio.sleep(1.05)
    probe = await b.claim("n")
    await b.slots.record("n", probe, ok=False)
    refused = await a.claim("n")
    assert not refused.granted and refused.open_s is not None and refused.open_s > 1.5


async def test_the_pool_rule_keeps_one_node_of_two_in_rotation(three: list[Replica]) -> None:
    a, b, _ = three
    for _ in range(5):
        await a.fail("n")
    for _ in range(8):
        await b.fail("other")  # the pool of two may lose only one
    assert (await a.claim("other")).granted


async def test_a_probe_whose_replica_died_frees_its_place_within_the_lease(
    three: list[Replica],
) -> None:
    a, b, c = three
    for _ in range(5):
        await a.fail("n")
    await asyncio.sleep(1.05)
    assert (await a.claim("n")).probe and (await a.claim("n")).probe  # both, never recorded
    assert not (await b.claim("n")).granted
    await asyncio.sleep(1.1)  # a's probe leases ran out: it was never renewing
    assert (await c.claim("n")).probe


async def test_while_redis_is_paused_each_replica_keeps_to_its_share(
    fresh_redis: RedisServer, three: list[Replica]
) -> None:
    a = three[0]
    fresh_redis.pause()
    try:
        started = time.monotonic()
        assert (await a.claim("n", limit=4, here=0)).granted  # 4 slots / 3 replicas: 1 here
        assert not (await a.claim("n", limit=4, here=1)).granted
        assert time.monotonic() - started < 0.5
    finally:
        fresh_redis.resume()


async def test_a_success_after_failures_is_sent_though_its_claim_was_clean(
    three: list[Replica],
) -> None:
    """Six requests claim while the node is clean; the first four fail, the fifth succeeds,
    the sixth fails: the success must reset the count (5 in a row never happened)."""
    a = three[0]
    claims = [await a.claim("n", limit=10) for _ in range(6)]
    assert all(c.granted and c.clean for c in claims)
    for claim in claims[:4]:
        await a.slots.record("n", claim, ok=False)
    success = a.slots.record("n", claims[4], ok=True)
    assert success is not None  # not skipped
    await success
    await a.slots.record("n", claims[5], ok=False)
    assert (await a.claim("n", limit=10)).granted  # closed: one failure since the success


async def test_slots_held_past_twice_the_lease_stay_held(three: list[Replica]) -> None:
    """The set of a node whose slots are all held gets no new claim to extend its expiry:
    the renewer must, or after 2 x lease_s the set (and the slots) would vanish."""
    a, b, _ = three
    a.leases.start()
    assert (await a.claim("n", limit=1)).granted
    await asyncio.sleep(2.6)  # past 2 x lease_s (1 s), renewed meanwhile
    assert not (await b.claim("n", limit=1)).granted
