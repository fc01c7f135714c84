"""The exact cache through the gateway with the real openai SDK: hits, replayed streams,
tenant isolation, the policy matrix, merging of identical requests in flight, TTL, and the
ledger's record of what each hit saved. The upstream is a scripted fake so calls can be
counted; the semantic half and the shared stores are tested in test_cache_semantic.py and
test_cache_shared.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.fakes.gateway import RunningGateway, node, running_gateway
from tests.fakes.upstream import FakeUpstream, Script
from tests.faults.test_failover import FAST
from tests.faults.test_ledger import ledger_rows

KEY_A, KEY_B = "team-a-secret-key", "team-b-secret-key"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
CLOUD_PRICE = {"input_per_mtok": "1.00", "output_per_mtok": "2.00", "currency": "USD"}


@pytest.fixture
async def up() -> AsyncIterator[FakeUpstream]:
    fake = await FakeUpstream("cloud").start()
    yield fake
    await fake.stop()


def config(up: FakeUpstream, data_dir: Path, **cache: Any) -> dict[str, Any]:
    return {
        "server": {"data_dir": str(data_dir)},
        "timeouts": FAST,
        "nodes": {"cloud": node("cloud", up.base_url, price=CLOUD_PRICE)},
        "keys": [{"key": KEY_A, "tenant": "a"}, {"key": KEY_B, "tenant": "b"}],
        "cache": cache,
    }


async def ask(
    gw: RunningGateway, key: str = KEY_A, headers: dict[str, str] | None = None, **extra: Any
) -> tuple[str, httpx.Headers]:
    """(answer text, response headers) of one non-streaming request."""
    body: dict[str, Any] = {"model": "m", "messages": QUESTION, "temperature": 0, **extra}
    raw = await gw.client(key).chat.completions.with_raw_response.create(
        **body, extra_headers=headers or {}
    )
    answer = raw.parse()
    return answer.choices[0].message.content or "", raw.headers


async def ask_stream(gw: RunningGateway, key: str = KEY_A, **extra: Any) -> tuple[str, Any, str]:
    """(text, usage or None, x-spillway-cache) of one streaming request."""
    body: dict[str, Any] = {"model": "m", "messages": QUESTION, "temperature": 0, **extra}
    raw = await gw.client(key).chat.completions.with_raw_response.create(**body, stream=True)
    text, usage, finishes = "", None, []
    async for chunk in raw.parse():
        usage = chunk.usage or usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finishes += [choice.finish_reason] if choice.finish_reason else []
    assert finishes == ["stop"]
    return text, usage, raw.headers["x-spillway-cache"]


async def settle(gw: RunningGateway) -> None:
    """Let background cache writes land (they run after the response, and may not have
    begun when it arrives): until none has been pending for 50 ms."""
    quiet = 0
    for _ in range(400):
        quiet = 0 if gw.gateway.pipeline.cache._writes else quiet + 1
        if quiet >= 10:
            return
        await asyncio.sleep(0.005)


async def test_a_repeat_is_a_hit_with_no_upstream_call(up: FakeUpstream, tmp_path: Path) -> None:
    async with running_gateway(config(up, tmp_path)) as gw:
        first, h1 = await ask(gw)
        await settle(gw)
        second, h2 = await ask(gw)
    assert up.calls == 1
    assert first == second
    assert (h1["x-spillway-cache"], h1["x-spillway-source"]) == ("miss", "cloud")
    assert (h2["x-spillway-cache"], h2["x-spillway-source"]) == ("hit-exact", "cache")
    assert "x-spillway-node" not in h2


@pytest.mark.parametrize("warm_with_stream", [False, True])
@pytest.mark.parametrize("include_usage", [False, True])
async def test_a_hit_replays_as_a_stream(
    up: FakeUpstream, tmp_path: Path, warm_with_stream: bool, include_usage: bool
) -> None:
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    async with running_gateway(config(up, tmp_path)) as gw:
        if warm_with_stream:
            fresh, _, status = await ask_stream(gw)
        else:
            (fresh, _), status = await ask(gw), "miss"
        assert status == "miss"
        await settle(gw)
        text, usage, status = await ask_stream(gw, **options)
    assert up.calls == 1
    assert status == "hit-exact" and text == fresh
    assert (usage is not None) == include_usage
    if usage is not None:
        assert (usage.prompt_tokens, usage.completion_tokens) == (7, 4)


async def test_tenants_never_share_entries(up: FakeUpstream, tmp_path: Path) -> None:
    async with running_gateway(config(up, tmp_path)) as gw:
        await ask(gw, KEY_A)
        await settle(gw)
        _, theirs = await ask(gw, KEY_B)
        await settle(gw)
        _, mine = await ask(gw, KEY_A)
    assert theirs["x-spillway-cache"] == "miss"
    assert mine["x-spillway-cache"] == "hit-exact"
    assert up.calls == 2


@pytest.mark.parametrize(
    ("headers", "extra", "expected", "note"),
    [
        ({"x-spillway-cache": "off"}, {}, "bypass", "x-spillway-cache: off"),
        ({"Cache-Control": "no-store"}, {}, "bypass", "Cache-Control: no-store"),
        ({"Cache-Control": "no-cache"}, {}, "miss", None),
        ({}, {"temperature": 0.8}, "bypass", "not deterministic (temperature is not 0)"),
        ({}, {"n": 2}, "bypass", "n > 1"),
    ],
)
async def test_policy_through_the_gateway(
    up: FakeUpstream,
    tmp_path: Path,
    headers: dict[str, str],
    extra: dict[str, Any],
    expected: str,
    note: str | None,
) -> None:
    async with running_gateway(config(up, tmp_path)) as gw:
        await ask(gw, **extra)
        await settle(gw)
        _, got = await ask(gw, headers=headers, **extra)
    assert got["x-spillway-cache"] == expected
    assert got.get("x-spillway-cache-note") == note  # a bypass always says why
    assert up.calls == 2


async def test_asking_for_semantic_where_it_is_off_says_so(
    up: FakeUpstream, tmp_path: Path
) -> None:
    """No model is configured semantic, so no embedder is loaded: a request that asks for
    semantic lookups gets exact ones, and every answer says so instead of a silent miss."""
    semantic = {"x-spillway-cache": "semantic"}
    async with running_gateway(config(up, tmp_path)) as gw:
        _, first = await ask(gw, headers=semantic)
        await settle(gw)
        _, again = await ask(gw, headers=semantic)
        _, plain = await ask(gw)
    assert (first["x-spillway-cache"], again["x-spillway-cache"]) == ("miss", "hit-exact")
    for answer in (first, again):
        note = answer["x-spillway-cache-note"]
        assert note.startswith("semantic lookups are off on this gateway")
        assert note.endswith("exact lookups only")
    assert "x-spillway-cache-note" not in plain  # exact, as asked: nothing to say
    assert up.calls == 1


async def test_no_store_is_not_stored_and_no_cache_refreshes(
    up: FakeUpstream, tmp_path: Path
) -> None:
    async with running_gateway(config(up, tmp_path)) as gw:
        await ask(gw, headers={"Cache-Control": "no-store"})
        await settle(gw)
        _, after_no_store = await ask(gw)
        await settle(gw)
        up.script.chunks = 2  # the upstream's answer changes
        refreshed, _ = await ask(gw, headers={"Cache-Control": "no-cache"})
        await settle(gw)
        served, hit = await ask(gw)
    assert after_no_store["x-spillway-cache"] == "miss"
    assert hit["x-spillway-cache"] == "hit-exact" and served == refreshed
    assert up.calls == 3


async def test_the_model_mode_off_is_final(up: FakeUpstream, tmp_path: Path) -> None:
    raw = config(up, tmp_path)
    raw["models"] = {"m": {"cache": "off"}}
    async with running_gateway(raw) as gw:
        await ask(gw)
        await settle(gw)
        _, got = await ask(gw, headers={"x-spillway-cache": "exact"})
    assert got["x-spillway-cache"] == "bypass" and up.calls == 2


async def test_a_bad_cache_header_is_refused_clearly(up: FakeUpstream, tmp_path: Path) -> None:
    async with running_gateway(config(up, tmp_path)) as gw:
        with pytest.raises(openai.BadRequestError) as caught:
            await ask(gw, headers={"x-spillway-cache": "please"})
    assert "x-spillway-cache must be one of off, exact or semantic" in str(caught.value)
    assert up.calls == 0


@pytest.mark.parametrize("mode", ["status", "cut"])
@pytest.mark.parametrize("stream", [False, True])
async def test_errors_and_cut_streams_are_never_cached(
    up: FakeUpstream, tmp_path: Path, mode: str, stream: bool
) -> None:
    up.script = Script(mode=mode, status=400)  # type: ignore[arg-type]
    async with running_gateway(config(up, tmp_path)) as gw:
        with pytest.raises(openai.APIError):
            if stream:
                await ask_stream(gw)
            else:
                await ask(gw)
        await settle(gw)
        up.script = Script()
        _, got = await ask(gw)
    assert got["x-spillway-cache"] == "miss"


async def test_a_text_answer_to_a_request_with_tools_is_cached(
    up: FakeUpstream, tmp_path: Path
) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    async with running_gateway(config(up, tmp_path)) as gw:
        await ask(gw, tools=tools)  # the fake answers with text, not a tool call
        await settle(gw)
        _, got = await ask(gw, tools=tools)
    assert got["x-spillway-cache"] == "hit-exact"


@pytest.mark.parametrize("stream", [False, True])
async def test_fifty_identical_requests_in_flight_make_one_upstream_call(
    up: FakeUpstream, tmp_path: Path, stream: bool
) -> None:
    up.script = Script(latency_s=0.3)
    async with running_gateway(config(up, tmp_path)) as gw:
        if stream:
            results = await asyncio.gather(*(ask_stream(gw) for _ in range(50)))
            texts = [text for text, _, _ in results]
        else:
            texts = [text for text, _ in await asyncio.gather(*(ask(gw) for _ in range(50)))]
        merged = gw.gateway.pipeline.cache.statistics().merged
    assert up.calls == 1
    assert len(set(texts)) == 1 and texts[0]
    assert merged == 49


async def test_followers_of_a_failed_leader_go_upstream_themselves(
    up: FakeUpstream, tmp_path: Path
) -> None:
    up.script = Script(mode="status", status=400, latency_s=0.2)
    async with running_gateway(config(up, tmp_path)) as gw:
        outcomes = await asyncio.gather(*(ask(gw) for _ in range(5)), return_exceptions=True)
    assert all(isinstance(o, openai.BadRequestError) for o in outcomes)
    assert up.calls == 5  # one leader, then each follower on its own; none waits forever


async def test_entries_expire(up: FakeUpstream, tmp_path: Path) -> None:
    async with running_gateway(config(up, tmp_path, ttl_s=0.2)) as gw:
        await ask(gw)
        await settle(gw)
        _, fresh = await ask(gw)
        await asyncio.sleep(0.3)
        _, stale = await ask(gw)
    assert fresh["x-spillway-cache"] == "hit-exact"
    assert stale["x-spillway-cache"] == "miss"
    assert up.calls == 2


async def test_the_ledger_counts_each_hit_with_the_cost_it_avoided(
    up: FakeUpstream, tmp_path: Path
) -> None:
    async with running_gateway(config(up, tmp_path)) as gw:
        await ask(gw)
        await settle(gw)
        await ask(gw)
        await ask_stream(gw)
    rows = await ledger_rows(tmp_path)
    assert [r.source for r in rows] == ["cloud", "cache", "cache"]
    paid, *hits = rows
    # 7 prompt tokens at $1/M and 4 completion tokens at $2/M on the cloud node.
    assert paid.cost == Decimal("0.000015")
    for hit in hits:
        assert hit.node is None and hit.cost == 0 and hit.status == "ok"
        assert (hit.prompt_tokens, hit.completion_tokens) == (7, 4)
        assert hit.avoided_cost == paid.cost
        assert hit.reference_cost == paid.reference_cost > 0
