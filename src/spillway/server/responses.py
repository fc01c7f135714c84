"""The OpenAI front door's rendering: errors as OpenAI's envelope (secrets scrubbed), and the
headers that tell the caller what happened to its request."""

from __future__ import annotations

import math

import orjson
from aiohttp import web

from spillway.errors import RateLimitExceeded, SpillwayError
from spillway.pipeline.calls import Route
from spillway.quota import Quota
from spillway.secrets import Redactor
from spillway.wire.errors import error_body

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


def error_headers(exc: SpillwayError) -> dict[str, str]:
    headers = {} if exc.retry_after_s is None else {"Retry-After": str(exc.retry_after_s)}
    if isinstance(exc, RateLimitExceeded):
        headers.update(quota_headers(exc.quota))
    return headers


def quota_headers(quota: Quota) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*``: a triple for each limit the key has (rpm, tpm)."""
    headers = {}
    if quota.limit_requests is not None:
        headers["x-ratelimit-limit-requests"] = str(quota.limit_requests)
        headers["x-ratelimit-remaining-requests"] = str(quota.remaining_requests)
        headers["x-ratelimit-reset-requests"] = duration(quota.reset_requests_s)
    if quota.limit_tokens is not None:
        headers["x-ratelimit-limit-tokens"] = str(quota.limit_tokens)
        headers["x-ratelimit-remaining-tokens"] = str(quota.remaining_tokens)
        headers["x-ratelimit-reset-tokens"] = duration(quota.reset_tokens_s)
    return headers


def duration(seconds: float) -> str:
    """A duration as OpenAI writes its resets: ``20ms``, ``1.5s``, ``6m0s``."""
    ms = math.ceil(seconds * 1000)
    if ms < 1000:
        return f"{ms}ms"
    if ms < 60_000:
        return f"{ms / 1000:g}s"
    minutes, rest = divmod(ms, 60_000)
    return f"{minutes}m{rest / 1000:g}s"


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
    if route.quota is not None:
        headers.update(quota_headers(route.quota))
    return headers
