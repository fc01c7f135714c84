"""Sending a committed stream to an OpenAI client as server-sent events.

Headers leave with the first chunk (the pipeline returns the stream only after its first
upstream chunk arrived: the commit point). A stream that ends well gets ``data: [DONE]``; one
that broke gets an SSE ``error`` event and no ``[DONE]``, so no client mistakes a cut answer
for a complete one. A client that goes away cancels this handler; either way the stream is
closed, which closes the upstream request at once and writes the ledger record.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from spillway.pipeline.calls import Stream
from spillway.secrets import Redactor
from spillway.wire.errors import error_body
from spillway.wire.sse import DONE_EVENT, encode_error

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


class _ClientStalled(Exception):
    """The client read nothing of what it was sent for ``idle_s``."""


class _Sender:
    """Writes to the client, and gives up on one that stops reading: a write waits (for the
    client to read) only once the socket's send buffer is full, so it is bounded by
    ``idle_s`` only then, and costs nothing extra while the client keeps up."""

    def __init__(self, request: web.Request, response: web.StreamResponse, idle_s: float):
        self._transport = request.transport
        self._response = response
        self._idle_s = idle_s

    async def __call__(self, data: bytes) -> None:
        transport = self._transport
        if transport is None or not transport.get_write_buffer_size():
            await self._response.write(data)
            return
        try:
            async with asyncio.timeout(self._idle_s):
                await self._response.write(data)
        except TimeoutError:
            raise _ClientStalled from None


async def send_stream(
    request: web.Request, stream: Stream, headers: dict[str, str], redactor: Redactor
) -> web.StreamResponse:
    response = _SseResponse(status=200, headers={**SSE_HEADERS, **headers})
    send = _Sender(request, response, stream.idle_s)
    try:
        await response.prepare(request)
        async for chunk in stream:
            await send(b"data: " + chunk + b"\n\n")
        if stream.error is None:
            await send(DONE_EVENT)
        else:
            await send(encode_error(error_body(stream.error, redactor)))
        await response.write_eof()
    except (ConnectionResetError, _ClientStalled):
        stream.client_gone()
        response.force_close()
    except asyncio.CancelledError:
        stream.client_gone(cancelled=True)
        raise
    finally:
        await stream.aclose()
    return response
