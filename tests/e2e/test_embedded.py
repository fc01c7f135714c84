"""The embedded default (`make run`): the openai SDK against spillway and a real llama.cpp node."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import NO_CACHE, Gateway

pytestmark = pytest.mark.e2e
HI: Any = [{"role": "user", "content": "Say hi"}]


def stream_text_and_last(client: openai.OpenAI, **kwargs: Any) -> tuple[str, Any, list[Any]]:
    chunks = list(client.chat.completions.create(model="default", messages=HI, stream=True,
                                                 extra_headers=NO_CACHE, **kwargs))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks[-1], chunks


def test_models_lists_the_public_name(embedded: Gateway):
    assert [m.id for m in embedded.client().models.list()] == ["default"]


def test_non_streaming_answer_and_headers(embedded: Gateway):
    raw = embedded.client().chat.completions.with_raw_response.create(
        model="default", messages=HI, max_tokens=20, temperature=0, extra_headers=NO_CACHE
    )
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.prompt_tokens == 32
    assert raw.headers["x-spillway-node"] == "local"
    assert raw.headers["x-spillway-source"] == "private"
    assert len(raw.headers["x-request-id"]) >= 16


def test_stream_matches_the_non_streaming_answer(embedded: Gateway):
    client = embedded.client()
    plain = client.chat.completions.create(
        model="default", messages=HI, max_tokens=24, temperature=0, extra_headers=NO_CACHE
    )
    text, _, chunks = stream_text_and_last(client, max_tokens=24, temperature=0)
    assert text == plain.choices[0].message.content
    assert len(chunks) > 5, "the stream must arrive chunk by chunk"
    assert all(c.usage is None for c in chunks), "no usage chunk unless asked for"


def test_a_repeated_deterministic_request_is_answered_from_the_cache(embedded: Gateway):
    client = embedded.client()
    prompt: Any = [{"role": "user", "content": "Name a large ocean."}]
    asked = {"model": "default", "messages": prompt, "max_tokens": 16, "temperature": 0}
    first = client.chat.completions.with_raw_response.create(**asked)
    time.sleep(0.3)  # the answer is stored after the response
    again = client.chat.completions.with_raw_response.create(**asked)
    streamed = client.chat.completions.with_raw_response.create(**asked, stream=True)
    assert first.headers["x-spillway-cache"] == "miss"
    assert (again.headers["x-spillway-cache"], again.headers["x-spillway-source"]) == (
        "hit-exact",
        "cache",
    )
    answer = first.parse().choices[0].message.content
    assert again.parse().choices[0].message.content == answer
    assert streamed.headers["x-spillway-cache"] == "hit-exact"
    text = "".join(c.choices[0].delta.content or "" for c in streamed.parse() if c.choices)
    assert text == answer


def test_include_usage_matches_the_nodes_own_count(embedded: Gateway):
    client = embedded.client()
    prompt: Any = [{"role": "user", "content": "Name three colours, briefly."}]
    plain = client.chat.completions.create(
        model="default", messages=prompt, max_tokens=40, temperature=0, extra_headers=NO_CACHE
    )
    chunks = list(
        client.chat.completions.create(
            model="default",
            messages=prompt,
            max_tokens=40,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=NO_CACHE,
        )
    )
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert plain.usage is not None
    assert usage.prompt_tokens == plain.usage.prompt_tokens
    assert usage.completion_tokens == plain.usage.completion_tokens
    assert usage.total_tokens == plain.usage.total_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_stops_with_length(embedded: Gateway, stream: bool):
    client = embedded.client()
    if not stream:
        completion = client.chat.completions.create(model="default", messages=HI, max_tokens=5)
        assert completion.choices[0].finish_reason == "length"
        assert completion.usage is not None and completion.usage.completion_tokens == 5
        return
    _, last, chunks = stream_text_and_last(
        client, max_tokens=5, stream_options={"include_usage": True}
    )
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == ["length"]
    assert last.usage.completion_tokens == 5


def test_concurrent_requests_all_answer(embedded: Gateway):
    async def one(client: openai.AsyncOpenAI, i: int) -> str:
        if i % 2:
            stream = await client.chat.completions.create(
                model="default", messages=HI, max_tokens=8, stream=True
            )
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        done = await client.chat.completions.create(model="default", messages=HI, max_tokens=8)
        return done.choices[0].message.content or ""

    async def all_of_them() -> list[str]:
        client = embedded.aclient()
        return await asyncio.gather(*(one(client, i) for i in range(6)))

    answers = asyncio.run(all_of_them())
    assert len(answers) == 6 and all(answers)


def test_embeddings_from_the_embedded_node(embedded: Gateway):
    result = embedded.client().embeddings.create(
        model="default", input="hello world", encoding_format="float"
    )
    assert result.data and result.data[0].embedding


def test_unknown_model_is_404(embedded: Gateway):
    with pytest.raises(openai.NotFoundError) as caught:
        embedded.client().chat.completions.create(model="gpt-7", messages=HI)
    assert caught.value.code == "model_not_found"
    assert "GET /v1/models" in caught.value.message


@pytest.mark.parametrize("messages", [[], None], ids=["empty", "missing"])
def test_missing_or_empty_messages_is_400(embedded: Gateway, messages: Any):
    body: dict[str, Any] = {"model": "default"}
    if messages is not None:
        body["messages"] = messages
    with pytest.raises(openai.BadRequestError) as caught:
        embedded.client().post("/chat/completions", body=body, cast_to=httpx.Response)
    assert caught.value.param == "messages"


def test_malformed_json_is_400(embedded: Gateway):
    response = httpx.post(embedded.base_url + "/chat/completions", content=b'{"model": "def')
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert "not valid JSON" in response.json()["error"]["message"]


@pytest.mark.parametrize("field", ["api_base", "base_url"])
def test_upstream_steering_fields_are_refused(embedded: Gateway, field: str):
    with pytest.raises(openai.BadRequestError) as caught:
        embedded.client().chat.completions.create(
            model="default", messages=HI, extra_body={field: "http://attacker.example/v1"}
        )
    assert caught.value.param == field


def test_body_over_the_limit_is_413_before_parsing(embedded: Gateway):
    oversized = b"x" * (16 * 1024 * 1024 + 1)
    response = httpx.post(embedded.base_url + "/chat/completions", content=oversized)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


def test_chunked_body_over_the_limit_is_413(embedded: Gateway):
    def chunks():
        for _ in range(17):
            yield b"x" * (1024 * 1024)

    response = httpx.post(embedded.base_url + "/chat/completions", content=chunks())
    assert response.status_code == 413


def test_node_rejecting_the_request_is_forwarded_as_400(embedded: Gateway):
    too_long: Any = [{"role": "user", "content": "hello " * 6000}]
    with pytest.raises(openai.BadRequestError) as caught:
        embedded.client().chat.completions.create(model="default", messages=too_long)
    assert "context" in caught.value.message


def test_health_and_readiness(embedded: Gateway):
    assert httpx.get(embedded.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(embedded.url + "/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["models"] == {"default": True}
    assert body["nodes"]["local"]["state"] == "up"
    assert body["nodes"]["local"]["managed"]["process"] == "running"


def test_spillway_nodes_prints_the_routing_table(embedded: Gateway):
    import subprocess

    from tests.e2e.conftest import SPILLWAY, clean_env

    result = subprocess.run(
        [str(SPILLWAY), "nodes", "--url", embedded.url],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "local" in result.stdout and "closed" in result.stdout
    assert "default" in result.stdout
