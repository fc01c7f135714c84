"""Parsing and checking OpenAI request bodies.

We check only the fields spillway acts on (``model``, ``messages``, ``stream``, ``max_tokens``,
``n``, ``stream_options``, ``input``) and pass every other field to the node untouched.
No pydantic here: this runs on every request.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from spillway.errors import InvalidRequest

#: Fields some gateways honour to pick the upstream. Honouring them would let a client point
#: spillway (and its cloud keys) at any host, so they are refused outright.
STEERING_FIELDS = frozenset(
    {
        "api_base",
        "base_url",
        "api_key",
        "api_version",
        "api_type",
        "azure_endpoint",
        "custom_llm_provider",
        "extra_headers",
        "extra_query",
        "proxy",
        "upstream",
        "endpoint",
    }
)
#: The deepest a body may nest objects and arrays (the body itself is level 1). Real requests
#: stay near 10: OpenAI's structured outputs allow a schema 10 levels deep, and it sits at
#: level 5 of a body (``tools[].function.parameters``). The bound must stay below 255:
#: orjson parses up to 1024 levels but writes at most 254, so a deeper body would be
#: accepted here and then fail on its way to the node.
MAX_NESTING = 64
#: The longest ``model`` accepted. It is echoed in errors and kept in every ledger record;
#: real names are under 100 characters.
MAX_MODEL_CHARS = 256
#: Unicode's control characters (category Cc): a terminal would run what they hide (escape
#: sequences, line breaks), so nothing that `spillway report` prints may carry them.
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A checked chat-completion request; ``body`` is the client's JSON object, unchanged."""

    body: dict[str, Any]
    model: str
    stream: bool
    include_usage: bool
    #: the most output tokens per choice: the larger of max_tokens and max_completion_tokens
    max_tokens: int | None


@dataclass(frozen=True, slots=True)
class EmbeddingsRequest:
    body: dict[str, Any]
    model: str

    def text(self) -> str:
        """The input as one text (token arrays are counted by their length elsewhere)."""
        value = self.body.get("input")
        if isinstance(value, str):
            return value
        return " ".join(v for v in value or () if isinstance(v, str))


def parse_json_object(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise InvalidRequest("The request body is empty; send a JSON object.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    _check_object(body, _may_nest_deeper(raw, MAX_NESTING))
    return body


def _check_object(body: dict[str, Any], may_nest_deeper: bool = True) -> None:
    """Not too deep, and no field that would steer the upstream."""
    if may_nest_deeper and _nests_deeper(body, MAX_NESTING):
        raise InvalidRequest(
            f"The request body nests objects and arrays more than {MAX_NESTING} levels deep."
            f" Send at most {MAX_NESTING} levels."
        )
    for field in STEERING_FIELDS.intersection(body):
        raise InvalidRequest(
            f"'{field}' is not accepted: spillway chooses the upstream node from its own "
            "configuration. Remove the field.",
            param=field,
        )


def parse_chat(raw: bytes) -> ChatRequest:
    return _chat(parse_json_object(raw))


def check_chat(body: dict[str, Any]) -> ChatRequest:
    """``parse_chat`` for a body already parsed (a batch line's)."""
    _check_object(body)
    return _chat(body)


def _chat(body: dict[str, Any]) -> ChatRequest:
    model = _model(body)
    _messages(body.get("messages"))
    stream = _optional(body, "stream", bool, False)
    options = _optional(body, "stream_options", dict, None)
    if options is not None and not stream:
        raise InvalidRequest(
            "'stream_options' is only allowed when 'stream' is true.", param="stream_options"
        )
    include_usage = bool(options and options.get("include_usage") is True)
    legacy_max = _positive_int(body, "max_tokens")
    newer_max = _positive_int(body, "max_completion_tokens")
    # The node gets both and may honour either, so the larger is the most it may write.
    max_tokens = max(legacy_max or 0, newer_max or 0) or None
    n = _positive_int(body, "n")
    if n is not None and n > 128:
        raise InvalidRequest("'n' must be at most 128.", param="n")
    return ChatRequest(body, model, stream, include_usage, max_tokens)


def parse_embeddings(raw: bytes) -> EmbeddingsRequest:
    return _embeddings(parse_json_object(raw))


def check_embeddings(body: dict[str, Any]) -> EmbeddingsRequest:
    """``parse_embeddings`` for a body already parsed (a batch line's)."""
    _check_object(body)
    return _embeddings(body)


def _embeddings(body: dict[str, Any]) -> EmbeddingsRequest:
    model = _model(body)
    value = body.get("input")
    if value is None or value == "" or value == []:
        raise InvalidRequest(
            "'input' is required: a string, a list of strings, or token arrays.", param="input"
        )
    if not isinstance(value, str | list):
        raise InvalidRequest("'input' must be a string or a list.", param="input")
    return EmbeddingsRequest(body, model)


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest(
            "'model' is required: a model name from GET /v1/models.", param="model"
        )
    if len(model) > MAX_MODEL_CHARS:
        # The name itself is not quoted: it is what is too long.
        raise InvalidRequest(
            f"'model' is {len(model)} characters long; at most {MAX_MODEL_CHARS} are allowed."
            " Use a model name from GET /v1/models.",
            param="model",
        )
    if CONTROL_CHARS.search(model):  # it is stored in the ledger and printed by `spillway report`
        raise InvalidRequest(
            "'model' contains control characters (a line break, an escape…). Use a model name "
            "from GET /v1/models.",
            param="model",
        )
    return model


def _may_nest_deeper(raw: bytes, limit: int) -> bool:
    """A body with no more opening brackets than ``limit`` cannot nest deeper than that:
    counting them runs in C at memory speed, so nearly every request (a chat has a dozen;
    a token array one or two, however long) skips the walk over its values."""
    return raw.count(b"[") + raw.count(b"{") > limit


def _nests_deeper(body: dict[str, Any], limit: int) -> bool:
    """Whether objects and arrays nest more than ``limit`` levels: one pass over the values,
    level by level (no recursion to overflow), costing about what parsing them did."""
    level: list[Any] = [body]
    for _ in range(limit):
        inner: list[Any] = []
        for container in level:
            # orjson makes exactly dict and list, so ``type() is`` is enough (and quicker)
            for value in container.values() if type(container) is dict else container:
                if type(value) is dict or type(value) is list:
                    inner.append(value)
        if not inner:
            return False
        level = inner
    return True


def _messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest(
            '\'messages\' is required: a non-empty list of {"role", "content"} objects.',
            param="messages",
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest(
                f"messages[{i}] must be an object with a string 'role'.", param=f"messages[{i}]"
            )


def _optional(body: dict[str, Any], field: str, kind: type, default: Any) -> Any:
    value = body.get(field)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise InvalidRequest(f"'{field}' must be a {_KIND_NAMES[kind]}.", param=field)
    return value


def _positive_int(body: dict[str, Any], field: str) -> int | None:
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequest(f"'{field}' must be a positive integer.", param=field)
    return value


_KIND_NAMES = {bool: "boolean", dict: "JSON object", str: "string", int: "integer"}


def body_for_node(request: ChatRequest | EmbeddingsRequest, node_model: str) -> bytes:
    """The client's body with the node's model name; streams always ask for usage."""
    body = dict(request.body)
    body["model"] = node_model
    if isinstance(request, ChatRequest) and request.stream:
        options = dict(body.get("stream_options") or {})
        options["include_usage"] = True
        body["stream_options"] = options
    return orjson.dumps(body)
