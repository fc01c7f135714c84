"""POST /v1/chat/completions and POST /v1/embeddings: the OpenAI front door.

Thin adapters over the pipeline: read and parse the body in OpenAI's format, hand the call
to ``Pipeline``, and render what comes back (a JSON answer, or server-sent events).
"""

from __future__ import annotations

from aiohttp import web

from spillway.pipeline.calls import Answer, Call, Stream
from spillway.server.body import read_within_limits
from spillway.server.middleware import client_supplied_id, principal_of, request_id_of
from spillway.server.responses import route_headers
from spillway.server.state import GATEWAY
from spillway.server.streaming import send_stream
from spillway.wire.requests import ChatRequest, EmbeddingsRequest, parse_chat, parse_embeddings


async def chat_completions(request: web.Request) -> web.StreamResponse:
    gateway = request.app[GATEWAY]

    async def inbound() -> ChatRequest:
        return parse_chat(await read_within_limits(request, gateway.config.server))

    result = await gateway.pipeline.chat(_call(request), inbound)
    return await _respond(request, result)


async def embeddings(request: web.Request) -> web.StreamResponse:
    gateway = request.app[GATEWAY]

    async def inbound() -> EmbeddingsRequest:
        return parse_embeddings(await read_within_limits(request, gateway.config.server))

    return await _respond(request, await gateway.pipeline.embeddings(_call(request), inbound))


def _call(request: web.Request) -> Call:
    return Call(
        principal_of(request),
        request_id_of(request),
        client_supplied_id(request),
        request.headers,  # x-spillway-cache, cache-control, x-spillway-timeout
    )


async def _respond(request: web.Request, result: Answer | Stream) -> web.StreamResponse:
    headers = route_headers(result.route, request_id_of(request))
    if isinstance(result, Answer):
        return web.Response(body=result.body, content_type="application/json", headers=headers)
    return await send_stream(request, result, headers, request.app[GATEWAY].redactor)
