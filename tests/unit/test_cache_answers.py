"""What may be stored, and replaying it as JSON or as the faithful chunks of a stream."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from spillway.cache.answers import CachedAnswer, from_reply, from_stream, replay_body, replay_chunks
from spillway.wire.streams import ChunkRelay, Usage

USAGE = Usage(12, 3)


def completion(
    message: dict[str, Any] | None = None, finish: str = "stop", **extra: Any
) -> dict[str, Any]:
    choice = {
        "index": 0,
        "message": message or {"role": "assistant", "content": "Paris."},
        "logprobs": None,
        "finish_reason": finish,
    }
    body = {
        "id": "x",
        "object": "chat.completion",
        "created": 1,
        "model": "node-model",
        "choices": [choice],
        "usage": USAGE.as_openai(),
        **extra,
    }
    return body


def test_a_plain_answer_is_stored_and_replayed_with_a_fresh_identity() -> None:
    answer = from_reply(completion(), USAGE, "p1", now=100.0, tools=False)
    assert answer is not None
    again = CachedAnswer.from_bytes(answer.to_bytes())
    assert again == answer
    replayed = orjson.loads(replay_body(again, now=200.0))
    assert replayed["choices"] == completion()["choices"]
    assert replayed["created"] == 200 and replayed["id"].startswith("chatcmpl-")
    assert replayed["usage"] == USAGE.as_openai()


@pytest.mark.parametrize(
    "reply",
    [
        completion(finish="content_filter"),
        completion(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                ],
            },
            finish="tool_calls",
        ),
        {"error": {"message": "boom"}},
        {"choices": []},
        {"choices": [completion()["choices"][0]] * 2},
    ],
)
def test_unfit_answers_are_not_stored(reply: dict[str, Any]) -> None:
    assert from_reply(reply, USAGE, "p1", now=1.0, tools=False) is None


def test_tool_calls_are_stored_when_configured_and_replay_as_deltas() -> None:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}
    reply = completion({"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls")
    answer = from_reply(reply, USAGE, "p1", now=1.0, tools=True)
    assert answer is not None
    chunks = [orjson.loads(c) for c in replay_chunks(answer, now=2.0, include_usage=False)]
    assert chunks[1]["choices"][0]["delta"]["tool_calls"] == [{"index": 0, **call}]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("include_usage", [True, False])
def test_stream_replay_is_well_formed(include_usage: bool) -> None:
    answer = from_reply(completion(), USAGE, "p1", now=1.0, tools=False)
    assert answer is not None
    chunks = [orjson.loads(c) for c in replay_chunks(answer, now=2.0, include_usage=include_usage)]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "Paris."
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "stop" and finishes.count("stop") == 1
    usage = [c["usage"] for c in chunks if "usage" in c]
    assert usage == ([USAGE.as_openai()] if include_usage else [])


def test_a_stream_is_assembled_into_the_answer_it_stands_for() -> None:
    relay = ChunkRelay(include_usage=False)
    for delta, finish in (
        ({"role": "assistant", "content": ""}, None),
        ({"content": "Par"}, None),
        ({"content": "is."}, None),
        ({}, "stop"),
    ):
        relay.observe(
            orjson.dumps(
                {
                    "id": "s",
                    "object": "chat.completion.chunk",
                    "created": 5,
                    "model": "nm",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                }
            )
        )
    answer = from_stream(relay, USAGE, "p1", now=9.0)
    assert answer is not None
    assert answer.body["choices"][0]["message"] == {"role": "assistant", "content": "Paris."}
    assert answer.body["model"] == "nm" and answer.body["usage"] == USAGE.as_openai()


def test_a_stream_with_tool_calls_or_no_finish_is_not_stored() -> None:
    relay = ChunkRelay(include_usage=False)
    relay.observe(
        orjson.dumps(
            {
                "choices": [
                    {
                        "index": 0,
                        "delta": {"tool_calls": [{"index": 0}]},
                        "finish_reason": "tool_calls",
                    }
                ]
            }
        )
    )
    assert from_stream(relay, USAGE, "p1", now=1.0) is None
    unfinished = ChunkRelay(include_usage=False)
    unfinished.observe(orjson.dumps({"choices": [{"index": 0, "delta": {"content": "a"}}]}))
    assert from_stream(unfinished, USAGE, "p1", now=1.0) is None


def test_garbage_entries_read_as_errors_not_answers() -> None:
    for raw in (b"", b"{}", orjson.dumps({"v": 99, "body": {}}), b"\xff"):
        with pytest.raises(ValueError):
            CachedAnswer.from_bytes(raw)
