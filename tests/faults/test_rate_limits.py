"""Per-key rate limits on one gateway without shared state: the openai SDK's view of a 429,
OpenAI's x-ratelimit-* headers on answers and refusals, tpm settled on real usage, and a
ledger record for every refusal."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.fakes.gateway import RunningGateway, node, running_gateway
from tests.fakes.upstream import FakeUpstream, Script
from tests.faults.test_ledger import ledger_rows

LIMITED, OPEN = "limited-key-0001", "unlimited-key-0002"
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def ups() -> AsyncIterator[FakeUpstream]:
    fake = await FakeUpstream("llm").start()
    yield fake
    await fake.stop()


def config(ups: FakeUpstream, data_dir: Path, **limits: int) -> dict[str, Any]:
    return {
        "server": {"data_dir": str(data_dir)},
        "cache": {"mode": "off"},
        "nodes": {"llm": node("private", ups.base_url)},
        "keys": [
            {"key": LIMITED, "tenant": "a", **limits},
            {"key": OPEN, "tenant": "b"},
        ],
    }


async def post(gw: RunningGateway, key: str, **body: Any) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.post(
            f"{gw.base_url}/chat/completions",
            json={"model": "m", "messages": MESSAGES, **body},
            headers={"Authorization": f"Bearer {key}"},
        )


async def test_rpm_refuses_with_openai_headers_and_the_sdk_sees_a_rate_limit_error(
    ups: FakeUpstream, tmp_path: Path
) -> None:
    async with running_gateway(config(ups, tmp_path, rpm=3)) as gw:
        answers = [await post(gw, LIMITED) for _ in range(3)]
        assert [a.status_code for a in answers] == [200] * 3
        assert [a.headers["x-ratelimit-remaining-requests"] for a in answers] == ["2", "1", "0"]
        assert answers[0].headers["x-ratelimit-limit-requests"] == "3"
        assert "x-ratelimit-limit-tokens" not in answers[0].headers
        refused = await post(gw, LIMITED)
        assert refused.status_code == 429
        assert refused.headers["Retry-After"] == "20"  # 1 request of 3 a minute
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert refused.json()["error"]["type"] == "requests"
        with pytest.raises(openai.RateLimitError) as sdk:
            await gw.client(LIMITED).chat.completions.create(model="m", messages=MESSAGES)
        assert "requests per minute (rpm): limit 3" in sdk.value.message
        other = await post(gw, OPEN)  # another key is not limited, and gets no such headers
        assert other.status_code == 200
        assert not any(h.startswith("x-ratelimit") for h in other.headers)
        assert ups.calls == 4
    rows = await ledger_rows(tmp_path)
    assert len(rows) == 6  # every request, refused ones too
    assert sorted(r.error_code or "" for r in rows) == [
        "",
        "",
        "",
        "",
        *["rate_limit_exceeded"] * 2,
    ]


async def test_tpm_counts_max_tokens_then_settles_on_real_usage(
    ups: FakeUpstream, tmp_path: Path
) -> None:
    async with running_gateway(config(ups, tmp_path, tpm=1_000)) as gw:
        first = await post(gw, LIMITED, max_tokens=600)
        assert first.status_code == 200
        # counted 600 + the prompt's estimate, settled on the fake's usage (7 + a few)
        remaining = int(first.headers["x-ratelimit-remaining-tokens"])
        assert remaining < 400
        second = await post(gw, LIMITED, max_tokens=600)
        assert second.status_code == 200, second.text  # the first gave back what it did not use
        too_many = await post(gw, LIMITED, max_tokens=5_000)
        assert too_many.status_code == 429 and "Retry-After" not in too_many.headers
        assert "can never be admitted" in too_many.json()["error"]["message"]
        assert too_many.json()["error"]["type"] == "tokens"


async def test_a_request_without_max_tokens_is_counted_for_the_reserve_not_refused(
    ups: FakeUpstream, tmp_path: Path
) -> None:
    raw = config(ups, tmp_path, tpm=300)
    raw["limits"] = {"output_reserve_tokens": 200}
    async with running_gateway(raw) as gw:
        answer = await post(gw, LIMITED)
        assert answer.status_code == 200
        assert int(answer.headers["x-ratelimit-remaining-tokens"]) < 100  # 200 + the prompt


async def test_max_parallel_refuses_while_the_key_has_that_many_in_flight(
    ups: FakeUpstream, tmp_path: Path
) -> None:
    ups.script = Script(mode="slow", latency_s=0.5)
    async with running_gateway(config(ups, tmp_path, max_parallel=1)) as gw:
        client = gw.client(LIMITED)
        first = asyncio.create_task(
            client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        )
        await asyncio.sleep(0.2)
        refused = await post(gw, LIMITED)
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
        assert "max_parallel" in refused.json()["error"]["message"]
        stream = await first
        _ = [chunk async for chunk in stream]  # the stream ends: its place is free
        assert (await post(gw, LIMITED)).status_code == 200


async def test_embeddings_count_too(tmp_path: Path) -> None:
    emb = await FakeUpstream("emb").start()
    try:
        raw = {
            "server": {"data_dir": str(tmp_path)},
            "nodes": {"emb": node("private", emb.base_url)},
            "keys": [{"key": LIMITED, "tenant": "a", "rpm": 1}],
        }
        async with running_gateway(raw) as gw:
            client = gw.client(LIMITED)
            await client.embeddings.create(model="m", input="hello")
            with pytest.raises(openai.RateLimitError):
                await client.embeddings.create(model="m", input="hello")
    finally:
        await emb.stop()


async def test_workers_without_shared_state_each_enforce_their_share(
    ups: FakeUpstream, tmp_path: Path
) -> None:
    """``--workers 3`` without Redis: each worker admits a third of rpm."""
    from spillway.config.load import validate
    from tests.fakes.gateway import _serve

    raw = config(ups, tmp_path, rpm=30)
    async with _serve(validate(raw), processes=3) as gw:
        statuses = [(await post(gw, LIMITED)).status_code for _ in range(12)]
    assert statuses == [200] * 10 + [429] * 2
