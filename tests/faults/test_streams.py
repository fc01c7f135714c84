"""Streams after the commit point, client disconnects, usage, and what reaches the node."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from tests.fakes.gateway import RunningGateway, node, running_gateway
from tests.fakes.upstream import FakeUpstream, Script, fake_nodes
from tests.faults.test_failover import FAST, MESSAGES, ask, both_modes


@pytest.fixture
async def fakes() -> AsyncIterator[dict[str, FakeUpstream]]:
    async with fake_nodes(*("a", "b")) as ups:
        yield ups


@pytest.fixture
async def gw(fakes: dict[str, FakeUpstream]) -> AsyncIterator[RunningGateway]:
    config = {
        "timeouts": FAST,
        "nodes": {
            "a": node("private", fakes["a"].base_url),
            "b": node("private", fakes["b"].base_url),
        },
    }
    async with running_gateway(config) as running:
        yield running


async def raw_stream(gw: RunningGateway, **extra: Any) -> tuple[int, bytes]:
    body = {"model": "m", "messages": MESSAGES, "stream": True, **extra}
    async with (
        aiohttp.ClientSession() as session,
        session.post(gw.base_url + "/chat/completions", json=body) as resp,
    ):
        return resp.status, await resp.read()


async def test_stream_cut_after_commit_ends_with_error_event_and_no_done(gw, fakes):
    fakes["a"].script = Script(mode="cut", cut_after=3)
    status, body = await raw_stream(gw)
    assert status == 200
    assert b"a-0 " in body and b"a-1 " in body
    assert b"event: error" in body
    assert b"[DONE]" not in body
    assert fakes["b"].calls == 0, "after the commit point a stream is never retried"


async def test_done_without_finish_reason_is_an_interrupted_stream(gw, fakes):
    fakes["a"].script = Script(mode="interrupted", cut_after=2)
    _, body = await raw_stream(gw)
    assert b"a-0 " in body and b"event: error" in body and b"[DONE]" not in body


async def test_stream_cut_raises_in_the_openai_sdk(gw, fakes):
    fakes["a"].script = Script(mode="cut", cut_after=3)
    with pytest.raises(openai.APIError, match="mid-stream"):
        await ask(gw.client(), stream=True)


async def test_plain_request_cut_mid_body_falls_back(gw, fakes):
    # Nothing reached the client yet, so unlike a committed stream this may move on.
    fakes["a"].script = Script(mode="cut")
    result = await ask(gw.client(), stream=False)
    assert result.node == "b"


async def test_client_disconnect_mid_stream_cancels_upstream_and_frees_the_slot(gw, fakes):
    fakes["a"].script = Script(mode="slow", chunks=200, delay_s=0.05)
    body = {"model": "m", "messages": MESSAGES, "stream": True}
    async with aiohttp.ClientSession() as session:
        resp = await session.post(gw.base_url + "/chat/completions", json=body)
        await resp.content.readuntil(b"a-1 ")
        resp.close()
        gone = time.monotonic()
    await _until(lambda: fakes["a"].cancelled_at, within_s=1.0)
    assert fakes["a"].cancelled_at[0] - gone < 1.0
    await _until(lambda: gw.in_flight()["a"] == 0, within_s=1.0)


@both_modes
async def test_client_disconnect_before_first_token_cancels_upstream(gw, fakes, stream):
    fakes["a"].script = Script(mode="stall")
    body = {"model": "m", "messages": MESSAGES, "stream": stream}
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(session.post(gw.base_url + "/chat/completions", json=body))
        await _until(lambda: fakes["a"].calls == 1, within_s=1.0)
        task.cancel()
        gone = time.monotonic()
    await _until(lambda: fakes["a"].cancelled_at, within_s=1.0)
    assert fakes["a"].cancelled_at[0] - gone < 1.0
    await _until(lambda: gw.in_flight()["a"] == 0, within_s=1.0)
    assert fakes["b"].calls == 0


async def test_usage_chunk_only_for_clients_that_ask(gw, fakes):
    _, without = await raw_stream(gw)
    assert b'"usage"' not in without
    assert fakes["a"].received[0].body["stream_options"] == {"include_usage": True}
    _, with_usage = await raw_stream(gw, stream_options={"include_usage": True})
    assert b'"usage":{"prompt_tokens":7,"completion_tokens":4' in with_usage
    assert with_usage.endswith(b"data: [DONE]\n\n")


async def test_node_without_stream_usage_gets_counted_usage(gw, fakes):
    fakes["a"].script = Script(send_usage=False)
    client = gw.client()
    stream = await client.chat.completions.create(
        model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    assert usage is not None and usage.completion_tokens > 0 and usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert chunks[-1].id == chunks[0].id


async def test_unknown_fields_pass_through_and_model_is_mapped(gw, fakes):
    client = gw.client()
    await client.chat.completions.create(
        model="m",
        messages=MESSAGES,
        temperature=0.3,
        extra_body={"guided_json": {"type": "object"}, "top_k": 5, "repetition_penalty": 1.1},
    )
    received = fakes["a"].received[0].body
    assert received["model"] == "private-model"
    assert received["guided_json"] == {"type": "object"}
    assert (received["top_k"], received["repetition_penalty"], received["temperature"]) == (
        5,
        1.1,
        0.3,
    )
    assert received["messages"] == MESSAGES


async def test_plain_answer_is_the_nodes_json_byte_for_byte(gw, fakes):
    body = {"model": "m", "messages": MESSAGES}
    async with (
        aiohttp.ClientSession() as session,
        session.post(gw.base_url + "/chat/completions", json=body) as resp,
    ):
        answer = await resp.read()
        headers = resp.headers
    parsed = orjson.loads(answer)
    assert parsed["id"] == "chatcmpl-a" and parsed["system_fingerprint"] is None
    assert parsed["usage"]["prompt_tokens"] == 7
    assert headers["x-spillway-node"] == "a" and headers["x-request-id"]


async def test_request_id_from_the_client_is_kept(gw, fakes):
    body = {"model": "m", "messages": MESSAGES}
    async with aiohttp.ClientSession() as session:
        headers = {"x-request-id": "trace-123"}
        async with session.post(
            gw.base_url + "/chat/completions", json=body, headers=headers
        ) as resp:
            assert resp.headers["x-request-id"] == "trace-123"


async def test_embeddings_are_forwarded(gw, fakes):
    result = await gw.client().embeddings.create(model="m", input="hello")
    assert result.data[0].embedding == [0.1, 0.2, 0.3]
    received = fakes["a"].received[0].body
    assert (received["model"], received["input"]) == ("private-model", "hello")


async def _until(condition: Any, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within_s} s")
        await asyncio.sleep(0.01)


async def test_chunks_are_relayed_as_they_arrive_not_buffered(gw, fakes):
    fakes["a"].script = Script(mode="slow", chunks=8, delay_s=0.1)
    body = {"model": "m", "messages": MESSAGES, "stream": True}
    started = time.monotonic()
    async with (
        aiohttp.ClientSession() as session,
        session.post(gw.base_url + "/chat/completions", json=body) as resp,
    ):
        await resp.content.readuntil(b"a-0 ")
        first = time.monotonic() - started
        await resp.read()
        total = time.monotonic() - started
    assert total >= 0.7
    assert first < 0.35, f"first chunk after {first:.2f} s of a {total:.2f} s stream"


async def test_broken_tokenizer_still_ends_the_stream_with_estimated_usage(fakes, tmp_path):
    garbage = tmp_path / "not-a-model.gguf"
    garbage.write_bytes(b"this is not a GGUF file")
    fakes["a"].script = Script(send_usage=False)
    config = {"nodes": {"a": node("private", fakes["a"].base_url, tokenizer=str(garbage))}}
    async with running_gateway(config) as gw:
        stream = await gw.client().chat.completions.create(
            model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
