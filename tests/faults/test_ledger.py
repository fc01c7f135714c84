"""The ledger through the gateway: one record per request whatever happens, exact money,
and budgets that hold under a race."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from spillway.ledger.records import LedgerRecord
from spillway.ledger.sql import SqlLedgerStore, sqlite_url
from spillway.server.auth import key_id
from tests.fakes.gateway import node, running_gateway
from tests.fakes.upstream import FakeUpstream, Script
from tests.faults.test_failover import FAST, MESSAGES

KEY = "ledger-team-key"
BUDGET_KEY = "ledger-budget-key"
# Cloud price: $1 per million input tokens, $2 per million output tokens.
CLOUD_PRICE = {"input_per_mtok": "1.00", "output_per_mtok": "2.00", "currency": "USD"}


@pytest.fixture
async def ups() -> AsyncIterator[dict[str, FakeUpstream]]:
    fakes = {name: await FakeUpstream(name).start() for name in ("priv", "cloud")}
    yield fakes
    for fake in fakes.values():
        await fake.stop()


def config(ups: dict[str, FakeUpstream], data_dir: Path, **extra: Any) -> dict[str, Any]:
    return {
        "server": {"data_dir": str(data_dir)},
        "timeouts": FAST,
        "nodes": {
            "priv": node("private", ups["priv"].base_url, max_concurrency=2),
            "cloud": node("cloud", ups["cloud"].base_url, price=CLOUD_PRICE),
        },
        "keys": [
            {"key": KEY, "tenant": "team"},
            # One request with max_tokens=1000 may cost about $0.002 on the cloud (1000 output
            # tokens at $2/M plus the estimated prompt): the budget admits one, not two.
            {"key": BUDGET_KEY, "tenant": "tight", "budget": {"amount": "0.0025"}},
        ],
        **extra,
    }


async def ledger_rows(data_dir: Path) -> list[LedgerRecord]:
    store = SqlLedgerStore(sqlite_url(data_dir))
    await store.open()
    try:
        return await store.query()
    finally:
        await store.aclose()


async def test_every_request_gets_exactly_one_record(ups, tmp_path):
    async with running_gateway(config(ups, tmp_path)) as gw:
        client = gw.client(KEY)
        await client.chat.completions.create(model="m", messages=MESSAGES)
        stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        _ = [chunk async for chunk in stream]
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="m", messages=[])
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="nope", messages=MESSAGES)
        ups["priv"].script = Script(mode="cut", cut_after=2)
        stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        with pytest.raises(openai.APIError):
            _ = [chunk async for chunk in stream]
        ups["priv"].script = ups["cloud"].script = Script(mode="status", status=500)
        with pytest.raises(openai.APIStatusError):
            await client.chat.completions.create(model="m", messages=MESSAGES)
    rows = await ledger_rows(tmp_path)
    assert len(rows) == 6
    assert [r.status for r in rows] == ["ok", "ok", "error", "error", "incomplete", "error"]
    assert [r.source for r in rows] == ["private", "private", None, None, "private", None]
    assert rows[0].prompt_tokens == 7 and rows[0].completion_tokens == 4
    assert rows[2].error_code is None or rows[2].error_code == "invalid_request_error"
    assert rows[3].error_code == "model_not_found"
    assert rows[4].completion_tokens > 0, "a cut stream still counts the tokens it produced"
    assert all(r.tenant == "team" and r.key_id == key_id(KEY) for r in rows)
    assert all(KEY not in repr(r) for r in rows)


async def test_cloud_cost_and_reference_cost_are_exact(ups, tmp_path):
    ups["priv"].script = Script(mode="status", status=503)
    async with running_gateway(config(ups, tmp_path)) as gw:
        await gw.client(KEY).chat.completions.create(model="m", messages=MESSAGES)
    cloud = [r for r in await ledger_rows(tmp_path) if r.source == "cloud"]
    assert len(cloud) == 1
    # 7 prompt + 4 completion tokens: 7 x $1/M + 4 x $2/M = $0.000015
    assert cloud[0].cost == Decimal("0.000015")
    # GPT-4.1 reference: 7 x $2/M + 4 x $8/M = $0.000046
    assert cloud[0].reference_cost == Decimal("0.000046")
    assert cloud[0].currency == "USD"


async def test_stream_without_node_usage_is_counted_for_the_ledger(ups, tmp_path):
    ups["priv"].script = Script(send_usage=False)
    async with running_gateway(config(ups, tmp_path)) as gw:
        stream = await gw.client(KEY).chat.completions.create(
            model="m", messages=MESSAGES, stream=True
        )
        _ = [chunk async for chunk in stream]
    (row,) = await ledger_rows(tmp_path)
    assert row.completion_tokens > 0 and row.prompt_tokens > 0
    assert row.tokens_estimated, "no tokenizer configured: the count is an estimate"


async def test_budget_race_admits_one_request(ups, tmp_path):
    # All private capacity is taken away so every request would go to the priced cloud node.
    ups["priv"].script = Script(mode="status", status=503)
    ups["cloud"].script = Script(latency_s=0.2)
    async with running_gateway(config(ups, tmp_path)) as gw:
        headers = {"Authorization": f"Bearer {BUDGET_KEY}"}
        body = {"model": "m", "messages": MESSAGES, "max_tokens": 1000}

        async def one(session: aiohttp.ClientSession) -> int:
            async with session.post(gw.base_url + "/chat/completions", json=body,
                                    headers=headers) as resp:  # fmt: skip
                return resp.status

        async with aiohttp.ClientSession() as session:
            statuses = await asyncio.gather(*(one(session) for _ in range(50)))
        remaining = gw.gateway.accountant._budgets.remaining(key_id(BUDGET_KEY))
    assert statuses.count(200) == 1
    assert statuses.count(429) == 49
    rows = await ledger_rows(tmp_path)
    spent = sum((r.cost for r in rows), Decimal(0))
    assert spent <= Decimal("0.0025")
    assert remaining is not None and remaining >= 0
    assert sum(r.error_code == "insufficient_quota" for r in rows) == 49


async def test_a_repeated_client_request_id_still_gets_one_row_per_request(ups, tmp_path):
    async with running_gateway(config(ups, tmp_path)) as gw:
        client = gw.client(KEY).with_options(default_headers={"x-request-id": "job-7"})
        for _ in range(3):
            raw = await client.chat.completions.with_raw_response.create(
                model="m", messages=MESSAGES
            )
            assert raw.headers["x-request-id"] == "job-7"
    rows = await ledger_rows(tmp_path)
    assert len(rows) == 3
    assert {r.client_request_id for r in rows} == {"job-7"}
    assert len({r.request_id for r in rows}) == 3


async def test_unreachable_ledger_database_is_a_clear_startup_error(ups, tmp_path):
    from spillway.errors import StartupError

    url = "postgresql+asyncpg://spillway:s3cret-pw@127.0.0.1:9/ledger"
    with pytest.raises(StartupError) as caught:
        async with running_gateway(config(ups, tmp_path, ledger={"url": url})):
            pass
    assert "cannot open the ledger (postgresql+asyncpg)" in caught.value.message
    assert "s3cret-pw" not in caught.value.message


@pytest.mark.parametrize("include_usage", [False, True])
async def test_broken_tokenizer_still_records_estimated_tokens(ups, tmp_path, include_usage):
    garbage = tmp_path / "not-a-model.gguf"
    garbage.write_bytes(b"this is not a GGUF file")
    ups["priv"].script = Script(send_usage=False)
    raw = config(ups, tmp_path)
    raw["nodes"]["priv"]["tokenizer"] = str(garbage)
    async with running_gateway(raw) as gw:
        options = {"stream_options": {"include_usage": True}} if include_usage else {}
        stream = await gw.client(KEY).chat.completions.create(
            model="m", messages=MESSAGES, stream=True, **options
        )
        _ = [chunk async for chunk in stream]
    (row,) = await ledger_rows(tmp_path)
    assert row.completion_tokens > 0 and row.prompt_tokens > 0
    assert row.tokens_estimated, "the GGUF tokenizer failed, so the count is an estimate"
