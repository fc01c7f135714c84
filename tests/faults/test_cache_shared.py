"""The shared stores, real servers: two gateways on one Redis and one PostgreSQL (pgvector)
see each other's exact and semantic entries, and an outage of either (down, or frozen so
that it accepts connections and never answers) costs hits, never requests.

The gateways run in this process (separate apps, separate data dirs, one shared secret);
tests/e2e/test_cache_shared.py does the same with two `spillway serve` processes, the local
embedder and a real llama.cpp node."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_client

from tests.fakes.gateway import running_gateway
from tests.fakes.upstream import FakeUpstream
from tests.faults.test_cache import KEY_A, KEY_B
from tests.faults.test_cache_semantic import config as semantic_config
from tests.faults.test_cache_semantic import status
from tests.pg import PgServer, create_database, postgres, signal_server, thaw
from tests.redis_server import RedisServer, redis_server

SECRET = "a-shared-cache-secret-for-tests"


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture(autouse=True)
def empty_redis(redis: RedisServer) -> None:
    """Each test starts with nothing cached (the server is shared by the module's tests)."""
    client = redis_client.Redis.from_url(redis.url)
    try:
        client.flushall()
    finally:
        client.close()


@pytest.fixture(scope="module")
def pg() -> Iterator[PgServer]:
    with postgres() as server:
        yield server


async def config(
    ups: dict[str, FakeUpstream], tmp: Path, redis: RedisServer, pg: PgServer
) -> dict[str, Any]:
    """test_cache_semantic's set-up (a private embedder node), on Redis and pgvector."""
    raw = semantic_config(ups, tmp, "private")
    raw["cache"] |= {
        "secret": SECRET,
        "store": "redis",
        "redis_url": redis.url,
        "index": "pgvector",
        "pgvector_url": await create_database(pg, "cache"),
        "lookup_timeout_s": 0.3,
    }
    return raw


async def test_two_gateways_share_exact_and_semantic_entries(
    ups: dict[str, FakeUpstream], tmp_path: Path, redis: RedisServer, pg: PgServer
) -> None:
    raw = await config(ups, tmp_path / "one", redis, pg)
    other = {**raw, "server": {"data_dir": str(tmp_path / "two")}}
    async with running_gateway(raw) as one, running_gateway(other) as two:
        warmed = await status(one, KEY_A, "tell me a joke")
        seen = [await status(two, KEY_A, p) for p in ("tell me a joke", "a joke, please")]
        theirs = await status(two, KEY_B, "tell me a joke")
    assert warmed == "miss"
    assert seen == ["hit-exact", "hit-semantic"]
    assert theirs == "miss"
    assert ups["llm"].calls == 2


@pytest.mark.parametrize("outage", ["down", "frozen"])
async def test_a_redis_outage_serves_every_request(
    ups: dict[str, FakeUpstream], tmp_path: Path, redis: RedisServer, pg: PgServer, outage: str
) -> None:
    async with running_gateway(await config(ups, tmp_path, redis, pg)) as gw:
        await status(gw, KEY_A, f"what is {outage}?")
        redis.stop() if outage == "down" else redis.pause()
        try:
            started = time.monotonic()
            during = [await status(gw, KEY_A, f"what is {outage}?") for _ in range(3)]
            took = time.monotonic() - started
        finally:
            redis.start() if outage == "down" else redis.resume()
        after = await status(gw, KEY_A, f"what is {outage}?")
    assert during == ["miss"] * 3
    assert took < 3 * 1.0  # each lookup gave up within its timeout
    assert after == ("miss" if outage == "down" else "hit-exact")


async def test_a_frozen_postgresql_serves_every_request(
    ups: dict[str, FakeUpstream], tmp_path: Path, redis: RedisServer, pg: PgServer
) -> None:
    async with running_gateway(await config(ups, tmp_path, redis, pg)) as gw:
        await status(gw, KEY_A, "tell me a joke")
        frozen = signal_server(pg.pid, signal.SIGSTOP)
        try:
            during = [await status(gw, KEY_A, p) for p in ("tell me a joke", "joke please")]
        finally:
            thaw(frozen)
        after = await status(gw, KEY_A, "a joke, please")
    assert during == ["hit-exact", "miss"]  # exact hits live in Redis; semantic gave up
    assert after == "hit-semantic"


async def test_an_unreachable_store_and_index_from_the_start(
    ups: dict[str, FakeUpstream], tmp_path: Path, redis: RedisServer, pg: PgServer
) -> None:
    raw = await config(ups, tmp_path, redis, pg)
    raw["cache"] |= {
        "redis_url": "redis://127.0.0.1:1/0",
        "pgvector_url": "postgresql://u:pw@127.0.0.1:1/db",
    }
    async with running_gateway(raw) as gw:
        got = [await status(gw, KEY_A, "tell me a joke") for _ in range(2)]
    assert got == ["miss", "miss"] and ups["llm"].calls == 2


async def test_postgresql_down_at_start_up_is_reconnected_later(
    ups: dict[str, FakeUpstream], tmp_path: Path, redis: RedisServer, pg: PgServer
) -> None:
    raw = await config(ups, tmp_path, redis, pg)
    frozen = signal_server(pg.pid, signal.SIGSTOP)
    try:
        async with running_gateway(raw) as gw:
            thaw(frozen)
            frozen = []
            first = await status(gw, KEY_A, "tell me a fable")  # starts the reconnection
            semantic = gw.gateway.pipeline.cache.semantic
            assert semantic is not None
            for _ in range(100):
                if getattr(semantic.index, "_pool", None) is not None:
                    break
                await asyncio.sleep(0.05)
            stored = await status(gw, KEY_A, "tell me a parable")
            paraphrased = await status(gw, KEY_A, "please tell me a parable")
    finally:
        thaw(frozen)
    assert (first, stored, paraphrased) == ("miss", "miss", "hit-semantic")
