"""Bounds on what a request body may be: how deep it nests, how long its model name is."""

from __future__ import annotations

import orjson
import pytest

from spillway.errors import InvalidRequest
from spillway.secrets import Redactor
from spillway.wire.errors import error_body
from spillway.wire.requests import (
    MAX_MODEL_CHARS,
    MAX_NESTING,
    body_for_node,
    parse_chat,
    parse_embeddings,
)

MESSAGES = [{"role": "user", "content": "hi"}]


def nested(levels: int, kind: str = "array") -> bytes:
    """JSON ``levels`` deep, [[[…]]] or {"a": {"a": …}}, written by hand: orjson writes no
    more than 254 levels."""
    if kind == "array":
        return b"[" * levels + b"]" * levels
    return b'{"a":' * (levels - 1) + b"{}" + b"}" * (levels - 1)


def chat_with(extra: bytes) -> bytes:
    """A chat body whose ``extra`` field sits at level 2 (the body is level 1)."""
    return b'{"model": "m", "messages": [{"role": "user"}], "extra": ' + extra + b"}"


@pytest.mark.parametrize("kind", ["array", "object"])
@pytest.mark.parametrize("depth", [MAX_NESTING + 1, 255, 1023])
def test_a_body_nested_too_deep_is_refused_naming_the_limit(depth: int, kind: str) -> None:
    """255 to 1,023 levels: orjson parsed the body, then could not write it for the node,
    and the client got 500 with a traceback in the log."""
    raw = chat_with(nested(depth - 1, kind))
    assert orjson.loads(raw)  # orjson parses it, so only spillway's own bound stops it
    with pytest.raises(InvalidRequest, match=f"more than {MAX_NESTING} levels deep") as info:
        parse_chat(raw)
    assert info.value.status == 400


def test_a_body_at_the_limit_is_accepted_and_reaches_the_node_intact() -> None:
    raw = chat_with(nested(MAX_NESTING - 1))
    request = parse_chat(raw)
    sent = orjson.loads(body_for_node(request, "node-model"))
    assert sent["extra"] == orjson.loads(nested(MAX_NESTING - 1))


def test_deep_nesting_inside_messages_counts_too() -> None:
    content = b'[{"type": "text", "x": ' + nested(MAX_NESTING) + b"}]"
    raw = b'{"model": "m", "messages": [{"role": "user", "content": ' + content + b"}]}"
    with pytest.raises(InvalidRequest, match="levels deep"):
        parse_chat(raw)


def test_embeddings_refuse_deep_nesting_and_accept_token_arrays() -> None:
    with pytest.raises(InvalidRequest, match="levels deep"):
        parse_embeddings(b'{"model": "m", "input": ' + nested(300) + b"}")
    tokens = [[1, 2, 3]] * 100
    assert parse_embeddings(orjson.dumps({"model": "m", "input": tokens})).body["input"] == tokens


def test_a_model_name_over_the_limit_is_refused_without_echoing_it() -> None:
    """Before, a 1 MB model name was accepted, echoed in the 404 and stored in the ledger."""
    name = "m" * 1_000_000
    for parse, body in [
        (parse_chat, {"model": name, "messages": MESSAGES}),
        (parse_embeddings, {"model": name, "input": "x"}),
    ]:
        with pytest.raises(InvalidRequest) as info:
            parse(orjson.dumps(body))
        error = info.value
        assert error.status == 400
        assert error.param == "model"
        assert f"at most {MAX_MODEL_CHARS}" in error.message
        assert len(str(error_body(error, Redactor([])))) < 500


def test_a_model_name_at_the_limit_is_accepted() -> None:
    name = "m" * MAX_MODEL_CHARS
    assert parse_chat(orjson.dumps({"model": name, "messages": MESSAGES})).model == name


@pytest.mark.parametrize("model", ["m\nforged row", "m\x1b]8;;http://x\x1b\\", "m\x00", "m\x85"])
def test_a_model_name_with_control_characters_is_refused(model: str) -> None:
    """It is stored in the ledger and printed by `spillway report`: a line break forged a
    table row, an escape sequence ran in the operator's terminal."""
    with pytest.raises(InvalidRequest, match="control characters") as caught:
        parse_chat(orjson.dumps({"model": model, "messages": MESSAGES}))
    assert caught.value.param == "model"
