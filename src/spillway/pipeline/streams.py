"""Committed streams, as the pipeline hands them to a front door: a node's, relayed chunk by
chunk and never buffered, and a cached answer's, replayed.

From the commit point on, a node failure ends the stream with an error (``error`` is set when
iteration stops) and the door says so in its protocol, with no end-of-stream marker, so no
client mistakes a cut answer for a complete one. Closing the stream (``aclose``, which the
door calls however it finishes) closes the upstream request at once, frees the node's slot,
offers a complete answer to the cache, and writes the request's one ledger record.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from functools import partial

from spillway.cache.answers import from_stream
from spillway.errors import SpillwayError, StreamInterrupted, UpstreamError
from spillway.nodes.tokens import TokenCounter
from spillway.pipeline.accounting import Accountant, Tally
from spillway.pipeline.calls import Route
from spillway.pipeline.sharing import Sharing
from spillway.routing.dispatch import OpenStream
from spillway.secrets import Redactor
from spillway.wire.requests import ChatRequest
from spillway.wire.sse import SseEvent
from spillway.wire.streams import ChunkRelay, Usage

log = logging.getLogger("spillway.server")

#: The most characters of a node's in-band error passed on (to the client, the log).
MAX_NODE_WORDS = 1000


class UpstreamStream:
    """A node's stream after its first chunk arrived. Owns the request's tally from here."""

    def __init__(
        self,
        opened: OpenStream,
        chat: ChatRequest,
        route: Route,
        tally: Tally,
        accountant: Accountant,
        redactor: Redactor,
        sharing: Sharing | None,
    ):
        self.route = route
        self.error: SpillwayError | None = None
        self.idle_s = opened.handle.timeouts.idle_s
        self._opened = opened
        self._chat = chat
        self._tally = tally
        self._accountant = accountant
        self._redactor = redactor
        self._sharing = sharing
        self._relay = ChunkRelay(include_usage=chat.include_usage)
        self._broken: StreamInterrupted | None = None
        self._saw_done = False
        self._ended = False
        self._closed = False
        self._iterating: AsyncGenerator[bytes, None] | None = None
        tally.ended("incomplete")  # until the stream really ends well

    def __aiter__(self) -> AsyncIterator[bytes]:
        self._iterating = self._chunks()
        return self._iterating

    def client_gone(self, cancelled: bool = False) -> None:
        """The client went away: on a failed write (``incomplete``), or by cancelling the
        request (``error``), as docs/ledger.md tells them apart."""
        self._tally.ended("error" if cancelled else "incomplete", "client_disconnected")

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        tally = self._tally
        try:
            if not self._ended and tally.error_code is None:
                tally.ended("error", "internal_error")
            self._settle_usage()
            sharing = self._sharing
            if sharing is not None and tally.status == "ok":
                node = self._opened.handle.name
                build = partial(from_stream, self._relay, node=node, now=sharing.now)
                sharing.offer(build, tally.usage, tally.counting)
        finally:
            try:
                if self._iterating is not None:
                    await self._iterating.aclose()  # a door that stopped reading early
                await self._opened.aclose()
            finally:
                if self._sharing is not None:
                    self._sharing.settle()
                self._accountant.close(tally)

    async def _chunks(self) -> AsyncGenerator[bytes, None]:
        async for out in self._relayed():
            yield out
        outcome = self._broken or self._ending()
        if outcome is None:
            self._ended = True
            async for extra in self._usage_chunk():
                yield extra
            self._tally.ended("ok")
            return
        self._opened.broke()
        self._tally.ended("incomplete", outcome.code)
        log.warning("request %s: %s", self._tally.request_id, outcome.message)
        self.error, self._ended = outcome, True

    async def _relayed(self) -> AsyncIterator[bytes]:
        """The node's chunks as they come, until its ``[DONE]`` (or the end of its stream)."""
        node = self._opened.handle.name
        event: SseEvent | None = self._opened.first
        chunk = self._opened.first_chunk
        while event is not None and not event.is_done:
            out = self._relay.observe(event.data, chunk) if event.event != "error" else None
            if event.event == "error" or self._relay.error_message is not None:
                said = self._redactor.excerpt(
                    self._relay.error_message or "error event", MAX_NODE_WORDS
                )
                self._broken = StreamInterrupted(node, f"failed mid-stream: {said}")
                return
            if out is not None:
                yield out
            try:
                event = await anext(self._opened.rest, None)
            except UpstreamError as exc:
                self._broken = StreamInterrupted(node, f"failed mid-stream: {exc.detail}")
                return
            chunk = None
        self._saw_done = event is not None

    def _ending(self) -> StreamInterrupted | None:
        """Why a stream that stopped sending broke, or None if it ended well."""
        node = self._opened.handle.name
        if not self._saw_done:
            return StreamInterrupted(node, "closed the stream before it finished (no [DONE])")
        if self._relay.chunks and not self._relay.finish_reasons:
            # Every OpenAI-compatible engine names why it stopped before [DONE]; a [DONE]
            # without it is an answer cut short (llama-cpp-python's interrupt_requests).
            return StreamInterrupted(node, "ended the stream without a finish_reason")
        return None

    async def _usage_chunk(self) -> AsyncIterator[bytes]:
        """The usage chunk the client asked for, when the node sent none: count it now."""
        if not self._chat.include_usage or self._relay.usage is not None:
            return
        counting = self._accountant.count_later(self._tally, self._count)
        usage, estimated = await counting
        self._tally.used(usage, estimated)
        yield self._relay.usage_chunk(usage)

    def _settle_usage(self) -> None:
        """The node's usage if it sent one (or we counted it already), else count it later."""
        tally = self._tally
        if tally.usage is not None or tally.counting is not None:
            return
        if self._relay.usage is not None:
            tally.used(self._relay.usage)
            return
        self._accountant.count_later(tally, self._count)

    def _count(self, counter: TokenCounter) -> Usage:
        prompt = counter.prompt_tokens(self._chat.body)
        relay = self._relay
        single_choice = len(relay.finish_reasons) == 1
        if single_choice and relay.finish_reasons[0] == "length" and self._chat.max_tokens:
            completion = self._chat.max_tokens  # the node stopped exactly at the limit
        else:
            # Text past what the relay keeps is counted by its length, like the estimate.
            past = (relay.overflow_chars + 3) // 4
            completion = counter.completion_tokens(relay.text) + past
        return Usage(prompt, completion)


class ReplayStream:
    """A cached answer replayed as a stream's chunks; its tally closes with it."""

    def __init__(
        self,
        chunks: Iterator[bytes],
        route: Route,
        tally: Tally,
        accountant: Accountant,
        idle_s: float,
    ):
        self.route = route
        self.error: SpillwayError | None = None
        self.idle_s = idle_s
        self._chunks = chunks
        self._tally = tally
        self._accountant = accountant
        self._closed = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._replay()

    async def _replay(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks:
            yield chunk

    def client_gone(self, cancelled: bool = False) -> None:
        self._tally.ended("error" if cancelled else "incomplete", "client_disconnected")

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._accountant.close(self._tally)
