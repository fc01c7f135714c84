"""Counting tokens when a node streams without usage (llama-cpp-python's server is one).

``GgufTokenCounter`` uses the model's own tokenizer and chat template from its GGUF file,
the way llama-cpp-python builds the prompt, so its counts match the node's non-streaming
usage. Without a tokenizer we estimate (about four bytes of the body a token) and say so.

``most_prompt_tokens`` is not an estimate but an upper bound, for budget reservations.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Protocol

import orjson

_BYTES_PER_TOKEN = 4
#: Role markers and separators a chat template adds per message, for the estimate.
_TOKENS_PER_MESSAGE = 4
#: For the bound: what a chat template adds around each message beyond its text (ChatML's
#: "<|im_start|>", "\n", "<|im_end|>", "\n" are 4), and the "▁" a SentencePiece tokenizer
#: puts before each piece of text it tokenizes (1); 8 leaves room for templates not seen yet.
_MOST_FRAMING_PER_PART = 8
#: ... and around the whole prompt: BOS, the generation prompt, and text the template writes
#: itself, such as a default system prompt (SmolLM2's: 21 tokens) or a tool-use preamble.
_MOST_FRAMING_PER_REQUEST = 256


class TokenCounter(Protocol):
    """Counts prompt and completion tokens for one node's model. Calls may block briefly."""

    exact: bool

    def prompt_tokens(self, body: dict[str, Any]) -> int: ...

    def completion_tokens(self, text: str) -> int: ...


class EstimatingCounter:
    """A rough count for nodes whose tokenizer spillway does not have."""

    exact = False

    def prompt_tokens(self, body: dict[str, Any]) -> int:
        # The whole body, not only the message text: tools, schemas, names, tool calls and
        # content parts are prompt as well, and fields we do not know yet may be too.
        messages = body.get("messages")
        count = len(messages) if isinstance(messages, list) else 0
        return _estimate(len(orjson.dumps(body))) + _TOKENS_PER_MESSAGE * count

    def completion_tokens(self, text: str) -> int:
        return _estimate(len(text.encode("utf-8")))


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


def most_prompt_tokens(sent_bytes: int, parts: int) -> int:
    """The most prompt tokens a node can bill for a body of ``sent_bytes`` bytes holding
    ``parts`` messages (or embedding inputs); docs/ledger.md#budgets says why it holds.

    A byte-level BPE or byte-fallback SentencePiece token stands for at least one byte of the
    text it was cut from, and all of that text is in the body, whichever field holds it; JSON
    only adds quotes, keys and commas. A token array spends at least one digit on each of its
    tokens. What is not in the body is what the template writes itself: the framing allowance.
    """
    return sent_bytes + _MOST_FRAMING_PER_PART * parts + _MOST_FRAMING_PER_REQUEST


def _estimate(size: int) -> int:
    return (size + _BYTES_PER_TOKEN - 1) // _BYTES_PER_TOKEN
