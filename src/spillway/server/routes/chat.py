"""POST /v1/chat/completions and POST /v1/embeddings."""

from __future__ import annotations

from aiohttp import web

from spillway.errors import InvalidRequest, PayloadTooLarge
from spillway.routing.dispatch import RequestContext
from spillway.server.middleware import principal_of, request_id_of
from spillway.server.responses import route_headers
from spillway.server.state import GATEWAY, Gateway
from spillway.server.streaming import relay_stream
from spillway.wire.requests import parse_chat, parse_embeddings

#: A client may shorten the request's deadline (all attempts included) with this header.
TIMEOUT_HEADER = "x-spillway-timeout"


async def chat_completions(request: web.Request) -> web.StreamResponse:
    gateway = request.app[GATEWAY]
    chat = parse_chat(await read_body(request, gateway))
    ctx = _context(request, gateway)
    if not chat.stream:
        answer = await gateway.dispatcher.complete(chat, ctx)
        return _json(answer.reply.body, route_headers(answer.handle, ctx.request_id))
    stream = await gateway.dispatcher.open_stream(chat, ctx)
    headers = route_headers(stream.handle, ctx.request_id)
    return await relay_stream(request, stream, chat, headers, gateway.redactor)


async def embeddings(request: web.Request) -> web.StreamResponse:
    gateway = request.app[GATEWAY]
    embed = parse_embeddings(await read_body(request, gateway))
    ctx = _context(request, gateway)
    answer = await gateway.dispatcher.complete(embed, ctx)
    return _json(answer.reply.body, route_headers(answer.handle, ctx.request_id))


async def read_body(request: web.Request, gateway: Gateway) -> bytes:
    """The raw body, refused with 413 before reading when its declared size is over the limit."""
    limit = gateway.config.server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"The request body is larger than {limit} bytes. Send less.")
    return await request.read()  # aiohttp enforces the same limit on chunked bodies


def _context(request: web.Request, gateway: Gateway) -> RequestContext:
    principal = principal_of(request)
    return RequestContext(
        request_id=request_id_of(request),
        tenant=principal.tenant,
        private_only=principal.private_only,
        deadline=gateway.clock.monotonic() + _budget_s(request, gateway),
    )


def _budget_s(request: web.Request, gateway: Gateway) -> float:
    """The configured deadline, shortened (never lengthened) by the client's header."""
    configured = gateway.config.timeouts.deadline_s
    asked = request.headers.get(TIMEOUT_HEADER)
    if asked is None:
        return configured
    try:
        seconds = float(asked)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise InvalidRequest(
            f"Header {TIMEOUT_HEADER} must be a positive number of seconds, e.g. 30 or 2.5.",
            param=TIMEOUT_HEADER,
        )
    return min(seconds, configured)


def _json(body: bytes, headers: dict[str, str]) -> web.Response:
    return web.Response(body=body, content_type="application/json", headers=headers)
