"""Cache keys: what decides the answer is in the key, the tenant scopes it, text normalises."""

from __future__ import annotations

from typing import Any

import pytest

from spillway.cache.keys import derive, last_user_text, normalise_text

SECRET = b"k" * 32


def body(**extra: Any) -> dict[str, Any]:
    return {
        "model": "m",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        "temperature": 0,
        **extra,
    }


def test_same_request_same_key_and_tenants_never_share_one() -> None:
    a, b = derive(SECRET, "team-a", body()), derive(SECRET, "team-a", body())
    assert a == b
    other = derive(SECRET, "team-b", body())
    assert other.exact != a.exact and other.scope != a.scope


def test_the_secret_is_part_of_the_key() -> None:
    assert derive(SECRET, "t", body()).exact != derive(b"x" * 32, "t", body()).exact


@pytest.mark.parametrize(
    "change",
    [
        {"model": "other"},
        {"temperature": 0.0001},
        {"max_tokens": 10},
        {"top_p": 0.5},
        {"seed": 1},
        {"stop": ["\n"]},
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
        {"response_format": {"type": "json_object"}},
    ],
)
def test_every_answer_deciding_field_changes_the_exact_key(change: dict[str, Any]) -> None:
    assert derive(SECRET, "t", body()).exact != derive(SECRET, "t", body(**change)).exact


@pytest.mark.parametrize(
    "change",
    [
        {"stream": True},
        {"stream": True, "stream_options": {"include_usage": True}},
        {"user": "alice"},
        {"metadata": {"trace": "1"}},
    ],
)
def test_transport_fields_do_not_change_the_key(change: dict[str, Any]) -> None:
    assert derive(SECRET, "t", body()).exact == derive(SECRET, "t", body(**change)).exact


def test_field_order_does_not_matter() -> None:
    reordered = dict(reversed(list(body().items())))
    assert derive(SECRET, "t", reordered).exact == derive(SECRET, "t", body()).exact


def test_whitespace_and_unicode_normalise() -> None:
    spaced = body()
    spaced["messages"][1]["content"] = "  What is\u00a0the  capital of France?\r\n"
    assert derive(SECRET, "t", spaced).exact == derive(SECRET, "t", body()).exact
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    assert normalise_text(composed) == normalise_text(decomposed)


def test_indentation_and_superscripts_are_meaning_and_stay() -> None:
    assert normalise_text("if x:\n    y") != normalise_text("if x:\n y")
    assert normalise_text("x²") != normalise_text("x2")


def test_scope_covers_everything_but_the_last_user_turn() -> None:
    paraphrase = body()
    paraphrase["messages"][1]["content"] = "Which city is the capital of France?"
    a, b = derive(SECRET, "t", body()), derive(SECRET, "t", paraphrase)
    assert a.exact != b.exact and a.scope == b.scope
    assert b.prompt == "Which city is the capital of France?"
    other_system = body()
    other_system["messages"][0]["content"] = "Answer in French."
    assert derive(SECRET, "t", other_system).scope != a.scope
    assert derive(SECRET, "t", body(max_tokens=5)).scope != a.scope


@pytest.mark.parametrize(
    ("last", "expected"),
    [
        ({"role": "user", "content": "hi"}, "hi"),
        (
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
            "a\nb",
        ),
        ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, None),
        ({"role": "assistant", "content": "prefill"}, None),
        ({"role": "tool", "content": "42", "tool_call_id": "c1"}, None),
        ({"role": "user", "content": "   "}, None),
    ],
)
def test_only_a_plain_text_user_turn_is_matched_semantically(
    last: dict[str, Any], expected: str | None
) -> None:
    assert last_user_text({"messages": [last]}) == expected
    keys = derive(SECRET, "t", {"model": "m", "messages": [last]})
    assert (keys.scope is None) == (expected is None)
