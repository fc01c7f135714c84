"""The batch issue's acceptance run: a 3,000-line batch submitted through the openai SDK to
two `spillway serve` replicas that share PostgreSQL, with its files in a real S3 server
(SeaweedFS). The replica working the batch is killed with SIGKILL mid-way; the other takes
the batch over when its lease runs out, and the killed one is started again. The batch
completes with every custom_id exactly once, each answered by its own answer, while
interactive requests keep going to the private node."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import openai
import orjson
import pytest

from tests.cache_helpers import needs_postgres
from tests.fakes.upstream import FakeUpstream, Script
from tests.pg import PgServer, create_database, postgres
from tests.replicas import Replica, start, stop, wait_ready
from tests.s3_server import S3Server, s3_server

KEY = "batch-crash-key-0001"
LINES = 3000
LEASE_S = 3.0


@pytest.fixture(scope="module")
def pg() -> Iterator[PgServer]:
    needs_postgres()
    with postgres() as server:
        yield server


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with s3_server() as server:
        yield server


@pytest.fixture
async def node() -> AsyncIterator[FakeUpstream]:
    fake = await FakeUpstream("a", script=Script(echo=True, latency_s=0.01)).start()
    yield fake
    await fake.stop()


def write_config(path: Path, node: FakeUpstream, ledger_url: str, s3: S3Server) -> None:
    storage = s3.storage(f"crash{os.urandom(3).hex()}")
    path.write_text(
        f"""
[server]
secret = "{"k" * 32}"
[ledger]
url = "{ledger_url}"
flush_interval_s = 0.1
[storage]
url = "{storage["url"]}"
endpoint_url = "{storage["endpoint_url"]}"
access_key_id = "{storage["access_key_id"]}"
secret_access_key = "{storage["secret_access_key"]}"
[batch]
poll_s = 0.5
lease_s = {LEASE_S}
checkpoint_s = 0.5
max_share = 0.5
[cache]
mode = "off"
[nodes.a]
kind = "private"
base_url = "{node.base_url}"
models = {{ m = "m1" }}
max_concurrency = 8
[[keys]]
key = "{KEY}"
tenant = "t"
"""
    )


async def lease_holder(dsn: str, batch_id: str) -> str | None:
    conn = await asyncpg.connect(dsn)
    try:
        owner: str | None = await conn.fetchval(
            "SELECT lease_owner FROM batches WHERE id = $1", batch_id
        )
        return owner
    finally:
        await conn.close()


async def test_a_batch_survives_kill_9_of_the_replica_working_it(
    pg: PgServer, s3: S3Server, node: FakeUpstream, tmp_path: Path
) -> None:
    url = await create_database(pg, "batchcrash")
    dsn = url.replace("postgresql+asyncpg://", "postgresql://")
    config = tmp_path / "spillway.toml"
    write_config(config, node, url, s3)
    replicas = [start(config, tmp_path / f"r{i}") for i in range(2)]
    try:
        await asyncio.gather(*(wait_ready(r) for r in replicas))
        clients = [openai.AsyncOpenAI(base_url=r.url + "/v1", api_key=KEY, max_retries=2)
                   for r in replicas]  # fmt: skip
        lines = b"\n".join(
            orjson.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                          "body": {"model": "m", "max_tokens": 8,
                                   "messages": [{"role": "user", "content": f"line {i}"}]}})
            for i in range(LINES)
        )  # fmt: skip
        uploaded = await clients[0].files.create(file=("big.jsonl", lines), purpose="batch")
        batch = await clients[0].batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        await _until(clients[1], batch.id, lambda b: b.request_counts.completed >= 600)
        owner = await lease_holder(dsn, batch.id)
        assert owner is not None
        victim = next(r for r in replicas if f":{r.proc.pid}:" in owner)
        survivor = next(r for r in replicas if r is not victim)
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait()
        killed_at = time.monotonic()
        done_at_kill = (await _batch(survivor, batch.id)).request_counts.completed
        # interactive traffic on the survivor while it takes the batch over
        interactive = await _interactive(survivor, 20)
        revived = start(config, victim.workdir)  # restarted, as an orchestrator would
        replicas[replicas.index(victim)] = revived
        await wait_ready(revived)
        done = await _until(_client(survivor), batch.id, lambda b: b.status == "completed", 180)
        took_over = time.monotonic() - killed_at
        output = await _client(survivor).files.content(done.output_file_id)
        rows = [json.loads(line) for line in output.text.splitlines()]
    finally:
        stop(replicas)
    ids = [row["custom_id"] for row in rows]
    assert len(ids) == LINES and set(ids) == {f"c{i}" for i in range(LINES)}
    for row in rows:
        number = row["custom_id"][1:]
        content = row["response"]["body"]["choices"][0]["message"]["content"]
        assert content == f"echo: line {number}", row
        assert row["response"]["body"]["usage"]["completion_tokens"] > 0
    assert done.error_file_id is None and done.request_counts.completed == LINES
    assert {source for _, source in interactive} == {"private"}
    sent_twice = len(node.received) - LINES - len(interactive)
    print(
        f"killed at {done_at_kill} of {LINES} done; finished {took_over:.1f} s after the kill; "
        f"lines run twice: {sent_twice}; interactive p50 while taking over: "
        f"{sorted(t for t, _ in interactive)[len(interactive) // 2] * 1000:.0f} ms"
    )


def _client(replica: Replica) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=replica.url + "/v1", api_key=KEY, max_retries=2)


async def _batch(replica: Replica, batch_id: str) -> Any:
    return await _client(replica).batches.retrieve(batch_id)


async def _until(client: openai.AsyncOpenAI, batch_id: str, holds: Any, limit_s: float = 60) -> Any:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        batch = await client.batches.retrieve(batch_id)
        if holds(batch):
            return batch
        await asyncio.sleep(0.2)
    raise AssertionError(f"batch {batch_id} never got there")


async def _interactive(replica: Replica, count: int) -> list[tuple[float, str]]:
    results = []
    async with httpx.AsyncClient(timeout=10) as http:
        for i in range(count):
            start_at = time.monotonic()
            answer = await http.post(
                replica.url + "/v1/chat/completions",
                headers={"Authorization": f"Bearer {KEY}"},
                json={"model": "m", "messages": [{"role": "user", "content": f"now {i}"}]},
            )
            assert answer.status_code == 200
            results.append((time.monotonic() - start_at, answer.headers["x-spillway-source"]))
    return results
