from typing import Any

import orjson
import pytest

from spillway.wire.streams import (
    MAX_FINISH_REASONS,
    MAX_GATHERED_CHARS,
    MAX_USAGE_TOKENS,
    ChunkRelay,
    Usage,
    usage_from,
)

META = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700, "model": "m"}


def chunk(delta: dict[str, Any] | None = None, **fields: Any) -> bytes:
    body: dict[str, Any] = {**META, "choices": [{"index": 0, "delta": delta or {}}]}
    body.update(fields)
    return orjson.dumps(body)


USAGE = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
USAGE_ONLY = orjson.dumps({**META, "choices": [], "usage": USAGE})


def test_chunks_pass_through_byte_identical() -> None:
    relay = ChunkRelay(include_usage=False)
    # Spacing and key order a re-encode would change.
    raw = b'{ "id" : "x",  "choices": [{"delta": {"content": "hi"}, "index": 0}] }'
    assert relay.observe(raw) == raw
    assert relay.chunks == 1


def test_usage_only_chunk_is_dropped_when_not_asked_for() -> None:
    relay = ChunkRelay(include_usage=False)
    assert relay.observe(USAGE_ONLY) is None
    assert relay.usage == Usage(3, 5)


def test_usage_only_chunk_is_kept_when_asked_for() -> None:
    relay = ChunkRelay(include_usage=True)
    assert relay.observe(USAGE_ONLY) == USAGE_ONLY
    assert relay.usage == Usage(3, 5)


def test_null_usage_key_is_stripped_when_not_asked_for() -> None:
    relay = ChunkRelay(include_usage=False)
    forwarded = relay.observe(chunk({"content": "a"}, usage=None))
    assert forwarded is not None
    assert orjson.loads(forwarded) == orjson.loads(chunk({"content": "a"}))
    assert relay.usage is None


def test_null_usage_key_is_kept_when_asked_for() -> None:
    raw = chunk({"content": "a"}, usage=None)
    assert ChunkRelay(include_usage=True).observe(raw) == raw


def test_usage_on_a_content_chunk_is_stripped_but_recorded() -> None:
    relay = ChunkRelay(include_usage=False)
    forwarded = relay.observe(chunk({"content": "a"}, usage=USAGE))
    assert forwarded is not None
    assert "usage" not in orjson.loads(forwarded)
    assert relay.usage == Usage(3, 5)


def test_in_stream_error_is_recorded_and_withheld() -> None:
    relay = ChunkRelay(include_usage=True)
    assert relay.observe(b'{"error": {"message": "model overloaded", "code": 503}}') is None
    assert relay.error_message == "model overloaded"
    assert relay.chunks == 0


def test_in_stream_error_without_message_is_described() -> None:
    relay = ChunkRelay(include_usage=False)
    assert relay.observe(b'{"error": "bad things"}') is None
    assert relay.error_message == "bad things"


def test_text_gathered_from_content_reasoning_and_tool_calls() -> None:
    relay = ChunkRelay(include_usage=False)
    relay.observe(chunk({"role": "assistant", "reasoning_content": "think. "}))
    relay.observe(chunk({"content": "Hello"}))
    relay.observe(chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]}))
    relay.observe(chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}))
    relay.observe(chunk({"content": None}))
    assert relay.text == 'think. Hello{"a":1}'


def test_finish_reasons_recorded() -> None:
    relay = ChunkRelay(include_usage=False)
    relay.observe(chunk({"content": "x"}))
    done = {**META, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    relay.observe(orjson.dumps(done))
    assert relay.finish_reasons == ["stop"]


def test_usage_chunk_reuses_first_chunk_identity() -> None:
    relay = ChunkRelay(include_usage=True)
    relay.observe(chunk({"content": "x"}))
    relay.observe(orjson.dumps({**META, "id": "other", "created": 9, "choices": []}))
    made = orjson.loads(relay.usage_chunk(Usage(10, 4)))
    assert made == {
        **META,
        "choices": [],
        "usage": {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14},
    }


def test_usage_chunk_without_any_chunk_still_has_object() -> None:
    made = orjson.loads(ChunkRelay(include_usage=True).usage_chunk(Usage(1, 2)))
    assert made["object"] == "chat.completion.chunk"
    assert made["usage"]["total_tokens"] == 3


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b'"text"', b"upstream key sk-x"])
def test_data_that_is_not_a_chunk_breaks_the_stream_and_is_not_passed_on(raw: bytes) -> None:
    """An OpenAI stream carries chunks (the caller handles [DONE]). Before, anything else went
    to the client as the node sent it, unscrubbed, and the stream still ended as a success."""
    relay = ChunkRelay(include_usage=False)
    assert relay.observe(raw) is None
    assert relay.chunks == 0
    assert relay.error_message == "sent an event that is not a chunk (not a JSON object)"


def test_usage_from_requires_integer_counts() -> None:
    assert usage_from({"prompt_tokens": 1, "completion_tokens": 2}) == Usage(1, 2)
    # Embeddings report only prompt tokens: that is a usage with no completion.
    assert usage_from({"prompt_tokens": 1, "total_tokens": 1}) == Usage(1, 0)
    assert usage_from({"completion_tokens": 2}) is None
    assert usage_from({"prompt_tokens": "1", "completion_tokens": 2}) is None
    assert usage_from(None) is None


def test_a_long_stream_is_relayed_whole_but_kept_only_up_to_the_cap() -> None:
    """A node may stream for its whole total_s: the relay forwards everything but keeps at
    most MAX_GATHERED_CHARS of text (then counts the rest), so memory stays bounded."""
    relay = ChunkRelay(include_usage=False)
    piece = "x" * 900_000
    chunk = orjson.dumps({"choices": [{"index": 0, "delta": {"content": piece}}]})
    for _ in range(10):
        assert relay.observe(chunk) == chunk
    for _ in range(1000):
        relay.observe(orjson.dumps({"choices": [{"index": 0, "finish_reason": "stop"}]}))
    assert len(relay.text) <= MAX_GATHERED_CHARS < 10 * len(piece)
    assert len(relay.text) + relay.overflow_chars == 10 * len(piece)
    assert len(relay.content) <= MAX_GATHERED_CHARS
    assert not relay.plain_text  # no longer whole: never cached
    assert len(relay.finish_reasons) == MAX_FINISH_REASONS


def test_usage_out_of_any_sane_range_is_not_believed() -> None:
    """A node's 2**63 once stopped the ledger, and a negative count refilled a budget: the
    answer's tokens are counted instead (usage_from says None)."""
    for bad in (-1, -100_000_000, 2**63, MAX_USAGE_TOKENS + 1, True, 1.0):
        assert usage_from({"prompt_tokens": bad, "completion_tokens": 1}) is None
        assert usage_from({"prompt_tokens": 1, "completion_tokens": bad}) is None
    assert usage_from({"prompt_tokens": MAX_USAGE_TOKENS, "completion_tokens": 0}) is not None
