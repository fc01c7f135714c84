"""A cached answer: what is stored, what may be stored, and how it is replayed.

What is stored is always a complete ``chat.completion`` object with its usage, whether the
answer first came as JSON or as a stream (a stream is assembled from its chunks). A hit is
replayed as JSON, or as the chunks of a stream when the client asked for one: a role chunk,
the content, the finish chunk, and a usage chunk when the client asked for one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from spillway.ids import random_hex
from spillway.wire.streams import ChunkRelay, Usage

#: Bumped when the stored layout changes; older entries then read as misses.
FORMAT = 1
_STORABLE_FINISH = frozenset({"stop", "length"})


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    body: dict[str, Any]  # a chat.completion object
    usage: Usage
    node: str | None  # the node that first answered: what a hit saves is its cost
    stored_at: float  # wall-clock epoch seconds

    def to_bytes(self) -> bytes:
        return orjson.dumps(
            {
                "v": FORMAT,
                "body": self.body,
                "usage": [self.usage.prompt_tokens, self.usage.completion_tokens],
                "node": self.node,
                "at": self.stored_at,
            }
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> CachedAnswer:
        """Raises ValueError on anything but a well-formed entry of this format."""
        try:
            data = orjson.loads(raw)
            if data["v"] != FORMAT or not isinstance(data["body"], dict):
                raise ValueError("unknown cache entry format")
            prompt, completion = data["usage"]
            usage = Usage(int(prompt), int(completion))
            return cls(data["body"], usage, data["node"], float(data["at"]))
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"unreadable cache entry: {exc}") from None


def from_reply(
    data: dict[str, Any], usage: Usage, node: str, now: float, tools: bool
) -> CachedAnswer | None:
    """A complete JSON answer (as the node client parsed it) worth storing, or None (an
    error, a filtered or cut-off choice, several choices, log-probabilities, or tool calls
    when they are not cached)."""
    if data.get("error"):
        return None
    choices = data.get("choices")
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        return None
    choice = choices[0]
    finish, message = choice.get("finish_reason"), choice.get("message")
    if not isinstance(message, dict) or choice.get("logprobs") is not None:
        return None
    calls_tools = bool(message.get("tool_calls") or message.get("function_call"))
    if calls_tools and not tools:
        return None
    if finish not in _STORABLE_FINISH and not (tools and finish == "tool_calls"):
        return None
    return CachedAnswer(data, usage, node, now)


def from_stream(relay: ChunkRelay, usage: Usage, node: str, now: float) -> CachedAnswer | None:
    """A stream that ended well, assembled into the JSON answer it stands for."""
    if not relay.plain_text or relay.finish_reasons[-1:] not in (["stop"], ["length"]):
        return None
    if len(relay.finish_reasons) != 1:
        return None
    meta = relay.meta
    body = {
        "id": meta.get("id", ""),
        "object": "chat.completion",
        "created": meta.get("created", int(now)),
        "model": meta.get("model", ""),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": relay.content},
                "logprobs": None,
                "finish_reason": relay.finish_reasons[0],
            }
        ],
        "usage": usage.as_openai(),
    }
    if "system_fingerprint" in meta:
        body["system_fingerprint"] = meta["system_fingerprint"]
    return CachedAnswer(body, usage, node, now)


def replay_body(answer: CachedAnswer, now: float) -> bytes:
    """The stored answer as this request's JSON answer (its own id and time)."""
    return orjson.dumps({**answer.body, **_fresh_identity(now)})


def replay_chunks(answer: CachedAnswer, now: float, include_usage: bool) -> Iterator[bytes]:
    """The stored answer as the chunks of a stream (each a ``chat.completion.chunk`` as JSON;
    the front door frames them)."""
    head = {
        **_fresh_identity(now),
        "object": "chat.completion.chunk",
        "model": answer.body.get("model", ""),
    }
    if "system_fingerprint" in answer.body:
        head["system_fingerprint"] = answer.body["system_fingerprint"]
    choice = answer.body["choices"][0]
    message = choice.get("message") or {}
    for delta in _deltas(message):
        yield orjson.dumps({**head, "choices": [_choice(delta, None)]})
    yield orjson.dumps({**head, "choices": [_choice({}, choice.get("finish_reason"))]})
    if include_usage:
        yield orjson.dumps({**head, "choices": [], "usage": answer.usage.as_openai()})


def _deltas(message: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield {"role": "assistant", "content": ""}
    if isinstance(message.get("content"), str) and message["content"]:
        yield {"content": message["content"]}
    for i, call in enumerate(message.get("tool_calls") or ()):
        yield {"tool_calls": [{"index": i, **call}]}


def _choice(delta: dict[str, Any], finish: Any) -> dict[str, Any]:
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


def _fresh_identity(now: float) -> dict[str, Any]:
    return {"id": "chatcmpl-" + random_hex(12), "created": int(now)}
