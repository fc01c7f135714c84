"""Reading a request's body within its limits: its size (``server.max_body_bytes``), the time
it may take to arrive (``server.body_timeout_s``), and a ``Content-Encoding`` that decodes.

When the body stalls or does not decode, nothing after it on the connection can be parsed:
the request is marked so that the middleware closes the connection once the error is sent.
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError

from spillway.config.schema import ServerConfig
from spillway.errors import InvalidRequest, PayloadTooLarge
from spillway.server.middleware import CLOSE_CONNECTION

#: The encodings aiohttp decodes; only these are named back to the client.
_ENCODINGS = frozenset({"gzip", "x-gzip", "deflate", "br", "zstd"})


async def read_within_limits(request: web.Request, server: ServerConfig) -> bytes:
    """The whole body, decompressed as its ``Content-Encoding`` says (aiohttp does that)."""
    limit = server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    try:
        if request.content.is_eof():  # came whole with the head (most do): no timer needed
            return await request.read()
        async with asyncio.timeout(server.body_timeout_s):
            return await request.read()  # aiohttp enforces the same limit on chunked bodies
    except TimeoutError:
        request[CLOSE_CONNECTION] = True
        raise _too_slow(server.body_timeout_s) from None
    except web.RequestPayloadError as exc:
        request[CLOSE_CONNECTION] = True
        raise _undecodable(request, exc) from None
    except web.HTTPRequestEntityTooLarge:  # a chunked body that grew past the limit
        raise _too_large(limit) from None


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"The request body is larger than {limit} bytes. Send less.")


def _too_slow(seconds: float) -> InvalidRequest:
    error = InvalidRequest(
        f"The request body did not arrive within {seconds:g} s of its headers "
        "(server.body_timeout_s). Send the whole body at once."
    )
    error.status, error.code = 408, "body_timeout"
    return error


def _undecodable(request: web.Request, exc: web.RequestPayloadError) -> InvalidRequest:
    """aiohttp's payload error names its cause: a body that does not decode as its
    ``Content-Encoding`` says, or framing that does not add up (chunks, Content-Length)."""
    if isinstance(exc.__cause__, ContentEncodingError):
        encoding = request.headers.get("Content-Encoding", "").strip().lower()
        if encoding not in _ENCODINGS:  # a header's text is not echoed; a known name is
            encoding = "encoded"
        message = (
            f"The request body is not valid {encoding} data, though its Content-Encoding "
            "header says so. Send it uncompressed, or compressed whole."
        )
        return InvalidRequest(message, param="Content-Encoding", code="invalid_body_encoding")
    return InvalidRequest(
        "The request body is malformed: it does not match its Content-Length or its "
        "chunked framing. Send the whole body as the headers describe it.",
        code="malformed_body",
    )
