"""What shared state costs a request before it reaches its node: one round trip to Redis,
whatever the key has (rate limits, a budget, both), counted on a gateway in front of a
scripted node with a real redis-server; and a cache hit of a rate-limited key, one too."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from spillway.state.redis import SharedState
from tests.fakes.gateway import RunningGateway, node, running_gateway
from tests.fakes.upstream import FakeUpstream
from tests.redis_server import RedisServer, redis_server

PLAIN, LIMITED, BUDGETED, BOTH = (f"round-trip-key-{i:04d}" for i in range(4))
MESSAGES: Any = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture
async def gateway(
    redis: RedisServer, tmp_path: Path
) -> AsyncIterator[tuple[RunningGateway, FakeUpstream, list[float]]]:
    fake = await FakeUpstream("llm").start()
    budget = {"amount": 100, "currency": "USD", "period": "day"}
    raw = {
        "server": {"data_dir": str(tmp_path)},
        "state": {"redis_url": redis.url, "namespace": tmp_path.name},
        "nodes": {"llm": node("private", fake.base_url, price={"input_per_mtok": 1,
                                                                 "output_per_mtok": 1})},
        "keys": [
            {"key": PLAIN, "tenant": "a"},
            {"key": LIMITED, "tenant": "b", "rpm": 1000, "tpm": 1_000_000, "max_parallel": 50},
            {"key": BUDGETED, "tenant": "c", "budget": budget},
            {"key": BOTH, "tenant": "d", "rpm": 1000, "budget": budget},
        ],
    }  # fmt: skip
    try:
        async with running_gateway(raw) as gw:
            calls: list[float] = []
            shared = gw.gateway.health._shared
            assert isinstance(shared, SharedState)
            real = shared.call

            async def counted(op: Callable[[Any], Awaitable[Any]]) -> Any:
                calls.append(time.monotonic())
                return await real(op)

            shared.call = counted  # type: ignore[method-assign]
            yield gw, fake, calls
    finally:
        await fake.stop()


@pytest.mark.parametrize("key", [PLAIN, LIMITED, BUDGETED, BOTH])
async def test_a_request_makes_one_round_trip_before_its_node(
    gateway: tuple[RunningGateway, FakeUpstream, list[float]], key: str
) -> None:
    gw, fake, calls = gateway
    client = gw.client(key)
    await client.chat.completions.create(model="m", messages=MESSAGES)  # warm: scripts loaded
    for _ in range(5):
        calls.clear()
        await client.chat.completions.create(
            model="m", messages=MESSAGES, extra_headers={"x-spillway-cache": "off"}
        )
        arrived = fake.received[-1].at
        assert sum(1 for at in calls if at <= arrived) == 1


async def test_a_cache_hit_of_a_limited_key_makes_one_round_trip(
    gateway: tuple[RunningGateway, FakeUpstream, list[float]],
) -> None:
    """Its rpm only: a key with tpm or max_parallel also settles after the answer, in the
    background, which this count would include."""
    gw, _, calls = gateway
    client = gw.client(BOTH)
    await client.chat.completions.create(model="m", messages=MESSAGES, temperature=0)
    calls.clear()
    raw = await client.chat.completions.with_raw_response.create(
        model="m", messages=MESSAGES, temperature=0
    )
    assert raw.headers["x-spillway-cache"].startswith("hit")
    assert len(calls) == 1 and raw.headers["x-ratelimit-limit-requests"] == "1000"
