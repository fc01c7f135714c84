"""Three `spillway serve` processes sharing one real Redis (``[state] redis_url``) in front of
scripted nodes: a node's max_concurrency and a key's rpm hold across the replicas, a paused
Redis costs no request and none a long wait, and the places a replica killed with -9 held
come free within the lease."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.fakes.upstream import FakeUpstream, Script
from tests.nginx import running_nginx, with_upstreams
from tests.redis_server import RedisServer, redis_server
from tests.replicas import Replica, chat, start, stop, wait_ready

KEY, BURST_KEY, PARALLEL_KEY = "replica-key-0001", "replica-burst-0002", "replica-par-0003"
BUDGET_KEY = "replica-budget-0004"
#: 1 USD per million output tokens and nothing for input: a request with max_tokens = 8 may
#: cost 0.000008 at most, so this budget is worth 10 of them (and half of an eleventh)
PRICE = "price = { input_per_mtok = 0, output_per_mtok = 1 }"
BUDGET = "budget = { amount = 0.000084, currency = 'USD', period = 'day' }"
LEASE_S = 3.0
MESSAGES: Any = [{"role": "user", "content": "hi"}]
NGINX_SITE = (Path(__file__).resolve().parents[2] / "docs" / "deploy" / "nginx.conf").read_text()


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


PRIVATE = ("p1", "p2", "p3")
PER_NODE = 4


@pytest.fixture
async def fleet() -> AsyncIterator[dict[str, FakeUpstream]]:
    fakes = {name: await FakeUpstream(name).start() for name in (*PRIVATE, "cloud")}
    yield fakes
    for fake in fakes.values():
        await fake.stop()


@pytest.fixture
async def replicas(
    redis: RedisServer, fleet: dict[str, FakeUpstream], tmp_path: Path
) -> AsyncIterator[list[Replica]]:
    config = tmp_path / "spillway.toml"
    config.write_text(_config(fleet, redis.url, tmp_path.name))
    running = [start(config, tmp_path / f"r{i}") for i in range(3)]
    try:
        await asyncio.gather(*(wait_ready(r) for r in running))
        yield running
    finally:
        stop(running)


def _config(fleet: dict[str, FakeUpstream], redis_url: str, namespace: str) -> str:
    nodes = "".join(
        f"""
[nodes.{name}]
kind = "private"
base_url = "{fleet[name].base_url}"
models = {{ m = "llm-model" }}
max_concurrency = {PER_NODE}
{PRICE}
"""
        for name in PRIVATE
    )
    return (
        nodes
        + f"""
[nodes.cloud]
kind = "cloud"
base_url = "{fleet["cloud"].base_url}"
api_key = "sk-replica-cloud-0123456789"
models = {{ m = "cloud-model" }}
max_concurrency = 256
{PRICE}
[server]
access_log = false
[state]
redis_url = "{redis_url}"
namespace = "{namespace}"
lease_s = {LEASE_S}
[cache]
mode = "off"
[routing]
queue_size = 512
[[keys]]
key = "{KEY}"
tenant = "load"
rpm = 1000000
[[keys]]
key = "{BURST_KEY}"
tenant = "burst"
rpm = 30
[[keys]]
key = "{PARALLEL_KEY}"
tenant = "slow"
max_parallel = 2
[[keys]]
key = "{BUDGET_KEY}"
tenant = "capped"
{BUDGET}
"""
    )


async def test_no_node_sees_more_than_its_max_concurrency_and_the_excess_spills(
    fleet: dict[str, FakeUpstream], replicas: list[Replica]
) -> None:
    """48 clients over 3 replicas, 3 private nodes of 4 slots: each replica alone would
    give every node up to 4, 12 in all. Half the clients send one and the same x-request-id,
    which must not let them share slots."""
    for fake in fleet.values():
        fake.script = Script(latency_s=0.2)
    statuses: list[int] = []
    stop = asyncio.Event()

    async def client_loop(client: httpx.AsyncClient, replica: Replica, same_id: bool) -> None:
        request_id = "the-same-id" if same_id else None
        while not stop.is_set():
            answer = await chat(client, replica, KEY, request_id=request_id)
            statuses.append(answer.status_code)

    async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=64)) as client:
        loops = [
            asyncio.create_task(client_loop(client, replicas[i % 3], i % 2 == 0)) for i in range(48)
        ]
        await asyncio.sleep(3.0)
        stop.set()
        await asyncio.gather(*loops)
    peaks = {name: fleet[name].peak_in_flight for name in PRIVATE}
    assert peaks == dict.fromkeys(PRIVATE, PER_NODE), peaks  # full, never over
    assert fleet["cloud"].calls > 0 and set(statuses) == {200}


async def test_rpm_30_admits_30_of_a_burst_of_90_over_three_replicas(
    replicas: list[Replica],
) -> None:
    async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=100)) as client:
        started = time.monotonic()
        answers = await asyncio.gather(
            *(chat(client, replicas[i % 3], BURST_KEY) for i in range(90))
        )
        elapsed = time.monotonic() - started
    statuses = [a.status_code for a in answers]
    admitted = statuses.count(200)
    # 30 at once, plus what refills (30 a minute) while the burst runs
    assert 30 <= admitted <= 30 + int(elapsed / 2) + 1, (admitted, elapsed)
    assert statuses.count(429) == 90 - admitted
    refused = [a for a in answers if a.status_code == 429]
    assert all(int(a.headers["Retry-After"]) >= 1 for a in refused)
    assert all(a.headers["x-ratelimit-limit-requests"] == "30" for a in refused)
    assert {a.json()["error"]["code"] for a in refused} == {"rate_limit_exceeded"}


async def test_a_paused_redis_fails_no_request_and_slows_none_past_1_5_s(
    redis: RedisServer, replicas: list[Replica]
) -> None:
    latencies: list[float] = []
    failures: list[int] = []
    states: list[str] = []
    stop = asyncio.Event()

    async def load(client: httpx.AsyncClient, replica: Replica) -> None:
        while not stop.is_set():
            started = time.monotonic()
            answer = await chat(client, replica, KEY)
            latencies.append(time.monotonic() - started)
            if answer.status_code != 200:
                failures.append(answer.status_code)

    async with httpx.AsyncClient(timeout=10) as client:
        workers = [asyncio.create_task(load(client, replicas[i % 3])) for i in range(6)]
        await asyncio.sleep(1.0)
        redis.pause()
        try:
            await asyncio.sleep(4.0)
            for replica in replicas:
                body = (await client.get(replica.url + "/readyz")).json()
                states.append(body["state"])
            await asyncio.sleep(4.0)
        finally:
            redis.resume()
        await asyncio.sleep(2.5)  # the heartbeat finds Redis again
        recovered = [(await client.get(r.url + "/readyz")).json()["state"] for r in replicas]
        stop.set()
        await asyncio.gather(*workers)
    assert failures == []
    assert len(latencies) > 100 and max(latencies) < 1.5, max(latencies)
    assert states == ["degraded"] * 3 and recovered == ["ok"] * 3
    logs = [r.log.read_text() for r in replicas]
    assert all(log.count("is unreachable") == 1 for log in logs)


async def test_a_killed_replicas_parallel_places_come_free_within_the_lease(
    fleet: dict[str, FakeUpstream], replicas: list[Replica]
) -> None:
    for fake in fleet.values():
        fake.script = Script(latency_s=60)
    async with httpx.AsyncClient(timeout=70) as client:
        held = [asyncio.create_task(chat(client, replicas[0], PARALLEL_KEY)) for _ in range(2)]
        await asyncio.sleep(1.0)
        assert sum(fake.in_flight for fake in fleet.values()) == 2
        refused = await chat(client, replicas[1], PARALLEL_KEY)
        assert refused.status_code == 429 and "max_parallel" in refused.text
        freed_after = await kill_then_wait(
            fleet, replicas, held, lambda: chat(client, replicas[1], PARALLEL_KEY),
            lambda answer: answer.status_code == 200,
        )  # fmt: skip
    assert freed_after <= LEASE_S + 1.0


async def test_a_killed_replicas_node_slots_come_free_within_the_lease(
    fleet: dict[str, FakeUpstream], replicas: list[Replica]
) -> None:
    for name in PRIVATE:
        fleet[name].script = Script(latency_s=60)
    async with httpx.AsyncClient(timeout=70) as client:
        held = [asyncio.create_task(chat(client, replicas[0], KEY)) for _ in range(12)]
        await asyncio.sleep(1.0)
        assert [fleet[name].in_flight for name in PRIVATE] == [PER_NODE] * 3
        spilled = await chat(client, replicas[1], KEY)  # every private slot is held
        assert spilled.headers["x-spillway-source"] == "cloud"
        freed_after = await kill_then_wait(
            fleet, replicas, held, lambda: chat(client, replicas[1], KEY),
            lambda answer: answer.headers["x-spillway-source"] == "private",
        )  # fmt: skip
    assert freed_after <= LEASE_S + 1.0


async def kill_then_wait(
    fleet: dict[str, FakeUpstream],
    replicas: list[Replica],
    held: list[asyncio.Task[httpx.Response]],
    ask: Callable[[], Awaitable[httpx.Response]],
    freed: Callable[[httpx.Response], bool],
) -> float:
    """Kill replica 0 (-9) with ``held`` in flight through it, make the nodes fast again,
    and ask until ``freed`` says its places are free: how many seconds that took."""
    os.kill(replicas[0].proc.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    for fake in fleet.values():
        fake.script = Script()
    while not freed(await ask()):
        assert time.monotonic() - killed_at < LEASE_S + 1.0
        await asyncio.sleep(0.1)
    seconds = time.monotonic() - killed_at
    for task in held:
        task.cancel()
    await asyncio.gather(*held, return_exceptions=True)
    return seconds


async def test_a_failing_node_behind_three_replicas_gets_five_failures_in_all(
    fleet: dict[str, FakeUpstream], replicas: list[Replica]
) -> None:
    """Each replica alone would need its own 5 failures (15 in all) to stop using it."""
    fleet["p1"].script = Script(mode="status", status=503)
    async with httpx.AsyncClient(timeout=10) as client:
        answers = [await chat(client, replicas[i % 3], KEY) for i in range(30)]
    assert {a.status_code for a in answers} == {200}  # each fell back to another node
    assert fleet["p1"].calls == 5  # the default consecutive_failures; open for 30 s now
    assert all(a.headers["x-spillway-node"] != "p1" for a in answers)


async def test_a_budget_worth_ten_requests_admits_ten_of_forty_over_three_replicas(
    fleet: dict[str, FakeUpstream], replicas: list[Replica]
) -> None:
    for fake in fleet.values():
        fake.script = Script(latency_s=1.0)  # all 40 run at once: every reservation counts
    async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=64)) as client:
        answers = await asyncio.gather(
            *(chat(client, replicas[i % 3], BUDGET_KEY) for i in range(40))
        )
    statuses = [a.status_code for a in answers]
    assert statuses.count(200) == 10 and statuses.count(429) == 30
    refused = [a.json()["error"] for a in answers if a.status_code == 429]
    assert {e["code"] for e in refused} == {"insufficient_quota"}


async def test_behind_nginx_as_docs_deploy_configures_it(
    replicas: list[Replica], tmp_path: Path
) -> None:
    """docs/deploy/nginx.conf in front of the 3 replicas: the openai SDK's answers and streams
    come through, and the rpm holds for the fleet behind one address."""
    site = with_upstreams(NGINX_SITE, [r.url.removeprefix("http://") for r in replicas])
    with running_nginx(site, tmp_path) as base:
        client = openai.AsyncOpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
        try:
            answer = await client.chat.completions.create(model="m", messages=MESSAGES)
            stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
            chunks = [chunk async for chunk in stream]
        finally:
            await client.close()
        async with httpx.AsyncClient(timeout=10) as http:
            burst = await asyncio.gather(
                *(
                    http.post(
                        base + "/v1/chat/completions",
                        json={"model": "m", "messages": MESSAGES},
                        headers={"Authorization": f"Bearer {BURST_KEY}"},
                    )
                    for _ in range(60)
                )
            )
    assert answer.choices[0].message.content and len(chunks) > 2
    statuses = [r.status_code for r in burst]
    assert 30 <= statuses.count(200) <= 31 and statuses.count(429) == 60 - statuses.count(200)
