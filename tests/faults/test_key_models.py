"""A key's ``models`` list (``[[keys]] models``): the models it may use and see, through the
openai SDK. A model it may not use is answered exactly as one that does not exist."""

from __future__ import annotations

from collections.abc import AsyncIterator

import openai
import pytest

from spillway.config.load import validate
from spillway.errors import ConfigError
from tests.fakes.gateway import RunningGateway, running_gateway
from tests.fakes.upstream import FakeUpstream

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def gw() -> AsyncIterator[tuple[RunningGateway, FakeUpstream]]:
    up = await FakeUpstream("a").start()
    config = {
        "nodes": {
            "a": {
                "kind": "private",
                "base_url": up.base_url,
                "models": {"m": "model-m", "n": "model-n"},
            }
        },
        "keys": [
            {"key": "key-narrow-00", "tenant": "t", "models": ["m"]},
            {"key": "key-wide-0000", "tenant": "t"},
        ],
    }
    async with running_gateway(config) as running:
        yield running, up
    await up.stop()


async def test_a_key_uses_and_sees_only_its_models(gw) -> None:
    running, up = gw
    narrow, wide = running.client("key-narrow-00"), running.client("key-wide-0000")
    assert [m.id async for m in narrow.models.list()] == ["m"]
    assert sorted([m.id async for m in wide.models.list()]) == ["m", "n"]
    assert (await narrow.chat.completions.create(model="m", messages=HI)).choices
    with pytest.raises(openai.NotFoundError) as hidden:
        await narrow.chat.completions.create(model="n", messages=HI)
    with pytest.raises(openai.NotFoundError) as missing:
        await narrow.chat.completions.create(model="zzz", messages=HI)
    assert hidden.value.code == missing.value.code == "model_not_found"
    assert hidden.value.message == missing.value.message.replace("zzz", "n")
    with pytest.raises(openai.NotFoundError):
        await narrow.embeddings.create(model="n", input="x")
    with pytest.raises(openai.NotFoundError):
        await narrow.models.retrieve("n")
    assert (await wide.models.retrieve("n")).id == "n"
    assert up.calls == 1  # only the allowed request reached the node


def test_a_key_naming_a_model_no_node_serves_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"keys.0.models: no node serves the model 'x'"):
        validate({
            "nodes": {"a": {"kind": "private", "base_url": "http://h/v1", "models": {"m": "m"}}},
            "keys": [{"key": "key-narrow-00", "tenant": "t", "models": ["x"]}],
        })  # fmt: skip
