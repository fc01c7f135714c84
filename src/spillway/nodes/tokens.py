"""Counting tokens when a node streams without usage (llama-cpp-python's server is one).

``GgufTokenCounter`` uses the model's own tokenizer and chat template from its GGUF file,
the way llama-cpp-python builds the prompt, so its counts match the node's non-streaming
usage. Without a tokenizer we estimate (about four characters a token) and say so.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Protocol

_CHARS_PER_TOKEN = 4
#: Role markers and separators a chat template adds per message, for the estimate.
_TOKENS_PER_MESSAGE = 4


class TokenCounter(Protocol):
    """Counts prompt and completion tokens for one node's model. Calls may block briefly."""

    exact: bool

    def prompt_tokens(self, body: dict[str, Any]) -> int: ...

    def completion_tokens(self, text: str) -> int: ...


class EstimatingCounter:
    """A rough count for nodes whose tokenizer spillway does not have."""

    exact = False

    def prompt_tokens(self, body: dict[str, Any]) -> int:
        messages = body.get("messages") or []
        chars = sum(len(_content_text(m.get("content"))) for m in messages if isinstance(m, dict))
        return _estimate(chars) + _TOKENS_PER_MESSAGE * len(messages)

    def completion_tokens(self, text: str) -> int:
        return _estimate(len(text))


class GgufTokenCounter:
    """Exact counts from a GGUF model's vocabulary (loaded lazily, vocabulary only)."""

    exact = True

    def __init__(self, model_path: Path):
        self.model_path = model_path
        self._lock = threading.Lock()
        self._llama: Any = None
        self._formatter: Any = None

    def prompt_tokens(self, body: dict[str, Any]) -> int:
        llama, formatter = self._load()
        if formatter is None:
            return EstimatingCounter().prompt_tokens(body)
        prompt = formatter(
            messages=body.get("messages") or [],
            tools=body.get("tools"),
            tool_choice=body.get("tool_choice"),
        ).prompt
        return len(llama.tokenize(prompt.encode("utf-8"), add_bos=True, special=True))

    def completion_tokens(self, text: str) -> int:
        if not text:
            return 0
        llama, _ = self._load()
        return len(llama.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def _load(self) -> tuple[Any, Any]:
        with self._lock:
            if self._llama is None:
                self._llama, self._formatter = _load_vocab(self.model_path)
            return self._llama, self._formatter


def _load_vocab(model_path: Path) -> tuple[Any, Any]:
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llama = Llama(model_path=str(model_path), vocab_only=True, verbose=False)
    template = llama.metadata.get("tokenizer.chat_template")
    if not template:
        return llama, None
    eos, bos = llama.token_eos(), llama.token_bos()
    formatter = Jinja2ChatFormatter(
        template=template,
        eos_token=llama._model.token_get_text(eos) if eos != -1 else "",
        bos_token=llama._model.token_get_text(bos) if bos != -1 else "",
        stop_token_ids=[eos],
    )
    return llama, formatter


def counter_for(tokenizer: Path | None) -> TokenCounter:
    return GgufTokenCounter(tokenizer) if tokenizer is not None else EstimatingCounter()


def _estimate(chars: int) -> int:
    return (chars + _CHARS_PER_TOKEN - 1) // _CHARS_PER_TOKEN


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: count the text ones
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""
