"""The OpenAI front door's rendering: errors as OpenAI's envelope (secrets scrubbed), and the
headers that tell the caller what happened to its request."""

from __future__ import annotations

import orjson
from aiohttp import web

from spillway.errors import SpillwayError
from spillway.pipeline.calls import Route
from spillway.secrets import Redactor

#: Response header: the node that answered.
NODE_HEADER = "x-spillway-node"
#: Response header: private, cloud or cache.
SOURCE_HEADER = "x-spillway-source"
#: Response header: hit-exact, hit-semantic, miss or bypass (chat only).
CACHE_HEADER = "x-spillway-cache"
#: Response header: why the cache did less than the request asked (bypassed, or exact
#: lookups where semantic ones were asked for). Absent when it did what was asked.
CACHE_NOTE_HEADER = "x-spillway-cache-note"
#: Response header on an answer shared from an identical request already in flight.
MERGED_HEADER = "x-spillway-merged"


def error_body(exc: SpillwayError, redactor: Redactor) -> dict[str, object]:
    """OpenAI's ``{"error": {"message", "type", "param", "code"}}``. An error's ``kind`` is
    named after OpenAI's types, so it is the type as it is."""
    return {
        "error": {
            "message": redactor.scrub(exc.message),
            "type": exc.kind,
            "param": exc.param,
            "code": exc.code,
        }
    }


def error_headers(exc: SpillwayError) -> dict[str, str]:
    return {} if exc.retry_after_s is None else {"Retry-After": str(exc.retry_after_s)}


def error_response(exc: SpillwayError, redactor: Redactor) -> web.Response:
    return web.Response(
        body=orjson.dumps(error_body(exc, redactor)),
        status=exc.status,
        content_type="application/json",
        headers=error_headers(exc),
    )


def route_headers(route: Route, request_id: str) -> dict[str, str]:
    """What happened, for the caller: which node answered and from where, and the cache's
    part in it."""
    headers = {SOURCE_HEADER: route.source, "x-request-id": request_id}
    if route.node is not None:
        headers[NODE_HEADER] = route.node
    if route.cache is not None:
        headers[CACHE_HEADER] = route.cache
    if route.cache_note:
        headers[CACHE_NOTE_HEADER] = route.cache_note
    if route.merged:
        headers[MERGED_HEADER] = "true"
    return headers
