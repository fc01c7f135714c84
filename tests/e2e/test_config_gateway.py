"""A gateway started from spillway.toml, with keys, in front of a real llama.cpp node."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from spillway.nodes.managed import default_model_path
from tests.e2e.conftest import NO_CACHE, Gateway, free_port, start_gateway, stop

pytestmark = pytest.mark.e2e
HI: Any = [{"role": "user", "content": "Say hi"}]
TEAM_KEY = "team-a-key-123"
SOVEREIGN_KEY = "sovereign-key-456"


@pytest.fixture(scope="module")
def gateway(llama_node: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    workdir = tmp_path_factory.mktemp("configured")
    # The cloud node is a closed loopback port: nothing here may ever depend on it answering.
    (workdir / "spillway.toml").write_text(
        f"""
[timeouts]
first_token_s = 20

[nodes.gpu-1]
kind = "private"
base_url = "{llama_node}"
models = {{ "chat" = "smollm2" }}
max_concurrency = 1
tokenizer = "{default_model_path()}"

[nodes.cloud]
kind = "cloud"
base_url = "http://127.0.0.1:{free_port()}/v1"
api_key = "sk-cloud-key-never-shown-1234"
models = {{ "chat" = "deepseek-chat" }}

[[keys]]
key = "{TEAM_KEY}"
tenant = "team-a"

[[keys]]
key = "{SOVEREIGN_KEY}"
tenant = "gov"
private_only = true
"""
    )
    running = start_gateway(workdir)  # finds ./spillway.toml in its working directory
    yield running
    stop(running.proc)


def test_missing_key_is_401(gateway: Gateway):
    response = httpx.post(
        gateway.base_url + "/chat/completions", json={"model": "chat", "messages": HI}
    )
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    assert "Authorization: Bearer" in response.json()["error"]["message"]


def test_wrong_key_is_401_and_not_echoed(gateway: Gateway):
    with pytest.raises(openai.AuthenticationError) as caught:
        gateway.client("wrong-key-987654").chat.completions.create(model="chat", messages=HI)
    assert "wrong-key-987654" not in caught.value.response.text


def test_models_need_a_key_too(gateway: Gateway):
    assert httpx.get(gateway.base_url + "/models").status_code == 401
    models = gateway.client(TEAM_KEY).models.list()
    assert [m.id for m in models] == ["chat"]


@pytest.mark.parametrize("key", [TEAM_KEY, SOVEREIGN_KEY], ids=["team", "private_only"])
def test_valid_keys_are_served_by_the_private_node(gateway: Gateway, key: str):
    raw = gateway.client(key).chat.completions.with_raw_response.create(
        model="chat", messages=HI, max_tokens=5
    )
    assert raw.headers["x-spillway-node"] == "gpu-1"
    assert raw.parse().choices[0].message.content


def test_configured_tokenizer_gives_exact_stream_usage(gateway: Gateway):
    client = gateway.client(TEAM_KEY)
    plain = client.chat.completions.create(
        model="chat", messages=HI, max_tokens=30, temperature=0, extra_headers=NO_CACHE
    )
    chunks = list(
        client.chat.completions.create(
            model="chat",
            messages=HI,
            max_tokens=30,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=NO_CACHE,
        )
    )
    assert plain.usage is not None
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == plain.usage.model_dump()


def test_readyz_reports_the_unreachable_cloud_node(gateway: Gateway):
    body = httpx.get(gateway.url + "/readyz").json()
    assert body["ready"] is True  # "chat" has a node that answers
    assert body["nodes"]["gpu-1"]["state"] == "up"
    assert body["nodes"]["cloud"]["state"] == "down"
    assert "sk-cloud-key-never-shown-1234" not in str(body)


def test_log_never_contains_secrets(gateway: Gateway):
    text = Path(gateway.log).read_text()
    for secret in ("sk-cloud-key-never-shown-1234", TEAM_KEY, SOVEREIGN_KEY):
        assert secret not in text


def test_concurrent_streams_are_never_silently_truncated(gateway: Gateway):
    """llama-cpp-python (default interrupt_requests) ends a running stream with a bare [DONE]
    when another request arrives. spillway must turn that into an error, never a short answer."""
    import asyncio

    async def one(client: openai.AsyncOpenAI) -> str:
        try:
            stream = await client.chat.completions.create(
                model="chat", messages=HI, max_tokens=12, stream=True
            )
            reasons = [c.choices[0].finish_reason async for c in stream if c.choices]
        except openai.APIError as exc:
            assert "finish_reason" in exc.message
            return "error"
        assert reasons[-1] in ("stop", "length")
        return "complete"

    async def run() -> list[str]:
        client = gateway.aclient(TEAM_KEY)
        return await asyncio.gather(*(one(client) for _ in range(4)))

    outcomes = asyncio.run(run())
    assert "complete" in outcomes
