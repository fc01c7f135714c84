"""The ledger through a PostgreSQL outage, with real parts: two `spillway serve` replicas
writing to one real PostgreSQL, which is frozen (SIGSTOP: connections stay open and never
answer) while 120 requests run and one replica restarts. Every answered request has exactly
one ledger row once PostgreSQL is back; a replica also starts while it is down."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.fakes.upstream import FakeUpstream
from tests.pg import PgServer, create_database, postgres, signal_server, thaw
from tests.replicas import Replica, chat, restart, start, stop, wait_ready

KEY = "outage-key-0001"


@pytest.fixture(scope="module")
def pg() -> Iterator[PgServer]:
    with postgres() as server:
        yield server


@pytest.fixture
async def node() -> AsyncIterator[FakeUpstream]:
    fake = await FakeUpstream("llm").start()
    yield fake
    await fake.stop()


def _config(node_url: str, ledger_url: str) -> str:
    return f"""
[server]
access_log = false
[ledger]
url = "{ledger_url}"
flush_interval_s = 0.2
[cache]
mode = "off"
[nodes.llm]
kind = "private"
base_url = "{node_url}"
models = {{ m = "llm-model" }}
max_concurrency = 64
[[keys]]
key = "{KEY}"
tenant = "t"
"""


async def rows(pg: PgServer, database_url: str) -> int:
    dsn = pg.dsn(database_url.rsplit("/", 1)[1])
    conn = await asyncpg.connect(dsn)
    try:
        count: int = await conn.fetchval("SELECT count(*) FROM ledger")
        return count
    finally:
        await conn.close()


def spooled(replica: Replica) -> int:
    return sum(1 for _ in (replica.workdir / "data" / "ledger-spool").glob("*.jsonl"))


async def test_postgresql_stopped_under_load_and_a_replica_restarting_loses_no_record(
    pg: PgServer, node: FakeUpstream, tmp_path: Path
) -> None:
    database = await create_database(pg, "outage")
    config = tmp_path / "spillway.toml"
    config.write_text(_config(node.base_url, database))
    replicas = [start(config, tmp_path / f"r{i}") for i in range(2)]
    answered = 0
    try:
        await asyncio.gather(*(wait_ready(r) for r in replicas))

        async def client(first: int) -> None:
            nonlocal answered
            async with httpx.AsyncClient(timeout=10) as http:
                for i in range(first, 120, 4):
                    try:
                        await chat(http, replicas[i % 2], KEY)
                    except httpx.TransportError:  # restarting: as a balancer would, the other
                        await chat(http, replicas[(i + 1) % 2], KEY)
                    answered += 1  # any answer at all is a request with a record
                    await asyncio.sleep(0.05)

        clients = [asyncio.create_task(client(i)) for i in range(4)]
        await asyncio.sleep(0.3)
        frozen = signal_server(pg.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(0.5)
            replicas[1] = await asyncio.to_thread(restart, replicas[1])  # spools, then starts
            await wait_ready(replicas[1])
            await asyncio.gather(*clients)
            on_disk = sum(spooled(r) for r in replicas)
        finally:
            thaw(frozen)
        deadline = time.monotonic() + 30
        while sum(spooled(r) for r in replicas) or await rows(pg, database) < answered:
            assert time.monotonic() < deadline, "the spooled records did not reach PostgreSQL"
            await asyncio.sleep(0.2)
    finally:
        stop(replicas)
    assert answered == 120 and on_disk > 0  # the outage really sent records to disk
    assert await rows(pg, database) == answered
    logs = "".join(r.log.read_text() for r in replicas)
    assert "cannot open the ledger" in logs  # the restarted replica started without it
