import copy
from typing import Any

import orjson
import pytest

from spillway.errors import InvalidRequest
from spillway.wire.requests import (
    STEERING_FIELDS,
    ChatRequest,
    body_for_node,
    parse_chat,
    parse_embeddings,
)

MESSAGES = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> bytes:
    body: dict[str, Any] = {"model": "default", "messages": MESSAGES}
    body.update(fields)
    return orjson.dumps({k: v for k, v in body.items() if v is not ...})


def rejected(raw: bytes) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        parse_chat(raw)
    assert info.value.status == 400
    assert info.value.kind == "invalid_request_error"
    return info.value


def test_minimal_body_is_accepted() -> None:
    request = parse_chat(chat())
    assert request.model == "default"
    assert request.stream is False
    assert request.include_usage is False
    assert request.max_tokens is None


def test_unknown_fields_are_kept_untouched() -> None:
    extra = {"temperature": 0.2, "tools": [{"type": "function"}], "x_vendor": {"a": [1, None]}}
    request = parse_chat(chat(**extra))
    assert request.body == {"model": "default", "messages": MESSAGES, **extra}


def test_stream_with_include_usage() -> None:
    request = parse_chat(chat(stream=True, stream_options={"include_usage": True}))
    assert request.stream is True
    assert request.include_usage is True


def test_max_tokens_is_the_larger_of_the_two_limits() -> None:
    # The node gets both and may honour either: the larger is the most it may write.
    assert parse_chat(chat(max_tokens=5)).max_tokens == 5
    assert parse_chat(chat(max_completion_tokens=7)).max_tokens == 7
    assert parse_chat(chat(max_tokens=5, max_completion_tokens=7)).max_tokens == 7
    assert parse_chat(chat(max_tokens=100, max_completion_tokens=7)).max_tokens == 100


def test_n_of_128_is_accepted() -> None:
    assert parse_chat(chat(n=128)).body["n"] == 128


@pytest.mark.parametrize(
    ("raw", "param", "hint"),
    [
        (b"", None, "empty"),
        (b"{not json", None, "not valid JSON"),
        (b"[1, 2]", None, "JSON object"),
        (b'"text"', None, "JSON object"),
        (chat(model=...), "model", "'model' is required"),
        (chat(model=""), "model", "'model' is required"),
        (chat(model="  "), "model", "'model' is required"),
        (chat(model=3), "model", "'model' is required"),
        (chat(messages=...), "messages", "non-empty list"),
        (chat(messages=[]), "messages", "non-empty list"),
        (chat(messages={"role": "user"}), "messages", "non-empty list"),
        (chat(messages=[{"content": "hi"}]), "messages[0]", "string 'role'"),
        (chat(messages=[*MESSAGES, "hi"]), "messages[1]", "string 'role'"),
        (chat(stream="true"), "stream", "must be a boolean"),
        (chat(stream=1), "stream", "must be a boolean"),
        (chat(stream_options={"include_usage": True}), "stream_options", "'stream' is true"),
        (chat(stream=False, stream_options={}), "stream_options", "'stream' is true"),
        (chat(stream=True, stream_options=[]), "stream_options", "JSON object"),
        (chat(max_tokens=0), "max_tokens", "positive integer"),
        (chat(max_tokens=-5), "max_tokens", "positive integer"),
        (chat(max_tokens=True), "max_tokens", "positive integer"),
        (chat(max_tokens="10"), "max_tokens", "positive integer"),
        (chat(max_tokens=1.5), "max_tokens", "positive integer"),
        (chat(max_completion_tokens=0), "max_completion_tokens", "positive integer"),
        (chat(n=0), "n", "positive integer"),
        (chat(n=129), "n", "at most 128"),
    ],
)
def test_invalid_body_is_rejected_with_what_to_fix(
    raw: bytes, param: str | None, hint: str
) -> None:
    error = rejected(raw)
    assert error.param == param
    assert hint in error.message


@pytest.mark.parametrize("field", sorted(STEERING_FIELDS))
def test_steering_fields_are_rejected(field: str) -> None:
    error = rejected(chat(**{field: "http://attacker.example"}))
    assert error.param == field
    assert f"'{field}' is not accepted" in error.message
    assert "Remove the field" in error.message


@pytest.mark.parametrize("field", sorted(STEERING_FIELDS))
def test_steering_fields_are_rejected_on_embeddings(field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_embeddings(orjson.dumps({"model": "e", "input": "x", field: "y"}))
    assert info.value.param == field


def node_body(request: ChatRequest, model: str = "node-model") -> dict[str, Any]:
    body: dict[str, Any] = orjson.loads(body_for_node(request, model))
    return body


def test_body_for_node_replaces_model_and_keeps_the_rest() -> None:
    request = parse_chat(chat(temperature=0.5, user="u1"))
    assert node_body(request) == {
        "model": "node-model",
        "messages": MESSAGES,
        "temperature": 0.5,
        "user": "u1",
    }


def test_body_for_node_forces_include_usage_on_streams() -> None:
    request = parse_chat(chat(stream=True))
    assert node_body(request)["stream_options"] == {"include_usage": True}


def test_body_for_node_keeps_other_stream_options() -> None:
    options = {"include_usage": False, "continuous_usage_stats": True}
    request = parse_chat(chat(stream=True, stream_options=options))
    assert request.include_usage is False
    assert node_body(request)["stream_options"] == {
        "include_usage": True,
        "continuous_usage_stats": True,
    }


def test_body_for_node_adds_no_stream_options_to_non_streams() -> None:
    assert "stream_options" not in node_body(parse_chat(chat()))
    assert "stream_options" not in node_body(parse_chat(chat(stream=False)))


def test_body_for_node_does_not_mutate_the_request() -> None:
    request = parse_chat(chat(stream=True, stream_options={"x": 1}, metadata={"k": "v"}))
    before = copy.deepcopy(request.body)
    node_body(request)
    assert request.body == before


def test_parse_embeddings_accepts_string_and_list() -> None:
    assert parse_embeddings(b'{"model": "e", "input": "x"}').model == "e"
    request = parse_embeddings(b'{"model": "e", "input": ["a", "b"], "dimensions": 8}')
    assert request.body["dimensions"] == 8
    assert orjson.loads(body_for_node(request, "up"))["model"] == "up"


@pytest.mark.parametrize("value", [..., None, "", []])
def test_parse_embeddings_rejects_missing_or_empty_input(value: Any) -> None:
    body = {"model": "e"} if value is ... else {"model": "e", "input": value}
    with pytest.raises(InvalidRequest) as info:
        parse_embeddings(orjson.dumps(body))
    assert info.value.param == "input"
    assert "'input' is required" in info.value.message


def test_parse_embeddings_rejects_non_string_input() -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_embeddings(b'{"model": "e", "input": 5}')
    assert info.value.param == "input"


def test_parse_embeddings_requires_model() -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_embeddings(b'{"input": "x"}')
    assert info.value.param == "model"
