"""What the client sees of an upstream chat stream, chunk by chunk, and what we learn from it.

spillway always asks the node for usage (``stream_options.include_usage``). ``ChunkRelay``
passes each chunk on unchanged, except that the usage chunk (and any ``usage`` field) is
withheld from clients that did not ask for it. It also keeps what accounting needs: the
node's usage if it sends one, else the generated text so tokens can be counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_openai(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


#: The most tokens a node's usage may claim for one answer. Beyond it (or below 0) the figure
#: is not believed: the answer's tokens are counted instead. No context window is near it, and
#: a node's 2**63 once stopped the ledger (SQLite cannot store it) and a negative count made a
#: negative cost that refilled a budget.
MAX_USAGE_TOKENS = 100_000_000


def usage_from(payload: Any) -> Usage | None:
    """A node's usage object, if it is one to believe (whole numbers, 0 to MAX_USAGE_TOKENS)."""
    if not isinstance(payload, dict):
        return None
    prompt = _tokens(payload.get("prompt_tokens"))
    completion = _tokens(payload.get("completion_tokens", 0))  # embeddings have none
    if prompt is None or completion is None:
        return None
    return Usage(prompt, completion)


def _tokens(value: Any) -> int | None:
    if type(value) is int and 0 <= value <= MAX_USAGE_TOKENS:
        return value
    return None


def reply_usage(data: dict[str, Any]) -> Usage | None:
    """The usage a node reported in a complete (non-streamed) answer, if any."""
    return usage_from(data.get("usage"))


def reply_text(data: dict[str, Any]) -> str:
    """The generated text of a complete chat answer, for counting its tokens."""
    choices = data.get("choices")
    parts: list[str] = []
    for choice in choices if isinstance(choices, list) else ():
        message = choice.get("message") if isinstance(choice, dict) else None
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            parts.append(message["content"])
    return "".join(parts)


@dataclass
class ChunkRelay:
    """Observes one upstream stream; ``observe`` returns the bytes to forward, or None."""

    include_usage: bool
    usage: Usage | None = None
    #: set when the node reported an error inside the stream
    error_message: str | None = None
    chunks: int = 0
    finish_reasons: list[str] = field(default_factory=list)
    #: False once the stream carried anything beyond one choice's plain text (tool calls,
    #: log-probabilities, reasoning, a refusal, a second choice): it cannot be replayed
    #: faithfully from the text alone, so the cache leaves it alone
    plain_text: bool = True
    #: characters of generated text past MAX_GATHERED_CHARS: not kept, only counted
    overflow_chars: int = 0
    _text: list[str] = field(default_factory=list)
    _content: list[str] = field(default_factory=list)
    _gathered: int = 0
    _meta: dict[str, Any] = field(default_factory=dict)

    def observe(self, data: bytes, chunk: Any = None) -> bytes | None:
        """The bytes to forward for one event's data (None: forward nothing). ``chunk`` is
        the data already parsed, when the caller had to parse it first (the commit point)."""
        if chunk is None:
            chunk = parse_chunk(data)
        if not isinstance(chunk, dict):  # an OpenAI stream carries chunks: this one is broken
            self.error_message = "sent an event that is not a chunk (not a JSON object)"
            return None
        if _is_error(chunk):
            self.error_message = _error_message(chunk["error"])
            return None
        self.chunks += 1
        if not self._meta:
            self._meta = {k: chunk[k] for k in _META_FIELDS if k in chunk}
        self._gather(chunk.get("choices"))
        if "usage" not in chunk:
            return data
        reported = usage_from(chunk["usage"])
        if reported is not None:
            self.usage = reported
        if self.include_usage:
            return data
        if reported is not None and not chunk.get("choices"):
            return None  # the usage-only chunk the client did not ask for
        del chunk["usage"]
        return orjson.dumps(chunk)

    @property
    def text(self) -> str:
        return "".join(self._text)

    @property
    def content(self) -> str:
        """The answer's message content (no tool-call arguments or reasoning)."""
        return "".join(self._content)

    @property
    def meta(self) -> dict[str, Any]:
        """id, created, model... as the node sent them in its first chunk."""
        return dict(self._meta)

    def usage_chunk(self, usage: Usage) -> bytes:
        """A final usage chunk in the node's own id/model, for nodes that sent none."""
        chunk = dict(self._meta)
        chunk.setdefault("object", "chat.completion.chunk")
        chunk["choices"] = []
        chunk["usage"] = usage.as_openai()
        return orjson.dumps(chunk)

    def _gather(self, choices: Any) -> None:
        if not isinstance(choices, list):
            return
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            reason = choice.get("finish_reason")
            if isinstance(reason, str) and len(self.finish_reasons) < MAX_FINISH_REASONS:
                self.finish_reasons.append(reason)
            if choice.get("index", 0) != 0 or choice.get("logprobs") is not None:
                self.plain_text = False
            delta = choice.get("delta")
            if isinstance(delta, dict):
                self._gather_delta(delta)

    def _gather_delta(self, delta: dict[str, Any]) -> None:
        content = delta.get("content")
        if isinstance(content, str) and self._gathered + len(content) <= MAX_GATHERED_CHARS:
            self._content.append(content)
        for key in ("content", "reasoning_content", "refusal"):
            if isinstance(delta.get(key), str):
                self._keep(delta[key])
        if any(delta.get(k) for k in _NOT_PLAIN):
            self.plain_text = False
        for call in delta.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                for key in ("name", "arguments"):
                    if isinstance(value := function.get(key), str):
                        self._keep(value)

    def _keep(self, text: str) -> None:
        """Gather text up to MAX_GATHERED_CHARS; past it, only count it (and the answer is
        then too long to cache: its content is no longer whole)."""
        if self._gathered + len(text) <= MAX_GATHERED_CHARS:
            self._text.append(text)
            self._gathered += len(text)
        else:
            self.overflow_chars += len(text)
            self.plain_text = False


#: The most generated text a relay keeps from one stream, for the cache's copy and for counting
#: tokens when the node reports none. A stream itself is not limited (it is relayed as it
#: comes); without this, a node streaming for its whole total_s would make the gateway hold
#: everything it said. 4 Mi characters is about a million tokens.
MAX_GATHERED_CHARS = 4 * 1024 * 1024
#: finish reasons kept: one per choice, and a request asks for at most 128 choices
MAX_FINISH_REASONS = 256
_META_FIELDS = ("id", "object", "created", "model", "system_fingerprint")
_NOT_PLAIN = ("tool_calls", "function_call", "reasoning_content", "refusal", "audio")


def _error_message(error: Any) -> str:
    """The node's words, whole: whoever shows them scrubs them first, then cuts (a cut before
    the scrub can leave half a key that no longer looks like one). The SSE decoder bounds an
    event's size."""
    message = error.get("message") if isinstance(error, dict) else None
    if isinstance(message, str):
        return message
    return str(error)


def parse_chunk(data: bytes) -> Any:
    """An event's data as JSON, or None when it is not JSON."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def is_error_chunk(chunk: Any) -> bool:
    """Is this parsed SSE data an in-band error (``{"error": {...}}``) rather than a chunk?"""
    return _is_error(chunk)


def _is_error(payload: Any) -> bool:
    return isinstance(payload, dict) and bool(payload.get("error"))
