"""``auth_header`` and ``headers`` reach the node exactly, and never come back in an error."""

from __future__ import annotations

from collections.abc import AsyncIterator

import openai
import pytest

from tests.fakes.gateway import node, running_gateway
from tests.fakes.upstream import FakeUpstream, Script
from tests.faults.test_failover import FAST, ask

KEY = "azure-key-0123456789abcdef"
TOKEN = "tenant-token-0123456789"


@pytest.fixture
async def azure() -> AsyncIterator[FakeUpstream]:
    fake = await FakeUpstream("azure").start()
    yield fake
    await fake.stop()


def config(fake: FakeUpstream, auth_header: str) -> dict[str, object]:
    settings = {
        "api_key": KEY,
        "auth_header": auth_header,
        "headers": {"api-version": "2024-10-21", "X-Tenant-Token": TOKEN},
    }
    return {"timeouts": FAST, "nodes": {"azure": node("cloud", fake.base_url, **settings)}}


@pytest.mark.parametrize("auth_header", ["api-key", "x-api-key"])
async def test_the_key_goes_in_the_named_header_with_the_extra_headers(
    azure: FakeUpstream, auth_header: str
) -> None:
    async with running_gateway(config(azure, auth_header)) as gw:
        assert (await ask(gw.client(), stream=False)).node == "azure"
    headers = {name.lower(): value for name, value in azure.received[0].headers.items()}
    assert headers[auth_header] == KEY  # the whole value: no "Bearer "
    assert "authorization" not in headers
    assert headers["api-version"] == "2024-10-21"
    assert headers["x-tenant-token"] == TOKEN
    assert headers["content-type"] == "application/json"


async def test_the_default_auth_header_is_a_bearer_token(azure: FakeUpstream) -> None:
    raw = {"timeouts": FAST, "nodes": {"azure": node("cloud", azure.base_url, api_key=KEY)}}
    async with running_gateway(raw) as gw:
        await ask(gw.client(), stream=False)
    assert azure.received[0].headers["Authorization"] == f"Bearer {KEY}"


async def test_a_node_that_echoes_its_key_and_headers_is_scrubbed(azure: FakeUpstream) -> None:
    azure.script = Script(mode="status", status=401, error_message=f"bad key {KEY} for {TOKEN}")
    async with running_gateway(config(azure, "api-key")) as gw:
        with pytest.raises(openai.APIStatusError) as caught:
            await ask(gw.client(), stream=False)
    text = caught.value.response.text
    assert "bad key" in text and KEY not in text and TOKEN not in text
