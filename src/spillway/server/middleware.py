"""Middleware, as a plain fold: request id → errors as OpenAI envelopes → auth on /v1."""

from __future__ import annotations

import logging
import re

from aiohttp import web
from aiohttp.typedefs import Handler

from spillway import ids
from spillway.errors import (
    InvalidRequest,
    PayloadTooLarge,
    SpillwayError,
)
from spillway.pipeline.principal import Principal
from spillway.server.cors import CORS
from spillway.server.responses import error_response
from spillway.server.state import GATEWAY

log = logging.getLogger("spillway.server")

REQUEST_ID = web.RequestKey("request_id", str)
PRINCIPAL = web.RequestKey("principal", Principal)
#: whether REQUEST_ID came from the client (then it may repeat, and the ledger keys its own)
CLIENT_ID = web.RequestKey("client_id", bool)
#: set when nothing more can be read from the connection (its body stalled or does not
#: decode): the answer is sent, then the connection closed
CLOSE_CONNECTION = web.RequestKey("close_connection", bool)
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
#: The most characters of a client's text (a path) quoted back in an error message.
QUOTED_CHARS = 100


def request_id_of(request: web.Request) -> str:
    return request[REQUEST_ID]


def client_supplied_id(request: web.Request) -> bool:
    return CLIENT_ID in request and request[CLIENT_ID]


def principal_of(request: web.Request) -> Principal:
    return request[PRINCIPAL]


@web.middleware
async def gateway_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Gives every request an id, checks its key on /v1 and /admin, and turns every failure
    into the OpenAI error envelope. One middleware rather than three: each is a coroutine
    frame on every request."""
    supplied = request.headers.get("x-request-id", "")
    rid = supplied if supplied and _CLIENT_ID.match(supplied) else ids.request_id()
    request[REQUEST_ID] = rid
    request[CLIENT_ID] = rid == supplied
    try:
        cors = request.app[CORS]
        if cors.is_preflight(request):  # sent without the key, by the browser itself
            response: web.StreamResponse = cors.preflight(request)
        else:
            _authenticate(request)
            response = await handler(request)
    except SpillwayError as exc:
        response = error_response(exc, request.app[GATEWAY].redactor)
    except web.HTTPException as exc:
        response = error_response(_from_http(exc, request), request.app[GATEWAY].redactor)
    except Exception:
        log.exception("request %s failed unexpectedly", rid)
        response = error_response(
            SpillwayError(f"Internal error; quote request id {rid} when reporting it."),
            request.app[GATEWAY].redactor,
        )
    if not response.prepared:
        response.headers["x-request-id"] = rid
    if request.get(CLOSE_CONNECTION, False) or _body_left_unread(request):
        await _answer_and_close(request, response)
    return response


def _body_left_unread(request: web.Request) -> bool:
    """Answered without reading the body (a 401, say): aiohttp would go on reading it for up
    to 10 s to reuse the connection, and a connection busy with that cannot make room under
    ``server.max_connections``: keyless clients could hold every one. Closing costs a client
    that sent a refused request one new connection."""
    return request.body_exists and not request.content.is_eof()


async def _answer_and_close(request: web.Request, response: web.StreamResponse) -> None:
    """Send the answer now and drop the connection. Left to itself, aiohttp would read on
    after the answer for up to 10 s to drain the unread body, and would log a body that
    does not decode a second time, as a traceback."""
    response.force_close()
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionError:
        pass  # the client has gone already
    request.protocol.force_close()  # flushes what was written, then closes


def _authenticate(request: web.Request) -> None:
    """Every /v1 and /admin route needs a valid key when keys are configured."""
    if request.path.startswith(("/v1/", "/admin/")):
        keys = request.app[GATEWAY].keys
        request[PRINCIPAL] = keys.authenticate(request.headers.get("Authorization"))


def _from_http(exc: web.HTTPException, request: web.Request) -> SpillwayError:
    if exc.status == 413:
        return PayloadTooLarge(
            f"The request body is larger than {request.app[GATEWAY].config.server.max_body_bytes}"
            " bytes. Send a smaller request."
        )
    if exc.status == 404:
        error = InvalidRequest(
            f"Unknown path {_quoted(request, request.path)}. See /v1/models, /v1/chat/completions."
        )
        error.status, error.code = 404, "unknown_url"
        return error
    if exc.status == 405:
        path = _quoted(request, request.path)
        error = InvalidRequest(f"{_quoted(request, request.method)} is not allowed on {path}.")
        error.status, error.code = 405, "method_not_allowed"
        return error
    error = InvalidRequest(exc.reason)
    error.status = exc.status
    return error


def _quoted(request: web.Request, text: str) -> str:
    """A client's text fit to quote in an error."""
    return request.app[GATEWAY].redactor.excerpt(text, QUOTED_CHARS, "…")
