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
import orjson
import pytest

from spillway.ledger.records import LedgerRecord
from spillway.ledger.sql import SqlLedgerStore, sqlite_url
from spillway.nodes.tokens import most_prompt_tokens
from spillway.server.auth import key_id
from tests.fakes.gateway import node, running_gateway
from tests.fakes.upstream import FakeUpstream, Script
from tests.faults.test_failover import FAST, MESSAGES
from tests.faults.test_signals_live import until

KEY = "ledger-team-key"
BUDGET_KEY = "ledger-budget-key"
ATTACK_KEY = "ledger-attack-key"
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
            # One request with max_tokens=1000 may cost $0.002352 on the cloud (1000 output
            # tokens at $2/M, and at most 352 prompt tokens at $1/M: its 88 bytes and the
            # template's framing): the budget admits one, not two.
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
        remaining = gw.gateway.pipeline.accountant._budgets.remaining(key_id(BUDGET_KEY))
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


async def test_a_postgresql_down_at_start_is_an_outage_served_through(ups, tmp_path, caplog):
    """The gateway starts, answers, and keeps every record on disk for when it answers."""
    from spillway.ledger.spool import Spool

    url = "postgresql+asyncpg://spillway:s3cret-pw@127.0.0.1:9/ledger"
    async with running_gateway(config(ups, tmp_path, ledger={"url": url})) as gw:
        for _ in range(3):
            await gw.client(KEY).chat.completions.create(model="m", messages=MESSAGES)
    assert Spool(tmp_path / "ledger-spool").count() == 3
    assert "cannot open the ledger (postgresql+asyncpg)" in caplog.text
    assert "s3cret-pw" not in caplog.text


async def test_a_sqlite_ledger_that_cannot_be_opened_is_a_clear_startup_error(ups, tmp_path):
    from spillway.errors import StartupError

    (tmp_path / "not-a-dir").write_text("a file where the ledger's directory should be")
    url = f"sqlite+aiosqlite:///{tmp_path}/not-a-dir/ledger.db"
    with pytest.raises(StartupError) as caught:
        async with running_gateway(config(ups, tmp_path, ledger={"url": url})):
            pass
    assert "cannot open the ledger (sqlite+aiosqlite)" in caught.value.message


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


def cloud_only(ups: dict[str, FakeUpstream], data_dir: Path, budget: str) -> dict[str, Any]:
    """Only the priced cloud node, and ATTACK_KEY with a budget of ``budget`` USD."""
    raw = config(ups, data_dir)
    del raw["nodes"]["priv"]
    raw["keys"].append({"key": ATTACK_KEY, "tenant": "attacker", "budget": {"amount": budget}})
    return raw


async def post(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {ATTACK_KEY}"}
    async with session.post(url, json=body, headers=headers) as resp:
        return resp.status, await resp.json()


@pytest.mark.parametrize(
    "tokens", [[7] * 8000, [[7] * 4000, [9] * 4000]], ids=["token-array", "token-arrays"]
)
async def test_token_array_embeddings_cannot_spend_past_the_budget(ups, tmp_path, tokens):
    # Each request is 8,000 tokens, $0.008 at $1/M: fifty of them would spend $0.40 of $0.05.
    # They were reserved as 0 tokens (only strings were counted), so all fifty got in.
    ups["cloud"].script = Script(latency_s=0.5, prompt_tokens=8000)
    body = {"model": "m", "input": tokens}
    gateway = running_gateway(cloud_only(ups, tmp_path, "0.05"))
    async with gateway as gw, aiohttp.ClientSession() as session:
        url = gw.base_url + "/embeddings"
        answers = await asyncio.gather(*(post(session, url, body) for _ in range(50)))
    statuses = [status for status, _ in answers]
    rows = await ledger_rows(tmp_path)
    assert sum((r.cost for r in rows), Decimal(0)) <= Decimal("0.05")
    # Reserved at about 16,300 tokens ($0.0163) each: three fit, a few more only as some settle.
    assert 3 <= statuses.count(200) <= 5
    assert statuses.count(429) == 50 - statuses.count(200)
    assert sum(r.error_code == "insufficient_quota" for r in rows) == statuses.count(429)


async def test_a_huge_tools_array_is_refused_when_its_worst_case_passes_the_budget(ups, tmp_path):
    # 2,000 tools, 281 kB: up to about 281,000 prompt tokens ($0.28 at $1/M) against a $0.01
    # budget. Only the message text was counted, so it was admitted.
    tool = {"type": "function", "function": {"description": "d" * 60, "parameters": {}}}
    tools = [{**tool, "function": {**tool["function"], "name": f"t{i}"}} for i in range(2000)]
    huge = {"model": "m", "messages": MESSAGES, "max_tokens": 10, "tools": tools}
    # A 1 kB prompt with the default output reserve (4,096 tokens) still fits: about $0.0095.
    ordinary = {"model": "m", "messages": [{"role": "user", "content": "x" * 1000}]}
    gateway = running_gateway(cloud_only(ups, tmp_path, "0.01"))
    async with gateway as gw, aiohttp.ClientSession() as session:
        url = gw.base_url + "/chat/completions"
        status, answer = await post(session, url, huge)
        assert (await post(session, url, ordinary))[0] == 200
    assert status == 429 and answer["error"]["code"] == "insufficient_quota"
    assert ups["cloud"].calls == 1, "the refused request never reached the node"


async def test_max_tokens_above_max_completion_tokens_is_what_is_reserved(ups, tmp_path):
    # The node gets both limits and may honour either; only max_completion_tokens was reserved.
    ups["cloud"].script = Script(latency_s=0.5)
    over = {"model": "m", "messages": MESSAGES, "max_completion_tokens": 10, "max_tokens": 10**5}
    held = {"model": "m", "messages": MESSAGES, "max_completion_tokens": 10, "max_tokens": 1000}
    gateway = running_gateway(cloud_only(ups, tmp_path, "0.01"))
    async with gateway as gw, aiohttp.ClientSession() as session:
        url = gw.base_url + "/chat/completions"
        status, answer = await post(session, url, over)  # 100,000 x $2/M = $0.20
        running = asyncio.create_task(post(session, url, held))
        await until(lambda: ups["cloud"].in_flight == 1)  # reserved, and at the node
        remaining = gw.gateway.pipeline.accountant._budgets.remaining(key_id(ATTACK_KEY))
        assert (await running)[0] == 200
    assert status == 429 and answer["error"]["code"] == "insufficient_quota"
    sent = orjson.dumps({**held, "model": "cloud-model"})  # what the node gets
    prompt = most_prompt_tokens(len(sent), 1)
    reserved = (Decimal(prompt) * 1 + Decimal(1000) * 2) / 1_000_000
    assert remaining == Decimal("0.01") - reserved.quantize(Decimal("0.000001"))


async def test_a_chunked_body_over_the_limit_is_recorded_as_too_large(ups, tmp_path):
    """No Content-Length, so aiohttp only finds out while reading, with its own exception:
    the record used to say internal_error."""
    raw = config(ups, tmp_path, server={"data_dir": str(tmp_path), "max_body_bytes": 4096})

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b'{"model": "m", "messages": []' + b" " * 1024

    async with running_gateway(raw) as gw, aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {KEY}"}
        url = gw.base_url + "/chat/completions"
        async with http.post(url, data=chunks(), headers=headers) as response:
            assert response.status == 413
            assert (await response.json())["error"]["code"] == "payload_too_large"
    rows = await ledger_rows(tmp_path)
    assert [(r.status, r.error_code) for r in rows] == [("error", "payload_too_large")]
