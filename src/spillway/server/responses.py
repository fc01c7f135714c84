"""Building responses: errors as OpenAI envelopes (secrets scrubbed) and routing headers."""

from __future__ import annotations

import orjson
from aiohttp import web

from spillway.errors import SpillwayError
from spillway.routing.router import NodeHandle
from spillway.secrets import Redactor


def error_body(exc: SpillwayError, redactor: Redactor) -> dict[str, object]:
    envelope = exc.envelope()
    envelope["error"]["message"] = redactor.scrub(exc.message)
    return envelope


def error_response(exc: SpillwayError, redactor: Redactor) -> web.Response:
    return web.Response(
        body=orjson.dumps(error_body(exc, redactor)),
        status=exc.status,
        content_type="application/json",
        headers=exc.headers(),
    )


def route_headers(handle: NodeHandle, request_id: str) -> dict[str, str]:
    """What happened, for the caller: which node answered and whether it was private or cloud."""
    return {
        "x-spillway-node": handle.name,
        "x-spillway-source": handle.kind,
        "x-request-id": request_id,
    }
