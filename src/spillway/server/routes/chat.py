"""POST /v1/chat/completions and POST /v1/embeddings."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

from aiohttp import web

from spillway.cache.answers import CachedAnswer, from_reply, from_stream
from spillway.cache.merging import wait_for_leader
from spillway.cache.service import Hit, Probe
from spillway.errors import InvalidRequest, SpillwayError
from spillway.nodes.tokens import TokenCounter
from spillway.routing.dispatch import RequestContext
from spillway.routing.router import NodeHandle
from spillway.server.accounting import Tally
from spillway.server.body import read_within_limits
from spillway.server.cached import Sharing, cache_headers, replay
from spillway.server.middleware import client_supplied_id, principal_of, request_id_of
from spillway.server.responses import route_headers
from spillway.server.state import GATEWAY, Gateway
from spillway.server.streaming import relay_stream
from spillway.wire.requests import ChatRequest, EmbeddingsRequest, parse_chat, parse_embeddings
from spillway.wire.streams import ChunkRelay, Usage, reply_text, reply_usage

#: A client may shorten the request's deadline (all attempts included) with this header.
TIMEOUT_HEADER = "x-spillway-timeout"


async def chat_completions(request: web.Request) -> web.StreamResponse:
    gateway = request.app[GATEWAY]
    with accounted(gateway, request) as tally:
        chat = parse_chat(await read_body(request, gateway))
        tally.model = chat.model
        ctx = _context(request, gateway)
        probe = gateway.cache.probe(
            chat.body, request.headers, ctx.tenant, chat.model, ctx.private_only
        )
        if probe.keys is None:
            status = cache_headers("bypass", probe.note)
            return await _upstream(request, gateway, chat, ctx, tally, None, status)
        return await _cached_or_upstream(request, gateway, chat, ctx, tally, probe)


async def _cached_or_upstream(
    request: web.Request,
    gateway: Gateway,
    chat: ChatRequest,
    ctx: RequestContext,
    tally: Tally,
    probe: Probe,
) -> web.StreamResponse:
    """A hit; else the answer of an identical request in flight; else our own upstream call."""
    assert probe.keys is not None
    # An unknown model is a 404 even when an old entry for it is still in the cache (on the
    # bypass path the dispatcher makes this check itself).
    gateway.router.check_eligible(chat.model, ctx.private_only)
    cache, clock = gateway.cache, gateway.clock
    lookup = await cache.lookup(probe)
    if lookup.hit is not None:
        return await _from_cache(request, gateway, chat, ctx, tally, lookup.hit, probe.note)
    leader = cache.merger.follow(probe.keys.exact)
    if leader is not None:
        shared = await wait_for_leader(leader, ctx.deadline - clock.monotonic())
        if shared is not None:
            cache.merger.count_merged()
            hit = Hit("exact", CachedAnswer.from_bytes(shared))
            return await _from_cache(request, gateway, chat, ctx, tally, hit, merged=True)
    sharing = Sharing(cache, probe, lookup.vector, leads=leader is None, now=clock.wall())
    status = cache_headers("miss", probe.note)
    try:
        return await _upstream(request, gateway, chat, ctx, tally, sharing, status)
    finally:
        sharing.settle()


async def _from_cache(
    request: web.Request,
    gateway: Gateway,
    chat: ChatRequest,
    ctx: RequestContext,
    tally: Tally,
    hit: Hit,
    note: str = "",
    merged: bool = False,
) -> web.StreamResponse:
    tally.from_cache = hit.answer
    now = gateway.clock.wall()
    return await replay(request, hit, chat, ctx.request_id, now, note, merged)


async def _upstream(
    request: web.Request,
    gateway: Gateway,
    chat: ChatRequest,
    ctx: RequestContext,
    tally: Tally,
    sharing: Sharing | None,
    cache_status: dict[str, str],
) -> web.StreamResponse:
    """Dispatch to the fleet; with ``sharing``, offer the answer to the cache afterwards."""
    gateway.accountant.reserve(tally, chat)
    tools = gateway.config.cache.cache_tool_calls
    if not chat.stream:
        answer = await gateway.dispatcher.complete(chat, ctx)
        body, handle = answer.reply.body, answer.handle
        _note_reply(tally, handle, chat, body)
        if sharing is not None:
            now = gateway.clock.wall()
            build = partial(from_reply, body, node=handle.name, now=now, tools=tools)
            sharing.offer(build, tally.usage, handle, tally.count_later)
        return _json(body, {**route_headers(handle, ctx.request_id), **cache_status})
    stream = await gateway.dispatcher.open_stream(chat, ctx)
    tally.answered_by(stream.handle, chat.model)
    tally.ttft_ms = int(1000 * (gateway.clock.monotonic() - tally.started))
    headers = {**route_headers(stream.handle, ctx.request_id), **cache_status}
    relay = ChunkRelay(include_usage=chat.include_usage)
    response = await relay_stream(request, stream, chat, headers, gateway.redactor, tally, relay)
    if sharing is not None and tally.status == "ok":
        now = gateway.clock.wall()
        build = partial(from_stream, relay, node=stream.handle.name, now=now)
        sharing.offer(build, tally.usage, stream.handle, tally.count_later)
    return response


async def embeddings(request: web.Request) -> web.StreamResponse:
    gateway = request.app[GATEWAY]
    with accounted(gateway, request) as tally:
        embed = parse_embeddings(await read_body(request, gateway))
        gateway.accountant.reserve(tally, embed)
        ctx = _context(request, gateway)
        answer = await gateway.dispatcher.complete(embed, ctx)
        _note_reply(tally, answer.handle, embed, answer.reply.body)
        return _json(answer.reply.body, route_headers(answer.handle, ctx.request_id))


@contextmanager
def accounted(gateway: Gateway, request: web.Request) -> Iterator[Tally]:
    """One ledger record for this request, however it ends."""
    tally = gateway.accountant.open(
        request_id_of(request), principal_of(request), client_supplied_id(request)
    )
    try:
        yield tally
    except SpillwayError as exc:
        tally.status, tally.error_code = "error", exc.code or exc.error_type
        raise
    except web.HTTPException as exc:  # aiohttp's own refusals, e.g. a chunked body too large
        tally.status = "error"
        tally.error_code = "payload_too_large" if exc.status == 413 else f"http_{exc.status}"
        raise
    except asyncio.CancelledError:
        # The client went away before its answer began.
        tally.status, tally.error_code = "error", "client_disconnected"
        raise
    except Exception:
        tally.status, tally.error_code = "error", "internal_error"
        raise
    finally:
        gateway.accountant.close(tally)


def _note_reply(
    tally: Tally, handle: NodeHandle, request: ChatRequest | EmbeddingsRequest, body: bytes
) -> None:
    tally.answered_by(handle, request.model)
    tally.usage = reply_usage(body)
    if tally.usage is None:  # the node reported none: count it once the client has its answer

        def count(counter: TokenCounter) -> Usage:
            if isinstance(request, EmbeddingsRequest):
                return Usage(counter.completion_tokens(request.text()), 0)
            prompt = counter.prompt_tokens(request.body)
            return Usage(prompt, counter.completion_tokens(reply_text(body)))

        tally.count_later = count


async def read_body(request: web.Request, gateway: Gateway) -> bytes:
    """The raw body, within the size and time limits of ``[server]`` (``server/body.py``)."""
    return await read_within_limits(request, gateway.config.server)


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
