"""Relaying a committed upstream stream to the client, chunk by chunk, never buffered.

Headers went out when the first upstream chunk arrived (the commit point, see
``routing.dispatch``). From here a node failure ends the stream with an SSE ``error`` event
and no ``[DONE]``, so no client mistakes a cut answer for a complete one. A client that goes
away cancels this handler, which closes the upstream request at once.
"""

from __future__ import annotations

import logging

from aiohttp import web

from spillway.errors import StreamInterrupted, UpstreamError
from spillway.nodes.tokens import TokenCounter
from spillway.routing.dispatch import OpenStream
from spillway.secrets import Redactor
from spillway.server.accounting import Tally, count_tokens
from spillway.server.responses import error_body
from spillway.wire.requests import ChatRequest
from spillway.wire.sse import DONE_EVENT, SseEvent, encode_data, encode_error
from spillway.wire.streams import ChunkRelay, Usage

log = logging.getLogger("spillway.server")

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # tell nginx in front of us not to buffer the stream
}


class _SseResponse(web.StreamResponse):
    """Headers leave with the first event, in one write. Sent on their own (aiohttp's
    default for a StreamResponse) they cost a second write, about 40 µs of time to first
    token here; aiohttp's ``web.Response`` buffers them the same way."""

    _send_headers_immediately = False


async def relay_stream(
    request: web.Request,
    stream: OpenStream,
    chat: ChatRequest,
    headers: dict[str, str],
    redactor: Redactor,
    tally: Tally,
    relay: ChunkRelay,
) -> web.StreamResponse:
    """Relay the stream; ``relay`` (made by the caller) keeps what the stream said."""
    response = _SseResponse(status=200, headers={**SSE_HEADERS, **headers})
    tally.status = "incomplete"  # until the stream really ends well
    try:
        await response.prepare(request)
        outcome = await _pump(response, stream, relay, redactor)
        if outcome is None:
            await _finish(response, stream, chat, relay, tally)
            tally.status = "ok"
        else:
            stream.broke()
            tally.error_code = outcome.code
            log.warning("request %s: %s", headers.get("x-request-id"), outcome.message)
            await response.write(encode_error(error_body(outcome, redactor)))
    except ConnectionResetError:
        tally.error_code = "client_disconnected"
        log.info("request %s: client went away mid-stream", headers.get("x-request-id"))
    finally:
        _settle_usage(tally, stream, chat, relay)
        await stream.aclose()
    return response


#: The most characters of a node's in-band error passed on (to the client, the log).
MAX_NODE_WORDS = 1000


def _node_words(text: str, redactor: Redactor) -> str:
    """A node's text fit to pass on: scrubbed whole, then cut (cut first, a key split at the
    cut would no longer be recognised, and its first half would go out)."""
    return redactor.scrub(text)[:MAX_NODE_WORDS]


def _settle_usage(tally: Tally, stream: OpenStream, chat: ChatRequest, relay: ChunkRelay) -> None:
    """The node's usage if it sent one (or we counted it already), else count it later."""
    if tally.usage is not None:
        return
    if relay.usage is not None:
        tally.usage = relay.usage
        return
    tally.count_later = lambda counter: _count(counter, chat, relay)


async def _pump(
    response: web.StreamResponse, stream: OpenStream, relay: ChunkRelay, redactor: Redactor
) -> StreamInterrupted | None:
    """Forward events until ``[DONE]``; return why the stream broke, or None if it ended well."""
    node = stream.handle.name
    event: SseEvent | None = stream.first
    while event is not None:
        if event.is_done:
            if relay.chunks and not relay.finish_reasons:
                # Every OpenAI-compatible engine names why it stopped before [DONE]; a [DONE]
                # without it is an answer cut short (llama-cpp-python's interrupt_requests).
                return StreamInterrupted(node, "ended the stream without a finish_reason")
            return None
        out = relay.observe(event.data) if event.event != "error" else None
        if event.event == "error" or relay.error_message is not None:
            said = _node_words(relay.error_message or "error event", redactor)
            return StreamInterrupted(node, f"failed mid-stream: {said}")
        if out is not None:
            await response.write(encode_data(out))
        try:
            event = await anext(stream.rest, None)
        except UpstreamError as exc:
            return StreamInterrupted(node, f"failed mid-stream: {exc.detail}")
    return StreamInterrupted(node, "closed the stream before it finished (no [DONE])")


async def _finish(
    response: web.StreamResponse,
    stream: OpenStream,
    chat: ChatRequest,
    relay: ChunkRelay,
    tally: Tally,
) -> None:
    if chat.include_usage and relay.usage is None:
        # The node sent no usage: count it now, the client asked for it before [DONE].
        tally.usage, tally.usage_estimated = await count_tokens(
            stream.handle, lambda counter: _count(counter, chat, relay)
        )
        await response.write(encode_data(relay.usage_chunk(tally.usage)))
    await response.write(DONE_EVENT)
    await response.write_eof()


def _count(counter: TokenCounter, chat: ChatRequest, relay: ChunkRelay) -> Usage:
    prompt = counter.prompt_tokens(chat.body)
    single_choice = len(relay.finish_reasons) == 1
    if single_choice and relay.finish_reasons[0] == "length" and chat.max_tokens:
        completion = chat.max_tokens  # the node stopped exactly at the limit
    else:
        completion = counter.completion_tokens(relay.text)
    return Usage(prompt, completion)
