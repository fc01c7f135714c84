"""Answering from the cache, and handing fresh answers to it (and to merged followers)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web

from spillway.cache.answers import CachedAnswer, replay_body, replay_events
from spillway.cache.service import Hit, Probe, ResponseCache
from spillway.cache.vectors import Vector
from spillway.nodes.tokens import TokenCounter
from spillway.routing.router import NodeHandle
from spillway.server.accounting import count_tokens
from spillway.server.streaming import SSE_HEADERS
from spillway.wire.requests import ChatRequest
from spillway.wire.streams import Usage

#: Response header: hit-exact, hit-semantic, miss or bypass.
CACHE_HEADER = "x-spillway-cache"
#: Response header: why the cache did less than the request asked (bypassed, or exact
#: lookups where semantic ones were asked for). Absent when it did what was asked.
CACHE_NOTE_HEADER = "x-spillway-cache-note"
#: Response header on an answer shared from an identical request already in flight.
MERGED_HEADER = "x-spillway-merged"


def cache_headers(status: str, note: str) -> dict[str, str]:
    """``x-spillway-cache``, and the note saying why the cache did less than asked."""
    return {CACHE_HEADER: status, CACHE_NOTE_HEADER: note} if note else {CACHE_HEADER: status}


async def replay(
    request: web.Request,
    hit: Hit,
    chat: ChatRequest,
    request_id: str,
    now: float,
    note: str,
    merged: bool,
) -> web.StreamResponse:
    """The cached answer as JSON, or as a complete SSE stream when the client asked for one."""
    headers = {
        **cache_headers(f"hit-{hit.kind}", note),
        "x-spillway-source": "cache",
        "x-request-id": request_id,
    }
    if merged:
        headers[MERGED_HEADER] = "true"
    if not chat.stream:
        body = replay_body(hit.answer, now)
        return web.Response(body=body, content_type="application/json", headers=headers)
    response = web.StreamResponse(status=200, headers={**SSE_HEADERS, **headers})
    await response.prepare(request)
    await response.write(b"".join(replay_events(hit.answer, now, chat.include_usage)))
    await response.write_eof()
    return response


Build = Callable[[Usage], CachedAnswer | None]
Count = Callable[[TokenCounter], Usage]


class Sharing:
    """A cache miss's duty: store its answer if it is worth keeping and, as the leader of
    identical requests in flight, hand it to them. ``settle`` (always called) releases the
    followers with nothing when no answer was offered: then each goes upstream itself."""

    def __init__(
        self, cache: ResponseCache, probe: Probe, vector: Vector | None, leads: bool, now: float
    ):
        self._cache = cache
        self._probe = probe
        self._vector = vector
        self._leads = leads
        self._now = now
        self._offered = False
        self._finished = False
        self._tasks: set[asyncio.Task[None]] = set()

    def offer(
        self, build: Build, usage: Usage | None, handle: NodeHandle, count: Count | None
    ) -> None:
        """An answer the client has in full; ``usage`` None means count it first."""
        if usage is not None:
            self._offered = True
            self._publish(build(usage))
        elif count is not None:
            self._offered = True
            task = asyncio.create_task(self._count_then_publish(build, handle, count))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def settle(self) -> None:
        if not self._offered:
            self._finish(None)

    async def _count_then_publish(self, build: Build, handle: NodeHandle, count: Count) -> None:
        try:
            usage, _estimated = await count_tokens(handle, count)
            self._publish(build(usage))
        finally:
            self._finish(None)  # a no-op when _publish already finished

    def _publish(self, answer: CachedAnswer | None) -> None:
        if answer is None:
            self._finish(None)
            return
        self._finish(answer.to_bytes())
        self._cache.store_later(self._probe, answer, self._vector)

    def _finish(self, value: bytes | None) -> None:
        # Once only: a later request with the same key may lead a new round by then.
        if self._leads and not self._finished and self._probe.keys is not None:
            self._finished = True
            self._cache.merger.finish(self._probe.keys.exact, value)
