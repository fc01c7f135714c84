"""Personal data in requests, through the real openai SDK: what reaches which node under each
``pii`` action (docs/security.md#personal-data). Scripted upstreams record what they were
sent; the private node is made to fail so that the cloud node is asked."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest

from tests.fakes.gateway import RunningGateway, node, running_gateway
from tests.fakes.upstream import FakeUpstream, Script, fake_nodes

PHONE = "138-1234-5678"
ID_NUMBER = "11010519491231002X"
EMAIL = "zhang.wei@example.com.cn"
FAST = {"connect_s": 1.0, "first_token_s": 1.0, "idle_s": 1.0, "total_s": 5.0, "deadline_s": 10.0}
both_modes = pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])


@pytest.fixture
async def fakes() -> AsyncIterator[dict[str, FakeUpstream]]:
    async with fake_nodes(*("a", "cloud")) as ups:
        yield ups


@pytest.fixture
async def gw(fakes: dict[str, FakeUpstream]) -> AsyncIterator[RunningGateway]:
    config = {
        "timeouts": FAST,
        "pii": {"action": "mask", "custom": [{"name": "employee_id", "pattern": r"EMP-\d{6}"}]},
        "nodes": {
            "a": node("private", fakes["a"].base_url),
            "cloud": node("cloud", fakes["cloud"].base_url, api_key="sk-cloud-0123456789"),
        },
        "keys": [
            {"key": "key-mask-0000", "tenant": "t"},
            {"key": "key-block-000", "tenant": "t", "pii": "block"},
            {"key": "key-private-0", "tenant": "t", "pii": "private_only"},
            {"key": "key-off-00000", "tenant": "t", "pii": "off"},
        ],
        "cache": {"mode": "off"},
    }
    async with running_gateway(config) as running:
        yield running


async def ask(client: openai.AsyncOpenAI, stream: bool, messages: Any) -> str:
    create = client.chat.completions.create
    if not stream:
        reply = await create(model="m", messages=messages)
        return reply.choices[0].message.content or ""
    text = ""
    async for chunk in await create(model="m", messages=messages, stream=True):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    return text


def sent(up: FakeUpstream) -> str:
    return json.dumps(up.received[-1].body, ensure_ascii=False)


PROMPT = [{"role": "user", "content": f"请给我回电 {PHONE}, 邮箱 {EMAIL}"}]


@both_modes
async def test_mask_keeps_private_nodes_whole_and_cloud_nodes_masked(gw, fakes, stream):
    client = gw.client("key-mask-0000")
    await ask(client, stream, PROMPT)
    assert PHONE in sent(fakes["a"]) and EMAIL in sent(fakes["a"])  # the private fleet may
    fakes["a"].script = Script(mode="status", status=503)
    assert await ask(client, stream, PROMPT)  # answered by the cloud node
    cloud = sent(fakes["cloud"])
    assert PHONE not in cloud and EMAIL not in cloud
    assert "请给我回电 [MOBILE], 邮箱 [EMAIL]" in cloud


async def test_mask_reaches_every_text_a_node_reads(gw, fakes):
    fakes["a"].script = Script(mode="status", status=503)
    messages: Any = [
        {"role": "system", "content": f"The user's ID is {ID_NUMBER}."},
        {"role": "user", "content": [{"type": "text", "text": f"Mail {EMAIL}"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "lookup", "arguments": json.dumps({"phone": PHONE})},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "staff EMP-004211 on shift"},
    ]
    await gw.client("key-mask-0000").chat.completions.create(
        model="m", messages=messages, user=EMAIL
    )
    body = fakes["cloud"].received[-1].body
    text = json.dumps(body, ensure_ascii=False)
    for value in (ID_NUMBER, EMAIL, "13812345678", PHONE, "EMP-004211"):
        assert value not in text
    assert body["messages"][0]["content"] == "The user's ID is [RESIDENT_ID]."
    assert body["messages"][1]["content"][0] == {"type": "text", "text": "Mail [EMAIL]"}
    assert "[MOBILE]" in body["messages"][2]["tool_calls"][0]["function"]["arguments"]
    assert body["messages"][3]["content"] == "staff [EMPLOYEE_ID] on shift"
    assert body["messages"][3]["tool_call_id"] == "call_1" and body["user"] == "[EMAIL]"


@both_modes
async def test_block_refuses_naming_kinds_never_values(gw, fakes, stream):
    with pytest.raises(openai.BadRequestError) as caught:
        await ask(gw.client("key-block-000"), stream, PROMPT)
    error = caught.value
    assert error.code == "pii_detected"
    assert "1 email, 1 mobile" in error.message
    assert PHONE not in str(error.body) and EMAIL not in str(error.body)
    assert fakes["a"].calls == 0 and fakes["cloud"].calls == 0
    clean = [{"role": "user", "content": "What is the capital of France?"}]
    assert await ask(gw.client("key-block-000"), stream, clean)  # no personal data: answered


@both_modes
async def test_private_only_fails_closed_rather_than_reach_the_cloud(gw, fakes, stream):
    client = gw.client("key-private-0")
    fakes["a"].script = Script(mode="status", status=503)
    with pytest.raises(openai.APIStatusError) as caught:
        await ask(client, stream, PROMPT)
    assert caught.value.status_code == 503
    assert fakes["cloud"].calls == 0
    clean = [{"role": "user", "content": "no personal data here"}]
    assert await ask(client, stream, clean)  # the same key spills as usual without it
    assert fakes["cloud"].calls == 1


async def test_a_key_with_pii_off_sends_its_text_as_it_is(gw, fakes):
    fakes["a"].script = Script(mode="status", status=503)
    await ask(gw.client("key-off-00000"), False, PROMPT)
    assert PHONE in sent(fakes["cloud"])


async def test_embeddings_input_is_masked_for_the_cloud(gw, fakes):
    fakes["a"].script = Script(mode="status", status=503)
    await gw.client("key-mask-0000").embeddings.create(
        model="m", input=["plain text", f"reach me at {EMAIL}"]
    )
    assert fakes["cloud"].received[-1].body["input"] == ["plain text", "reach me at [EMAIL]"]


async def test_numbers_that_only_look_personal_pass_unmasked(gw, fakes):
    """A timestamp, an order number and a wrong check digit are not personal data."""
    fakes["a"].script = Script(mode="status", status=503)
    text = "ts 1733472000123, order 2024120612345678, id 110105194912310021"
    await ask(gw.client("key-mask-0000"), False, [{"role": "user", "content": text}])
    assert fakes["cloud"].received[-1].body["messages"][0]["content"] == text
