"""Three `spillway serve` processes sharing one real Redis (``[state] redis_url``) in front of
a scripted node: a key's rpm holds across the replicas, a paused Redis costs no request and
none a long wait, and the max_parallel places of a replica killed with -9 come free within
the lease."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import SPILLWAY, clean_env, free_port
from tests.fakes.upstream import FakeUpstream, Script
from tests.redis_server import RedisServer, redis_server

KEY, BURST_KEY, PARALLEL_KEY = "replica-key-0001", "replica-burst-0002", "replica-par-0003"
LEASE_S = 3.0


@dataclass
class Replica:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture
async def node() -> AsyncIterator[FakeUpstream]:
    fake = await FakeUpstream("llm").start()
    yield fake
    await fake.stop()


@pytest.fixture
async def replicas(
    redis: RedisServer, node: FakeUpstream, tmp_path: Path
) -> AsyncIterator[list[Replica]]:
    config = tmp_path / "spillway.toml"
    config.write_text(_config(node.base_url, redis.url, tmp_path.name))
    running = [_start(config, tmp_path / f"r{i}") for i in range(3)]
    try:
        await asyncio.gather(*(_wait_ready(r) for r in running))
        yield running
    finally:
        for replica in running:
            if replica.proc.poll() is None:
                replica.proc.terminate()
        for replica in running:
            try:
                replica.proc.wait(30)
            except subprocess.TimeoutExpired:
                replica.proc.kill()


def _config(node_url: str, redis_url: str, namespace: str) -> str:
    return f"""
[server]
access_log = false
[state]
redis_url = "{redis_url}"
namespace = "{namespace}"
lease_s = {LEASE_S}
[cache]
mode = "off"
[nodes.llm]
kind = "private"
base_url = "{node_url}"
models = {{ m = "llm-model" }}
max_concurrency = 256
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
"""


def _start(config: Path, workdir: Path) -> Replica:
    workdir.mkdir()
    port = free_port()
    log = workdir / "spillway.log"
    cmd = [str(SPILLWAY), "serve", "--config", str(config), "--port", str(port)]
    cmd += ["--data-dir", str(workdir / "data")]
    proc = subprocess.Popen(cmd, env=clean_env(), stdout=log.open("wb"), stderr=subprocess.STDOUT)
    return Replica(proc, f"http://127.0.0.1:{port}", log)


async def _wait_ready(replica: Replica, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=1) as client:
        while time.monotonic() < deadline:
            if replica.proc.poll() is not None:
                raise RuntimeError(replica.log.read_text())
            try:
                if (await client.get(replica.url + "/readyz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{replica.url} not ready: {replica.log.read_text()}")


async def chat(client: httpx.AsyncClient, replica: Replica, key: str) -> httpx.Response:
    return await client.post(
        replica.url + "/v1/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
        headers={"Authorization": f"Bearer {key}"},
    )


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
    node: FakeUpstream, replicas: list[Replica]
) -> None:
    node.script = Script(latency_s=60)
    async with httpx.AsyncClient(timeout=70) as client:
        held = [asyncio.create_task(chat(client, replicas[0], PARALLEL_KEY)) for _ in range(2)]
        await asyncio.sleep(1.0)
        assert node.in_flight == 2
        refused = await chat(client, replicas[1], PARALLEL_KEY)
        assert refused.status_code == 429 and "max_parallel" in refused.text
        os.kill(replicas[0].proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        node.script = Script()
        while (await chat(client, replicas[1], PARALLEL_KEY)).status_code != 200:
            assert time.monotonic() - killed_at < LEASE_S + 1.0
            await asyncio.sleep(0.1)
        freed_after = time.monotonic() - killed_at
        for task in held:
            task.cancel()
        await asyncio.gather(*held, return_exceptions=True)
    assert freed_after <= LEASE_S + 1.0
