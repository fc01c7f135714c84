"""The contract every upstream node meets, whatever engine serves it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from spillway.config.schema import Timeouts
from spillway.wire.sse import SseEvent


@dataclass(frozen=True, slots=True)
class Reply:
    """A complete (non-streamed) successful answer, passed to the client byte for byte."""

    status: int
    body: bytes
    content_type: str
    #: ``body`` parsed: always a JSON object (a node that answers anything else has failed),
    #: parsed once here so that nothing after the node needs to parse it again
    data: dict[str, Any]


class Node(Protocol):
    """One OpenAI-compatible upstream (vLLM, SGLang, MindIE, llama.cpp, or a cloud API).

    Methods raise only ``spillway.errors.UpstreamError`` subclasses; every library exception
    is translated inside the implementation.
    """

    name: str

    async def chat(self, body: bytes, timeouts: Timeouts) -> Reply:
        """POST a non-streaming chat completion and return the node's JSON answer."""
        ...

    def stream(self, body: bytes, timeouts: Timeouts) -> AsyncIterator[SseEvent]:
        """POST a streaming chat completion and yield its SSE events as they arrive.

        The first event must arrive within ``first_token_s``, each next one within ``idle_s``,
        all of them within ``total_s``. Closing the iterator cancels the upstream request.
        """
        ...

    async def embed(self, body: bytes, timeouts: Timeouts) -> Reply:
        """POST an embeddings request."""
        ...

    async def probe(self, timeout_s: float) -> None:
        """Return if the node answers ``GET /models``; raise ``UpstreamError`` otherwise."""
        ...

    async def aclose(self) -> None: ...
